"""The simplestreams face: each upstream's tree under C{/NAME/}.

C{/NAME/streams/v1/index.json} and the products files the index names are served byte for byte
from the metadata cache. Any other path must be an item that the upstream's catalogue lists: a hit
is served from the blob store, a miss joins (or starts) the one upstream download of that file.
Anything else is a 404 that costs no upstream request.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from proxy.access_log import HIT, JOINED, MISS, note_cache, note_face
from proxy.agents import ClientAgents
from proxy.blobs import BlobStore
from proxy.client_networks import ClientNetworks, UpstreamAccess, client_host
from proxy.catalogue import Family, Item
from proxy.errors import Forbidden, NotFound
from proxy.files import CacheFiles
from proxy.metadata import SimplestreamsMetadata
from proxy.metadata_memory import MetadataMemory, load_small, memory_of
from proxy.peers import NODE_HEADER, wants_cached_only
from proxy.request_target import READ_METHODS
from proxy.streaming import CompleteFile
from proxy.web import AsyncResource, relative_path, serve_bytes, serve_file, serve_stored_bytes
from proxy.work import Run, inline


class UpstreamResource(AsyncResource):
    """Everything under C{/NAME/} for one upstream."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        metadata: SimplestreamsMetadata,
        files: CacheFiles,
        store: BlobStore,
        clock: IReactorTime,
        *,
        families: Mapping[Family, SimplestreamsMetadata] | None = None,
        agents: ClientAgents | None = None,
        disk: Run = inline,
        memory: MetadataMemory | None = None,
    ) -> None:
        super().__init__()
        self._metadata = metadata
        # The catalogue each client family is served (PROTOCOLS.md §5.1: an upstream may
        # answer LXD and Incus differently); one shared by all when not told apart.
        self._families: dict[Family, SimplestreamsMetadata] = dict(families or {metadata.family: metadata})
        self._agents = agents if agents is not None else ClientAgents()
        self._files = files
        # Where the metadata files' bodies are read from.
        self._store = store
        # Small metadata bodies are answered from here (shared by every face of the store),
        # read into it by C{disk}.
        self._memory = memory if memory is not None else memory_of(store)
        self._disk = disk
        self._clock = clock

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
        elif wants_cached_only(request):
            await self._cached_only(request, path)
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
        small = await self._small_body(record.sha256)
        if small is not None:
            serve_stored_bytes(
                request, small, etag=record.sha256, last_modified=record.fetched_at,
                content_type=b"application/json",
            )
            return
        blob = self._store.path_for(record.sha256)
        await serve_file(
            request, CompleteFile(blob, blob.getsize()), etag=record.sha256,
            last_modified=record.fetched_at, clock=self._clock, content_type=b"application/json",
        )

    async def _small_body(self, sha256: str) -> bytes | None:
        """The stored body C{sha256} from memory, read into it (on the disk worker) when small."""
        memory = self._memory
        body = memory.get(sha256)
        if body is None and not memory.too_big(sha256):
            body = await self._disk(load_small, self._store, sha256, memory.max_body)
            memory.put(sha256, body)
        return body

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

    async def _cached_only(self, request: Request, path: str) -> None:
        """
        A peer's question (L{proxy.peers}): the stored file, found by the index alone, or a
        504; nothing is downloaded, joined or asked of the upstream for it.
        """
        item = self._files.stored_item(self.name, path)
        if item is None:
            raise self._files.not_here(self.name, path)
        request.setHeader(NODE_HEADER, self._files.node_id.encode("ascii"))
        opening = self._files.open(
            self.name, path, item, sent=lambda: request.sentLength,
            head=request.method == b"HEAD", cached_only=True,
        )
        async with opening as opened:
            note_cache(request, HIT)
            await serve_file(
                request, opened.source, etag=item.sha256, last_modified=opened.last_modified,
                clock=self._clock, ranges=True,
            )

    async def _item_file(self, request: Request, path: str, metadata: SimplestreamsMetadata) -> None:
        item = await self._find_item(path, metadata)
        if item is None:
            raise NotFound(f"{self.name}: {path} is not in this upstream's catalogue")
        opening = self._files.open(
            self.name, path, item, sent=lambda: request.sentLength, head=request.method == b"HEAD"
        )
        async with opening as opened:
            note_cache(request, HIT if opened.hit else JOINED if opened.joined else MISS)
            # Ranges of a stored file only: a download is streamed whole, as it arrives.
            await serve_file(
                request, opened.source, etag=item.sha256, last_modified=opened.last_modified,
                clock=self._clock, ranges=opened.hit,
            )


# The access log's names of the faces beside the upstreams.
FACES = {"1.0": "lxd"}


class RootResource(Resource):
    """C{/}: one child per upstream; at the root itself C{page}, or else a short text page."""

    def __init__(
        self,
        upstreams: Mapping[str, IResource],
        banner: str,
        others: Mapping[str, IResource] | None = None,
        *,
        observe: Callable[[str, Request], None] | None = None,
        page: IResource | None = None,
        clients: ClientNetworks = ClientNetworks(),
        access: UpstreamAccess = UpstreamAccess(),
    ) -> None:
        super().__init__()
        # Who may use any of it ([server] allow); the others get a 403 and reach nothing.
        self._clients = clients
        # Who may use each upstream's face ([upstreams.NAME] allow), likewise.
        self._access = access
        # Told of every request with the first segment of its path (the metrics count them).
        self._observe = observe
        self._page = page
        self._upstreams = dict(upstreams)
        # The faces beside the upstreams: C{1.0} (the LXD API), C{import} (URL import).
        self._others = dict(others or {})
        self._banner = banner.encode("utf-8")

    def getChild(self, path: bytes, request: Any) -> IResource:
        try:
            name = path.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if self._observe is not None:
            self._observe(name, request)
        host = client_host(request)
        if not self._clients.permits(host):
            note_face(request, "-")
            return _ForbiddenResource(
                f"{host or '?'} is not in a network this proxy serves (server.allow)"
            )
        if name in self._upstreams:
            note_face(request, name)
            refusal = self._access.refusal(name, host)
            if refusal is not None:
                return _ForbiddenResource(refusal)
            return self._upstreams[name]
        if name in self._others:
            note_face(request, FACES.get(name, name))
            return self._others[name]
        if path == b"":
            note_face(request, "root")
            return self._page if self._page is not None else self
        return _NotFoundResource(name)

    def render(self, request: Request) -> bytes:
        # Twisted would answer an unknown method with a 501 HTML page.
        if request.method not in READ_METHODS:
            body = b"method not allowed\n"
            request.setResponseCode(405)
            request.setHeader(b"Allow", b", ".join(READ_METHODS))
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            return body
        rendered: bytes = super().render(request)
        return rendered

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


class _ForbiddenResource(AsyncResource):
    isLeaf = True

    def __init__(self, message: str) -> None:
        super().__init__()
        self._message = message

    async def handle(self, request: Request) -> None:
        raise Forbidden(self._message)


__all__ = ["RootResource", "UpstreamResource"]
