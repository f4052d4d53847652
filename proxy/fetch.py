"""One upstream file being fetched (L{Download}), and what every kind of download gives the engine.

A L{Download} writes the upstream body to a temp file (the disk is the buffer), hashes it as it
arrives and wakes its followers, each of which reads the growing file at its own pace. Only a body
whose size and sha256 match the catalogue is committed; anything else discards the temp file and
fails every follower, which then aborts its client connection.

The engine that starts, verifies and commits downloads is L{proxy.downloads.Fetcher}; it drives
every kind of download (this file of a simplestreams upstream, the export of an LXD upstream's
image in L{proxy.lxd_fetch}) through L{Job}: how the body is received and what it must turn out
to be differ by kind, and nothing else does.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Callable, ClassVar, Protocol

from attrs import define, field, frozen
from treq import collect
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IResponse

from proxy.blobs import PartialBlob
from proxy.catalogue import Item
from proxy.errors import UpstreamFailed, VerificationFailed
from proxy.index import ImageParts
from proxy.observers import Observers

DEFAULT_IDLE_TIMEOUT_SECONDS = 60.0


class Receive(Protocol):
    """
    Hands C{response}'s body to C{sink}, at most C{limit} bytes, under the engine's idle
    timeout; fires when the body ended cleanly.
    """

    def __call__(
        self, response: IResponse, sink: Callable[[bytes], None], limit: int,
    ) -> "Deferred[int]": ...


@frozen
class StoredFile:
    """One verified file of a download: its temp file, and what its record says."""

    partial: PartialBlob
    sha256: str
    size: int
    # the file's path under its upstream, as the catalogue lists it
    path: str
    product: str
    version: str


@frozen
class Verified:
    """What a download turned out to be: its files, and the image's parts when it taught them."""

    files: tuple[StoredFile, ...]
    parts: ImageParts | None = None


class Job(Protocol):
    """
    One kind of download, as the engine drives it: it receives the body its own way, says what
    that body turned out to be (or raises L{VerificationFailed}), and tells its followers how it
    ended. Starting, health, the commit and the no-room rule are the engine's.
    """

    upstream: str
    url: str
    background: bool
    # waiting for its upstream's turn (L{proxy.download_slots}): nothing asked yet
    queued: bool

    @property
    def key(self) -> str:
        """What the engine keeps it in flight by: the file's sha256, the image's fingerprint."""

    @property
    def subject(self) -> str:
        """What is asked of the upstream, in messages: an item path, C{image FP}."""

    @property
    def transfer_subject(self) -> str:
        """What a transfer that failed is called in its error."""

    @property
    def size(self) -> int:
        """The bytes the upstream is expected to send (the files', without any framing)."""

    @property
    def received(self) -> int: ...

    @property
    def failure(self) -> Failure | None: ...

    @property
    def finished(self) -> bool: ...

    @property
    def partials(self) -> Sequence[PartialBlob]:
        """Every temp file it writes (or was given and does not use): discarded when not stored."""

    def busy(self) -> Collection[str]:
        """The sha256 of every file it will store, where known: not to be evicted meanwhile."""

    async def error_text(self, response: IResponse, receive: Receive) -> str:
        """Read and drop an error answer's body; what it says, or C{""}."""

    async def receive(self, response: IResponse, receive: Receive) -> None:
        """Take the body of a 200 answer (or raise, having read and dropped it)."""

    def verified(self) -> Verified:
        """What was received, checked against what it must be; raises L{VerificationFailed}."""

    def committed(self, verified: Verified, paths: Sequence[FilePath[Any]], *, stored: bool) -> None:
        """
        The files of C{verified} are readable at C{paths} (in their order): the blobs, or the
        temp files when C{stored} is False (no room: they go once every follower opened them).
        """

    def fail(self, failure: Failure) -> None: ...


@define(eq=False)
class Download:
    """
    One upstream file being fetched into the cache.

    It is a L{proxy.streaming.FileSource}: C{path}, C{size}, C{available()}, C{failure} and
    C{wait()} let any number of followers stream it while it arrives. C{when_done()} fires with
    the committed path, or fails. Every observer gets its own Deferred, so one that is cancelled
    (a client that went away) never cancels the download.
    """

    upstream: str
    url: str
    item: Item
    partial: PartialBlob
    size: int = field(init=False)
    failure: Failure | None = field(default=None, init=False)
    final_path: FilePath[Any] | None = field(default=None, init=False)
    streaming: bool = field(default=False, init=False)
    # started by the prefetcher rather than for a waiting client
    background: bool = field(default=False, init=False)
    # waiting for a download slot of its upstream: its clients have headers, no bytes yet
    queued: bool = field(default=False, init=False)
    # False when the verified file was streamed to its clients but not kept (no room)
    stored: bool = field(default=True, init=False)
    _observers: Observers[FilePath[Any]] = field(factory=Observers, init=False)
    _start_observers: Observers[None] = field(factory=Observers, init=False)
    _waiters: Observers[None] = field(factory=Observers, init=False)
    _received: int = field(default=0, init=False)
    # Told the validator of each whole body that starts (to write the sidecar, off the reactor).
    persist: Callable[["Download"], object] | None = field(default=None, kw_only=True)
    # The ETag (else Last-Modified) of the answer whose bytes are on disk, and the URL it
    # came from: If-Range is only ever sent back to that URL.
    validator: str = field(default="", init=False)
    validator_url: str = field(default="", init=False)
    # Body bytes received over every attempt, those dropped by a restart included.
    fetched: int = field(default=0, init=False)
    # How many times bytes that did not verify were dropped (see restart).
    discarded: int = field(default=0, init=False)
    # Set by the engine when its bytes are kept for a later download to continue.
    keep_partial: bool = field(default=False, init=False)
    # Whether the bytes on disk came in more than one answer (or from an earlier run): if they
    # do not verify, one whole body is asked for before the download fails.
    spliced: bool = field(default=False, init=False)

    # A download of one file can continue from the bytes on disk (L{resume_headers}).
    resumable: ClassVar[bool] = True

    def __attrs_post_init__(self) -> None:
        self.size = self.item.size

    @property
    def key(self) -> str:
        return self.item.sha256

    @property
    def subject(self) -> str:
        return self.item.path

    @property
    def transfer_subject(self) -> str:
        return self.item.path

    @property
    def partials(self) -> Sequence[PartialBlob]:
        return (self.partial,)

    def busy(self) -> Collection[str]:
        return (self.item.sha256,)

    @property
    def path(self) -> FilePath[Any]:
        # Once committed the temp name is gone; followers that open the file from now on must
        # use the final name. A follower that opened the temp file keeps a valid descriptor.
        return self.final_path if self.final_path is not None else self.partial.path

    @property
    def finished(self) -> bool:
        return self.final_path is not None or self.failure is not None

    def when_streaming(self) -> "Deferred[None]":
        """
        Fires once the upstream accepted the request (status 200, plausible length), so that a
        client can still be told a precise error for the common quick failures; fails with the
        download's failure otherwise.
        """
        if self.failure is not None:
            return fail(self.failure)
        if self.streaming or self.final_path is not None:
            return succeed(None)
        return self._start_observers.add()

    def start_streaming(self) -> None:
        self.streaming = True
        self._start_observers.fire(None)

    def when_done(self) -> "Deferred[FilePath[Any]]":
        if self.final_path is not None:
            return succeed(self.final_path)
        if self.failure is not None:
            return fail(self.failure)
        return self._observers.add()

    def available(self) -> int:
        # The last byte is held back until the file is verified and committed, so a follower
        # can never finish a response whose bytes are about to be rejected.
        if self.final_path is None:
            return min(self._received, self.size - 1)
        return self._received

    def wait(self) -> "Deferred[None]":
        return succeed(None) if self.finished else self._waiters.add()

    def _wake(self) -> None:
        self._waiters.fire(None)

    def data(self, chunk: bytes) -> None:
        self.partial.write(chunk)
        self.partial.flush()
        self._received += len(chunk)
        self.fetched += len(chunk)
        self._wake()

    # -- resuming ---------------------------------------------------------------------------

    def resume_headers(self, url: str) -> dict[bytes, bytes]:
        """
        The headers that ask C{url} for the bytes not on disk yet: none while there are none.

        C{If-Range} carries the validator only to the URL it came from (another mirror's
        ETag means nothing here); without it a changed file would be spliced, which the final
        sha256 check refuses, so the catalogue still guards every byte.
        """
        if self._received == 0:
            return {}
        headers = {b"Range": b"bytes=%d-" % self._received}
        if self.validator and url == self.validator_url:
            headers[b"If-Range"] = self.validator.encode("latin-1")
        return headers

    def took_over(self) -> None:
        """
        The partial left by an earlier run (L{PartialBlob.resumed}) has been rehashed: its
        bytes count as received, its validator as this download's.
        """
        resumed = self.partial.resumed
        if resumed is None:
            return
        if self.partial.size >= self.size:
            # Complete or longer, yet never committed: cheaper to fetch again than to guess.
            self.partial.truncate()
            return
        self._received = self.partial.size
        self.validator = resumed.validator
        self.validator_url = resumed.url
        self.spliced = True
        self._wake()

    def restart(self, *, wrong: bool = False) -> None:
        """
        The upstream sends the whole body again: the bytes on disk go. C{wrong}: some of them
        did not verify, so the followers that sent any are cut (L{discarded}) rather than
        continued with the new bytes.
        """
        if wrong:
            self.discarded += 1
        self.partial.truncate()
        self._received = 0
        self.spliced = False

    def _range_start(self, response: IResponse) -> int:
        """Where a 206 answer's body starts: exactly the bytes on disk, to the file's end."""
        values = response.headers.getRawHeaders(b"Content-Range") or []
        expected = b"bytes %d-%d/%d" % (self._received, self.size - 1, self.size)
        if len(values) != 1 or values[0].strip() != expected:
            shown = values[0].decode("latin-1", "replace") if values else "none"
            raise UpstreamFailed(
                f"upstream answered a range of {self.item.path} with Content-Range {shown}, "
                f"not {expected.decode()}"
            )
        return self._received

    @property
    def received(self) -> int:
        return self._received

    # -- as the engine drives it (L{Job}) ---------------------------------------------------

    async def error_text(self, response: IResponse, receive: Receive) -> str:
        # A simplestreams server's error page says nothing the status does not.
        await discard_body(response)
        return ""

    async def receive(self, response: IResponse, receive: Receive) -> None:
        item = self.item
        start = 0
        if response.code == 206:
            try:
                start = self._range_start(response)
            except UpstreamFailed:
                await discard_body(response)
                raise
            self.spliced = True
        if isinstance(response.length, int) and response.length != item.size - start:
            await discard_body(response)
            raise VerificationFailed(
                f"upstream announced {response.length} bytes for {item.path} from byte {start}, "
                f"catalogue says {item.size} in all"
            )
        if response.code != 206:
            # A whole body: the range was ignored or the file changed (If-Range did not
            # match); it replaces whatever is on disk and its validator is the one kept.
            if self._received:
                self.restart()
            self.validator = _validator(response)
            self.validator_url = self.url
            if self.persist is not None:
                self.persist(self)
        self.start_streaming()
        await receive(response, self.data, item.size - start)

    def verified(self) -> Verified:
        item = self.item
        partial = self.partial
        if partial.size != item.size:
            raise VerificationFailed(f"upstream sent {partial.size} of {item.size} bytes for {item.path}")
        digest = partial.hexdigest()
        if digest != item.sha256:
            raise VerificationFailed(
                f"sha256 of {item.path} is {digest}, catalogue says {item.sha256}"
            )
        return Verified((
            StoredFile(partial, item.sha256, item.size, item.path, item.product, item.version),
        ))

    def committed(self, verified: Verified, paths: Sequence[FilePath[Any]], *, stored: bool) -> None:
        [path] = paths
        self.succeed(path, stored=stored)

    # -- the outcome ------------------------------------------------------------------------

    def succeed(self, path: FilePath[Any], *, stored: bool = True) -> None:
        self.stored = stored
        self.final_path = path
        self._wake()
        self._observers.fire(path)

    def fail(self, failure: Failure) -> None:
        if self.keep_partial:
            self.partial.keep()
        else:
            self.partial.discard()
        self.failure = failure
        self._wake()
        self._observers.fire(failure)
        self._start_observers.fire(failure)


def _validator(response: IResponse) -> str:
    """The strong ETag of C{response}, else its Last-Modified, else C{""} (RFC 9110 13.1.5)."""
    for name in (b"ETag", b"Last-Modified"):
        values = response.headers.getRawHeaders(name) or []
        if values and not values[0].startswith(b"W/"):
            return values[0].decode("latin-1")
    return ""


async def discard_body(response: IResponse) -> None:
    """Read and drop an error body so that the connection is left in a clean state."""
    try:
        await collect(response, lambda _: None)
    except Exception:
        pass


class FetchedItem(Protocol):
    """What a fetcher's C{get} returns: a L{Download}, or one file of an export download."""

    @property
    def path(self) -> FilePath[Any]: ...

    @property
    def size(self) -> int: ...

    @property
    def failure(self) -> Failure | None: ...

    @property
    def received(self) -> int: ...

    @property
    def stored(self) -> bool: ...

    @property
    def queued(self) -> bool: ...

    def available(self) -> int: ...

    def wait(self) -> "Deferred[None]": ...

    def when_streaming(self) -> "Deferred[None]": ...

    def when_done(self) -> "Deferred[Any]": ...
