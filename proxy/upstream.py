"""The HTTP client the proxy uses to reach its upstreams, and nothing else.

Every request, and every redirect hop, goes through L{AllowlistAgent}: a URL whose origin
(scheme, host, port) is not that of a configured upstream is refused before any connection is
made, so the proxy can never be turned into an open proxy.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence, cast

from hyperlink import URL
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import _WrapperException
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from proxy import __version__
from proxy.errors import ProxyError, UpstreamFailed, UpstreamTimeout, VerificationFailed
from proxy.outbound import OutboundProxy, UpstreamEndpoints
from proxy.via import INCOMING, LOOP_DETECTED, LOOP_HEADER, LoopAnswers, outgoing

USER_AGENT = f"lxd-image-proxy/{__version__}".encode("ascii")
# The most of a 508's message (L{proxy.via}) read to say why.
MAX_LOOP_MESSAGE_BYTES = 4096

Origin = tuple[bytes, bytes, int]


def origin_of(url: bytes | str) -> Origin:
    """Return the (scheme, host, port) of an absolute URL, lowercased, default ports filled."""
    text = url.decode("ascii") if isinstance(url, bytes) else url
    parsed = URL.from_text(text)
    scheme = parsed.scheme.lower()
    port = parsed.port
    if port is None:
        port = 443 if scheme == "https" else 80
    return (scheme.encode("ascii"), parsed.host.lower().encode("idna"), port)


class NotAnUpstream(UpstreamFailed):
    """
    A request, or a redirect, pointed at a host that is not a configured upstream.

    Only an upstream's redirect can lead here (clients name files, never hosts), so for the
    client it is an upstream fault: 502.
    """


class UpstreamServerError(UpstreamFailed):
    """The upstream answered a 5xx: a fault of the server (or mirror) asked, not of the file."""


class BodyBroken(UpstreamFailed):
    """An upstream body that ended (reset, closed) before its end: worth resuming."""


class BodyStalled(UpstreamTimeout):
    """An upstream body that sent nothing for the idle timeout: worth resuming."""


def as_proxy_error(failure: Failure, what: str) -> ProxyError:
    """
    The L{ProxyError} to answer with for an upstream request that failed with C{failure}.

    No answer within the header timeout is a 504; every other transport, TLS or protocol
    failure is a 502 whose message names the cause.
    """
    error = failure.value
    if isinstance(error, ProxyError):
        return error
    reasons: list[Failure] = [failure]
    if isinstance(error, _WrapperException):
        reasons = list(error.reasons) or reasons
    if any(r.check(CancelledError, TimeoutError) for r in reasons):
        return UpstreamTimeout(f"{what}: the upstream did not answer in time")
    return UpstreamFailed(f"{what}: {reasons[0].getErrorMessage()}")


@implementer(IAgent)
class AllowlistAgent:
    """
    An agent that only lets requests through to configured upstream origins.

    treq wraps this agent in its C{RedirectAgent}, so each redirect hop is checked here too.
    """

    def __init__(self, agent: IAgent, allowed: Iterable[Origin]) -> None:
        self._agent = agent
        self._allowed = frozenset(allowed)

    def allows(self, uri: bytes) -> bool:
        try:
            return origin_of(uri) in self._allowed
        except Exception:
            return False

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> "Deferred[IResponse]":
        if not self.allows(uri):
            return fail(
                NotAnUpstream(
                    f"refusing to contact {uri.decode('ascii', 'replace')}: not a configured upstream"
                )
            )
        return self._agent.request(method, uri, headers, bodyProducer)


@implementer(IPolicyForHTTPS)
class PerOriginTLSPolicy:
    """Chooses the TLS policy of the upstream that owns the host and port being contacted."""

    def __init__(self, policies: Mapping[tuple[bytes, int], IPolicyForHTTPS], default: IPolicyForHTTPS) -> None:
        self._policies = dict(policies)
        self._default = default

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        policy = self._policies.get((hostname.lower(), port), self._default)
        return policy.creatorForNetloc(hostname, port)


class BodyReceiver(Protocol):
    """
    Hands an upstream body to C{sink} chunk by chunk, with a size cap and an idle timeout.

    The idle timer restarts on every chunk, so a slow but live upstream is fine and a stalled
    one fails after C{idle_timeout} seconds of silence. Only a body that ended with
    C{ResponseDone} counts as complete: C{PotentialDataLoss} (no length, connection closed) is a
    failure for a cache.
    """

    def __init__(self, sink: Callable[[bytes], None], limit: int | None, clock: IReactorTime,
                 idle_timeout: float, finished: "Deferred[int]") -> None:
        self._sink = sink
        self._limit = limit
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._finished = finished
        self._received = 0
        self._timer: IDelayedCall | None = None
        self._error: ProxyError | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self._abort(BodyStalled(f"upstream sent nothing for {self._idle_timeout:g} seconds"))

    def abort(self, error: ProxyError) -> None:
        """Stop receiving: drop the connection; the body fails with C{error}."""
        if self._error is None:
            self._abort(error)

    def _abort(self, error: ProxyError) -> None:
        self._error = error
        # A response body's transport is a TransportProxyProducer: stopping it drops the
        # connection, and connectionLost follows.
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._limit is not None and self._received + len(data) > self._limit:
            self._abort(VerificationFailed(f"upstream sent more than the expected {self._limit} bytes"))
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)
        self._received += len(data)
        try:
            self._sink(data)
        except Exception as e:
            self._abort(UpstreamFailed(f"cannot store the upstream body: {e}"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._error is not None:
            self._finished.errback(Failure(self._error))
        elif reason.check(ResponseDone):
            self._finished.callback(self._received)
        else:
            self._finished.errback(Failure(BodyBroken(
                f"upstream body ended after {self._received} bytes: {reason.getErrorMessage()}"
            )))


def receive_body(response: IResponse, sink: Callable[[bytes], None], *, limit: int | None,
                 clock: IReactorTime, idle_timeout: float) -> "Deferred[int]":
    """Deliver C{response}'s body to C{sink}; fires with the byte count when it ended cleanly."""
    finished: Deferred[int] = Deferred()
    response.deliverBody(BodyReceiver(sink, limit, clock, idle_timeout, finished))
    return finished


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory without a log line for each connection made or closed."""

    noisy = False


class UpstreamClient:
    """
    Makes GET requests to configured upstreams.

    Bodies are never buffered here (C{unbuffered=True}); the caller consumes them with
    C{deliverBody}. C{header_timeout} bounds the time until the response headers arrive; the body
    needs its own idle timeout, which the caller owns.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        agent: IAgent,
        allowed: Iterable[Origin],
        *,
        header_timeout: float,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self._reactor = reactor
        self._agent = AllowlistAgent(agent, allowed)
        self._http = HTTPClient(self._agent)
        self._header_timeout = header_timeout
        self._pool = pool
        # Set by for_upstreams: each origin's outbound proxy, for the status page.
        self._proxies: dict[Origin, OutboundProxy | None] = {}
        # Set by for_upstreams: the upstream each origin belongs to, for the loop message.
        self._names: dict[Origin, str] = {}
        # Set by use_pseudonym: what the requests' Via names, and what a 508 means here.
        self._loops: LoopAnswers | None = None

    @classmethod
    def for_upstreams(
        cls,
        reactor: Any,
        upstreams: Mapping[str, tuple[str | Sequence[str], IPolicyForHTTPS]],
        default_policy: IPolicyForHTTPS,
        *,
        connect_timeout: float,
        header_timeout: float,
        proxies: Mapping[Origin, OutboundProxy | None] | None = None,
    ) -> "UpstreamClient":
        """
        Build a client for C{upstreams}: name -> (base URL, or every mirror's, TLS policy for
        that upstream). Every mirror's origin is allowed, with its upstream's TLS policy.

        @param proxies: the outbound proxy of each origin (L{proxy.outbound.proxy_for});
            an origin not in it is reached directly.
        """
        origins: list[Origin] = []
        names: dict[Origin, str] = {}
        policies: dict[tuple[bytes, int], IPolicyForHTTPS] = {}
        for name, (urls, policy) in upstreams.items():
            for url in (urls,) if isinstance(urls, str) else urls:
                origin = origin_of(url)
                origins.append(origin)
                names[origin] = name
                policies[(origin[1], origin[2])] = policy
        routes = {origin: (proxies or {}).get(origin) for origin in origins}
        pool = HTTPConnectionPool(reactor, persistent=True)
        # Twisted's pool logs "Starting factory" and "Stopping factory" at info for every
        # upstream connection; the downloads say what an admin needs of them.
        pool._factory = _QuietClientFactory
        pool.maxPersistentPerHost = 4
        pool.cachedConnectionTimeout = 120
        # Twisted's own endpoints, except that an origin with an outbound proxy is reached
        # through a CONNECT tunnel (the connect timeout covers the proxy's answer too).
        endpoints = UpstreamEndpoints(
            reactor, PerOriginTLSPolicy(policies, default_policy), routes,
            connect_timeout=connect_timeout, user_agent=USER_AGENT,
        )
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        client = cls(reactor, agent, origins, header_timeout=header_timeout, pool=pool)
        client._proxies = routes
        client._names = names
        return client

    def use_pseudonym(self, pseudonym: str) -> None:
        """Send C{Via} with C{pseudonym} (L{proxy.via}) and turn an upstream's 508 into its error."""
        self._loops = LoopAnswers(pseudonym)

    def outbound_proxy(self, url: str) -> OutboundProxy | None:
        """The outbound proxy requests to C{url} go through; None: direct."""
        try:
            return self._proxies.get(origin_of(url))
        except Exception:
            return None

    def get(self, url: str, headers: Mapping[bytes, bytes] | None = None) -> "Deferred[IResponse]":
        """
        GET C{url}; fires with the response once its headers arrived, fails with
        L{NotAnUpstream} for a foreign URL, or with C{CancelledError} after C{header_timeout}.
        """
        all_headers = Headers({b"User-Agent": [USER_AGENT]})
        for name, value in (headers or {}).items():
            all_headers.setRawHeaders(name, [value])
        loops = self._loops
        # Read now: the callbacks below run outside the context of the work that asks.
        incoming = INCOMING.get()
        if loops is not None:
            all_headers.setRawHeaders(b"Via", [outgoing(loops.pseudonym)])
        d = self._http.get(
            url,
            headers=all_headers,
            unbuffered=True,
            allow_redirects=True,
            timeout=self._header_timeout,
            reactor=self._reactor,
        )
        if loops is not None:
            d.addCallback(lambda response: self._loop_checked(loops, url, incoming, response))
        return cast("Deferred[IResponse]", d)

    def _loop_checked(
        self, loops: LoopAnswers, url: str, incoming: str, response: IResponse,
    ) -> object:
        """C{response}, or for a 508 (the request looped) the L{UpstreamLoop} to fail with."""
        if response.code != LOOP_DETECTED:
            return response
        try:
            name = self._names.get(origin_of(url), url)
        except Exception:
            name = url
        detector = (response.headers.getRawHeaders(LOOP_HEADER) or [b""])[0]
        chunks: list[bytes] = []
        # The answer is a line of text; what does not come within a second is not waited for.
        received = receive_body(
            response, chunks.append, limit=MAX_LOOP_MESSAGE_BYTES, clock=self._reactor,
            idle_timeout=1.0,
        )

        def fail(_: object) -> None:
            said = b"".join(chunks).decode("utf-8", "replace")
            raise loops.error(name, detector.decode("latin-1")[:100], said, incoming)

        return received.addBoth(fail)

    def close(self) -> "Deferred[None]":
        """Close idle persistent connections (at service stop)."""
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d


__all__ = [
    "AllowlistAgent", "BodyBroken", "BodyReceiver", "BodyStalled", "NotAnUpstream",
    "PerOriginTLSPolicy", "UpstreamClient", "UpstreamServerError",
    "VerificationFailed", "as_proxy_error", "origin_of", "receive_body",
]
