"""
Hostile clients of a proxy listening on loopback, in front of a loopback upstream.

Each case writes raw bytes to the proxy's port (over TLS unless the case is about what is not
TLS) and reads whatever comes back until the proxy closes the connection. Whatever it sent,
the client gets no 5xx, nothing is logged with a traceback, the upstream is asked for nothing
outside its catalogue, and the next ordinary request gets its whole file.

Slowloris heads and huge headers are checked for those invariants only. How long the proxy
waits for a request's head, and how big a head may be, are its listener's settings, tested
with them (C{tests/test_listen.py}).
"""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure

from tests.faults.upstreams import (
    BROKEN,
    NAME,
    NET_TIMEOUT_SECONDS,
    OTHER,
    UNLISTED,
    Loopback,
    start_loopback,
)
from tests.faults.wire import Answer, parse, request
from tests.helpers.invariants import assert_no_traceback, assert_only_catalogue, assert_whole
from tests.helpers.logs import Logged
from tests.helpers.wired import INDEX

reactor: Any = _reactor

SEED = 20240101


class RawClient(Protocol):
    """
    Sends C{chunks} C{pause} seconds apart, then reads until the server closes the connection
    (or hangs up itself once everything is sent, with C{hang_up}).
    """

    def __init__(self, chunks: Sequence[bytes], pause: float = 0.0, hang_up: bool = False) -> None:
        self.chunks = list(chunks)
        self.pause = pause
        self.hang_up = hang_up
        self.received = b""
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()
        self._next: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._send()

    def _send(self) -> None:
        self._next = None
        assert self.transport is not None
        if self.chunks:
            self.transport.write(self.chunks.pop(0))
        if self.chunks:
            self._next = reactor.callLater(self.pause, self._send)
        elif self.hang_up:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self.reason = reason
        self.done.callback(None)


def client_hello() -> bytes:
    """The first flight of a real TLS client: a ClientHello record."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path) -> AsyncIterator[Loopback]:
    running = await start_loopback(reactor, tmp_path)
    try:
        yield running
    finally:
        await running.stop()


async def connect(
    site: Loopback, chunks: Sequence[bytes], *, tls: bool = True, pause: float = 0.0,
    hang_up: bool = False,
) -> RawClient:
    """A connection to the proxy, sending C{chunks}; its C{done} fires once it is closed."""
    endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", site.port)
    if tls:
        trust = Certificate.loadPEM(site.proxy.cert_pem)
        endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=trust), endpoint)
    client = RawClient(chunks, pause, hang_up)
    await endpoint.connect(Factory.forProtocol(lambda: client)).addTimeout(NET_TIMEOUT_SECONDS, reactor)
    return client


async def exchange(
    site: Loopback, chunks: Sequence[bytes], *, tls: bool = True, pause: float = 0.0,
    hang_up: bool = False,
) -> RawClient:
    """One connection to the proxy: C{chunks} out, everything back until it is closed."""
    client = await connect(site, chunks, tls=tls, pause=pause, hang_up=hang_up)
    await client.done.addTimeout(NET_TIMEOUT_SECONDS, reactor)
    return client


async def hang_up_after_another(site: Loopback, client: RawClient) -> None:
    """
    Serve another client whole meanwhile, then hang C{client} up, if the proxy has not: for a
    connection the proxy holds open without answering, which a hostile client gives up on.
    """
    assert_whole(await site.get(INDEX), site.files[INDEX])
    if not client.done.called:
        assert client.transport is not None
        client.transport.loseConnection()
    await client.done.addTimeout(NET_TIMEOUT_SECONDS, reactor)


async def assert_still_serving(site: Loopback, logged: Logged) -> None:
    """The invariants every hostile client leaves behind."""
    assert_whole(await site.get(OTHER), site.files[OTHER])
    assert_only_catalogue(site.tree.paths(), site.files)
    assert_no_traceback(logged)


def assert_no_5xx(answer: Answer, what: object) -> None:
    assert answer.responses, (what, answer.rest[:200])
    assert all(code < 500 for code in answer.codes), (what, answer.codes)


# -- paths a client should not be able to reach ----------------------------------------------

TRAVERSALS = [
    "/cache/images/%2e%2e/%2e%2e/etc/passwd",
    "/cache/%2e%2e/%2e%2e/etc/passwd",
    "/cache/images%2f..%2f..%2fetc%2fpasswd",
    "/cache/images/%252e%252e/%252e%252e/etc/passwd",
    "/cache/images/%252e%252e%252fstreams/v1/index.json",
    "/cache/images/..\\..\\etc\\passwd",
    "/cache/images/%5c..%5c..%5cetc%5cpasswd",
    "/cache/images/x%00/y",
    "/cache/streams/v1/index.json%00.squashfs",
    "/cache/images/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/cache/images%c0%af..%c0%af..%c0%afetc%c0%afpasswd",
    "/cache/images/%e0%80%ae%e0%80%ae/secret.bin",
    "/cache/./images/unlisted/./secret.bin",
    f"/cache/{UNLISTED}",
    f"/cache//{UNLISTED}",
    f"/cache/{UNLISTED.replace('/', '%2f')}",
    "/cache/streams/v1/../../images/unlisted/secret.bin",
    "/cache/streams/v1/%2e%2e/%2e%2e/images/unlisted/secret.bin",
    "/%2e%2e/cache/streams/v1/index.json",
    "/1.0/images/%2e%2e/%2e%2e/cache/streams/v1/index.json",
    "/1.0/images/..%2f..%2fetc%2fpasswd/export",
    "/1.0/images/aliases/..%2f..%2f..%2fcache",
    "/import/cache/..%2f..%2fetc%2fpasswd",
    "/import/%2e%2e/cache/streams/v1/index.json",
]


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_traversal_encodings(site: Loopback, logged: Logged) -> None:
    for target in TRAVERSALS:
        answer = parse((await exchange(site, [request(target)])).received)
        assert_no_5xx(answer, target)
        assert answer.codes[0] in (400, 404), (target, answer.codes)
    await assert_still_serving(site, logged)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_absolute_uris_and_connect(site: Loopback, logged: Logged) -> None:
    """The proxy is no forward proxy: a request naming another host reaches nothing."""
    upstream = f"127.0.0.1:{site.upstream.port}"
    targets = [
        request(f"https://{upstream}/{UNLISTED}"),
        request(f"https://localhost:{site.port}/{NAME}/{UNLISTED}"),
        request(f"http://{upstream}/{INDEX}"),
        request(upstream, method="CONNECT"),
        request(f"{upstream}:443", method="CONNECT"),
        request("*", method="OPTIONS"),
    ]
    # Absolute forms are served as their path (no upstream is named "images"), a tunnel is
    # refused, and so is a request for the server as a whole.
    expected = [404, 404, 404, 405, 405, 400]
    for raw, status in zip(targets, expected):
        answer = parse((await exchange(site, [raw])).received)
        assert_no_5xx(answer, raw)
        assert answer.codes == [status], (raw, answer.codes)
    # A client that goes on as if a tunnel had opened gets no further: the ClientHello is only
    # the start of a request line that never ends.
    client = await connect(site, [request(upstream, method="CONNECT", close=False), client_hello()])
    await hang_up_after_another(site, client)
    assert_no_5xx(parse(client.received), "CONNECT then a ClientHello")
    await assert_still_serving(site, logged)


# -- several requests on one connection ------------------------------------------------------


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(site: Loopback, logged: Logged) -> None:
    """A miss, a listed file, an unlisted one and a hit, all in one write: each gets its own."""
    order = [INDEX, BROKEN, UNLISTED, OTHER, BROKEN]
    raw = b"".join(request(f"/{NAME}/{path}", close=False) for path in order[:-1])
    raw += request(f"/{NAME}/{order[-1]}")
    answer = parse((await exchange(site, [raw])).received)
    assert answer.codes == [200, 200, 404, 200, 200], answer.codes
    for path, (_, _, body) in zip(order, answer.responses):
        if path in site.files:
            assert body == site.files[path], path
    assert answer.rest == b""
    await assert_still_serving(site, logged)


# -- heads that never end, or never stop ------------------------------------------------------


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_slowloris_heads_do_not_hold_up_other_clients(site: Loopback, logged: Logged) -> None:
    """Five clients drip a head a line at a time; meanwhile an ordinary client is served."""
    drip = [f"GET /{NAME}/{BROKEN} HTTP/1.1\r\n".encode()]
    drip += [f"X-Drip-{i}: {'x' * 20}\r\n".encode() for i in range(8)]
    slow = [Deferred.fromCoroutine(exchange(site, drip, pause=0.1, hang_up=True)) for _ in range(5)]
    assert_whole(await site.get(INDEX), site.files[INDEX])
    for client in await gatherResults(slow):
        # The head never ended: it was never answered, and never reached the upstream.
        assert parse(client.received).responses == []
    assert site.tree.count(BROKEN) == 0
    await assert_still_serving(site, logged)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_huge_heads_are_never_served(site: Loopback, logged: Logged) -> None:
    """Each huge head is refused at once with a 414 or a 431, and holds up nobody else."""
    target = f"/{NAME}/{BROKEN}"
    heads = {
        "one long header": (request(target, extra=b"X-Big: " + b"x" * 70_000 + b"\r\n"), 431),
        "many headers": (request(target, extra=b"".join(b"X-%d: y\r\n" % i for i in range(2000))), 431),
        "a long request line": (request(f"{target}?{'q' * 70_000}"), 414),
        "a long path": (request(f"/{NAME}/images/{'a' * 70_000}"), 414),
    }
    for what, (raw, status) in heads.items():
        client = await connect(site, [raw])
        await hang_up_after_another(site, client)
        answer = parse(client.received)
        assert answer.codes == [status], (what, answer.codes)
    assert site.tree.count(BROKEN) == 0
    await assert_still_serving(site, logged)


# -- what is not HTTP over TLS ------------------------------------------------------------------


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_plain_http_serves_listed_files_only(site: Loopback, logged: Logged) -> None:
    # Plain HTTP is LXD's first attempt at an image file (proxy.plain): anything but a file
    # path gets the 400 pointing to https:// and reaches no upstream; a path no catalogue
    # lists, the 404 it gets over HTTPS.
    answer = parse((await exchange(site, [request(f"/{NAME}/{UNLISTED}")], tls=False)).received)
    assert answer.codes == [404], answer
    for raw in (
        request(f"/{NAME}/streams/v1/index.json"),
        request(f"/{NAME}/{BROKEN}", method="DELETE"), request("/1.0"), request("/"),
    ):
        answer = parse((await exchange(site, [raw], tls=False)).received)
        assert answer.codes == [400], (raw, answer)
    assert site.tree.count(BROKEN) == 0
    # A listed file is served whole, as over HTTPS.
    answer = parse((await exchange(site, [request(f"/{NAME}/{BROKEN}")], tls=False)).received)
    assert [(code, body) for code, _, body in answer.responses] == [(200, site.files[BROKEN])]
    await assert_still_serving(site, logged)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_garbage_tls_is_dropped(site: Loopback, logged: Logged) -> None:
    rng = random.Random(SEED)
    hello = client_hello()
    garbage = {
        "a handshake record of noise": b"\x16\x03\x01\x02\x00" + rng.randbytes(512),
        "noise after a ClientHello": hello + rng.randbytes(512),
        "half a ClientHello": hello[: len(hello) // 2],
        "a ClientHello over and over": hello * 8,
    }
    for what, raw in garbage.items():
        client = await exchange(site, [raw], tls=False, hang_up=what == "half a ClientHello")
        # No HTTP answer to a broken handshake: a TLS alert at most, and the connection closed.
        assert not client.received.startswith(b"HTTP/"), what
    # Any other first byte is taken for plain HTTP (an alert record, here) and told to use TLS.
    answer = parse((await exchange(site, [b"\x15\x03\x03\x00\x02\x02\x28"], tls=False)).received)
    assert answer.codes == [400]
    # A whole handshake, then bytes that are not HTTP: a 400 from the HTTP parser, if anything.
    answer = parse((await exchange(site, [rng.randbytes(256) + b"\r\n\r\n"])).received)
    assert all(code == 400 for code in answer.codes), answer.codes
    await assert_still_serving(site, logged)
