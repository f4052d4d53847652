"""
The outbound proxy: its URL and what it shows of it, the choice per upstream URL (configuration,
then the environment and NO_PROXY), and the CONNECT tunnel, in memory: the proxy's side of the
connection is a L{StringTransport} the test answers for it, time a L{Clock}.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from zope.interface import implementer

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.health import UpstreamHealth
from proxy.outbound import (
    DIRECT,
    NoProxy,
    OutboundProxy,
    OutboundProxyError,
    TunnelEndpoint,
    UpstreamEndpoints,
    parse_proxy_setting,
    parse_proxy_url,
    proxy_for,
    proxy_routes,
    redact,
)
from proxy.upstream import NotAnUpstream, UpstreamClient, as_proxy_error, origin_of
from tests.helpers.logs import Logged

SECRET = "s3cr%40t"  # percent-encoded "s3cr@t"
PROXY_URL = f"http://alice:{SECRET}@proxy.lan:3128"
PROXY = parse_proxy_url(PROXY_URL, "server.upstream_proxy")
UPSTREAM = "https://images.example/streams"


# -- the proxy URL -------------------------------------------------------------------------


def test_a_proxy_url_is_parsed_with_its_credentials_decoded() -> None:
    assert (PROXY.host, PROXY.port, PROXY.username, PROXY.password) == (
        "proxy.lan", 3128, "alice", "s3cr@t"
    )
    assert PROXY.authorization() == b"Basic YWxpY2U6czNjckB0"  # alice:s3cr@t
    assert PROXY.source == "server.upstream_proxy"


def test_a_proxy_never_shows_its_credentials() -> None:
    for shown in (PROXY.url, str(PROXY), repr(PROXY), f"{PROXY}"):
        assert "s3cr" not in shown and "alice" not in shown
    assert PROXY.url == "http://proxy.lan:3128"
    assert repr(PROXY) == "OutboundProxy('http://proxy.lan:3128', with credentials)"


def test_a_proxy_url_without_a_port_is_port_80_and_ipv6_is_bracketed() -> None:
    assert parse_proxy_url("http://proxy.lan", "k").port == 80
    proxy = parse_proxy_url("http://[fd00::1]:3128/", "k")
    assert (proxy.host, proxy.url, proxy.authorization()) == ("fd00::1", "http://[fd00::1]:3128", None)


@pytest.mark.parametrize("value", [
    "https://alice:pw-secret@proxy.lan:3128",
    "socks5://alice:pw-secret@proxy.lan:1080",
    "http://alice:pw-secret@proxy.lan:3128/some/path",
    "http://alice:pw-secret@proxy.lan:99999",
    "http://alice:pw-secret@:3128",
    "http://alice:pw-secret@proxy.lan:0",
    "proxy.lan:3128",
])
def test_a_bad_proxy_url_is_a_config_error_without_the_password(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_proxy_url(value, "server.upstream_proxy")
    message = str(info.value)
    assert message.startswith("server.upstream_proxy: ")
    assert "pw-secret" not in message


def test_only_http_proxies_are_accepted() -> None:
    with pytest.raises(ConfigError, match="only http:// proxies are supported"):
        parse_proxy_url("https://proxy.lan:3128", "k")


def test_redact_hides_everything_before_the_last_at() -> None:
    assert redact("http://u:p@ss@host:1/x") == "http://***@host:1/x"
    assert redact("u:p@host:3128") == "***@host:3128"
    assert redact("http://host:3128") == "http://host:3128"


def test_an_empty_setting_is_direct() -> None:
    assert parse_proxy_setting("", "k") is DIRECT
    assert parse_proxy_setting(PROXY_URL, "k") == PROXY


# -- the choice ----------------------------------------------------------------------------

OTHER = parse_proxy_url("http://other.lan:8080", "upstreams.images.proxy")
ENV_PROXY = "http://envproxy.lan:3128"


def test_the_upstreams_setting_wins_then_the_servers() -> None:
    env = {"HTTPS_PROXY": ENV_PROXY}
    assert proxy_for(UPSTREAM, OTHER, PROXY, env) == OTHER
    assert proxy_for(UPSTREAM, DIRECT, PROXY, env) is None
    assert proxy_for(UPSTREAM, None, PROXY, env) == PROXY
    assert proxy_for(UPSTREAM, None, DIRECT, env) is None


def test_the_environment_decides_when_the_configuration_says_nothing() -> None:
    https = proxy_for(UPSTREAM, None, None, {"HTTPS_PROXY": ENV_PROXY, "HTTP_PROXY": "http://h:1"})
    assert https is not None and (https.url, https.source) == (ENV_PROXY, "HTTPS_PROXY")
    http = proxy_for("http://127.0.0.1:8000/x", None, None, {"HTTPS_PROXY": ENV_PROXY, "http_proxy": "h:1"})
    assert http is not None and (http.url, http.source) == ("http://h:1", "http_proxy")
    assert proxy_for(UPSTREAM, None, None, {"HTTP_PROXY": ENV_PROXY}) is None
    assert proxy_for(UPSTREAM, None, None, {}) is None
    assert proxy_for(UPSTREAM, None, None, {"HTTPS_PROXY": "  "}) is None


def test_the_lower_case_variable_wins_as_in_curl() -> None:
    chosen = proxy_for(UPSTREAM, None, None, {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"})
    assert chosen is not None and chosen.url == "http://low:1"


def test_a_bad_environment_proxy_names_the_variable_and_the_way_out() -> None:
    with pytest.raises(ConfigError) as info:
        proxy_for(UPSTREAM, None, None, {"HTTPS_PROXY": "socks5://bob:hunter2@p:1080"})
    message = str(info.value)
    assert message.startswith("HTTPS_PROXY: only http:// proxies")
    assert 'upstream_proxy = ""' in message and "hunter2" not in message


@pytest.mark.parametrize(("no_proxy", "url", "excluded"), [
    ("*", UPSTREAM, True),
    ("foo, *", UPSTREAM, True),
    ("images.example", UPSTREAM, True),
    ("IMAGES.EXAMPLE.", UPSTREAM, True),
    ("example", UPSTREAM, True),
    (".example", UPSTREAM, True),
    ("*.example", UPSTREAM, True),
    ("ges.example", UPSTREAM, False),
    ("other.example", UPSTREAM, False),
    ("images.example:443", UPSTREAM, True),
    ("images.example:8443", UPSTREAM, False),
    ("127.0.0.1", "https://127.0.0.1:8443/x", True),
    ("127.0.0.2", "https://127.0.0.1:8443/x", False),
    ("127.0.0.0/8", "https://127.0.0.1:8443/x", True),
    ("10.0.0.0/8", "https://127.0.0.1:8443/x", False),
    ("127.0.0.1:8443", "https://127.0.0.1:8443/x", True),
    ("127.0.0.1:9000", "https://127.0.0.1:8443/x", False),
    ("::1", "https://[::1]:8443/x", True),
    ("[::1]:8443", "https://[::1]:8443/x", True),
    ("[::1]:9", "https://[::1]:8443/x", False),
    ("fd00::/8", "https://[fd00::5]/x", True),
    ("localhost", "https://127.0.0.1/x", False),  # names are never resolved
    ("", UPSTREAM, False),
    (" , ,", UPSTREAM, False),
])
def test_no_proxy_as_curl_reads_it(no_proxy: str, url: str, excluded: bool) -> None:
    env = {"HTTPS_PROXY": ENV_PROXY, "NO_PROXY": no_proxy}
    assert (proxy_for(url, None, None, env) is None) is excluded


def test_no_proxy_applies_to_the_environments_proxy_only() -> None:
    env = {"HTTPS_PROXY": ENV_PROXY, "no_proxy": "*"}
    assert proxy_for(UPSTREAM, None, None, env) is None
    assert proxy_for(UPSTREAM, None, PROXY, env) == PROXY
    assert proxy_for(UPSTREAM, OTHER, None, env) == OTHER


def test_no_proxy_ignores_entries_it_cannot_read() -> None:
    rules = NoProxy.parse("a:b:c, [::1, ex ample.com, example.com:port, images.example")
    assert rules.excludes("images.example", 443)
    assert not rules.excludes("ex", 443)


def test_upstreams_on_one_origin_must_agree() -> None:
    daily = "https://cloud.example/daily"
    releases = "https://cloud.example/releases"
    same = proxy_routes(
        [("a", daily, origin_of(daily), None), ("b", releases, origin_of(releases), None)], PROXY, {}
    )
    assert same == {origin_of(daily): PROXY}
    with pytest.raises(ConfigError, match=r"upstreams\.b\.proxy: .* reached through http://proxy.lan:3128"):
        proxy_routes(
            [("a", daily, origin_of(daily), None), ("b", releases, origin_of(releases), DIRECT)],
            PROXY, {},
        )


# -- the configuration ---------------------------------------------------------------------


def test_the_configuration_keys(tmp_path: Any) -> None:
    config = parse_config({
        "server": {"upstream_proxy": PROXY_URL},
        "upstreams": {
            "a": {"url": "https://a.example"},
            "b": {"url": "https://b.example", "proxy": ""},
            "c": {"url": "https://c.example", "proxy": "http://other.lan:8080"},
        },
    }, base_dir=str(tmp_path))
    assert config.server.upstream_proxy == PROXY
    assert [u.proxy for u in config.upstreams] == [None, DIRECT, OTHER]
    assert "s3cr" not in repr(config)
    assert parse_config({}, base_dir=str(tmp_path)).server.upstream_proxy is None


def test_a_bad_configured_proxy_names_the_key(tmp_path: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"upstreams": {"a": {"url": "https://a.example", "proxy": "https://u:pw-secret@p"}}},
                     base_dir=str(tmp_path))
    assert str(info.value).startswith("upstreams.a.proxy: only http:// proxies")
    assert "pw-secret" not in str(info.value)
    with pytest.raises(ConfigError, match="server.upstream_proxy: expected a string"):
        parse_config({"server": {"upstream_proxy": 3128}}, base_dir=str(tmp_path))


# -- the tunnel ----------------------------------------------------------------------------


class Inner(Protocol):
    """What the endpoint was asked to connect (TLS, in the proxy): records what it gets."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost = reason


@implementer(IStreamClientEndpoint)
class FakeProxyEndpoint:
    """The TCP connection to the proxy: a StringTransport, or a failure, or a wait."""

    def __init__(self, outcome: str = "connect") -> None:
        self.outcome = outcome
        self.transport = StringTransport()
        self.protocol: IProtocol | None = None
        self.pending: Deferred[IProtocol] | None = None
        self.cancelled = False

    def connect(self, factory: IProtocolFactory) -> "Deferred[IProtocol]":
        if self.outcome == "refused":
            return fail(ConnectionRefusedError("111: Connection refused"))
        if self.outcome == "wait":
            self.pending = Deferred(lambda _: setattr(self, "cancelled", True))
            return self.pending
        protocol = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert protocol is not None
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        return succeed(protocol)

    def answer(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)


def tunnel(proxy: OutboundProxy = PROXY, outcome: str = "connect"
           ) -> tuple[Clock, FakeProxyEndpoint, list[object], Inner]:
    clock = Clock()
    fake = FakeProxyEndpoint(outcome)
    endpoint = TunnelEndpoint(clock, proxy, "images.example", 443, timeout=30,
                              proxy_endpoint=fake, user_agent=b"test-agent")
    inner = Inner()
    results: list[object] = []
    d = endpoint.connect(Factory.forProtocol(lambda: inner))
    d.addBoth(results.append)
    d.addErrback(lambda _: None)
    return clock, fake, results, inner


def test_the_tunnel_sends_connect_with_credentials_and_hands_over_on_200() -> None:
    clock, fake, results, inner = tunnel()
    assert fake.transport.value() == (
        b"CONNECT images.example:443 HTTP/1.1\r\nHost: images.example:443\r\n"
        b"User-Agent: test-agent\r\nProxy-Authorization: Basic YWxpY2U6czNjckB0\r\n\r\n"
    )
    assert results == []
    fake.answer(b"HTTP/1.1 200 Connection established\r\nVia: squid\r\n\r\nhello")
    assert results == [inner]
    assert cast(object, inner.transport) is fake.transport
    assert inner.received == b"hello"
    fake.answer(b" world")
    assert inner.received == b"hello world"
    # The deadline was for the CONNECT only: the tunnel outlives it.
    clock.advance(60)
    assert not fake.transport.disconnecting
    fake.protocol.connectionLost(Failure(Exception("gone")))  # type: ignore[union-attr]
    assert inner.lost is not None


def test_without_credentials_no_authorization_is_sent() -> None:
    _, fake, _, _ = tunnel(parse_proxy_url("http://proxy.lan:3128", "k"))
    assert b"Proxy-Authorization" not in fake.transport.value()


def test_an_answer_in_pieces_is_read_whole() -> None:
    _, fake, results, inner = tunnel()
    for piece in (b"HTTP/1.0 200 OK\r", b"\n\r", b"\n"):
        fake.answer(piece)
    assert results == [inner]


def test_an_interim_answer_is_skipped() -> None:
    _, fake, results, inner = tunnel()
    fake.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nhi")
    assert results == [inner] and inner.received == b"hi"


def failure_message(results: list[object]) -> str:
    assert len(results) == 1 and isinstance(results[0], Failure), results
    assert results[0].check(OutboundProxyError)
    return results[0].getErrorMessage()


@pytest.mark.parametrize(("answer", "said"), [
    (b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n<html>",
     "407 Proxy Authentication Required"),
    (b"HTTP/1.1 403 Access violation\r\n\r\n", "403 Access violation"),
    (b"HTTP/1.1 502\r\n\r\n", "502"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "an answer that is not HTTP"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 3000, "an answer head over 16 KiB"),
])
def test_a_refusal_fails_the_connect_with_the_proxys_answer(
    logged: Logged, answer: bytes, said: str
) -> None:
    _, fake, results, inner = tunnel()
    fake.answer(answer)
    message = failure_message(results)
    assert message == (
        f"the outbound proxy http://proxy.lan:3128 refused CONNECT to images.example:443: {said}"
    )
    assert fake.transport.disconnecting and inner.transport is None
    assert logged.lines(LogLevel.warn) == [message]


def test_the_same_refusal_is_logged_once_until_the_proxy_works_again(logged: Logged) -> None:
    clock = Clock()
    fakes = [FakeProxyEndpoint() for _ in range(4)]
    endpoints = [TunnelEndpoint(clock, PROXY, "images.example", 443, timeout=30, proxy_endpoint=f)
                 for f in fakes]
    # One trouble, as the endpoints an UpstreamEndpoints makes share one.
    for e in endpoints[1:]:
        e.trouble = endpoints[0].trouble
    for e, f, answer in zip(endpoints, fakes, [b"407 No", b"407 No", b"200 OK", b"407 No"]):
        e.connect(Factory.forProtocol(Inner)).addErrback(lambda _: None)
        f.answer(b"HTTP/1.1 " + answer + b"\r\n\r\n")
    assert [(e["log_level"], e["log_format"]) for e in logged if "proxy" in e] == [
        (LogLevel.warn, "{message}"),
        (LogLevel.info, "the outbound proxy {proxy} opens tunnels to {target} again"),
        (LogLevel.warn, "{message}"),
    ]


def test_an_unreachable_proxy_is_named() -> None:
    _, _, results, _ = tunnel(outcome="refused")
    assert failure_message(results) == (
        "cannot reach the outbound proxy http://proxy.lan:3128 (for images.example:443): "
        "Connection was refused by other side: 111: Connection refused."
    )


def test_a_proxy_that_closes_without_answering() -> None:
    _, fake, results, _ = tunnel()
    fake.answer(b"HTTP/1.1 2")
    fake.protocol.connectionLost(Failure(Exception("reset")))  # type: ignore[union-attr]
    assert failure_message(results).startswith(
        "the outbound proxy http://proxy.lan:3128 closed the connection without answering"
    )


def test_the_timeout_covers_the_connection_to_the_proxy() -> None:
    clock, fake, results, _ = tunnel(outcome="wait")
    clock.advance(29)
    assert results == []
    clock.advance(1)
    assert failure_message(results) == (
        "the outbound proxy http://proxy.lan:3128 did not open a tunnel to images.example:443 "
        "within 30 s"
    )
    assert fake.cancelled


def test_the_timeout_covers_the_connect_answer() -> None:
    clock, fake, results, _ = tunnel()
    clock.advance(30)
    assert "did not open a tunnel" in failure_message(results)
    assert fake.transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_cancelling_drops_the_connection() -> None:
    clock = Clock()
    fake = FakeProxyEndpoint()
    endpoint = TunnelEndpoint(clock, PROXY, "images.example", 443, timeout=30, proxy_endpoint=fake)
    d = endpoint.connect(Factory.forProtocol(Inner))
    results: list[object] = []
    d.addBoth(results.append)
    d.cancel()
    assert isinstance(results[0], Failure) and results[0].check(CancelledError)
    assert fake.transport.disconnecting
    assert clock.getDelayedCalls() == []


def test_a_proxy_failure_marks_the_upstream_offline_with_the_message() -> None:
    """To health it is a connection failure: the upstream cannot be reached."""
    health = UpstreamHealth("images", Clock())
    error = OutboundProxyError("the outbound proxy http://proxy.lan:3128 refused CONNECT to x:443: 403")
    health.record_error(error, "https://x/streams/v1/index.json")
    assert health.offline
    assert "refused CONNECT to x:443: 403" in health.describe()
    mapped = as_proxy_error(Failure(error), "images: streams/v1/index.json")
    assert (mapped.code, mapped.message) == (
        502, "images: streams/v1/index.json: the outbound proxy http://proxy.lan:3128 refused "
        "CONNECT to x:443: 403",
    )


# -- the endpoints and the agent -----------------------------------------------------------


def test_the_endpoints_reach_only_the_routed_origins() -> None:
    reactor = MemoryReactorClock()
    routes = {origin_of(UPSTREAM): PROXY, origin_of("http://127.0.0.1:8000"): None}
    endpoints = UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), routes, connect_timeout=5)
    with pytest.raises(SchemeNotSupported):
        endpoints.endpointForURI(URI.fromBytes(b"https://elsewhere.example/x"))
    tunnelled = endpoints.endpointForURI(URI.fromBytes(b"https://IMAGES.example/x"))
    assert isinstance(getattr(tunnelled, "_wrappedEndpoint"), TunnelEndpoint)
    direct = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8000/x"))
    assert not isinstance(direct, TunnelEndpoint)
    # An http upstream (allow_insecure, tests only) is tunnelled with CONNECT too, without TLS.
    plain = UpstreamEndpoints(
        reactor, BrowserLikePolicyForHTTPS(), {origin_of("http://127.0.0.1:8000"): PROXY},
        connect_timeout=5,
    ).endpointForURI(URI.fromBytes(b"http://127.0.0.1:8000/x"))
    assert isinstance(plain, TunnelEndpoint) and (plain.host, plain.port) == ("127.0.0.1", 8000)


def client_through(reactor: MemoryReactorClock) -> UpstreamClient:
    proxy = parse_proxy_url("http://127.0.0.9:3128", "k")
    return UpstreamClient.for_upstreams(
        reactor, {"images": ("https://127.0.0.1:8443", BrowserLikePolicyForHTTPS())},
        BrowserLikePolicyForHTTPS(), connect_timeout=5, header_timeout=5,
        proxies={origin_of("https://127.0.0.1:8443"): proxy},
    )


def test_the_client_connects_to_the_proxy_for_an_upstream() -> None:
    reactor = MemoryReactorClock()
    client = client_through(reactor)
    client.get("https://127.0.0.1:8443/streams/v1/index.json").addErrback(lambda _: None)
    # MemoryReactor resolves every name to 127.0.0.1: the port tells the proxy's.
    assert [port for _, port, *_ in reactor.tcpClients] == [3128]


def test_a_foreign_url_never_reaches_the_proxy() -> None:
    reactor = MemoryReactorClock()
    client = client_through(reactor)
    results: list[object] = []
    client.get("https://evil.example/x").addBoth(results.append)
    assert isinstance(results[0], Failure) and results[0].check(NotAnUpstream)
    assert reactor.tcpClients == []
