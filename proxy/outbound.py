# -*- test-case-name: tests.test_outbound -*-
"""Reaching upstreams through an outbound HTTP proxy.

Three things live here, and nothing else:

- L{OutboundProxy}, a parsed C{http://[USER:PASSWORD@]HOST[:PORT]} URL, which never shows its
  credentials (its C{url}, C{str} and C{repr} leave them out; L{redact} does the same for a URL
  that could not be parsed), and L{parse_proxy_url};
- L{proxy_for}, the choice for one upstream URL: C{[upstreams.NAME] proxy}, else
  C{[server] upstream_proxy}, else the conventional environment (C{https_proxy} /
  C{HTTPS_PROXY} for https, C{http_proxy} / C{HTTP_PROXY} for http, minus what C{no_proxy} /
  C{NO_PROXY} excludes, read as curl reads it: L{NoProxy});
- L{UpstreamEndpoints}, the agent's endpoint factory: per origin a direct TCP connection or a
  L{TunnelEndpoint} (C{CONNECT host:port} to the proxy), with TLS to the upstream on top for
  https, verified by the upstream's own policy exactly as without a proxy. http upstreams
  (C{allow_insecure}, tests only) are tunnelled with C{CONNECT} too, so both kinds reach
  the proxy the same way and the proxy sees one target per upstream origin.

Which origins may be asked at all is decided above this, by
L{proxy.upstream.AllowlistAgent}: only configured upstream origins ever become a C{CONNECT}
target, redirects included.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from proxy.errors import ConfigError

__all__ = [
    "DIRECT", "Direct", "NoProxy", "OutboundProxy", "OutboundProxyError", "ProxySetting", "ProxyTrouble",
    "TunnelEndpoint", "UpstreamEndpoints", "parse_proxy_setting", "parse_proxy_url",
    "proxy_for", "proxy_routes", "redact",
]

# (scheme, host, port) as proxy.upstream.origin_of makes it.
Origin = tuple[bytes, bytes, int]

# The port of an http:// proxy URL that names none: the scheme's, as Go, Python and apt take it.
DEFAULT_PROXY_PORT = 80
# A CONNECT answer's head longer than this is not a proxy's.
MAX_ANSWER_HEAD_BYTES = 16 * 1024
# The most of a proxy's reason phrase repeated in a message.
MAX_REASON_CHARS = 100

_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?")


@frozen(repr=False)
class OutboundProxy:
    """
    An outbound HTTP proxy.

    @ivar host: a lower-case host name or an IP address (IPv6 without brackets).
    @ivar username: for C{Proxy-Authorization: Basic}, percent-decoded; C{""} for none.
    @ivar password: as C{username}; never shown anywhere.
    @ivar source: where it was configured (C{"server.upstream_proxy"}, C{"HTTPS_PROXY"}), for
        log lines; not part of its identity.
    """

    host: str
    port: int
    username: str = ""
    password: str = ""
    source: str = field(default="", eq=False)

    @property
    def url(self) -> str:
        """C{http://HOST:PORT}: the proxy as every log line and message shows it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password)

    def authorization(self) -> bytes | None:
        """The C{Proxy-Authorization} value, or None without credentials."""
        if not self.has_credentials:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode("utf-8"))
        return b"Basic " + token

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        credentials = ", with credentials" if self.has_credentials else ""
        return f"OutboundProxy({self.url!r}{credentials})"


@frozen(repr=False)
class Direct:
    """A proxy setting of C{""}: connect directly, whatever the environment says."""

    def __repr__(self) -> str:
        return "DIRECT"


DIRECT = Direct()
# What a configuration key says: a proxy, direct, or nothing (the environment decides).
ProxySetting = OutboundProxy | Direct | None


class OutboundProxyError(Exception):
    """
    The outbound proxy could not be reached, or would not open the tunnel.

    Deliberately not a L{proxy.errors.ProxyError}: to the upstream's health it is a connection
    failure (the upstream cannot be reached), and L{proxy.upstream.as_proxy_error} makes it a
    502 whose message is this one.
    """


def redact(value: str) -> str:
    """C{value}, a URL as given, with anything before its last C{@} (the credentials) hidden."""
    scheme, separator, rest = value.partition("://")
    if not separator:
        scheme, rest = "", value
    if "@" not in rest:
        return value
    return f"{scheme}{separator}***@{rest.rsplit('@', 1)[1]}"


def _host(value: str) -> str | None:
    """C{value} as a canonical IP address or lower-case host name; None if it is neither."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.lower().rstrip(".")
    return name if len(name) <= 253 and _HOST_NAME.fullmatch(name) else None


def parse_proxy_url(value: str, key: str, *, scheme_optional: bool = False) -> OutboundProxy:
    """
    Parse C{http://[USER[:PASSWORD]@]HOST[:PORT][/]} (port 80 when none is given).

    @param key: the configuration key or environment variable, for messages and C{source}.
    @param scheme_optional: take C{HOST:PORT} as C{http://HOST:PORT}, as curl does for the
        environment's proxies.
    @raise ConfigError: naming C{key}, and the value without its credentials.
    """
    shown = redact(value)
    text = value.strip()
    if scheme_optional and "://" not in text:
        text = "http://" + text
    form = "http://[USER:PASSWORD@]HOST[:PORT]"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: {shown!r} is not a proxy URL like {form}") from None
    if parts.scheme.lower() != "http":
        raise ConfigError(
            f"{key}: only http:// proxies are supported (the proxy is asked to CONNECT, and TLS "
            f"runs to the upstream through it), got {shown!r}"
        )
    host = _host(parts.hostname or "")
    if host is None or parts.path not in ("", "/") or parts.query or parts.fragment or port == 0:
        raise ConfigError(f"{key}: {shown!r} is not a proxy URL like {form}")
    return OutboundProxy(
        host=host,
        port=port or DEFAULT_PROXY_PORT,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        source=key,
    )


def parse_proxy_setting(value: str, key: str) -> OutboundProxy | Direct:
    """A configuration key's value: C{""} is L{DIRECT}, anything else a proxy URL."""
    if not value.strip():
        return DIRECT
    return parse_proxy_url(value, key)


# -- the environment -----------------------------------------------------------------------


@frozen
class _Exclusion:
    """One C{NO_PROXY} entry: a domain (and its subdomains), an address or a network."""

    domain: str = ""
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def matches(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        return host == self.domain or host.endswith("." + self.domain)


@frozen
class NoProxy:
    """
    The hosts that C{NO_PROXY} excludes from the environment's proxy.

    Comma-separated entries, without regard to case or surrounding spaces: C{*} (everything),
    a host name that also covers its subdomains (C{example.com}, C{.example.com} and
    C{*.example.com} alike, as curl reads them), an IP address, a CIDR network, each
    optionally with C{:PORT} (C{[ADDRESS]:PORT} for IPv6) to exclude that port only. Host
    names are never resolved: an address entry matches only a URL written with that address.
    Entries that are none of these are ignored, as curl ignores them.
    """

    everything: bool = False
    exclusions: tuple[_Exclusion, ...] = ()

    @classmethod
    def parse(cls, value: str) -> "NoProxy":
        everything = False
        exclusions: list[_Exclusion] = []
        for raw in value.split(","):
            entry = raw.strip().lower()
            if entry == "*":
                everything = True
            elif entry:
                exclusion = _exclusion(entry)
                if exclusion is not None:
                    exclusions.append(exclusion)
        return cls(everything, tuple(exclusions))

    def excludes(self, host: str, port: int) -> bool:
        """Whether C{host} (as in a URL, IPv6 without brackets) and C{port} go direct."""
        if self.everything:
            return True
        name = host.lower().strip("[]").rstrip(".")
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
        except ValueError:
            address = None
        return any(e.matches(name, address, port) for e in self.exclusions)


def _exclusion(entry: str) -> _Exclusion | None:
    port: int | None = None
    if entry.startswith("["):
        inside, _, after = entry[1:].partition("]")
        if after.startswith(":") and after[1:].isdigit():
            port = int(after[1:])
        elif after:
            return None
        entry = inside
    elif entry.count(":") == 1:
        entry, _, port_text = entry.partition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    try:
        return _Exclusion(network=ipaddress.ip_network(entry, strict=False), port=port)
    except ValueError:
        pass
    domain = entry.removeprefix("*").lstrip(".").rstrip(".")
    if not domain or _HOST_NAME.fullmatch(domain) is None:
        return None
    return _Exclusion(domain=domain, port=port)


def _environment(environ: Mapping[str, str], lower: str) -> tuple[str, str]:
    """(name, value) of the first non-empty of C{lower} and its upper-case twin (curl's order)."""
    for name in (lower, lower.upper()):
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return lower.upper(), ""


def proxy_for(
    url: str, upstream: ProxySetting, server: ProxySetting, environ: Mapping[str, str]
) -> OutboundProxy | None:
    """
    The outbound proxy for requests to C{url}, or None to connect directly.

    C{upstream} (C{[upstreams.NAME] proxy}) wins over C{server} (C{[server] upstream_proxy});
    either may say L{DIRECT}. When both say nothing, C{environ} decides: C{https_proxy} or
    C{HTTPS_PROXY} for an https URL, C{http_proxy} or C{HTTP_PROXY} for an http one, unless
    C{no_proxy} or C{NO_PROXY} excludes its host (L{NoProxy}). C{NO_PROXY} applies only to
    the environment's proxies.

    @raise ConfigError: the environment's proxy URL is not one (naming the variable).
    """
    for setting in (upstream, server):
        if isinstance(setting, OutboundProxy):
            return setting
        if isinstance(setting, Direct):
            return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    name, value = _environment(environ, "https_proxy" if scheme == "https" else "http_proxy")
    if not value:
        return None
    _, no_proxy = _environment(environ, "no_proxy")
    port = parts.port or (443 if scheme == "https" else 80)
    if no_proxy and NoProxy.parse(no_proxy).excludes(parts.hostname or "", port):
        return None
    try:
        return parse_proxy_url(value, name, scheme_optional=True)
    except ConfigError as e:
        raise ConfigError(
            f"{e} (from the environment; [server] upstream_proxy = \"\" ignores it)"
        ) from None


def proxy_routes(
    upstreams: Iterable[tuple[str, str, Origin, ProxySetting]],
    server: ProxySetting,
    environ: Mapping[str, str],
) -> dict[Origin, OutboundProxy | None]:
    """
    The proxy of each origin (L{proxy_for}), from (upstream name, URL, its origin, its
    C{proxy} setting) for every URL of every upstream.

    @raise ConfigError: as L{proxy_for}, or two upstreams on one origin (the connection
        pool's key) would use different proxies.
    """
    routes: dict[Origin, OutboundProxy | None] = {}
    for name, url, origin, setting in upstreams:
        proxy = proxy_for(url, setting, server, environ)
        other = routes.setdefault(origin, proxy)
        if other != proxy:
            raise ConfigError(
                f"upstreams.{name}.proxy: {url} shares its host and port with another "
                f"upstream, reached {f'through {other.url}' if other else 'directly'}; "
                f"give both the same proxy"
            )
    return routes


# -- the tunnel ----------------------------------------------------------------------------


class ProxyTrouble:
    """
    Says once that an outbound proxy fails for a target, and once that it works again.

    Every request through a refusing proxy fails the same way; the upstream's health already
    keeps them few, and this keeps the proxy's own warning to one line per change.
    """

    log: ClassVar[Logger] = Logger()

    def __init__(self) -> None:
        self._failing: dict[tuple[str, str], str] = {}

    def failed(self, proxy: OutboundProxy, target: str, message: str) -> None:
        key = (proxy.url, target)
        if self._failing.get(key) != message:
            self.log.warn("{message}", message=message, proxy=proxy.url, target=target)
        self._failing[key] = message

    def worked(self, proxy: OutboundProxy, target: str) -> None:
        if self._failing.pop((proxy.url, target), None) is not None:
            self.log.info(
                "the outbound proxy {proxy} opens tunnels to {target} again",
                proxy=proxy.url, target=target,
            )


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ConnectProtocol(Protocol):
    """
    Sends C{CONNECT}, reads the proxy's answer, then passes the connection to the protocol
    the endpoint was asked to connect (TLS for https), byte for byte in both directions.
    """

    def __init__(self, attempt: "_Attempt") -> None:
        self._attempt = attempt
        self._buffer = b""
        self._inner: IProtocol | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._attempt.request)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_ANSWER_HEAD_BYTES:
                    self._attempt.refused(self, "an answer head over 16 KiB")
                return
            head, rest = self._buffer[:end], self._buffer[end + 4:]
            self._buffer = rest
            match = _STATUS_LINE.fullmatch(head.split(b"\r\n", 1)[0])
            if match is None:
                self._attempt.refused(self, "an answer that is not HTTP")
                return
            code = int(match.group(1))
            # An interim answer (100 Continue) comes before the real one.
            if not 100 <= code < 200:
                break
        self._buffer = b""
        if not 200 <= code < 300:
            reason = (match.group(2) or b"").decode("latin-1")
            reason = "".join(c for c in reason if c.isprintable())[:MAX_REASON_CHARS]
            self._attempt.refused(self, f"{code} {reason}".rstrip())
            return
        assert self.transport is not None
        inner = self._attempt.established(self.transport)
        if inner is None:
            return
        self._inner = inner
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        else:
            self._attempt.lost(reason)


class _Attempt:
    """One C{CONNECT}: the proxy connection, the exchange, one deadline over both."""

    def __init__(self, endpoint: "TunnelEndpoint", factory: IProtocolFactory) -> None:
        self._endpoint = endpoint
        self._factory = factory
        proxy = endpoint.proxy
        self.target = _authority(endpoint.host, endpoint.port)
        lines = [f"CONNECT {self.target} HTTP/1.1".encode("ascii"),
                 f"Host: {self.target}".encode("ascii"),
                 b"User-Agent: " + endpoint.user_agent]
        authorization = proxy.authorization()
        if authorization is not None:
            lines.append(b"Proxy-Authorization: " + authorization)
        self.request = b"\r\n".join(lines) + b"\r\n\r\n"
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._protocol: _ConnectProtocol | None = None
        self._timer: IDelayedCall | None = endpoint.clock.callLater(endpoint.timeout, self._time_out)
        factory = Factory.forProtocol(lambda: _ConnectProtocol(self))
        # Not a line per upstream connection ("Starting factory"): failures say what matters.
        factory.noisy = False
        self._connecting: Deferred[IProtocol] | None = endpoint.proxy_endpoint.connect(factory)
        if self._connecting is not None:
            self._connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, protocol: IProtocol) -> None:
        self._connecting = None
        assert isinstance(protocol, _ConnectProtocol)
        self._protocol = protocol
        if self.result.called:
            self._abort()

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        if not self.result.called:
            proxy = self._endpoint.proxy
            self._fail(f"cannot reach the outbound proxy {proxy.url} (for {self.target}): "
                       f"{failure.getErrorMessage()}")

    def refused(self, protocol: _ConnectProtocol, answer: str) -> None:
        self._protocol = protocol
        self._fail(f"the outbound proxy {self._endpoint.proxy.url} refused CONNECT to "
                   f"{self.target}: {answer}")

    def established(self, transport: ITransport) -> IProtocol | None:
        """The tunnel is open: hand it to the protocol the endpoint was asked for."""
        if self.result.called:
            return None
        self._stop_timer()
        address: IAddress = getattr(transport, "getPeer")()
        inner = self._factory.buildProtocol(address)
        if inner is None:
            self._fail("the connection was declined", quiet=True)
            return None
        self._endpoint.trouble.worked(self._endpoint.proxy, self.target)
        inner.makeConnection(transport)
        self.result.callback(inner)
        return inner

    def lost(self, reason: Failure) -> None:
        if not self.result.called:
            self._fail(f"the outbound proxy {self._endpoint.proxy.url} closed the connection "
                       f"without answering CONNECT to {self.target}: {reason.getErrorMessage()}")

    def _time_out(self) -> None:
        self._timer = None
        self._fail(f"the outbound proxy {self._endpoint.proxy.url} did not open a tunnel to "
                   f"{self.target} within {self._endpoint.timeout:g} s")

    def _fail(self, message: str, *, quiet: bool = False) -> None:
        if self.result.called:
            return
        if not quiet:
            self._endpoint.trouble.failed(self._endpoint.proxy, self.target, message)
        self._stop_timer()
        # Fired before the connection is dropped: the loss that follows finds it done.
        self.result.errback(Failure(OutboundProxyError(message)))
        self._abort()

    def _cancel(self, _: "Deferred[IProtocol]") -> None:
        self._stop_timer()
        self._abort()

    def _abort(self) -> None:
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """
    A connection to C{host:port} through an outbound proxy's C{CONNECT}.

    C{connect} fires with the protocol of the given factory once the proxy answered 2xx;
    the tunnel is then that protocol's transport. It fails with L{OutboundProxyError} when
    the proxy cannot be reached, refuses (any other status), closes or says nothing
    HTTP-like, or when the whole exchange takes over C{timeout} seconds.
    """

    def __init__(
        self,
        clock: IReactorTime,
        proxy: OutboundProxy,
        host: str,
        port: int,
        *,
        timeout: float,
        proxy_endpoint: IStreamClientEndpoint,
        trouble: ProxyTrouble | None = None,
        user_agent: bytes = b"lxd-image-proxy",
    ) -> None:
        self.clock = clock
        self.proxy = proxy
        self.host = host
        self.port = port
        self.timeout = timeout
        self.proxy_endpoint = proxy_endpoint
        self.trouble = trouble if trouble is not None else ProxyTrouble()
        self.user_agent = user_agent

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        return _Attempt(self, protocolFactory).result


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    The agent's endpoints: for each allowed origin directly or through its outbound proxy,
    TLS on top for https with C{policy}'s creator for that host, as Twisted's own agent does.

    @param routes: every origin that may be reached, with its proxy or None (direct). Any
        other origin fails (L{proxy.upstream.AllowlistAgent} never lets one through).
    """

    def __init__(
        self,
        reactor: Any,
        policy: IPolicyForHTTPS,
        routes: Mapping[Origin, OutboundProxy | None],
        *,
        connect_timeout: float,
        user_agent: bytes = b"lxd-image-proxy",
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._routes = dict(routes)
        self._connect_timeout = connect_timeout
        self._user_agent = user_agent
        self.trouble = ProxyTrouble()
        for (scheme, host, port), proxy in self._routes.items():
            if proxy is not None:
                self.trouble.log.info(
                    "upstream {origin} is reached through the outbound proxy {proxy} ({source})",
                    origin=f"{scheme.decode('ascii')}://{_authority(host.decode('ascii'), port)}",
                    proxy=proxy.url, source=proxy.source,
                )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        origin = (uri.scheme, uri.host.lower(), uri.port)
        if origin not in self._routes or uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"{uri.toBytes()!r} is not an upstream origin")
        host = uri.host.decode("ascii")
        proxy = self._routes[origin]
        endpoint: IStreamClientEndpoint
        if proxy is None:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._connect_timeout)
        else:
            endpoint = TunnelEndpoint(
                self._reactor, proxy, host, uri.port, timeout=self._connect_timeout,
                proxy_endpoint=HostnameEndpoint(
                    self._reactor, proxy.host, proxy.port, timeout=self._connect_timeout
                ),
                trouble=self.trouble, user_agent=self._user_agent,
            )
        if uri.scheme == b"https":
            return wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint
