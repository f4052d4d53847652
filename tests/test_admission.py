"""The cap on client connections, the open-file limit, and the listener refusing past the cap."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from attrs import evolve
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy import admission
from proxy.admission import (
    FDS_PER_CONNECTION,
    RESERVED_FDS,
    ConnectionCap,
    OpenFileLimit,
    fitting_cap,
    raise_open_file_limit,
)
from proxy.config import default_config
from proxy.listen import SniffingFactory, listen_tls
from proxy.service import ListenService
from proxy.tls import ensure_server_certificate, server_tls_options
from tests.helpers.logs import Logged

reactor: Any = _reactor
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
TIMEOUT_SECONDS = 10


# -- ConnectionCap ----------------------------------------------------------------------------


def test_cap_admits_up_to_its_limit() -> None:
    cap = ConnectionCap(2, Clock())
    assert cap.admit() and cap.admit()
    assert not cap.admit()
    assert (cap.open, cap.refused) == (2, 1)
    cap.release()
    assert cap.admit()
    assert (cap.open, cap.refused) == (2, 1)


def test_refusals_are_logged_once_per_interval(logged: Logged) -> None:
    clock = Clock()
    cap = ConnectionCap(1, clock, log_interval=60)
    cap.admit()
    for _ in range(500):
        cap.admit()
    clock.advance(59)
    for _ in range(10):
        cap.admit()
    assert len(logged.matching("max_connections")) == 1
    clock.advance(1)
    cap.admit()
    lines = logged.matching("max_connections", level=LogLevel.warn)
    assert len(lines) == 2
    assert (lines[0]["count"], lines[0]["total"]) == (1, 1)
    # The second line counts every refusal since the first one.
    assert (lines[1]["count"], lines[1]["total"]) == (510, 511)


# -- open-file limit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "configured, open_files, cap",
    [
        (4096, 65536, 4096),
        (4096, 20000, 4096),
        (4096, 1024, (1024 - RESERVED_FDS) // FDS_PER_CONNECTION),
        (10, 1024, 10),
        (4096, 100, 1),
        (4096, resource.RLIM_INFINITY, 4096),
    ],
)
def test_fitting_cap(configured: int, open_files: int, cap: int) -> None:
    assert fitting_cap(configured, open_files) == cap


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


def test_soft_limit_is_raised_to_the_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLimits(1024, 20000)
    monkeypatch.setattr(admission.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(admission.resource, "setrlimit", fake.setrlimit)
    assert raise_open_file_limit() == OpenFileLimit(before=1024, soft=20000, hard=20000)


def test_unlimited_hard_limit_raises_to_nr_open(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLimits(1024, resource.RLIM_INFINITY)
    monkeypatch.setattr(admission.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(admission.resource, "setrlimit", fake.setrlimit)
    monkeypatch.setattr(admission, "_nr_open", lambda: 1048576)
    assert raise_open_file_limit().soft == 1048576


def test_a_limit_that_cannot_be_raised_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLimits(1024, 20000, refuse=True)
    monkeypatch.setattr(admission.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(admission.resource, "setrlimit", fake.setrlimit)
    assert raise_open_file_limit() == OpenFileLimit(before=1024, soft=1024, hard=20000)


def listen_service(max_connections: int) -> ListenService:
    config = default_config()
    config = evolve(config, server=evolve(config.server, max_connections=max_connections))
    return ListenService(config, Clock(), Site(Resource()))


def test_service_logs_the_raise_and_lowers_a_cap_that_does_not_fit(
    monkeypatch: pytest.MonkeyPatch, logged: Logged
) -> None:
    monkeypatch.setattr(
        "proxy.service.raise_open_file_limit",
        lambda: OpenFileLimit(before=256, soft=1024, hard=1024),
    )
    cap = listen_service(4096)._connection_cap()
    assert cap == (1024 - RESERVED_FDS) // FDS_PER_CONNECTION
    [raised] = logged.matching("open-file limit raised", level=LogLevel.info)
    assert (raised["before"], raised["soft"]) == (256, 1024)
    [warning] = logged.matching("does not fit", level=LogLevel.warn)
    assert (warning["configured"], warning["cap"]) == (4096, cap)


def test_service_keeps_a_cap_that_fits(monkeypatch: pytest.MonkeyPatch, logged: Logged) -> None:
    monkeypatch.setattr(
        "proxy.service.raise_open_file_limit",
        lambda: OpenFileLimit(before=65536, soft=65536, hard=65536),
    )
    assert listen_service(4096)._connection_cap() == 4096
    assert logged.at(LogLevel.warn) == []
    assert logged.matching("open-file limit raised") == []


# -- the listener ------------------------------------------------------------------------------


class Nothing(Protocol):
    pass


def test_listener_refuses_past_the_cap_and_releases_on_close() -> None:
    cap = ConnectionCap(1, Clock())
    factory = SniffingFactory(Factory.forProtocol(Nothing), Clock(), cap)
    first = factory.buildProtocol(PEER)
    assert first is not None
    first.makeConnection(StringTransport())
    # The port closes an accepted socket at once when no protocol is built for it.
    assert factory.buildProtocol(PEER) is None
    assert cap.refused == 1
    first.connectionLost(Failure(Exception("gone")))
    assert cap.open == 0
    assert factory.buildProtocol(PEER) is not None


class Watch(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


async def connect(port: int) -> Watch:
    protocol = Watch()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoint.connect(Factory.forProtocol(lambda: protocol)).addTimeout(
        TIMEOUT_SECONDS, reactor
    )
    return protocol


@pytest_twisted.ensureDeferred
async def test_loopback_connection_past_the_cap_is_closed_at_once(tmp_path: Path) -> None:
    cert, key = ensure_server_certificate(FilePath(str(tmp_path)), [], ["proxy-host"])
    cap = ConnectionCap(2, reactor)
    port = await listen_tls(
        reactor, "tcp:0:interface=127.0.0.1", server_tls_options(cert, key), Site(Resource()), cap
    )
    number = port.getHost().port  # type: ignore[attr-defined]
    held: list[Watch] = []
    try:
        held = [await connect(number), await connect(number)]
        refused = await connect(number)
        await refused.lost.addTimeout(TIMEOUT_SECONDS, reactor)
        assert cap.refused == 1 and cap.open == 2
        # A place freed is a place taken again.
        assert held[0].transport is not None
        held[0].transport.loseConnection()
        await held[0].lost.addTimeout(TIMEOUT_SECONDS, reactor)
        for _ in range(100):
            if cap.open < 2:
                break
            await deferLater(0.01)
        assert cap.open == 1
        held[0] = await connect(number)
        for _ in range(100):
            if cap.open == 2:
                break
            await deferLater(0.01)
        assert (cap.open, cap.refused) == (2, 1)
        assert not held[0].lost.called
    finally:
        for watch in held:
            if watch.transport is not None:
                watch.transport.loseConnection()
        await maybeDeferred(port.stopListening)


def deferLater(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
