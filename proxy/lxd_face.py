"""The LXD image API face: a read-only public LXD server at C{/1.0}.

So that a LAN can use C{lxc remote add cache https://cache.lan:8443 --accept-certificate}: the
LXD protocol pins the server certificate on first contact, no CA set-up needed. It lists the
images of the C{[lxd_api]} upstreams (PROTOCOLS.md §2) and exports them from the cache, or, on
a miss, while their files are fetched once, with the same coalescing and verification as the
simplestreams face. Every answer, errors included, is LXD's response envelope.
"""

from __future__ import annotations

from contextlib import ExitStack
from datetime import datetime, timezone
from typing import Any, Mapping, Protocol, Sequence
from urllib.parse import parse_qs, quote, unquote

from attrs import define, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from proxy import __version__
from proxy.agents import ClientAgents
from proxy.blobs import BlobStore
from proxy.busy import InUse
from proxy.catalogue import ARCHITECTURES, Family, Image, Item
from proxy.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, ProxyError
from proxy.export import ExportPart, export_parts, serve_export
from proxy.downloads import Fetcher
from proxy.index import CacheIndex, FileRecord, ImageParts
from proxy.lxd_remote import (
    LxdRemote,
    RemoteImage,
    base_product,
    image_item_path,
    meta_filename,
    root_filename,
    unified_filename,
    version_base,
)
from proxy.lxd_model import (
    ClientInfo,
    LxdCatalogue,
    Published,
    alias_json,
    client_info,
    error_body,
    image_json,
    sync_body,
)
from proxy.metadata import INDEX_PATH, SimplestreamsMetadata
from proxy.resolve import host_architecture
from proxy.simplestreams import await_start, record_hit
from proxy.streaming import CompleteFile, FileSource
from proxy.web import AsyncResource

# What this face offers of LXD's API extensions: only what works. In particular not
# api_filtering, so that clients list with ?recursion=1 and filter themselves.
API_EXTENSIONS: tuple[str, ...] = ()

# Methods that change things: refused as an untrusted caller is refused by LXD.
_WRITES = (b"POST", b"PUT", b"PATCH", b"DELETE")
_READS = (b"GET", b"HEAD")
# What Go's url.PathEscape leaves as it is in a path segment, besides letters, digits and -._~
_PATH_SAFE = "$&+:=@"


class ImageSource(Protocol):
    """One upstream as the LXD face (and URL import) sees it."""

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    async def images(self, family: Family) -> tuple[object, list[Image]]:
        """The upstream's images for C{family}, and a key that changes when they change."""

    async def missing_parts(self, image: Image) -> list[ExportPart]:
        """
        The export parts of C{image}, some of whose files are not stored: started (or joined)
        downloads, once the upstream has accepted them or the grace for that has run out.
        """


class SimplestreamsImages:
    """The images of a simplestreams upstream, from its (cached, refreshed) catalogue."""

    def __init__(
        self,
        metadata: SimplestreamsMetadata,
        fetcher: Fetcher,
        store: BlobStore,
        clock: IReactorTime,
        *,
        families: Mapping[Family, SimplestreamsMetadata] | None = None,
    ) -> None:
        self._metadata = metadata
        self._families: dict[Family, SimplestreamsMetadata] = dict(families or {metadata.family: metadata})
        self._fetcher = fetcher
        self._store = store
        self._clock = clock

    @property
    def name(self) -> str:
        return self._metadata.name

    @property
    def url(self) -> str:
        return self._metadata.base_url

    @property
    def protocol(self) -> str:
        return "simplestreams"

    async def images(self, family: Family) -> tuple[object, list[Image]]:
        metadata = self._families.get(family, self._metadata)
        offline = metadata.offline
        if offline:
            paths = await metadata.products_paths(refresh=False)
        else:
            await metadata.get(INDEX_PATH)
            paths = await metadata.products_paths()
        images: list[Image] = []
        key: list[object] = [offline]
        for path in paths:
            try:
                record = await metadata.get(path)
            except ProxyError:
                if offline:
                    # A products file never fetched lists nothing that can be served.
                    continue
                raise
            key.append(record.sha256)
            # Parsed once per copy, off the reactor, by the catalogue itself.
            images.extend(await metadata.products_images(path, family, refresh=False))
        if offline:
            # As the simplestreams face does while offline: only images that can be served.
            images = [i for i in images if all(self._store.exists(f.sha256) for f in i.files)]
            key.append(frozenset(i.fingerprint for i in images))
        return tuple(key), images

    async def missing_parts(self, image: Image) -> list[ExportPart]:
        sources: list[FileSource] = []
        for item in image.files:
            if self._store.exists(item.sha256):
                sources.append(CompleteFile(self._store.path_for(item.sha256), item.size))
                continue
            download = self._fetcher.get(self.name, item)
            await await_start(download, self._clock)
            sources.append(download)
        return export_parts(image, sources[0], sources[1] if len(sources) > 1 else None)


class LxdRemoteImages:
    """
    The images of an upstream of protocol C{lxd}: every public image it lists, with its files
    as far as an earlier export taught them (L{CacheIndex.get_parts}).
    """

    def __init__(
        self,
        remote: LxdRemote,
        fetcher: Fetcher,
        store: BlobStore,
        index: CacheIndex,
        clock: IReactorTime,
    ) -> None:
        self._remote = remote
        self._fetcher = fetcher
        self._store = store
        self._index = index
        self._clock = clock
        self._by_fingerprint: dict[str, RemoteImage] = {}

    @property
    def name(self) -> str:
        return self._remote.name

    @property
    def url(self) -> str:
        return self._remote.base_url

    @property
    def protocol(self) -> str:
        return "lxd"

    async def images(self, family: Family) -> tuple[object, list[Image]]:
        offline = self._remote.offline
        remote_images = await self._remote.images(refresh=not offline)
        self._by_fingerprint = {r.fingerprint: r for r in remote_images}
        images: list[Image] = []
        known: list[object] = []
        for remote in remote_images:
            arch = remote.arch
            if arch is None:
                continue
            parts = self._index.get_parts(remote.fingerprint)
            known.append(parts)
            image = _image_of(remote, arch, parts)
            if offline and not (
                parts is not None and all(self._store.exists(i.sha256) for i in image.files)
            ):
                continue
            images.append(image)
        return (offline, tuple(r.fingerprint for r in remote_images), tuple(known)), images

    async def missing_parts(self, image: Image) -> list[ExportPart]:
        remote = self._by_fingerprint.get(image.fingerprint)
        if remote is None:
            raise NotFound(f"{self.name}: image {image.fingerprint} is no longer listed")
        download = self._fetcher.get_image(self.name, remote)
        await await_start(download, self._clock)
        fp = image.fingerprint
        if download.kind == "unified":
            return [ExportPart("metadata", unified_filename(fp), download.unified)]
        if download.kind is None:
            # The upstream has not answered within the grace: the client gets its headers
            # now, and the shape expected.
            if remote.presumed_unified:
                return [ExportPart("metadata", unified_filename(fp), download.unified)]
        root_name = "rootfs.img" if remote.type == "virtual-machine" else "rootfs"
        root_ftype = image.root.ftype if image.root is not None else (
            "disk-kvm.img" if remote.type == "virtual-machine" else "squashfs"
        )
        return [
            ExportPart("metadata", meta_filename(fp), download.meta),
            ExportPart(root_name, root_filename(fp, root_ftype), download.root),
        ]


def _image_of(remote: RemoteImage, arch: str, parts: ImageParts | None) -> Image:
    """
    A catalogue image for an LXD upstream's image: with its real files when they are known,
    else with one placeholder file of the whole size and no hash (never looked up in the store).
    """
    fp = remote.fingerprint
    product = base_product(remote)
    version = version_base(remote)
    if parts is None:
        meta = Item(remote.filename or unified_filename(fp), "", remote.size, "lxd_combined.tar.gz", product, version)
        root = None
    elif parts.root_sha256 is None:
        meta = Item(image_item_path(fp, unified_filename(fp)), parts.meta_sha256, parts.meta_size,
                    "lxd_combined.tar.gz", product, version)
        root = None
    else:
        meta = Item(image_item_path(fp, meta_filename(fp, parts.meta_ftype)), parts.meta_sha256,
                    parts.meta_size, parts.meta_ftype, product, version)
        root = Item(image_item_path(fp, root_filename(fp, parts.root_ftype)), parts.root_sha256,
                    parts.root_size, parts.root_ftype, product, version)
    return Image(
        fingerprint=fp,
        type=remote.type,
        arch=arch,
        product=product,
        version=remote.prop("serial") or version,
        aliases=remote.aliases,
        meta=meta,
        root=root,
        architecture=ARCHITECTURES.get(remote.architecture, remote.architecture),
        os=remote.prop("os"),
        release=remote.prop("release"),
        release_title=remote.prop("release") or remote.prop("version"),
        variant=remote.prop("variant"),
        label=remote.prop("label"),
        os_version=remote.prop("version"),
        created_at=remote.created_at or _EPOCH,
        expires_at=remote.expires_at or _EPOCH,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@define
class ServerCertificate:
    """The certificate the listeners serve, filled in once it is loaded or generated."""

    pem: str = ""
    fingerprint: str = ""


@frozen
class _Built:
    key: object
    catalogue: LxdCatalogue


class FaceCatalogue:
    """The L{LxdCatalogue} of the listed upstreams, rebuilt only when one of them changed."""

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        self._sources = list(sources)
        self._built: dict[Family, _Built] = {}

    @property
    def sources(self) -> list[ImageSource]:
        return list(self._sources)

    def source(self, name: str) -> ImageSource:
        for source in self._sources:
            if source.name == name:
                return source
        raise NotFound(f"no upstream named {name!r} is listed here")

    async def get(self, family: Family) -> LxdCatalogue:
        keys: list[object] = []
        published: list[tuple[str, list[Image]]] = []
        for source in self._sources:
            key, images = await source.images(family)
            keys.append(key)
            published.append((source.name, images))
        key = tuple(keys)
        built = self._built.get(family)
        if built is None or built.key != key:
            built = _Built(key, LxdCatalogue(published))
            self._built[family] = built
        return built.catalogue


class LxdApiResource(AsyncResource):
    """Everything under C{/1.0}."""

    isLeaf = True
    log = Logger()
    allowed_methods = (*_READS, *_WRITES)

    def __init__(
        self,
        catalogue: FaceCatalogue,
        store: BlobStore,
        index: CacheIndex,
        clock: IReactorTime,
        in_use: InUse,
        certificate: ServerCertificate,
        *,
        host_arch: str | None = None,
        agents: ClientAgents | None = None,
    ) -> None:
        super().__init__()
        self._agents = agents if agents is not None else ClientAgents()
        self._catalogue = catalogue
        self._store = store
        self._index = index
        self._clock = clock
        self._in_use = in_use
        self._certificate = certificate
        self._host_arch = host_arch or host_architecture()

    def render_error(self, request: Request, error: ProxyError) -> None:
        # LXD clients decode every error as the envelope; its error text is what they show.
        body = error_body(error.code, " ".join(error.message.splitlines()))
        request.setResponseCode(error.code)
        for name, value in error.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)

    async def handle(self, request: Request) -> bytes | None:
        segments = _segments(request.path)
        _check_project(request)
        agent = request.getHeader(b"User-Agent")
        self._agents.note(agent)
        client = client_info(agent)
        if segments == []:
            _read_only(request)
            return _json(request, self._server())
        if segments[0] != "images":
            raise NotFound("not found")
        rest = segments[1:]
        if rest == []:
            _read_only(request, what="images cannot be added through this server")
            return await self._images(request, client)
        if rest[0] == "aliases":
            names = rest[1:]
            if not names:
                _read_only(request, what="aliases cannot be added through this server")
                return await self._aliases(request, client)
            _read_only(request, what="aliases cannot be changed through this server")
            return await self._alias("/".join(names), request, client)
        fingerprint, tail = rest[0], rest[1:]
        if tail == []:
            _read_only(request, what="images cannot be changed through this server")
            return await self._image(fingerprint, request, client)
        if tail == ["export"]:
            _read_only(request)
            await self._export(fingerprint, request, client)
            return None
        if tail in (["secret"], ["refresh"]):
            # Every image is public: no secret is ever needed, and refreshing is the proxy's job.
            raise Forbidden("not authorized")
        raise NotFound("not found")

    # -- answers ----------------------------------------------------------------------------

    def _server(self) -> dict[str, Any]:
        return {
            "api_extensions": list(API_EXTENSIONS),
            "api_status": "stable",
            "api_version": "1.0",
            "auth": "untrusted",
            "public": True,
            "auth_methods": ["tls"],
            "config": {},
            "environment": {
                "certificate": self._certificate.pem,
                "certificate_fingerprint": self._certificate.fingerprint,
                "server": "lxd-image-proxy",
                "server_version": __version__,
            },
        }

    def _arch(self, client: ClientInfo) -> str:
        return client.architecture or self._host_arch

    async def _images(self, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._catalogue.get(client.family)
        published = catalogue.images()
        if _recursion(request):
            arch = self._arch(client)
            return _json(request, [self._image_json(catalogue, p, arch) for p in published])
        return _json(request, [f"/1.0/images/{p.image.fingerprint}" for p in published])

    async def _image(self, prefix: str, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._catalogue.get(client.family)
        published = catalogue.find(prefix)
        return _json(request, self._image_json(catalogue, published, self._arch(client)))

    async def _aliases(self, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._catalogue.get(client.family)
        entries = sorted(catalogue.aliases(self._arch(client)).values(), key=lambda e: e.name)
        if _recursion(request):
            return _json(request, [alias_json(e) for e in entries])
        # One path segment each, escaped as LXD's api.URL escapes it (Go's url.PathEscape):
        # ubuntu/24.04 is listed as ubuntu%2F24.04.
        return _json(
            request, [f"/1.0/images/aliases/{quote(e.name, safe=_PATH_SAFE)}" for e in entries]
        )

    async def _alias(self, name: str, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._catalogue.get(client.family)
        entry = catalogue.alias(name, self._arch(client))
        if entry is None:
            raise NotFound("not found")
        return _json(request, alias_json(entry))

    def _image_json(self, catalogue: LxdCatalogue, published: Published, arch: str) -> dict[str, Any]:
        source = self._catalogue.source(published.upstream)
        # A placeholder file (an LXD upstream's image not exported yet) has no hash to look up.
        records = [
            self._index.get(item.sha256) if item.sha256 else None
            for item in published.image.files
        ]
        stored = [r for r in records if r is not None]
        complete = len(stored) == len(records)
        pinned = complete and any(not r.cached for r in stored)
        return image_json(
            published,
            aliases=catalogue.aliases_of(published.image.fingerprint, arch),
            cached=complete and not pinned,
            auto_update=pinned,
            last_used_at=_last_used(stored),
            server_url=source.url,
            protocol=source.protocol,
        )

    async def _export(self, prefix: str, request: Request, client: ClientInfo) -> None:
        catalogue = await self._catalogue.get(client.family)
        published = catalogue.find(prefix)
        source = self._catalogue.source(published.upstream)
        image = published.image
        items = [item for item in image.files if item.sha256]
        with ExitStack() as holds:
            for item in items:
                holds.enter_context(self._in_use.holding(item.sha256))
            hit = len(items) == len(image.files) and all(
                self._store.exists(item.sha256) for item in items
            )
            if hit:
                sources = [
                    CompleteFile(self._store.path_for(item.sha256), item.size) for item in items
                ]
                for item in items:
                    await record_hit(self._index, self._clock, source.name, item.path, item)
                parts = export_parts(image, sources[0], sources[1] if len(sources) > 1 else None)
            elif request.method == b"HEAD" and len(items) == len(image.files):
                # The headers need only the sizes: a HEAD must not start a download. (An LXD
                # upstream's image whose files are not known yet has no sizes to give.)
                placeholders = [
                    CompleteFile(self._store.path_for(item.sha256), item.size) for item in items
                ]
                parts = export_parts(
                    image, placeholders[0], placeholders[1] if len(placeholders) > 1 else None
                )
            else:
                parts = await source.missing_parts(image)
            await serve_export(request, parts, clock=self._clock)
        self._index.note_served(hit, request.sentLength)
        if not hit:
            # Counted once the body is out: the records exist only after the commit.
            for item in items:
                self._index.note_use(item.sha256)


# -- request details ----------------------------------------------------------------------------


def _segments(raw: bytes) -> list[str]:
    """The decoded path segments after C{/1.0}; a trailing slash is ignored, as LXD does."""
    parts = raw.split(b"?", 1)[0].split(b"/")[2:]
    if parts and parts[-1] == b"":
        parts = parts[:-1]
    decoded: list[str] = []
    for part in parts:
        try:
            text = unquote(part.decode("ascii"), errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadRequest("request path is not valid")
        if "\x00" in text:
            raise BadRequest("request path is not valid")
        # An escaped slash (ubuntu%2F24.04) belongs to an alias name: split it as LXD's router
        # does not, by keeping the pieces in order.
        decoded.extend(text.split("/"))
    return decoded


def _query(request: Request) -> dict[str, list[str]]:
    query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    try:
        return parse_qs(query.decode("ascii"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("query string is not valid")


def _check_project(request: Request) -> None:
    project = _query(request).get("project", ["default"])[-1]
    if project not in ("", "default"):
        # As LXD answers an untrusted caller about another project.
        raise NotFound("not found")


def _recursion(request: Request) -> bool:
    value = _query(request).get("recursion", ["0"])[-1]
    return value not in ("", "0")


def _read_only(request: Request, what: str = "this server is read-only") -> None:
    if request.method in _WRITES:
        raise Forbidden(f"not authorized: {what}")
    if request.method not in _READS:
        raise MethodNotAllowed("method not allowed")


def _json(request: Request, metadata: Any) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    body = sync_body(metadata)
    if request.method == b"HEAD":
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return b""
    return body


def _last_used(records: list[FileRecord]) -> float | None:
    used = [r.last_used_at for r in records if r.use_count > 0]
    return max(used) if used else None


__all__ = [
    "API_EXTENSIONS", "FaceCatalogue", "LxdApiResource", "LxdRemoteImages", "ServerCertificate",
    "SimplestreamsImages",
]
