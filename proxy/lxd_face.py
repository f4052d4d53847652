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
from proxy.access_log import HIT, MISS, note_cache
from proxy.agents import ClientAgents
from proxy.client_networks import UpstreamAccess, client_host
from proxy.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, ProxyError
from proxy.export import export_parts, serve_export
from proxy.files import CacheFiles
from proxy.images import FaceCatalogue
from proxy.index import FileRecord
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
from proxy.resolve import host_architecture
from proxy.web import AsyncResource

# What this face offers of LXD's API extensions: only what works. In particular not
# api_filtering, so that clients list with ?recursion=1 and filter themselves.
API_EXTENSIONS: tuple[str, ...] = ()

# Methods that change things: refused as an untrusted caller is refused by LXD.
_WRITES = (b"POST", b"PUT", b"PATCH", b"DELETE")
_READS = (b"GET", b"HEAD")
# What Go's url.PathEscape leaves as it is in a path segment, besides letters, digits and -._~
_PATH_SAFE = "$&+:=@"


@define
class ServerCertificate:
    """The certificate the listeners serve, filled in once it is loaded or generated."""

    pem: str = ""
    fingerprint: str = ""


class LxdApiResource(AsyncResource):
    """Everything under C{/1.0}."""

    isLeaf = True
    log = Logger()
    allowed_methods = (*_READS, *_WRITES)

    def __init__(
        self,
        catalogue: FaceCatalogue,
        files: CacheFiles,
        clock: IReactorTime,
        certificate: ServerCertificate,
        *,
        host_arch: str | None = None,
        agents: ClientAgents | None = None,
        access: UpstreamAccess = UpstreamAccess(),
    ) -> None:
        super().__init__()
        # Which listed upstreams a client may use ([upstreams.NAME] allow): only their images
        # are listed, named and exported to it; another's is not found, as LXD answers an
        # untrusted client about an image it may not see.
        self._access = access
        self._agents = agents if agents is not None else ClientAgents()
        self._catalogue = catalogue
        self._files = files
        self._clock = clock
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

    async def _listed(self, request: Request, client: ClientInfo) -> LxdCatalogue:
        """The catalogue of the listed upstreams that the client of C{request} may use."""
        names = [source.name for source in self._catalogue.sources]
        usable = self._access.usable(client_host(request), names)
        # None when it may use them all: the one catalogue every such client shares.
        return await self._catalogue.get(client.family, None if len(usable) == len(names) else usable)

    def _arch(self, client: ClientInfo) -> str:
        return client.architecture or self._host_arch

    async def _images(self, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._listed(request, client)
        published = catalogue.images()
        if _recursion(request):
            arch = self._arch(client)
            return _json(request, [self._image_json(catalogue, p, arch) for p in published])
        return _json(request, [f"/1.0/images/{p.image.fingerprint}" for p in published])

    async def _image(self, prefix: str, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._listed(request, client)
        published = catalogue.find(prefix)
        return _json(request, self._image_json(catalogue, published, self._arch(client)))

    async def _aliases(self, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._listed(request, client)
        entries = sorted(catalogue.aliases(self._arch(client)).values(), key=lambda e: e.name)
        if _recursion(request):
            return _json(request, [alias_json(e) for e in entries])
        # One path segment each, escaped as LXD's api.URL escapes it (Go's url.PathEscape):
        # ubuntu/24.04 is listed as ubuntu%2F24.04.
        return _json(
            request, [f"/1.0/images/aliases/{quote(e.name, safe=_PATH_SAFE)}" for e in entries]
        )

    async def _alias(self, name: str, request: Request, client: ClientInfo) -> bytes:
        catalogue = await self._listed(request, client)
        entry = catalogue.alias(name, self._arch(client))
        if entry is None:
            raise NotFound("not found")
        return _json(request, alias_json(entry))

    def _image_json(self, catalogue: LxdCatalogue, published: Published, arch: str) -> dict[str, Any]:
        source = self._catalogue.source(published.upstream)
        # A placeholder file (an LXD upstream's image not exported yet) has no hash to look up.
        records = self._files.records(published.image.files)
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
        catalogue = await self._listed(request, client)
        published = catalogue.find(prefix)
        source = self._catalogue.source(published.upstream)
        image = published.image
        files = self._files
        async with files.open_image(source.name, image.files, sent=lambda: request.sentLength) as stored:
            # Started and joined exports are not told apart here: both are misses.
            note_cache(request, HIT if stored is not None else MISS)
            if stored is not None:
                parts = export_parts(image, stored[0], stored[1] if len(stored) > 1 else None)
            elif request.method == b"HEAD" and all(item.sha256 for item in image.files):
                # The headers need only the sizes: a HEAD must not start a download. (An LXD
                # upstream's image whose files are not known yet has no sizes to give.)
                placeholders = [files.stored_file(item) for item in image.files]
                parts = export_parts(
                    image, placeholders[0], placeholders[1] if len(placeholders) > 1 else None
                )
            else:
                parts = await source.missing_parts(image)
            await serve_export(request, parts, clock=self._clock)


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
