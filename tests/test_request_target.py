"""Request-target forms and methods the faces do not serve, answered as nginx does."""

from __future__ import annotations

from typing import cast

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Request

from proxy.channel import HeadLimits, ProxyChannel, ProxySite
from proxy.request_target import origin_form, refusal
from proxy.simplestreams import RootResource
from proxy.web import AsyncResource


class Echo(AsyncResource):
    """A face (GET and HEAD) that answers with what the request looked like once parsed."""

    isLeaf = True

    async def handle(self, request: Request) -> bytes:
        host = request.getHeader(b"Host") or b"-"
        return b"%s %s %s" % (request.uri, request.path, host)


def exchange(raw: bytes) -> tuple[bytes, bool]:
    """The proxy's answer to C{raw} and whether it closes the connection."""
    site = ProxySite(RootResource({}, "banner\n", {"images": Echo()}), HeadLimits(), Clock())
    channel = cast(ProxyChannel, site.buildProtocol(None))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    return transport.value(), bool(transport.disconnecting)


def head_and_body(answer: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"/images/x", (b"/images/x", None)),
        (b"https://h:8443/images/x?a=b", (b"/images/x?a=b", b"h:8443")),
        (b"HTTP://H/", (b"/", b"H")),
        (b"https://h", (b"/", b"h")),
        (b"https://h?q", (b"/?q", b"h")),
        (b"https://user:pw@h/x", (b"/x", b"h")),
        (b"ftp://h/x", (b"ftp://h/x", None)),
        (b"*", (b"*", None)),
    ],
)
def test_origin_form(target: bytes, expected: tuple[bytes, bytes | None]) -> None:
    assert origin_form(target) == expected


def test_refusal_rules() -> None:
    assert refusal(b"GET", b"/images/x") is None
    assert refusal(b"OPTIONS", b"/") is None
    assert refusal(b"OPTIONS", b"*") == (400, "the request target * is not served here")
    assert refusal(b"CONNECT", b"example.org:443") is not None
    assert refusal(b"CONNECT", b"example.org:443")[0] == 405  # type: ignore[index]
    assert refusal(b"GET", b"images/x") is not None


def test_options_star_gets_400() -> None:
    answer, closed = exchange(b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\n\r\n")
    head, body = head_and_body(answer)
    assert head[0] == b"HTTP/1.1 400 Bad Request"
    assert b"Connection: close" in head
    assert body == b"the request target * is not served here\n"
    assert closed


def test_connect_gets_405_with_allow() -> None:
    answer, closed = exchange(b"CONNECT images.lxd.canonical.com:443 HTTP/1.1\r\n\r\n")
    head, body = head_and_body(answer)
    assert head[0] == b"HTTP/1.1 405 Method Not Allowed"
    assert b"Allow: GET, HEAD" in head
    assert b"not a forward proxy" in body
    assert closed


def test_absolute_form_is_served_as_its_path() -> None:
    answer, closed = exchange(
        b"GET https://elsewhere.example:8443/images/streams/v1/index.json?x=1 HTTP/1.1\r\n"
        b"Host: proxy\r\n\r\n"
    )
    head, body = head_and_body(answer)
    assert head[0] == b"HTTP/1.1 200 OK"
    # The authority stands for Host (RFC 9112 section 3.2.2); nothing is fetched from it.
    assert body == (
        b"/images/streams/v1/index.json?x=1 /images/streams/v1/index.json elsewhere.example:8443"
    )
    assert not closed


@pytest.mark.parametrize("target", [b"images/x", b"https:///images/x", b"ftp://h/images/x"])
def test_other_targets_get_400(target: bytes) -> None:
    answer, closed = exchange(b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\n\r\n")
    head, body = head_and_body(answer)
    assert head[0] == b"HTTP/1.1 400 Bad Request"
    assert b"must be a path" in body
    assert closed


@pytest.mark.parametrize("method", [b"OPTIONS", b"TRACE", b"POST", b"PROPFIND", b"FOO"])
@pytest.mark.parametrize("path", [b"/", b"/images/x", b"/nothing-here"])
def test_methods_not_served_get_405_with_allow(method: bytes, path: bytes) -> None:
    answer, closed = exchange(method + b" " + path + b" HTTP/1.1\r\nHost: proxy\r\n\r\n")
    head, _ = head_and_body(answer)
    assert head[0] == b"HTTP/1.1 405 Method Not Allowed", (method, path)
    assert b"Allow: GET, HEAD" in head
    assert not closed


def test_root_still_serves_get_and_head() -> None:
    answer, _ = exchange(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\nHEAD / HTTP/1.1\r\nHost: p\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.count(b"banner\n") == 1
