"""Direct URL import: C{lxc image import https://HOST:PORT/import/UPSTREAM/REF}.

LXD (up to 6.8) and Incus import an image from a URL by asking it with C{HEAD} for
C{LXD-Image-Hash} and C{LXD-Image-URL} (C{Incus-Image-Hash}, C{Incus-Image-URL}), then
downloading that URL and checking the whole body against the hash (PROTOCOLS.md §3). Only a
unified image is one file, so only unified images can be imported this way; the URL handed out
is the image's file on the simplestreams face, served from the cache like any other file.

C{REF} is a fingerprint (or a unique start of one) or an alias. An alias is resolved for the
first architecture the importing server names in C{LXD-Server-Architectures} (or
C{?arch=NAME}, or the User-Agent's), as a container unless C{?type=virtual-machine}.
"""

from __future__ import annotations

import re
from typing import Mapping
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from proxy.catalogue import ARCHITECTURES, Image
from proxy.client_networks import UpstreamAccess, client_host
from proxy.errors import BadRequest, NotFound
from proxy.images import ImageSource
from proxy.lxd_model import client_info
from proxy.resolve import CONTAINER, VIRTUAL_MACHINE, host_architecture, resolve_alias
from proxy.web import AsyncResource, relative_path

# A Host header fit to be put into a URL: a name or address and a port, nothing else.
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_HEX = re.compile(r"[0-9a-f]{1,64}")


class ImportResource(AsyncResource):
    """Everything under C{/import/}."""

    isLeaf = True

    def __init__(
        self, sources: Mapping[str, ImageSource], clock: IReactorTime, *, host_arch: str | None = None,
        access: UpstreamAccess = UpstreamAccess(),
    ) -> None:
        super().__init__()
        # Who may import from which upstream ([upstreams.NAME] allow): others get a 403.
        self._access = access
        self._sources = dict(sources)
        self._clock = clock
        self._host_arch = host_arch or host_architecture()

    async def handle(self, request: Request) -> bytes:
        path = relative_path(request.path.split(b"?", 1)[0], 1)
        name, _, ref = path.partition("/")
        if not name or not ref:
            raise NotFound(
                "import an image with lxc image import https://HOST:PORT/import/UPSTREAM/ALIAS"
                " (or FINGERPRINT)"
            )
        source = self._sources.get(name)
        if source is None:
            raise NotFound(f"no upstream named {name!r} is configured here")
        self._access.check(name, client_host(request))
        client = client_info(request.getHeader(b"User-Agent"))
        _key, images = await source.images(client.family)
        image = self._find(images, ref, request)
        if image.root is not None:
            raise BadRequest(
                f"{name}:{ref} is a split image (metadata and root file): URL import takes one"
                " file; add this proxy as a remote and use lxc image copy instead"
            )
        url = f"https://{_host(request)}/{quote(name)}/{quote(image.meta.path)}"
        for family in (b"LXD", b"Incus"):
            request.setHeader(family + b"-Image-Hash", image.fingerprint.encode("ascii"))
            request.setHeader(family + b"-Image-URL", url.encode("ascii"))
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        body = f"{image.fingerprint} {url}\n".encode("ascii")
        if request.method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            return b""
        return body

    def _find(self, images: list[Image], ref: str, request: Request) -> Image:
        if _HEX.fullmatch(ref):
            found = list({i.fingerprint: i for i in images if i.fingerprint.startswith(ref)}.values())
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise BadRequest(f"more than one image has a fingerprint starting with {ref}")
        arch = self._arch(request)
        kind = _query_value(request, b"type") or CONTAINER
        if kind not in (CONTAINER, VIRTUAL_MACHINE):
            raise BadRequest(f"type must be {CONTAINER} or {VIRTUAL_MACHINE}, not {kind!r}")
        image = resolve_alias(images, ref, arch, kind)
        if image is None and "/" in ref:
            # ALIAS/ARCH names that architecture whoever imports, as on the LXD face.
            named = ARCHITECTURES.get(ref.rsplit("/", 1)[1])
            if named is not None and named != arch:
                arch = named
                image = resolve_alias(images, ref, arch, kind)
        if image is None:
            raise NotFound(f"no {kind} image {ref} for {arch}")
        return image

    def _arch(self, request: Request) -> str:
        wanted = _query_value(request, b"arch")
        if wanted:
            if wanted not in ARCHITECTURES:
                raise BadRequest(f"{wanted!r} is not an architecture LXD knows")
            return ARCHITECTURES[wanted]
        for header in (b"LXD-Server-Architectures", b"Incus-Server-Architectures"):
            value = request.getHeader(header)
            if value:
                first = value.decode("latin-1").split(",")[0].strip()
                if first in ARCHITECTURES:
                    return ARCHITECTURES[first]
        return client_info(request.getHeader(b"User-Agent")).architecture or self._host_arch


def _query_value(request: Request, name: bytes) -> str:
    values = request.args.get(name) if request.args else None
    if not values:
        return ""
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("query string is not valid UTF-8")


def _host(request: Request) -> str:
    """The name and port the client reached this server by, for the URL it is sent to."""
    header = request.getHeader(b"Host")
    if header:
        text = header.decode("latin-1")
        if _HOST.fullmatch(text):
            return text
    address = request.getHost()
    return f"localhost:{getattr(address, 'port', 8443)}"


__all__ = ["ImportResource"]
