"""An in-memory LXD server with public images, for the tests of an upstream of protocol "lxd".

It answers C{GET /1.0/images?recursion=1} with LXD's sync envelope and
C{GET /1.0/images/FP/export} as LXD's C{imageExport} does (lxd/images.go, lxd/response
C{fileResponse}): a split image as C{multipart/form-data} framed byte for byte as Go's
C{mime/multipart} writer frames it (C{CreateFormFile} part headers, C{CRLF--boundary}
delimiters, C{--boundary--} at the end, no Content-Length), a unified one as
C{application/octet-stream} with C{Content-Length} and C{Content-Disposition: inline;filename=}.
Requests are recorded; an export can be held and written by the test piece by piece.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from attrs import define, field
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.catalogue import Family
from proxy.health import UpstreamHealth
from proxy.config import LXD, UpstreamConfig
from proxy.downloads import Fetcher
from proxy.lxd_remote import LxdRemote
from proxy.files import CacheFiles
from proxy.simplestreams import RootResource, UpstreamResource
from tests.helpers.harness import IDLE, CacheHarness

LXD_URL = "https://lxd.test:8443"
GO_BOUNDARY = "3c1d5e0e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@define
class FakeImage:
    """One image of the fake server: a metadata file and a rootfs file, or one unified file."""

    meta: bytes
    rootfs: bytes | None = None
    type: str = "container"
    architecture: str = "x86_64"
    aliases: tuple[str, ...] = ()
    properties: dict[str, str] = field(factory=dict)
    created_at: str = "2024-07-02T10:20:30Z"
    uploaded_at: str = "2024-07-02T10:25:00Z"
    public: bool = True
    root_ext: str = ".squashfs"

    @property
    def fingerprint(self) -> str:
        return sha(self.meta + (self.rootfs or b""))

    @property
    def size(self) -> int:
        return len(self.meta) + len(self.rootfs or b"")

    def api_json(self) -> dict[str, Any]:
        return {
            "aliases": [{"name": a, "description": ""} for a in self.aliases],
            "architecture": self.architecture,
            "auto_update": False,
            "cached": False,
            "fingerprint": self.fingerprint,
            "filename": f"{self.fingerprint[:12]}.tar.xz",
            "properties": dict(self.properties),
            "public": self.public,
            "size": self.size,
            "type": self.type,
            "created_at": self.created_at,
            "uploaded_at": self.uploaded_at,
            "expires_at": "0001-01-01T00:00:00Z",
            "last_used_at": "0001-01-01T00:00:00Z",
            "profiles": ["default"],
            "project": "default",
            "update_source": None,
        }

    def export(self, boundary: str = GO_BOUNDARY) -> tuple[bytes, bytes]:
        """(Content-Type, body) as LXD sends the export."""
        fp = self.fingerprint
        if self.rootfs is None:
            return b"application/octet-stream", self.meta
        root_name = "rootfs.img" if self.type == "virtual-machine" else "rootfs"
        body = go_multipart(boundary, [
            ("metadata", f"meta-{fp}.tar.xz", self.meta),
            (root_name, f"{fp}{self.root_ext}", self.rootfs),
        ])
        return f"multipart/form-data; boundary={boundary}".encode(), body


def go_multipart(boundary: str, parts: list[tuple[str, str, bytes]]) -> bytes:
    """What Go's C{multipart.Writer} writes for C{CreateFormFile} parts, then C{Close}."""
    out = bytearray()
    for i, (name, filename, data) in enumerate(parts):
        out += (b"\r\n--" if i else b"--") + boundary.encode() + b"\r\n"
        out += f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n"
        out += data
    out += b"\r\n--" + boundary.encode() + b"--\r\n"
    return bytes(out)


def envelope(metadata: Any) -> bytes:
    return json.dumps({
        "type": "sync", "status": "Success", "status_code": 200, "operation": "",
        "error_code": 0, "error": "", "metadata": metadata,
    }).encode()


def error_envelope(code: int, message: str) -> bytes:
    return json.dumps({
        "type": "error", "status": "", "status_code": 0, "operation": "",
        "error_code": code, "error": message, "metadata": None,
    }).encode()


@define
class HeldExport:
    request: Request
    body: bytes

    def write(self, data: bytes) -> None:
        self.request.write(data)

    def write_until(self, end: int, start: int = 0) -> None:
        self.request.write(self.body[start:end])

    def finish(self) -> None:
        self.request.finish()

    def break_connection(self) -> None:
        transport: Any = self.request.channel.transport
        transport.abortConnection()


class FakeLxd(Resource):
    """The LXD API at the root of C{LXD_URL}, for the images in C{images}."""

    isLeaf = True

    def __init__(self, images: list[FakeImage] | None = None) -> None:
        super().__init__()
        self.images: list[FakeImage] = list(images or [])
        self.requests: list[tuple[str, dict[bytes, bytes]]] = []
        self.list_status: int | None = None
        self.list_etag: bytes | None = None
        self.hold_exports = False
        self.held: dict[str, list[HeldExport]] = {}
        # fingerprint -> (content type, body) served instead of the real export
        self.export_override: dict[str, tuple[bytes, bytes]] = {}
        self.export_status: dict[str, int] = {}
        self.override: dict[str, Callable[[Request], Any]] = {}

    def exports_requested(self, fingerprint: str) -> int:
        return sum(1 for path, _ in self.requests if path == f"/1.0/images/{fingerprint}/export")

    def list_requests(self) -> list[dict[bytes, bytes]]:
        return [headers for path, headers in self.requests if path == "/1.0/images?recursion=1"]

    def image(self, fingerprint: str) -> FakeImage | None:
        for image in self.images:
            if image.fingerprint == fingerprint:
                return image
        return None

    def render_GET(self, request: Request) -> Any:
        uri = request.uri.decode()
        headers = {k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((uri, headers))
        if uri in self.override:
            return self.override[uri](request)
        if uri == "/1.0/images?recursion=1":
            return self._list(request, headers)
        parts = request.path.decode().split("/")
        if len(parts) == 5 and parts[:3] == ["", "1.0", "images"] and parts[4] == "export":
            return self._export(request, parts[3])
        request.setResponseCode(404)
        return error_envelope(404, "Not Found")

    def _list(self, request: Request, headers: dict[bytes, bytes]) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if self.list_status is not None:
            request.setResponseCode(self.list_status)
            return error_envelope(self.list_status, "scripted failure")
        if self.list_etag is not None:
            if headers.get(b"if-none-match") == self.list_etag:
                request.setResponseCode(304)
                return b""
            request.setHeader(b"ETag", self.list_etag)
        return envelope([i.api_json() for i in self.images if i.public])

    def _export(self, request: Request, fingerprint: str) -> Any:
        if fingerprint in self.export_status:
            code = self.export_status[fingerprint]
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"application/json")
            return error_envelope(code, "scripted export failure")
        image = self.image(fingerprint)
        if image is None or not image.public:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"application/json")
            return error_envelope(404, f'Image "{fingerprint}" not found')
        content_type, body = self.export_override.get(fingerprint) or image.export()
        request.setHeader(b"Content-Type", content_type)
        if content_type == b"application/octet-stream":
            request.setHeader(b"Content-Length", str(len(body)).encode())
            request.setHeader(b"Content-Disposition", f"inline;filename={fingerprint}.tar.gz".encode())
        # A multipart export has no Content-Length: Twisted sends it chunked, as LXD does.
        if self.hold_exports:
            held = HeldExport(request, body)
            self.held.setdefault(fingerprint, []).append(held)
            request.write(b"")
            return NOT_DONE_YET
        return body


# -- the proxy's side, wired in memory -----------------------------------------------------------

TTL = 300.0
UPSTREAM = "lxd"


class LxdHarness(CacheHarness):
    """
    An L{LxdRemote} and the download engine (L{Fetcher}) reading a L{FakeLxd} through the
    proxy's own L{UpstreamClient} over C{RequestTraversalAgent}; the simplestreams face over
    them as a C{StubTreq} client sees it. Time is a L{Clock}; L{settle} pumps everything.
    """

    upstream_name = UPSTREAM

    def __init__(
        self,
        tmp_path: Any,
        images: list[FakeImage] | None = None,
        *,
        health: bool = False,
        make_room: Callable[[int], bool] | None = None,
        families: tuple[Family, ...] = ("lxd",),
    ) -> None:
        self.server = FakeLxd(images)
        super().__init__(tmp_path, self.server, LXD_URL)
        self.health = UpstreamHealth(UPSTREAM, self.clock) if health else None
        self.remote = LxdRemote(
            UPSTREAM, LXD_URL, self.client, self.store, self.index, self.clock, ttl=TTL,
            idle_timeout=IDLE, health=self.health, families=families,
        )
        self.fetcher = Fetcher(
            self.client, self.store, self.index, self.clock,
            [UpstreamConfig(UPSTREAM, LXD_URL, protocol=LXD)], IDLE, make_room=make_room,
            health={UPSTREAM: self.health} if self.health is not None else None,
        )
        files = CacheFiles(
            self.store, self.index, self.fetcher, self.clock,
            health={UPSTREAM: self.health} if self.health is not None else None,
        )
        resource = UpstreamResource(self.remote, files, self.store, self.clock)
        self.proxy = StubTreq(RootResource({UPSTREAM: resource}, "banner\n"))

    def call(self, coroutine: Any) -> Any:
        return self.run(Deferred.fromCoroutine(coroutine))
