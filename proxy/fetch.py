"""One upstream download per file, however many clients wait for it.

A L{Download} writes the upstream body to a temp file (the disk is the buffer), hashes it as it
arrives and wakes its followers, each of which reads the growing file at its own pace. Only a body
whose size and sha256 match the catalogue is committed (fsync, rename, index record); anything else
discards the temp file and fails every follower, which then aborts its client connection.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

from attrs import define, field
from treq import collect
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IResponse

from proxy.blobs import BlobStore, PartialBlob
from proxy.catalogue import Item
from proxy.errors import NotFound, UpstreamFailed
from proxy.health import UpstreamHealth
from proxy.index import CacheIndex, FileRecord
from proxy.upstream import UpstreamClient, VerificationFailed, as_proxy_error, receive_body
from proxy.work import Run, inline

DEFAULT_IDLE_TIMEOUT_SECONDS = 60.0


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
    # False when the verified file was streamed to its clients but not kept (no room)
    stored: bool = field(default=True, init=False)
    _observers: list[Deferred[FilePath[Any]]] = field(factory=list, init=False)
    _start_observers: list[Deferred[None]] = field(factory=list, init=False)
    _waiters: list[Deferred[None]] = field(factory=list, init=False)
    _received: int = field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.size = self.item.size

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
        d: Deferred[None] = Deferred()
        if self.failure is not None:
            d.errback(self.failure)
        elif self.streaming or self.final_path is not None:
            d.callback(None)
        else:
            self._start_observers.append(d)
        return d

    def start_streaming(self) -> None:
        self.streaming = True
        observers, self._start_observers = self._start_observers, []
        for d in observers:
            if not d.called:
                d.callback(None)

    def when_done(self) -> "Deferred[FilePath[Any]]":
        d: Deferred[FilePath[Any]] = Deferred()
        if self.final_path is not None:
            d.callback(self.final_path)
        elif self.failure is not None:
            d.errback(self.failure)
        else:
            self._observers.append(d)
        return d

    def available(self) -> int:
        # The last byte is held back until the file is verified and committed, so a follower
        # can never finish a response whose bytes are about to be rejected.
        if self.final_path is None:
            return min(self._received, self.size - 1)
        return self._received

    def wait(self) -> "Deferred[None]":
        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            # A follower that went away cancelled its own waiter; it is already fired.
            if not d.called:
                d.callback(None)

    def data(self, chunk: bytes) -> None:
        self.partial.write(chunk)
        self.partial.flush()
        self._received += len(chunk)
        self._wake()

    @property
    def received(self) -> int:
        return self._received

    def succeed(self, path: FilePath[Any], *, stored: bool = True) -> None:
        self.stored = stored
        self.final_path = path
        self._wake()
        for d in self._pop_observers():
            d.callback(path)

    def fail(self, failure: Failure) -> None:
        self.partial.discard()
        self.failure = failure
        self._wake()
        for d in self._pop_observers():
            d.errback(failure)
        starters, self._start_observers = self._start_observers, []
        for s in starters:
            if not s.called:
                s.errback(failure)

    def _pop_observers(self) -> list[Deferred[FilePath[Any]]]:
        observers, self._observers = self._observers, []
        return [d for d in observers if not d.called]


class Fetcher:
    """
    Starts at most one L{Download} per sha256 and commits verified files into the cache.

    A download runs to its end even when every client that asked for it has gone: the bytes
    are wanted by the next client, and the idle timeout bounds a stalled upstream.
    """

    log = Logger()

    def __init__(
        self,
        client: UpstreamClient,
        store: BlobStore,
        index: CacheIndex,
        clock: IReactorTime,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        *,
        make_room: Callable[[int], "bool | Deferred[bool]"] | None = None,
        health: Mapping[str, UpstreamHealth] | None = None,
        disk: Run = inline,
    ) -> None:
        self._client = client
        self._disk = disk
        self._store = store
        self._index = index
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._make_room = make_room
        self._health = dict(health or {})
        self._inflight: dict[str, Download] = {}

    def in_flight(self) -> dict[str, Download]:
        return dict(self._inflight)

    def client_downloads(self) -> int:
        """How many downloads in flight some client is waiting for (prefetches go after these)."""
        return sum(1 for d in self._inflight.values() if not d.background)

    def get(self, upstream: str, base_url: str, item: Item, *, background: bool = False) -> Download:
        """
        Return the running download of C{item}, or start one from C{base_url}/C{item.path}.

        @raise Unavailable: the upstream is offline and it is not yet time to probe it again.
        """
        running = self._inflight.get(item.sha256)
        if running is not None:
            if not background:
                running.background = False
            return running
        health = self._health.get(upstream)
        if health is not None:
            health.check(item.path)
        url = f"{base_url}/{item.path}"
        partial = self._store.new_partial()
        partial.writeback = self._disk
        download = Download(upstream, url, item, partial)
        download.background = background
        self._inflight[item.sha256] = download
        Deferred.fromCoroutine(self._run(download))
        return download

    async def _run(self, download: Download) -> None:
        health = self._health.get(download.upstream)
        try:
            await self._fetch(download, health)
        except Exception as e:
            if health is not None:
                health.record_error(e, download.url)
            failure = Failure(as_proxy_error(Failure(e), download.item.path))
            self.log.warn(
                "download of {url} failed, nothing cached: {reason}",
                url=download.url, reason=failure.getErrorMessage(),
            )
            if download.failure is None and download.final_path is None:
                download.fail(failure)
        finally:
            self._inflight.pop(download.item.sha256, None)
            self._index.note_fetched(download.received)

    async def _fetch(self, download: Download, health: UpstreamHealth | None) -> None:
        item = download.item
        self.log.info("fetching {url} ({size} bytes)", url=download.url, size=item.size)
        response: IResponse = await self._client.get(download.url)
        if health is not None:
            health.record_answer(response.code, download.url)
        if response.code != 200:
            await _discard_body(response)
            if response.code == 404:
                raise NotFound(f"upstream has no {item.path} (404)")
            raise UpstreamFailed(f"upstream answered {response.code} for {item.path}")
        if response.length not in (item.size,) and isinstance(response.length, int):
            await _discard_body(response)
            raise VerificationFailed(
                f"upstream announced {response.length} bytes for {item.path}, catalogue says {item.size}"
            )
        download.start_streaming()
        await receive_body(response, download.data, limit=item.size, clock=self._clock,
                           idle_timeout=self._idle_timeout)
        await self._commit(download)

    async def _commit(self, download: Download) -> None:
        item = download.item
        partial = download.partial
        if partial.size != item.size:
            raise VerificationFailed(f"upstream sent {partial.size} of {item.size} bytes for {item.path}")
        digest = partial.hexdigest()
        if digest != item.sha256:
            raise VerificationFailed(
                f"sha256 of {item.path} is {digest}, catalogue says {item.sha256}"
            )
        existing = self._index.get(item.sha256)
        # A record already counts these bytes (another process stored the file meanwhile):
        # committing adds nothing, so nothing need be evicted for it.
        if existing is None and self._make_room is not None and not await maybeDeferred(
            self._make_room, item.size
        ):
            # No room even after evicting what may go: the clients have their bytes (each
            # follower holds the file open), the cache does not keep them.
            self._index.note_not_stored()
            self.log.warn(
                "not storing {url} ({size} bytes): the cache is full of files that may not be "
                "evicted (pinned, in use or downloading)", url=download.url, size=item.size,
            )
            download.succeed(partial.path, stored=False)
            # Deleted on the next turn rather than now: get() may have handed this download to
            # a client that has not opened the file yet (when the upstream answered within
            # get() itself), and every client opens it before the reactor runs again.
            self._clock.callLater(0, self._disk, partial.discard)
            return
        # The fsync of the whole file runs on a worker; meanwhile a follower may still open
        # the temp name, which stays until the followers are told the blob's.
        path = await self._disk(partial.commit, item.sha256, keep_temp=True)
        now = self._clock.seconds()
        index = self._index
        if existing is None:
            await index.write(index.put, FileRecord(
                sha256=item.sha256, size=item.size, upstream=download.upstream,
                paths=(f"{download.upstream}/{item.path}",), product=item.product,
                version=item.version, stored_at=now, last_used_at=now, use_count=0,
                cached=True, auto_update=False,
            ))
        else:
            await index.write(index.add_path, item.sha256, download.upstream, item.path)
        self.log.info("cached {url} as sha256:{sha256}", url=download.url, sha256=item.sha256)
        download.succeed(path)
        self._disk(partial.release_temp).addErrback(
            lambda f: self.log.failure("removing the temp name of {path}", f, path=path.path)
        )


async def _discard_body(response: IResponse) -> None:
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

    def available(self) -> int: ...

    def wait(self) -> "Deferred[None]": ...

    def when_streaming(self) -> "Deferred[None]": ...

    def when_done(self) -> "Deferred[Any]": ...


class ItemFetcher(Protocol):
    """Starts or joins the one download of a catalogue file (L{Fetcher} and its kin)."""

    def get(self, upstream: str, base_url: str, item: Item, *, background: bool = False) -> FetchedItem: ...

    def client_downloads(self) -> int: ...

    def in_flight(self) -> Mapping[str, Any]: ...


class FetcherRouter:
    """One L{ItemFetcher} per upstream, seen as one (by the prefetcher)."""

    def __init__(self, by_upstream: Mapping[str, ItemFetcher]) -> None:
        self._by_upstream = dict(by_upstream)
        self._all = list({id(f): f for f in self._by_upstream.values()}.values())

    def get(self, upstream: str, base_url: str, item: Item, *, background: bool = False) -> FetchedItem:
        return self._by_upstream[upstream].get(upstream, base_url, item, background=background)

    def client_downloads(self) -> int:
        return sum(f.client_downloads() for f in self._all)

    def in_flight(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for fetcher in self._all:
            found.update(fetcher.in_flight())
        return found
