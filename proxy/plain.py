# -*- test-case-name: tests.test_plain -*-
"""
The plain-HTTP face: the image files the catalogues list, and nothing else.

LXD and Incus fetch every simplestreams image file over plain C{http://} on the remote's host
and port first, and over HTTPS only when that fails (PROTOCOLS.md §1.8); they check the file
against the sha256 of the catalogue they fetched over HTTPS. So a plain-HTTP C{GET} or
C{HEAD} of C{/NAME/<item path>} is served exactly as over HTTPS (hits, joined and cold
downloads, the last byte held until verified; sent with C{sendfile}), while everything else
(catalogues, C{/1.0}, status pages, C{setup.sh}, import) gets a 400 pointing to
C{https://}: a catalogue over plain HTTP would let a man in the middle choose the hashes.

L{PlainRoot} routes through the HTTPS site's L{RootResource}, so who may use the proxy
(C{[server] allow}) and the metrics' request counts are the same on both.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from proxy.errors import BadRequest
from proxy.request_target import READ_METHODS
from proxy.simplestreams import RootResource, UpstreamResource, _ForbiddenResource
from proxy.web import relative_path

HTTPS_ONLY_BODY = (
    b"Over plain HTTP this port serves only image files; use https:// to reach the LXD image "
    b"proxy.\n"
)


def answer_https_only(request: Request) -> bytes:
    """The 400 for whatever plain HTTP may not have; the connection closes after it."""
    request.setResponseCode(400)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % (len(HTTPS_ONLY_BODY),))
    # As the port answered before plain HTTP was served: a client sending anything else is
    # not an LXD host after an image file.
    request.setHeader(b"Connection", b"close")
    request.channel.persistent = False
    return b"" if request.method == b"HEAD" else HTTPS_ONLY_BODY


class _HttpsOnly(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return answer_https_only(request)


class _ItemFiles(Resource):
    """An upstream's item files over plain HTTP; its catalogue is for HTTPS only."""

    isLeaf = True
    log = Logger()

    def __init__(self, upstream: UpstreamResource) -> None:
        super().__init__()
        self._upstream = upstream

    def render(self, request: Request) -> Any:
        try:
            path = relative_path(request.path, 1)
        except BadRequest:
            path = ""
        if request.method not in READ_METHODS or not path or path.startswith("streams/"):
            self.log.debug(
                "plain {method} {uri} answered with 400",
                method=request.method.decode("latin-1"), uri=request.uri.decode("latin-1"),
            )
            return answer_https_only(request)
        return self._upstream.render(request)


class PlainRoot(Resource):
    """C{/} of the plain-HTTP site: L{_ItemFiles} per upstream of C{root}, a 400 elsewhere."""

    def __init__(self, root: RootResource) -> None:
        super().__init__()
        self._root = root

    def getChild(self, path: bytes, request: Any) -> IResource:
        child = self._root.getChild(path, request)
        if isinstance(child, UpstreamResource):
            return _ItemFiles(child)
        if isinstance(child, _ForbiddenResource):
            # [server] allow holds on every port.
            return child
        return _HttpsOnly()

    def render(self, request: Request) -> bytes:
        return answer_https_only(request)


__all__ = ["HTTPS_ONLY_BODY", "PlainRoot", "answer_https_only"]
