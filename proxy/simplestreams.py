"""The simplestreams face: each upstream's tree under C{/NAME/}.

C{/NAME/streams/v1/index.json} and the products files the index names are served byte for byte
from the metadata cache. Any other path must be an item that the upstream's catalogue lists: a hit
is served from the blob store, a miss joins (or starts) the one upstream download of that file.
Anything else is a 404 that costs no upstream request.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from proxy.blobs import BlobStore
from proxy.busy import InUse
from proxy.agents import ClientAgents
from proxy.catalogue import Family, Item
from proxy.errors import BadRequest, NotFound
from proxy.downloads import ItemFetcher
from proxy.index import CacheIndex, FileRecord
from proxy.metadata import SimplestreamsMetadata
from proxy.streaming import CompleteFile
from proxy.web import AsyncResource, serve_bytes, serve_file

# How long a miss may wait for the upstream's response headers before the client gets its own
# 200 and headers anyway: long enough to turn the usual quick failures (404, 5xx, refused) into
# a precise status, far below the LXD client's 30 s header timeout.
UPSTREAM_START_GRACE_SECONDS = 5.0


def relative_path(raw: bytes, prefix_segments: int) -> str:
    """
    Turn the raw request path into a clean path relative to the upstream's root.

    Segments are percent-decoded (the client may encode C{:} and C{/}), empty and C{.} segments
    dropped; C{..}, NUL and undecodable bytes are refused with L{BadRequest}.
    """
    segments = raw.split(b"/")[1 + prefix_segments:]
    decoded = unquote_to_bytes(b"/".join(segments))
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request path is not valid UTF-8")
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == ".." or "\x00" in part or "\\" in part:
            raise BadRequest("request path may not contain '..', backslashes or NUL")
        parts.append(part)
    return "/".join(parts)


class UpstreamResource(AsyncResource):
    """Everything under C{/NAME/} for one upstream."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        metadata: SimplestreamsMetadata,
        fetcher: ItemFetcher,
        store: BlobStore,
        index: CacheIndex,
        clock: IReactorTime,
        in_use: InUse | None = None,
        *,
        families: Mapping[Family, SimplestreamsMetadata] | None = None,
        agents: ClientAgents | None = None,
    ) -> None:
        super().__init__()
        self._metadata = metadata
        # The catalogue each client family is served (PROTOCOLS.md §5.1: an upstream may
        # answer LXD and Incus differently); one shared by all when not told apart.
        self._families: dict[Family, SimplestreamsMetadata] = dict(families or {metadata.family: metadata})
        self._agents = agents if agents is not None else ClientAgents()
        self._fetcher = fetcher
        self._store = store
        self._index = index
        self._clock = clock
        self._in_use = in_use if in_use is not None else InUse()

    @property
    def name(self) -> str:
        return self._metadata.name

    async def handle(self, request: Request) -> None:
        path = relative_path(request.path, 1)
        if not path:
            raise NotFound(f"{self.name}: add this URL as a simplestreams remote; it has no index page")
        family = self._agents.note(request.getHeader(b"User-Agent"))
        metadata = self._families.get(family, self._metadata)
        if path.startswith("streams/"):
            await self._metadata_file(request, path, metadata)
        else:
            await self._item_file(request, path, metadata)

    async def _metadata_file(self, request: Request, path: str, metadata: SimplestreamsMetadata) -> None:
        record = await metadata.get(path)
        if metadata.offline:
            body = await metadata.offline_view(path)
            serve_bytes(
                request, body, etag=hashlib.sha256(body).hexdigest(), last_modified=record.fetched_at,
            )
            return
        blob = self._store.path_for(record.sha256)
        await serve_file(
            request, CompleteFile(blob, blob.getsize()), etag=record.sha256,
            last_modified=record.fetched_at, clock=self._clock, content_type=b"application/json",
        )

    async def _find_item(self, path: str, metadata: SimplestreamsMetadata) -> Item | None:
        item = await metadata.item(path)
        if item is not None:
            return item
        # A file listed only in another family's catalogue (held already: asking the upstream
        # for a catalogue just to look a path up is not worth it) is the same file for all.
        for other in self._families.values():
            if other is not metadata and other.holds_catalogue():
                item = await other.item(path)
                if item is not None:
                    return item
        return None

    async def _item_file(self, request: Request, path: str, metadata: SimplestreamsMetadata) -> None:
        item = await self._find_item(path, metadata)
        if item is None:
            raise NotFound(f"{self.name}: {path} is not in this upstream's catalogue")
        with self._in_use.holding(item.sha256):
            if self._store.exists(item.sha256):
                record = await record_hit(self._index, self._clock, self.name, path, item)
                blob = self._store.path_for(item.sha256)
                await serve_file(
                    request, CompleteFile(blob, item.size), etag=item.sha256,
                    last_modified=record.stored_at, clock=self._clock,
                )
                self._index.note_served(True, request.sentLength)
                return
            if request.method == b"HEAD":
                await self._head_of_miss(request, item, metadata)
                return
            download = self._fetcher.get(self.name, item)
            await await_start(download, self._clock)
            await serve_file(
                request, download, etag=item.sha256, last_modified=self._clock.seconds(),
                clock=self._clock, ranges=False,
            )
            self._index.note_served(False, request.sentLength)
            # Counted once the body is out: the record exists only after the download committed.
            self._index.note_use(item.sha256)

    async def _head_of_miss(self, request: Request, item: Item, metadata: SimplestreamsMetadata) -> None:
        """
        Answer a HEAD for a file not stored from the catalogue alone: what a GET would send,
        without the download a GET starts (a monitoring check must not cost gigabytes).
        """
        health = metadata.health
        if health is not None:
            health.check(item.path)
        # Never opened for a HEAD: only its size is read.
        placeholder = CompleteFile(self._store.path_for(item.sha256), item.size)
        await serve_file(
            request, placeholder, etag=item.sha256, last_modified=self._clock.seconds(),
            clock=self._clock, ranges=False,
        )


class Starting(Protocol):
    """A download that says when the upstream accepted it (L{Download}, an export download)."""

    @property
    def failure(self) -> Failure | None: ...

    def when_streaming(self) -> "Deferred[None]": ...


async def await_start(download: Starting, clock: IReactorTime) -> None:
    """
    Wait until the upstream accepted the download, at most C{UPSTREAM_START_GRACE_SECONDS}:
    a quick failure (404, 5xx, refused) is raised for a precise status; after the grace the
    client gets its headers anyway and follows the download.
    """
    started = download.when_streaming()
    timer = clock.callLater(UPSTREAM_START_GRACE_SECONDS, started.cancel)
    try:
        await started
    except Exception:
        if download.failure is not None:
            download.failure.raiseException()
        # The grace ran out: stream anyway, the download goes on.
    finally:
        if timer.active():
            timer.cancel()


async def record_hit(
    index: CacheIndex, clock: IReactorTime, upstream: str, path: str, item: Item
) -> FileRecord:
    """
    Count a use of the stored file of C{item}, reached as C{upstream}/C{path}.

    The use is counted in memory (written in batches by the usage flush); only a file reached
    by a new path or stored without a record (as metadata) is written to the index at once.
    """
    record = index.get(item.sha256)
    if record is None:
        # A blob with no file record: the same bytes are stored as metadata. Record the file.
        now = clock.seconds()
        record = FileRecord(
            sha256=item.sha256, size=item.size, upstream=upstream,
            paths=(f"{upstream}/{path}",), product=item.product, version=item.version,
            stored_at=now, last_used_at=now, use_count=0, cached=True, auto_update=False,
        )
        await index.write(index.put, record)
    elif f"{upstream}/{path}" not in record.paths:
        await index.write(index.add_path, item.sha256, upstream, path)
    index.note_use(item.sha256)
    return record


class RootResource(Resource):
    """C{/}: one child per upstream; a short text page at the root itself."""

    def __init__(
        self,
        upstreams: Mapping[str, IResource],
        banner: str,
        others: Mapping[str, IResource] | None = None,
    ) -> None:
        super().__init__()
        self._upstreams = dict(upstreams)
        # The faces beside the upstreams: C{1.0} (the LXD API), C{import} (URL import).
        self._others = dict(others or {})
        self._banner = banner.encode("utf-8")

    def getChild(self, path: bytes, request: Any) -> IResource:
        try:
            name = path.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if name in self._upstreams:
            return self._upstreams[name]
        if name in self._others:
            return self._others[name]
        if path == b"":
            return self
        return _NotFoundResource(name)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return self._banner

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class _NotFoundResource(AsyncResource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    async def handle(self, request: Request) -> None:
        raise NotFound(f"no upstream named {self._name!r} is configured here")


__all__ = ["RootResource", "UpstreamResource", "await_start", "record_hit", "relative_path"]
