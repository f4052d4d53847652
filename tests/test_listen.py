"""The HTTPS listener: TLS for TLS clients, an immediate 400 for plain HTTP on the same port."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from proxy.listen import (
    DEFAULT_BACKLOG,
    FIRST_BYTE_TIMEOUT_SECONDS,
    PLAIN_HTTP_ANSWER,
    SniffingFactory,
    listen_tls,
)
from proxy.tls import ensure_server_certificate, server_tls_options, upstream_tls_policy

reactor: Any = _reactor
TIMEOUT_SECONDS = 10
CLIENT_HELLO_START = b"\x16\x03\x01\x00\xa5\x01"


# -- in memory -----------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class RecordingFactory(Factory):
    """Stands in for the TLS factory: records what it built and whether it runs."""

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.events: list[str] = []

    def startFactory(self) -> None:
        self.events.append("start")

    def stopFactory(self) -> None:
        self.events.append("stop")

    def buildProtocol(self, addr: IAddress | None) -> Recorder:
        protocol = Recorder()
        self.built.append(protocol)
        return protocol


def connected(tls: RecordingFactory, clock: Clock) -> tuple[Protocol, StringTransport]:
    factory = SniffingFactory(tls, clock)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_plain_request_gets_400_and_close() -> None:
    tls, clock = RecordingFactory(), Clock()
    protocol, transport = connected(tls, clock)
    protocol.dataReceived(b"GET /images/streams/v1/index.json HTTP/1.1\r\n")
    assert transport.value() == PLAIN_HTTP_ANSWER
    assert transport.disconnecting
    # Whatever follows while the connection closes is dropped, not answered again.
    protocol.dataReceived(b"Host: proxy\r\n\r\n")
    assert transport.value() == PLAIN_HTTP_ANSWER
    assert tls.built == []
    assert clock.getDelayedCalls() == []


def test_plain_answer_is_well_formed() -> None:
    head, _, body = PLAIN_HTTP_ANSWER.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 400 Bad Request"
    assert b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert b"https://" in body
    assert body.count(b"\n") == 1 and body.endswith(b"\n")


def test_tls_handshake_goes_to_tls() -> None:
    tls, clock = RecordingFactory(), Clock()
    protocol, transport = connected(tls, clock)
    protocol.dataReceived(CLIENT_HELLO_START)
    protocol.dataReceived(b"rest")
    assert transport.value() == b""
    assert not transport.disconnecting
    [inner] = tls.built
    # The TLS protocol talks to the real transport itself, and sees every byte.
    assert cast(object, inner.transport) is transport
    assert inner.data == [CLIENT_HELLO_START, b"rest"]
    assert clock.getDelayedCalls() == []
    protocol.connectionLost(Failure(Exception("gone")))
    assert [f.getErrorMessage() for f in inner.lost] == ["gone"]


def _sniffing(tls: RecordingFactory | None, plain: RecordingFactory) -> tuple[Protocol, StringTransport]:
    factory = SniffingFactory(tls, Clock(), None, plain)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_plain_http_goes_to_the_plain_site_when_there_is_one() -> None:
    tls, plain = RecordingFactory(), RecordingFactory()
    protocol, transport = _sniffing(tls, plain)
    protocol.dataReceived(b"GET /images/x HTTP/1.1\r\n")
    protocol.dataReceived(b"\r\n")
    [inner] = plain.built
    assert cast(object, inner.transport) is transport
    assert inner.data == [b"GET /images/x HTTP/1.1\r\n", b"\r\n"]
    assert tls.built == [] and transport.value() == b""
    # Neither TLS nor a method: the 400 at once, not a wait for a request line.
    protocol, transport = _sniffing(tls, plain)
    protocol.dataReceived(b"\x15\x03\x03\x00\x02\x02\x28")
    assert transport.value() == PLAIN_HTTP_ANSWER and transport.disconnecting
    assert len(plain.built) == 1


def test_a_plain_only_listener_closes_tls_and_starts_its_factory() -> None:
    plain = RecordingFactory()
    protocol, transport = _sniffing(None, plain)
    protocol.dataReceived(CLIENT_HELLO_START)
    assert transport.value() == b"" and transport.disconnecting
    assert plain.built == []
    factory = SniffingFactory(None, Clock(), None, plain)
    factory.doStart()
    factory.doStop()
    assert plain.events == ["start", "stop"] and factory.logPrefix() == "HTTP"


def test_silent_connection_is_aborted() -> None:
    tls, clock = RecordingFactory(), Clock()
    _, transport = connected(tls, clock)
    clock.advance(FIRST_BYTE_TIMEOUT_SECONDS - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnected


def test_lost_before_first_byte_cancels_the_timer() -> None:
    tls, clock = RecordingFactory(), Clock()
    protocol, _ = connected(tls, clock)
    protocol.connectionLost(Failure(Exception("gone")))
    assert clock.getDelayedCalls() == []


def test_factory_starts_and_stops_the_tls_factory() -> None:
    tls = RecordingFactory()
    factory = SniffingFactory(tls, Clock())
    factory.doStart()
    factory.doStop()
    assert tls.events == ["start", "stop"]


# -- real loopback -------------------------------------------------------------------------


class Collect(Protocol):
    """A raw TCP client: sends C{request}, collects everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.received)


async def listen(tmp_path: Path) -> tuple[IListeningPort, FilePath[str]]:
    cert, key = ensure_server_certificate(FilePath(str(tmp_path)), [], ["proxy-host"])
    root = Resource()
    root.putChild(b"", Data(b"hello over TLS\n", "text/plain"))
    port = await listen_tls(
        reactor, "tcp:0:interface=127.0.0.1", server_tls_options(cert, key), Site(root)
    )
    return port, cert


async def raw_request(port: int, request: bytes) -> bytes:
    protocol = Collect(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoint.connect(Factory.forProtocol(lambda: protocol)).addTimeout(TIMEOUT_SECONDS, reactor)
    return await protocol.done.addTimeout(TIMEOUT_SECONDS, reactor)


@pytest_twisted.ensureDeferred
async def test_loopback_plain_and_tls(tmp_path: Path) -> None:
    port, cert = await listen(tmp_path)
    number = port.getHost().port  # type: ignore[attr-defined]
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        # A whole plain request, as the LXD client sends it first for every image file.
        started = time.monotonic()
        answer = await raw_request(number, b"GET /images/x HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert answer == PLAIN_HTTP_ANSWER
        assert time.monotonic() - started < 2
        # Even an unfinished request line is answered at once rather than waited for.
        assert await raw_request(number, b"GET /") == PLAIN_HTTP_ANSWER

        # A TLS client gets the site behind the listener.
        agent = Agent(reactor, contextFactory=upstream_tls_policy(cert.path), pool=pool)
        response = await treq.get(f"https://127.0.0.1:{number}/", agent=agent).addTimeout(
            TIMEOUT_SECONDS, reactor
        )
        assert response.code == 200
        assert await treq.content(response) == b"hello over TLS\n"
    finally:
        await pool.closeCachedConnections()
        await maybeDeferred(port.stopListening)


def test_listen_queue_defaults_to_511_unless_given() -> None:
    reactor = MemoryReactorClock()
    options: Any = CertificateOptions()
    listen_tls(reactor, "tcp:8443:interface=127.0.0.1", options, Site(Resource()))
    listen_tls(reactor, "tcp:8444:interface=127.0.0.1:backlog=64", options, Site(Resource()))
    assert [(port, backlog) for port, _factory, backlog, _interface in reactor.tcpServers] == [
        (8443, DEFAULT_BACKLOG), (8444, 64),
    ]
    assert DEFAULT_BACKLOG == 511
