"""A scripted in-memory upstream for deterministic tests of the proxy's request path.

Each request is recorded. A file can be served at once, or held: the request then waits
(C{NOT_DONE_YET}) until the test writes chunks to it and finishes or breaks it, which is how the
tests see what the proxy does while a download is in flight.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from attrs import define
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

BASE_URL = "https://upstream.test/base"


@define
class Held:
    request: Request

    def write(self, data: bytes) -> None:
        self.request.write(data)

    def finish(self) -> None:
        self.request.finish()

    def break_connection(self) -> None:
        transport: Any = self.request.channel.transport
        transport.abortConnection()


class ScriptedUpstream(Resource):
    """Serves C{files} under C{/base/}; C{requests} lists every (method, path, headers) seen."""

    isLeaf = True

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        # Shared, not copied: a test changes what the upstream serves by changing this dict.
        self.files: dict[str, bytes] = files if files is not None else {}
        self.requests: list[tuple[bytes, str, dict[bytes, bytes]]] = []
        self.held_paths: set[str] = set()
        self.held: dict[str, list[Held]] = {}
        self.statuses: dict[str, int] = {}
        self.redirects: dict[str, bytes] = {}
        self.etags: dict[str, bytes] = {}
        self.override: dict[str, Callable[[Request], Any]] = {}

    def paths_requested(self, path: str) -> int:
        return sum(1 for _, p, _ in self.requests if p == path)

    def render(self, request: Request) -> Any:
        path = request.path.decode("utf-8")
        assert path.startswith("/base/"), path
        path = path[len("/base/"):]
        headers = {k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method, path, headers))
        if path in self.override:
            return self.override[path](request)
        if path in self.redirects:
            request.redirect(self.redirects[path])
            return b""
        if path in self.statuses:
            request.setResponseCode(self.statuses[path])
            return b"scripted failure\n"
        body = self.files.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"no such file\n"
        etag = self.etags.get(path)
        if etag is not None:
            if headers.get(b"if-none-match") == etag:
                request.setResponseCode(304)
                return b""
            request.setHeader(b"ETag", etag)
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if path in self.held_paths:
            held = Held(request)
            self.held.setdefault(path, []).append(held)
            request.write(b"")
            return NOT_DONE_YET
        return body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def simple_tree(rootfs: bytes = b"R" * 300_000, meta: bytes = b"M" * 500) -> dict[str, bytes]:
    """A one-image simplestreams tree: index, products file, metadata and squashfs items."""
    version = "20240101_0000"
    base = f"images/testos/1.0/amd64/default/{version}"
    products = {
        "content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
        "products": {"testos:1.0:amd64:default": {
            "aliases": "testos/1.0", "arch": "amd64", "os": "testos", "release": "1.0",
            "release_title": "1.0",
            "versions": {version: {"items": {
                "lxd.tar.xz": {"ftype": "lxd.tar.xz", "path": f"{base}/lxd.tar.xz",
                               "size": len(meta), "sha256": sha(meta),
                               "combined_squashfs_sha256": sha(meta + rootfs)},
                "root.squashfs": {"ftype": "squashfs", "path": f"{base}/rootfs.squashfs",
                                  "size": len(rootfs), "sha256": sha(rootfs)},
            }}},
        }},
    }
    index = {"format": "index:1.0", "index": {"images": {
        "datatype": "image-downloads", "path": "streams/v1/images.json", "format": "products:1.0",
        "products": ["testos:1.0:amd64:default"]}}}
    return {
        "streams/v1/index.json": json.dumps(index).encode(),
        "streams/v1/images.json": json.dumps(products).encode(),
        f"{base}/lxd.tar.xz": meta,
        f"{base}/rootfs.squashfs": rootfs,
    }


ROOTFS_PATH = "images/testos/1.0/amd64/default/20240101_0000/rootfs.squashfs"
META_PATH = "images/testos/1.0/amd64/default/20240101_0000/lxd.tar.xz"
