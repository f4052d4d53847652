"""One export download per image of an LXD upstream, split into its files as it arrives.

C{GET /1.0/images/FP/export} (PROTOCOLS.md §2.5) answers a unified image with its one file
(C{application/octet-stream}) and a split image with a C{multipart/form-data} body whose two
parts are the C{metadata} file and the C{rootfs} (C{rootfs.img} for a VM) file, framed as Go's
C{mime/multipart} writer frames them. L{proxy.multipart.MultipartSplitter} cuts that body into the two files
while it streams (never holding more than a chunk in memory), each written to its own temp file,
with one running sha256 over both. Only when sha256(meta ‖ rootfs) is the fingerprint are both
committed, recorded as files, and their sizes and hashes kept as the image's L{ImageParts}; any
other ending discards both and fails everyone who follows the download.

Followers read the temp files while they grow (the disk is the buffer, as for L{Fetcher}):
L{ExportDownload} offers L{PartSource}s for the LXD face and, through L{LxdExportFetcher.get},
objects that behave like a L{proxy.fetch.Download} for one listed file, for the simplestreams face
and the prefetcher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Callable, Literal, Protocol

from attrs import define, field
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IResponse

from proxy.blobs import BlobStore, PartialBlob
from proxy.catalogue import META_FTYPE, UNIFIED_FTYPE, Item
from proxy.errors import NotFound, UpstreamFailed
from proxy.fetch import DEFAULT_IDLE_TIMEOUT_SECONDS
from proxy.health import UpstreamHealth
from proxy.index import CacheIndex, FileRecord, ImageParts
from proxy.lxd_remote import (
    RemoteImage,
    base_product,
    image_item_path,
    item_role,
    meta_filename,
    root_filename,
    root_ftype_of,
    unified_filename,
    version_base,
)
from proxy.multipart import MultipartError, MultipartSplitter, multipart_boundary
from proxy.streaming import FileSource
from proxy.upstream import UpstreamClient, VerificationFailed, as_proxy_error, receive_body
from proxy.work import Run, inline

# Bytes an export may carry beyond the image's files: the boundaries and the two part headers
# (a few hundred bytes as LXD writes them).
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# What is read of an error answer to find LXD's error message in it.
MAX_ERROR_BODY_BYTES = 64 * 1024

Kind = Literal["split", "unified"]
Role = Literal["meta", "root", "unified"]
ROOT_FORM_NAMES = ("rootfs", "rootfs.img")


class WrongShape(UpstreamFailed):
    """The export is split where unified was expected, or the other way round."""


# -- the download ------------------------------------------------------------------------------


@define(eq=False)
class _Part:
    """One file of an export being written: its temp file and what has arrived of it."""

    partial: PartialBlob
    name: str = ""
    filename: str = ""
    received: int = 0
    complete: bool = False
    sha256: str | None = None
    final_path: FilePath[Any] | None = None

    @property
    def path(self) -> FilePath[Any]:
        # A follower that opened the temp file keeps a valid descriptor through the rename.
        return self.final_path if self.final_path is not None else self.partial.path


@define(eq=False)
class PartSource:
    """
    A L{proxy.streaming.FileSource} over one file of an L{ExportDownload}.

    With C{hold_back}, the last byte is only readable once the file's content is known good:
    the whole export verified, or (with C{expect}) the file complete and hashing to C{expect}.
    It fails with the download, or on its own when the file turns out larger than C{size},
    or complete with another size or hash than expected.
    """

    _download: ExportDownload
    _part: _Part
    size: int
    expect: str | None = None
    hold_back: bool = True
    _own_failure: Failure | None = field(default=None, init=False)

    @property
    def path(self) -> FilePath[Any]:
        return self._part.path

    @property
    def received(self) -> int:
        return self._part.received

    @property
    def failure(self) -> Failure | None:
        if self._download.failure is not None:
            return self._download.failure
        return self._check()

    def verified(self) -> bool:
        """Whether every byte may be handed out as good."""
        part = self._part
        if self._check() is not None:
            return False
        if part.final_path is not None:
            return True
        return (
            part.complete and self.expect is not None and part.sha256 == self.expect
            and part.received == self.size
        )

    def available(self) -> int:
        got = min(self._part.received, self.size)
        if not self.hold_back or self.verified():
            return got
        return max(0, min(got, self.size - 1))

    def wait(self) -> "Deferred[None]":
        return self._download.wait()

    def _check(self) -> Failure | None:
        if self._own_failure is None:
            part = self._part
            problem = ""
            if part.received > self.size:
                problem = f"more than the {self.size} bytes expected"
            elif part.complete and part.received != self.size:
                problem = f"{part.received} bytes, {self.size} expected"
            elif part.complete and self.expect is not None and part.sha256 != self.expect:
                problem = f"sha256 {part.sha256}, {self.expect} expected"
            if problem:
                self._own_failure = Failure(VerificationFailed(
                    f"{part.name or 'file'} of image {self._download.fingerprint} from {self._download.url}: "
                    f"{problem}"
                ))
        return self._own_failure


@define(eq=False)
class ExportDownload:
    """
    The export of one image being fetched into the cache.

    C{meta}, C{root} and C{unified} each give a new Deferred per access (so that cancelling
    one affects nobody else) firing with a L{PartSource}:

      - C{meta}, once the metadata part of a split export is complete. Its bytes are whole
        but verified only with the rootfs: send them as part of the export, never as a
        complete file of their own before L{when_done}.
      - C{root}, once the rootfs part starts, sized C{image.size - meta size}, holding back
        its last byte until the export is verified.
      - C{unified}, once a unified export starts, holding back its last byte likewise.

    Asking a unified export for C{meta} or C{root}, or a split one for C{unified}, fails with
    L{WrongShape}; so does every one of them when the download fails, with its failure.
    C{when_done()} fires with the image's L{ImageParts} once verified (committed unless
    C{stored} is False: no room), or fails.
    """

    upstream: str
    url: str
    image: RemoteImage
    expected: ImageParts | None
    _meta_part: _Part
    _root_part: _Part
    product: str = ""
    version: str = ""
    # started by the prefetcher rather than for a waiting client
    background: bool = False
    failure: Failure | None = field(default=None, init=False)
    # False when the verified files were streamed to their clients but not kept (no room)
    stored: bool = field(default=True, init=False)
    kind: Kind | None = field(default=None, init=False)
    parts: ImageParts | None = field(default=None, init=False)
    # body bytes received, framing included
    received: int = field(default=0, init=False)
    _combined: Any = field(factory=hashlib.sha256, init=False)
    _waiters: list[Deferred[None]] = field(factory=list, init=False)
    _start_observers: list[Deferred[None]] = field(factory=list, init=False)
    _done_observers: list[Deferred[ImageParts]] = field(factory=list, init=False)
    _meta_observers: list[Deferred[FileSource]] = field(factory=list, init=False)
    _root_observers: list[Deferred[FileSource]] = field(factory=list, init=False)
    _unified_observers: list[Deferred[FileSource]] = field(factory=list, init=False)
    _root_source: PartSource | None = field(default=None, init=False)

    @property
    def fingerprint(self) -> str:
        return self.image.fingerprint

    @property
    def finished(self) -> bool:
        return self.parts is not None or self.failure is not None

    # -- what followers use -----------------------------------------------------------------

    def when_streaming(self) -> "Deferred[None]":
        """Fires once the upstream answered 200 (then L{kind} is set); fails with the download."""
        d: Deferred[None] = Deferred()
        if self.failure is not None:
            d.errback(self.failure)
        elif self.kind is not None:
            d.callback(None)
        else:
            self._start_observers.append(d)
        return d

    def when_done(self) -> "Deferred[ImageParts]":
        d: Deferred[ImageParts] = Deferred()
        if self.parts is not None:
            d.callback(self.parts)
        elif self.failure is not None:
            d.errback(self.failure)
        else:
            self._done_observers.append(d)
        return d

    @property
    def meta(self) -> "Deferred[FileSource]":
        return self._observe(self._meta_observers, "split", self._meta_source)

    @property
    def root(self) -> "Deferred[FileSource]":
        return self._observe(self._root_observers, "split", lambda: self._root_source)

    @property
    def unified(self) -> "Deferred[FileSource]":
        return self._observe(self._unified_observers, "unified", self._unified_source)

    def wait(self) -> "Deferred[None]":
        """Fires when more bytes arrived, or the download ended either way."""
        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def source_for(self, role: Role, item: Item) -> PartSource:
        """A source for the listed file C{item}, sized and checked by the catalogue's word."""
        part = self._root_part if role == "root" else self._meta_part
        return PartSource(self, part, item.size, expect=item.sha256)

    # -- internals ----------------------------------------------------------------------------

    def _observe(
        self, observers: list[Deferred[FileSource]], kind: Kind, ready: Callable[[], PartSource | None],
    ) -> "Deferred[FileSource]":
        d: Deferred[FileSource] = Deferred()
        if self.failure is not None:
            d.errback(self.failure)
        elif self.kind is not None and self.kind != kind:
            d.errback(self._wrong_shape(kind))
        else:
            source = ready()
            if source is not None:
                d.callback(source)
            else:
                observers.append(d)
        return d

    def _wrong_shape(self, wanted: Kind) -> Failure:
        return Failure(WrongShape(
            f"image {self.fingerprint} is exported {self.kind} by {self.url}, not {wanted}"
        ))

    def _meta_source(self) -> PartSource | None:
        part = self._meta_part
        if self.kind != "split" or not part.complete:
            return None
        expect = self.expected.meta_sha256 if self.expected is not None else None
        return PartSource(self, part, part.received, expect=expect, hold_back=False)

    def _unified_source(self) -> PartSource | None:
        if self.kind != "unified":
            return None
        return PartSource(self, self._meta_part, self.image.size, expect=self.fingerprint)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            # A follower that went away cancelled its own waiter; it is already fired.
            if not d.called:
                d.callback(None)

    def _fire(self, observers: list[Deferred[Any]], result: Any) -> None:
        pending = list(observers)
        observers.clear()
        for d in pending:
            if d.called:
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def start(self, kind: Kind) -> None:
        """The upstream answered 200 with an export of C{kind}."""
        self.kind = kind
        if kind == "unified":
            # The one file goes where a split export's metadata would.
            self._root_part.partial.discard()
            self._fire(self._unified_observers, self._unified_source())
            self._fire(self._meta_observers, self._wrong_shape("split"))
            self._fire(self._root_observers, self._wrong_shape("split"))
        else:
            self._fire(self._unified_observers, self._wrong_shape("unified"))
        self._fire(self._start_observers, None)

    def unified_data(self, data: bytes) -> None:
        part = self._meta_part
        part.partial.write(data)
        part.received += len(data)
        self.received += len(data)
        self._wake()

    def unified_complete(self) -> None:
        part = self._meta_part
        part.complete = True
        part.sha256 = part.partial.hexdigest()

    def succeed(self, parts: ImageParts, meta_path: FilePath[Any], root_path: FilePath[Any] | None,
                *, stored: bool) -> None:
        self.stored = stored
        self._meta_part.final_path = meta_path
        if root_path is not None:
            self._root_part.final_path = root_path
        self.parts = parts
        self._wake()
        self._fire(self._done_observers, parts)

    def fail(self, failure: Failure) -> None:
        self._meta_part.partial.discard()
        self._root_part.partial.discard()
        self.failure = failure
        self._wake()
        for observers in (
            self._start_observers, self._done_observers, self._meta_observers,
            self._root_observers, self._unified_observers,
        ):
            self._fire(observers, failure)


@define(eq=False)
class _SplitWriter:
    """Receives the parts of a split export: metadata first, then the rootfs, nothing else."""

    download: ExportDownload
    _current: _Part | None = field(default=None, init=False)

    def start_part(self, name: str, filename: str) -> None:
        d = self.download
        meta, root = d._meta_part, d._root_part
        if not meta.name:
            if name != "metadata":
                raise MultipartError(f"export's first part is {name!r}, not 'metadata'")
            part = meta
        elif not root.name:
            if name not in ROOT_FORM_NAMES:
                raise MultipartError(f"export's second part is {name!r}, not 'rootfs' or 'rootfs.img'")
            part = root
        else:
            raise MultipartError("export has more than two parts")
        part.name, part.filename = name, filename
        self._current = part
        if part is root:
            size = d.image.size - meta.received
            if size < 0:
                raise VerificationFailed(
                    f"metadata of image {d.fingerprint} is {meta.received} bytes, more than the "
                    f"image's {d.image.size}"
                )
            expect = d.expected.root_sha256 if d.expected is not None else None
            d._root_source = PartSource(d, root, size, expect=expect)
            d._fire(d._root_observers, d._root_source)

    def part_data(self, data: bytes) -> None:
        d = self.download
        part = self._current
        assert part is not None
        if d._meta_part.received + d._root_part.received + len(data) > d.image.size:
            raise VerificationFailed(
                f"export of image {d.fingerprint} is larger than its {d.image.size} bytes"
            )
        part.partial.write(data)
        part.received += len(data)
        d._combined.update(data)
        d._wake()

    def end_part(self) -> None:
        part = self._current
        assert part is not None
        part.complete = True
        part.sha256 = part.partial.hexdigest()
        self._current = None
        d = self.download
        if part is d._meta_part:
            d._fire(d._meta_observers, d._meta_source())
        d._wake()


@define(eq=False)
class ItemDownload:
    """
    One listed file of an LXD upstream's image, served from its image's export download: what
    L{proxy.fetch.Fetcher.get} returns for a file of a simplestreams upstream (C{path},
    C{size}, C{failure}, C{available()}, C{wait()}, C{when_streaming()}, C{when_done()},
    C{background}, C{stored}, C{received}).

    The file is handed out whole once its own sha256 is the catalogue's (the metadata file
    before the rootfs has arrived), or once the export is verified.
    """

    export: ExportDownload
    item: Item
    role: Role
    _source: PartSource = field(init=False)
    _shape_failure: Failure | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._source = self.export.source_for(self.role, self.item)

    @property
    def path(self) -> FilePath[Any]:
        return self._source.path

    @property
    def size(self) -> int:
        return self.item.size

    @property
    def failure(self) -> Failure | None:
        return self._shape() or self._source.failure

    def available(self) -> int:
        return 0 if self._shape() is not None else self._source.available()

    def wait(self) -> "Deferred[None]":
        return self.export.wait()

    @property
    def received(self) -> int:
        return self._source.received

    @property
    def stored(self) -> bool:
        return self.export.stored

    @property
    def background(self) -> bool:
        return self.export.background

    @background.setter
    def background(self, value: bool) -> None:
        self.export.background = value

    def when_streaming(self) -> "Deferred[None]":
        d: Deferred[None] = Deferred()

        def started(_: None) -> None:
            failure = self.failure
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(None)

        self.export.when_streaming().addCallbacks(started, d.errback)
        return d

    def when_done(self) -> "Deferred[FilePath[Any]]":
        d: Deferred[FilePath[Any]] = Deferred()

        def done(_: ImageParts) -> None:
            failure = self.failure
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(self.path)

        self.export.when_done().addCallbacks(done, d.errback)
        return d

    def _shape(self) -> Failure | None:
        if self._shape_failure is None and self.export.kind is not None:
            listed_as: Kind = "unified" if self.role == "unified" else "split"
            if self.export.kind != listed_as:
                self._shape_failure = self.export._wrong_shape(listed_as)
        return self._shape_failure


# -- the fetcher -------------------------------------------------------------------------------


class LxdExportFetcher:
    """
    Starts at most one L{ExportDownload} per fingerprint and commits verified images.

    Like L{proxy.fetch.Fetcher}, a download runs to its end even when every client that
    asked for it has gone, bounded by the idle timeout; C{make_room} is asked before a commit
    and C{health} (by upstream name) is told how the upstream answered.
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
        self._inflight: dict[str, ExportDownload] = {}

    def in_flight(self) -> dict[str, ExportDownload]:
        """The downloads running, by fingerprint."""
        return dict(self._inflight)

    def busy(self) -> set[str]:
        """The sha256 of every file a running download will store, where known."""
        found: set[str] = set()
        for fingerprint, download in self._inflight.items():
            found.add(fingerprint)
            if download.expected is not None:
                found.add(download.expected.meta_sha256)
                if download.expected.root_sha256 is not None:
                    found.add(download.expected.root_sha256)
        return found

    def client_downloads(self) -> int:
        """How many downloads in flight some client is waiting for (prefetches go after these)."""
        return sum(1 for d in self._inflight.values() if not d.background)

    def get_image(
        self, upstream: str, base_url: str, image: RemoteImage, *, background: bool = False,
    ) -> ExportDownload:
        """
        Return the running export download of C{image}, or start one from
        C{base_url}/1.0/images/FP/export.

        @raise Unavailable: the upstream is offline and it is not yet time to probe it again.
        """
        return self._start(upstream, base_url, image, background=background)

    def get(self, upstream: str, base_url: str, item: Item, *, background: bool = False) -> ItemDownload:
        """
        The download of one file of the synthesised catalogue (L{proxy.lxd_remote}), which
        starts or joins the export of its image.

        @raise NotFound: C{item} is not a file of an LXD upstream's image, or its image is split
            and its files are not known (they are listed only once they are).
        @raise Unavailable: as L{get_image}.
        """
        found = item_role(item.path)
        if found is None:
            raise NotFound(f"{upstream}: {item.path} is not a file of an image of this upstream")
        fingerprint, role = found
        if role == "unified":
            size = item.size
        else:
            parts = self._index.get_parts(fingerprint)
            if parts is None or parts.unified:
                raise NotFound(f"{upstream}: the files of image {fingerprint} are not known")
            size = parts.size
        image = RemoteImage(fingerprint=fingerprint, size=size)
        export = self._start(
            upstream, base_url, image, background=background, product=item.product,
            version=item.version,
        )
        return ItemDownload(export, item, role)

    def _start(
        self, upstream: str, base_url: str, image: RemoteImage, *, background: bool,
        product: str = "", version: str = "",
    ) -> ExportDownload:
        running = self._inflight.get(image.fingerprint)
        if running is not None:
            if not background:
                running.background = False
            return running
        health = self._health.get(upstream)
        if health is not None:
            health.check(f"image {image.fingerprint}")
        url = f"{base_url}/1.0/images/{image.fingerprint}/export"
        meta = self._store.new_partial()
        try:
            root = self._store.new_partial()
        except BaseException:
            meta.discard()
            raise
        meta.writeback = root.writeback = self._disk
        download = ExportDownload(
            upstream, url, image, self._index.get_parts(image.fingerprint), _Part(meta), _Part(root),
            product=product or base_product(image), version=version or version_base(image),
            background=background,
        )
        self._inflight[image.fingerprint] = download
        Deferred.fromCoroutine(self._run(download))
        return download

    async def _run(self, download: ExportDownload) -> None:
        health = self._health.get(download.upstream)
        try:
            await self._fetch(download, health)
        except Exception as e:
            if health is not None:
                health.record_error(e, download.url)
            failure = Failure(as_proxy_error(Failure(e), f"export of image {download.fingerprint}"))
            self.log.warn(
                "download of {url} failed, nothing cached: {reason}",
                url=download.url, reason=failure.getErrorMessage(),
            )
            if not download.finished:
                download.fail(failure)
        finally:
            self._inflight.pop(download.fingerprint, None)
            self._index.note_fetched(download.received)

    async def _fetch(self, download: ExportDownload, health: UpstreamHealth | None) -> None:
        image = download.image
        self.log.info("fetching {url} ({size} bytes)", url=download.url, size=image.size)
        response: IResponse = await self._client.get(download.url)
        if health is not None:
            health.record_answer(response.code, download.url)
        if response.code != 200:
            reason = await self._error_text(response)
            said = f": {reason}" if reason else ""
            if response.code == 404:
                raise NotFound(f"upstream has no image {image.fingerprint} (404{said})")
            raise UpstreamFailed(f"upstream answered {response.code} for image {image.fingerprint}{said}")
        content_type = response.headers.getRawHeaders(b"Content-Type")
        try:
            boundary = multipart_boundary(content_type[0] if content_type else None)
        except MultipartError:
            await self._error_text(response)
            raise
        if boundary is None:
            await self._receive_unified(download, response)
        else:
            await self._receive_split(download, response, boundary)
        await self._commit(download)

    async def _receive_unified(self, download: ExportDownload, response: IResponse) -> None:
        image = download.image
        if isinstance(response.length, int) and response.length != image.size:
            await self._error_text(response)
            raise VerificationFailed(
                f"upstream announced {response.length} bytes for image {image.fingerprint}, "
                f"its size is {image.size}"
            )
        download.start("unified")
        await receive_body(response, download.unified_data, limit=image.size, clock=self._clock,
                           idle_timeout=self._idle_timeout)
        download.unified_complete()

    async def _receive_split(self, download: ExportDownload, response: IResponse, boundary: bytes) -> None:
        splitter = MultipartSplitter(boundary, _SplitWriter(download))
        download.start("split")
        errors: list[Exception] = []

        def sink(data: bytes) -> None:
            download.received += len(data)
            try:
                splitter.feed(data)
            except Exception as e:
                # Raised from here, the body receiver would only say it could not store it.
                errors.append(e)
                raise

        try:
            await receive_body(response, sink, limit=download.image.size + MULTIPART_OVERHEAD_BYTES,
                               clock=self._clock, idle_timeout=self._idle_timeout)
        except Exception:
            if errors:
                raise errors[0]
            raise
        splitter.close()

    async def _error_text(self, response: IResponse) -> str:
        """LXD's error message from an error answer (its envelope), read and dropped."""
        chunks: list[bytes] = []
        try:
            await receive_body(response, chunks.append, limit=MAX_ERROR_BODY_BYTES, clock=self._clock,
                               idle_timeout=self._idle_timeout)
        except Exception:
            return ""
        try:
            doc = json.loads(b"".join(chunks))
        except ValueError:
            return ""
        error = doc.get("error") if isinstance(doc, dict) else None
        return " ".join(error.split())[:200] if isinstance(error, str) else ""

    async def _commit(self, download: ExportDownload) -> None:
        image = download.image
        fingerprint = image.fingerprint
        meta, root = download._meta_part, download._root_part
        if download.kind == "unified":
            digest = meta.partial.hexdigest()
            total = meta.received
        else:
            if not root.name:
                raise MultipartError(f"export of image {fingerprint} has no rootfs part")
            digest = download._combined.hexdigest()
            total = meta.received + root.received
        if total != image.size:
            raise VerificationFailed(f"upstream sent {total} of {image.size} bytes for image {fingerprint}")
        if digest != fingerprint:
            raise VerificationFailed(
                f"sha256 of the export of image {fingerprint} is {digest}: not the fingerprint"
            )
        files: list[tuple[_Part, str, str]] = []
        if download.kind == "unified":
            parts = ImageParts(
                fingerprint=fingerprint, upstream=download.upstream, meta_sha256=fingerprint,
                meta_size=meta.received, meta_ftype=UNIFIED_FTYPE["lxd"], root_sha256=None,
                root_size=0, root_ftype="",
            )
            files.append((meta, fingerprint, image_item_path(fingerprint, unified_filename(fingerprint))))
        else:
            assert meta.sha256 is not None and root.sha256 is not None
            expected = download.expected
            if expected is not None and expected.root_sha256 == root.sha256 and expected.root_ftype:
                # As it is listed already: the files' paths must not move.
                root_ftype = expected.root_ftype
            else:
                root_ftype = root_ftype_of(root.name, root.filename, image.type, image.prop("type"))
            parts = ImageParts(
                fingerprint=fingerprint, upstream=download.upstream, meta_sha256=meta.sha256,
                meta_size=meta.received, meta_ftype=META_FTYPE["lxd"], root_sha256=root.sha256,
                root_size=root.received, root_ftype=root_ftype,
            )
            files.append((meta, meta.sha256, image_item_path(fingerprint, meta_filename(fingerprint))))
            root_path = image_item_path(fingerprint, root_filename(fingerprint, root_ftype))
            files.append((root, root.sha256, root_path))

        new: dict[str, int] = {}
        for part, sha256, _path in files:
            if self._index.get(sha256) is None:
                new[sha256] = part.received
        needed = sum(new.values())
        index = self._index
        # Learnt whether or not the files are kept: the image can be listed from now on.
        await index.write(index.put_parts, parts)
        if needed and self._make_room is not None and not await maybeDeferred(self._make_room, needed):
            # No room even after evicting what may go: the clients have their bytes (each
            # follower holds its file open), the cache does not keep them.
            self._index.note_not_stored()
            self.log.warn(
                "not storing {url} ({size} bytes): the cache is full of files that may not be "
                "evicted (pinned, in use or downloading)", url=download.url, size=needed,
            )
            download.succeed(parts, meta.partial.path, None if root.partial.closed else root.partial.path,
                             stored=False)
            # Deleted on the next turn rather than now: a follower may not have opened its file yet.
            self._clock.callLater(0, self._disk, meta.partial.discard)
            self._clock.callLater(0, self._disk, root.partial.discard)
            return
        # The fsyncs run on a worker; a follower may open the temp names until succeed().
        committed: list[FilePath[Any]] = []
        for part, sha256, _path in files:
            committed.append(await self._disk(part.partial.commit, sha256, keep_temp=True))
        now = self._clock.seconds()
        for part, sha256, path in files:
            if index.get(sha256) is None:
                await index.write(index.put, FileRecord(
                    sha256=sha256, size=part.received, upstream=download.upstream,
                    paths=(f"{download.upstream}/{path}",), product=download.product,
                    version=download.version, stored_at=now, last_used_at=now, use_count=0,
                    cached=True, auto_update=False,
                ))
            else:
                await index.write(index.add_path, sha256, download.upstream, path)
        self.log.info(
            "cached {url} as {count} files, image {fingerprint}",
            url=download.url, count=len(files), fingerprint=fingerprint,
        )
        download.succeed(parts, committed[0], committed[1] if len(committed) > 1 else None, stored=True)
        for part, _sha256, _path in files:
            self._disk(part.partial.release_temp).addErrback(
                lambda f: self.log.failure("removing the temp name of a stored file", f)
            )


__all__ = [
    "ExportDownload",
    "ItemDownload",
    "LxdExportFetcher",
    "PartSource",
    "WrongShape",
]
