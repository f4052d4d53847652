"""ProxyChannel: deadlines for TLS handshakes and request heads, keep-alive idling, head limits."""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.channel import (
    CLOSING,
    BUSY,
    CLOSE_GRACE_SECONDS,
    IDLE,
    RESPONSE_CLOSE_GRACE_SECONDS,
    HeadLimits,
    ProxyChannel,
    ProxySite,
)
from proxy.listen import sniffing_tls_factory
from proxy.tls import ensure_server_certificate, server_tls_options

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
LIMITS = HeadLimits()


class Held(Resource):
    """C{/held}: answered only when the test says so; C{/}: a short answer at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        if request.path == b"/held":
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"ok\n"

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        return b"posted %d\n" % (len(request.content.read()),)


class Conn:
    """One plain (not TLS) connection to a L{ProxySite} over a L{StringTransport}."""

    def __init__(self, limits: HeadLimits = LIMITS, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.resource = Held()
        self.site = ProxySite(self.resource, limits, self.clock)
        self.channel = cast(ProxyChannel, self.site.buildProtocol(PEER))
        self.transport = StringTransport(peerAddress=PEER)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


def status_of(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def trickle(conn: Conn, data: bytes, every: float, until: float) -> float:
    """Send C{data} a byte at a time every C{every} seconds, for at most C{until} seconds."""
    elapsed = 0.0
    for byte in data:
        if conn.closing() or elapsed + every > until:
            break
        conn.send(bytes([byte]))
        conn.clock.advance(every)
        elapsed += every
    return elapsed


GET = b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n"


# -- request-head deadline -------------------------------------------------------------------


def test_trickled_head_is_cut_at_the_deadline() -> None:
    conn = Conn()
    conn.send(b"G")
    # A byte every 5 s would keep an idle timeout reset forever; the deadline does not move.
    for _ in range(5):
        conn.clock.advance(5)
        conn.send(b"E")
    conn.clock.advance(4.9)
    assert not conn.closing()
    conn.clock.advance(0.1)
    assert status_of(conn.take()) == b"HTTP/1.1 408 Request Timeout"
    assert conn.closing()
    # Whatever the client still sends is dropped.
    conn.send(b"T / HTTP/1.1\r\n\r\n")
    assert conn.take() == b""


def test_deadline_counts_from_the_first_byte_of_the_request() -> None:
    conn = Conn()
    conn.clock.advance(LIMITS.keepalive_timeout - 1)
    conn.send(b"GET / HTTP/1.1\r\n")
    conn.clock.advance(LIMITS.request_head_timeout - 0.5)
    assert not conn.closing()
    conn.send(b"Host: proxy\r\n\r\n")
    assert status_of(conn.take()) == b"HTTP/1.1 200 OK"
    conn.clock.advance(1)
    assert not conn.closing()


def test_deadline_applies_to_every_request_on_a_keepalive_connection() -> None:
    conn = Conn()
    conn.send(GET)
    assert status_of(conn.take()) == b"HTTP/1.1 200 OK"
    conn.clock.advance(3)
    elapsed = trickle(conn, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100, every=2, until=60)
    assert elapsed == LIMITS.request_head_timeout
    assert status_of(conn.take()) == b"HTTP/1.1 408 Request Timeout"
    assert conn.closing()


def test_pipelined_requests_each_get_their_own_deadline() -> None:
    conn = Conn()
    conn.send(GET + GET + b"GET / HTTP/1.1\r\n")
    assert conn.take().count(b"HTTP/1.1 200 OK") == 2
    conn.clock.advance(LIMITS.request_head_timeout - 1)
    assert not conn.closing()
    conn.clock.advance(1)
    assert status_of(conn.take()) == b"HTTP/1.1 408 Request Timeout"


def test_configured_head_deadline() -> None:
    conn = Conn(HeadLimits(request_head_timeout=2))
    conn.send(b"GET / HTTP/1.1\r\n")
    conn.clock.advance(2)
    assert b"within 2 s" in conn.take()
    assert conn.closing()


# -- keep-alive and active timeouts ---------------------------------------------------------


def test_idle_keepalive_connection_is_closed_silently() -> None:
    conn = Conn()
    conn.send(GET)
    conn.take()
    conn.clock.advance(LIMITS.keepalive_timeout - 0.1)
    assert not conn.closing()
    conn.clock.advance(0.1)
    assert conn.closing()
    assert conn.take() == b""


def test_connection_without_a_request_is_idle_from_the_start() -> None:
    conn = Conn(HeadLimits(keepalive_timeout=3))
    conn.clock.advance(3)
    assert conn.closing()
    assert conn.take() == b""


def test_request_in_progress_is_never_timed_out() -> None:
    conn = Conn()
    conn.send(b"GET /held HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert conn.channel.state == BUSY
    # Far beyond every deadline: a slow reader of a large body is not cut off.
    for _ in range(100):
        conn.clock.advance(60)
    assert not conn.closing()
    [request] = conn.resource.waiting
    request.write(b"late")
    request.finish()
    assert status_of(conn.take()) == b"HTTP/1.1 200 OK"
    # Then the keep-alive timeout applies again.
    assert conn.channel.state == IDLE
    conn.clock.advance(LIMITS.keepalive_timeout)
    assert conn.closing()


def test_aborting_a_connection_already_gone_is_a_no_op() -> None:
    """A TLS transport drops its TLS state when the connection goes; aborting it then raised."""

    class GoneTLS(StringTransport):
        def abortConnection(self) -> None:
            raise AttributeError("'NoneType' object has no attribute 'shutdown'")

    conn = Conn()
    gone = GoneTLS(peerAddress=PEER)
    gone.connected = False
    conn.channel.transport = gone
    conn.channel.forceAbortClient()


def test_stop_serving_closes_a_kept_alive_connection_at_once() -> None:
    conn = Conn()
    conn.send(GET)
    conn.take()
    conn.site.stop_serving()
    assert conn.closing()
    assert conn.take() == b""


def test_stop_serving_closes_a_busy_connection_after_its_response() -> None:
    conn = Conn()
    conn.send(b"GET /held HTTP/1.1\r\nHost: proxy\r\n\r\n")
    conn.site.stop_serving()
    assert not conn.closing(), "the response in progress is not cut"
    [request] = conn.resource.waiting
    request.write(b"last")
    request.finish()
    answer = conn.take()
    assert status_of(answer) == b"HTTP/1.1 200 OK"
    assert b"\r\nConnection: close\r\n" in answer
    assert conn.closing()


def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout() -> None:
    conn = Conn(HeadLimits(send_timeout=20))
    conn.send(b"GET /held HTTP/1.1\r\nHost: proxy\r\n\r\n")
    [request] = conn.resource.waiting
    request.write(b"part")
    # Its buffers fill: the transport pauses the channel, and the client reads nothing.
    conn.channel.pauseProducing()
    conn.clock.advance(19)
    assert not conn.closing()
    conn.clock.advance(1)
    assert conn.transport.disconnecting and conn.channel.state == CLOSING


def test_a_slow_reader_that_reads_something_is_never_dropped() -> None:
    conn = Conn(HeadLimits(send_timeout=20))
    conn.send(b"GET /held HTTP/1.1\r\nHost: proxy\r\n\r\n")
    [request] = conn.resource.waiting
    for _ in range(30):
        conn.channel.pauseProducing()
        conn.clock.advance(19)
        conn.channel.resumeProducing()
        request.write(b"more")
    assert not conn.closing()
    request.finish()
    conn.channel.connectionLost(Failure(Exception("gone")))
    assert conn.clock.getDelayedCalls() == []


def test_stalled_request_body_gets_the_site_idle_timeout() -> None:
    conn = Conn()
    conn.send(b"POST / HTTP/1.1\r\nHost: proxy\r\nContent-Length: 10\r\n\r\n")
    # The head is complete: its deadline no longer applies.
    conn.clock.advance(LIMITS.request_head_timeout + 1)
    conn.send(b"12345")
    idle = conn.site.timeOut
    assert idle is not None
    conn.clock.advance(idle - 1)
    assert not conn.closing()
    conn.send(b"67890")
    assert b"posted 10" in conn.take()


def test_stalled_request_body_is_closed() -> None:
    conn = Conn()
    conn.send(b"POST / HTTP/1.1\r\nHost: proxy\r\nContent-Length: 10\r\n\r\n12345")
    idle = conn.site.timeOut
    assert idle is not None
    conn.clock.advance(idle)
    assert conn.closing()


# -- closing ----------------------------------------------------------------------------------


def test_a_peer_that_does_not_close_is_aborted_after_the_grace() -> None:
    conn = Conn()
    conn.send(b"GET / HTTP/1.1\r\n")
    conn.clock.advance(LIMITS.request_head_timeout)
    assert conn.closing() and not conn.transport.disconnected
    conn.clock.advance(CLOSE_GRACE_SECONDS)
    assert conn.transport.disconnected


def test_last_response_tail_gets_the_longer_grace() -> None:
    conn = Conn()
    conn.send(b"GET / HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
    assert status_of(conn.take()) == b"HTTP/1.1 200 OK"
    assert conn.closing()
    conn.clock.advance(RESPONSE_CLOSE_GRACE_SECONDS - 1)
    assert not conn.transport.disconnected
    conn.clock.advance(1)
    assert conn.transport.disconnected


def test_closed_connection_leaves_no_timer() -> None:
    conn = Conn()
    conn.send(b"GET / HTTP/1.1\r\n")
    conn.channel.connectionLost(Failure(Exception("gone")))
    assert conn.clock.getDelayedCalls() == []


# -- head limits -------------------------------------------------------------------------------


def test_request_line_at_the_limit_is_served() -> None:
    path = b"/" + b"a" * (LIMITS.max_request_line - len(b"GET / HTTP/1.1"))
    line = b"GET " + path + b" HTTP/1.1"
    assert len(line) == LIMITS.max_request_line
    conn = Conn()
    conn.send(line + b"\r\nHost: proxy\r\n\r\n")
    assert status_of(conn.take()) == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize("ending", [b" HTTP/1.1\r\nHost: proxy\r\n\r\n", b""])
def test_long_request_line_gets_414_at_once(ending: bytes) -> None:
    conn = Conn()
    conn.send(b"GET /" + b"a" * LIMITS.max_request_line + ending)
    answer = conn.take()
    assert status_of(answer) == b"HTTP/1.1 414 URI Too Long"
    assert b"Connection: close" in answer
    assert conn.closing()


def test_one_huge_header_gets_431_without_waiting_for_its_end() -> None:
    conn = Conn()
    conn.send(b"GET / HTTP/1.1\r\nX-Big: ")
    for _ in range(LIMITS.max_header_bytes // 4096 + 1):
        conn.send(b"b" * 4096)
    assert status_of(conn.take()) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert conn.closing()


def test_range_header_of_2000_ranges_is_answered_at_once() -> None:
    # About 20 KB: over Twisted's 16 KiB line limit, which used to leave it unanswered.
    short = b",".join(b"%d-%d" % (i * 10, i * 10 + 1) for i in range(2000))
    assert 16 * 1024 < len(short) < LIMITS.max_header_bytes
    conn = Conn()
    conn.send(b"GET / HTTP/1.1\r\nHost: proxy\r\nRange: bytes=" + short + b"\r\n\r\n")
    assert status_of(conn.take()) == b"HTTP/1.1 200 OK"
    # About 44 KB: over the limit.
    long = b",".join(b"%d-%d" % (10**9 + i * 10, 10**9 + i * 10 + 1) for i in range(2000))
    conn = Conn()
    conn.send(b"GET / HTTP/1.1\r\nHost: proxy\r\nRange: bytes=" + long + b"\r\n\r\n")
    assert status_of(conn.take()) == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_header_bytes_are_counted_over_all_lines() -> None:
    line = b"X-Pad: " + b"p" * 1000
    count = LIMITS.max_header_bytes // len(line) + 1
    assert count <= LIMITS.max_headers
    conn = Conn()
    conn.send(b"GET / HTTP/1.1\r\n" + b"\r\n".join([line] * count) + b"\r\n\r\n")
    assert status_of(conn.take()) == b"HTTP/1.1 431 Request Header Fields Too Large"


def test_header_count_limit() -> None:
    def head(fields: int) -> bytes:
        return b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(fields)) + b"\r\n"

    at_limit = Conn()
    at_limit.send(head(LIMITS.max_headers))
    assert status_of(at_limit.take()) == b"HTTP/1.1 200 OK"
    over = Conn()
    over.send(head(LIMITS.max_headers + 1))
    assert status_of(over.take()) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert over.closing()


def test_limits_apply_to_each_request_afresh() -> None:
    limits = HeadLimits(max_header_bytes=2048)
    conn = Conn(limits)
    one = b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 1500 + b"\r\n\r\n"
    conn.send(one + one + one)
    assert conn.take().count(b"HTTP/1.1 200 OK") == 3
    assert not conn.closing()


def test_configured_limits() -> None:
    limits = HeadLimits(max_request_line=1024, max_header_bytes=1024, max_headers=3)
    long_line = Conn(limits)
    long_line.send(b"GET /" + b"a" * 1024 + b" HTTP/1.1\r\n\r\n")
    assert b"longer than 1024 bytes" in long_line.take()
    many = Conn(limits)
    many.send(b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n\r\n")
    assert status_of(many.take()) == b"HTTP/1.1 431 Request Header Fields Too Large"


# -- over TLS, in memory ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_options(tmp_path_factory: pytest.TempPathFactory) -> Any:
    state = tmp_path_factory.mktemp("tls")
    cert, key = ensure_server_certificate(FilePath(str(state)), [], ["proxy-host"])
    return server_tls_options(cert, key)


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class TcpStringTransport(StringTransport):
    """What the TLS layer wraps: it says it is TCP, so the channel sets TCP_NODELAY on it."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class TlsPair:
    """The listener's whole stack (sniffing, TLS, channel) and a TLS client, pumped by hand."""

    def __init__(self, tls_options: Any, limits: HeadLimits = LIMITS) -> None:
        self.clock = Clock()
        self.resource = Held()
        self.site = ProxySite(self.resource, limits, self.clock)
        factory = sniffing_tls_factory(tls_options, self.site, self.clock)
        factory.doStart()
        self.factory = factory
        server = factory.buildProtocol(PEER)
        assert server is not None
        self.server = server
        self.server_transport = TcpStringTransport(peerAddress=PEER)
        self.server.makeConnection(self.server_transport)
        self.client = Client()
        client_factory = TLSMemoryBIOFactory(
            CertificateOptions(), True, Factory.forProtocol(lambda: self.client), self.clock
        )
        client_tls = client_factory.buildProtocol(PEER)
        assert client_tls is not None
        self.client_tls = client_tls
        self.client_transport = StringTransport()
        self.client_tls.makeConnection(self.client_transport)

    def pump(self) -> None:
        for _ in range(50):
            # The TLS layers flush small writes on the clock's next turn.
            self.clock.advance(0)
            to_server = self.client_transport.value()
            self.client_transport.clear()
            to_client = self.server_transport.value()
            self.server_transport.clear()
            if not to_server and not to_client:
                return
            if to_server:
                self.server.dataReceived(to_server)
            if to_client:
                self.client_tls.dataReceived(to_client)
        raise AssertionError("still talking after 50 rounds")

    def send(self, data: bytes) -> None:
        assert self.client_tls.transport is not None
        self.client_tls.write(data)
        self.pump()

    def close(self) -> None:
        self.factory.doStop()

    def channel(self) -> ProxyChannel:
        tls = self.server._delegate  # type: ignore[attr-defined]
        return cast(ProxyChannel, tls.wrappedProtocol)


def test_one_byte_of_a_tls_record_is_aborted_at_the_handshake_deadline(tls_options: Any) -> None:
    pair = TlsPair(tls_options)
    pair.server.dataReceived(b"\x16")
    pair.clock.advance(LIMITS.tls_handshake_timeout - 0.1)
    assert not pair.server_transport.disconnecting
    pair.clock.advance(0.1)
    assert pair.server_transport.disconnected


def test_trickled_handshake_is_aborted_at_the_deadline(tls_options: Any) -> None:
    pair = TlsPair(tls_options)
    hello = pair.client_transport.value()
    pair.client_transport.clear()
    for byte in hello[: int(LIMITS.tls_handshake_timeout)]:
        pair.server.dataReceived(bytes([byte]))
        pair.clock.advance(1)
    assert pair.server_transport.disconnected


def test_handshake_deadline_is_configurable(tls_options: Any) -> None:
    pair = TlsPair(tls_options, HeadLimits(tls_handshake_timeout=2))
    pair.server.dataReceived(b"\x16\x03")
    pair.clock.advance(2)
    assert pair.server_transport.disconnected


def test_completed_handshake_then_keepalive_timeout(tls_options: Any) -> None:
    pair = TlsPair(tls_options)
    pair.pump()
    assert pair.channel().state == IDLE
    pair.clock.advance(LIMITS.tls_handshake_timeout + 1)
    assert not pair.server_transport.disconnecting
    pair.send(GET)
    assert status_of(pair.client.received) == b"HTTP/1.1 200 OK"
    pair.clock.advance(LIMITS.keepalive_timeout)
    pair.pump()
    # The proxy's close_notify reached the client, which answered; both sides closed.
    assert pair.server_transport.disconnecting


def test_header_too_large_over_tls_is_answered_and_closed(tls_options: Any) -> None:
    """Twisted's own line limit left a TLS connection open and unanswered until the idle timeout."""
    pair = TlsPair(tls_options)
    pair.pump()
    pair.send(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * (1 << 20) + b"\r\n\r\n")
    assert status_of(pair.client.received) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert pair.server_transport.disconnecting
    assert pair.clock.seconds() == 0


def test_trickled_head_over_tls_gets_408(tls_options: Any) -> None:
    pair = TlsPair(tls_options)
    pair.pump()
    for byte in b"GET / HTTP/1.1\r\nHost":
        pair.send(bytes([byte]))
        pair.clock.advance(5)
        if pair.client.received:
            break
    pair.pump()
    assert status_of(pair.client.received) == b"HTTP/1.1 408 Request Timeout"
    assert pair.server_transport.disconnecting


def test_lost_during_the_handshake_leaves_no_timer(tls_options: Any) -> None:
    pair = TlsPair(tls_options)
    pair.server.dataReceived(b"\x16")
    pair.server.connectionLost(Failure(Exception("gone")))
    pair.close()
    assert pair.clock.getDelayedCalls() == []
