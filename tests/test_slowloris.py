"""
A real listening proxy under a slowloris load: a thousand connections trickling request heads
or holding one byte of a TLS record, while a normal client is served, until the deadlines cut
every one of them.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from tests.helpers.certs import make_ca
from tests.helpers.running_proxy import start_proxy
from tests.helpers.tree import build_tree
from tests.helpers.upstream import start_https_upstream

reactor: Any = _reactor
HEAD_DEADLINE = 4.0
HANDSHAKE_DEADLINE = 4.0
TRICKLE_EVERY = 0.5
# The deadlines fire on a loaded reactor: a connection is cut at most this late.
SLACK = 5.0
MOST_CONNECTIONS = 1000
CONNECT_BATCH = 50
NORMAL_REQUESTS = 20
HEAD = b"GET /cache/streams/v1/index.json HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 200


@pytest.fixture
def open_files() -> Iterator[int]:
    """The soft RLIMIT_NOFILE raised to the hard limit for the test, as the service does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Slow(Protocol):
    """A connection that is told when to start (C{go}) and records when it was cut."""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.received = b""
        self.started_at: float | None = None
        self.lost_at: float | None = None

    def go(self) -> None:
        raise NotImplementedError

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_at = reactor.seconds()
        if not self.ready.called:
            self.ready.errback(reason)
        self.lost.callback(None)


@implementer(IHandshakeListener)
class Trickler(Slow):
    """After its TLS handshake, on C{go}, a request head a byte every L{TRICKLE_EVERY} s."""

    def __init__(self) -> None:
        super().__init__()
        self._sent = 0
        self._next: IDelayedCall | None = None

    def handshakeCompleted(self) -> None:
        self.ready.callback(None)

    def go(self) -> None:
        self.started_at = reactor.seconds()
        self._send()

    def _send(self) -> None:
        self._next = None
        if self.lost_at is not None or self._sent >= len(HEAD):
            return
        assert self.transport is not None
        self.transport.write(HEAD[self._sent : self._sent + 1])
        self._sent += 1
        self._next = reactor.callLater(TRICKLE_EVERY, self._send)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        super().connectionLost(reason)


class RecordByte(Slow):
    """A plain TCP connection that sends the first byte of a TLS record, on C{go}, and no more."""

    def connectionMade(self) -> None:
        self.ready.callback(None)

    def go(self) -> None:
        self.started_at = reactor.seconds()
        assert self.transport is not None
        self.transport.write(b"\x16")


class OneProtocol(Factory):
    """A factory for the one protocol it was given."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_made = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        self.protocol_made.factory = self
        return self.protocol_made


def normal_client(cert_pem: bytes) -> HTTPClient:
    trust = trustRootFromCertificates([Certificate.loadPEM(cert_pem)])
    # A fresh connection per request: each must be accepted despite the load.
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool))


async def open_slow(port: int, cert_pem: bytes, count: int) -> list[Slow]:
    tls = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(cert_pem))
    plain = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    secure = wrapClientTLS(tls, plain)
    made: list[Slow] = []
    # In batches: the listening socket's accept queue is short.
    for start in range(0, count, CONNECT_BATCH):
        batch: list[Slow] = []
        waits = []
        for i in range(start, min(count, start + CONNECT_BATCH)):
            protocol: Slow = Trickler() if i % 2 == 0 else RecordByte()
            endpoint = secure if isinstance(protocol, Trickler) else plain
            batch.append(protocol)
            waits.append(endpoint.connect(OneProtocol(protocol)))
        await gatherResults(waits).addTimeout(30, reactor)
        await gatherResults([p.ready for p in batch]).addTimeout(30, reactor)
        made += batch
    return made


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_slowloris_connections_are_cut_and_a_normal_client_is_served(
    tmp_path: Path, open_files: int
) -> None:
    # Two descriptors per slow connection in this process: the client's and the proxy's.
    count = min(MOST_CONNECTIONS, (open_files - 1024) // 2)
    if count < 100:
        pytest.skip(f"an open-file hard limit of {open_files} leaves no room for the load")
    tree = build_tree(tmp_path / "tree")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = await start_proxy(
        reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)},
        server={
            "request_head_timeout": HEAD_DEADLINE,
            "tls_handshake_timeout": HANDSHAKE_DEADLINE,
        },
    )
    slow: list[Slow] = []
    try:
        cap = proxy.service.listener.cap
        assert cap is not None and cap.limit > count
        client = normal_client(proxy.cert_pem)
        index_url = f"https://localhost:{proxy.port}/cache/streams/v1/index.json"
        # Once before the load: the index is then a stored metadata file.
        first = await client.get(index_url)
        index = await treq.content(first)
        assert first.code == 200

        slow = await open_slow(proxy.port, proxy.cert_pem, count)
        # A plain connection is made before the proxy has accepted it.
        for _ in range(500):
            if cap.open >= count:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert cap.open == count
        for protocol in slow:
            protocol.go()

        served = []
        for _ in range(NORMAL_REQUESTS):
            response = await client.get(index_url).addTimeout(30, reactor)
            served.append((response.code, await treq.content(response)))
        # Every slow connection was still held while the normal client was served.
        assert [p for p in slow if p.lost_at is not None] == []
        assert served == [(200, index)] * NORMAL_REQUESTS

        await gatherResults([p.lost for p in slow]).addTimeout(
            max(HEAD_DEADLINE, HANDSHAKE_DEADLINE) + 30, reactor
        )
        for protocol in slow:
            assert protocol.started_at is not None and protocol.lost_at is not None
            held = protocol.lost_at - protocol.started_at
            deadline = HEAD_DEADLINE if isinstance(protocol, Trickler) else HANDSHAKE_DEADLINE
            assert deadline - 0.1 <= held <= deadline + SLACK, (type(protocol).__name__, held)
            if isinstance(protocol, Trickler):
                assert protocol.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            else:
                assert protocol.received == b""
        # The proxy let go of every one of them.
        for _ in range(500):
            if cap.open == 0:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert cap.open == 0
        assert cap.refused == 0
    finally:
        for protocol in slow:
            if protocol.lost_at is None and protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        await proxy.stop()
        await upstream.stop()
