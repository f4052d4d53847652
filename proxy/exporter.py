# -*- test-case-name: tests.test_exporter -*-
"""The metrics listener: C{/metrics}, C{/healthz} and C{/readyz} over plain HTTP.

Prometheus exporters serve plain HTTP on a port of their own, so that a scraper needs neither
the proxy's certificate nor a path on the port the LXD hosts use, and a firewall can tell the
two apart. C{[metrics] listen} names the addresses (loopback by default); empty turns the
listener off.

The exposition is rendered on the reactor thread: every collector reads memory or the index's
kept totals (see L{proxy.metrics}), which costs less than handing the work to a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from proxy.metrics import render_metrics
from proxy.probes import Healthz, Readiness, Readyz

log = Logger()

INDEX_BODY = (
    b"lxd-image-proxy metrics listener: /metrics (Prometheus), /healthz (liveness), "
    b"/readyz (readiness)\n"
)


class MetricsResource(Resource):
    """C{/metrics}: the registry's exposition, in the format the scraper's C{Accept} asks for."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        body, content_type = render_metrics(self._registry, request.getHeader(b"Accept"))
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        return body


class _Index(Resource):
    def getChild(self, path: bytes, request: Any) -> IResource:
        # Twisted's default is a deprecated HTML page that echoes nothing useful.
        return notFound("No such path", "Try /metrics, /healthz or /readyz.")

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return INDEX_BODY


class QuietSite(Site):
    """A L{Site} that writes no access line: a scrape every few seconds is not news."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def exporter_site(registry: CollectorRegistry, state: Callable[[], Readiness]) -> Site:
    """The resource tree of the metrics listener."""
    root = _Index()
    root.putChild(b"", root)
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(state))
    site = QuietSite(root)
    site.displayTracebacks = False
    return site


class MetricsListenService(Service):
    """Listens for the metrics listener on every address of C{[metrics] listen}."""

    def __init__(self, listen: tuple[str, ...], reactor: Any, site: Site) -> None:
        self.listen = listen
        self.reactor = reactor
        self.site = site
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[list[int]] = Deferred()
        self._started = False

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.listen:
            self.ready.callback([])
            return
        results: list[list[tuple[bool, Any]]] = []
        listening = DeferredList(
            [serverFromString(self.reactor, d).listen(self.site) for d in self.listen],
            consumeErrors=True,
        )
        listening.addCallback(results.append)
        # TCP endpoints listen at once: a port that cannot be had stops start-up here.
        if results:
            self._listening(results[0])
        else:
            listening.addCallback(lambda _: self._listening(results[0]))

    def _listening(self, results: list[tuple[bool, Any]]) -> None:
        self.ports = [r for ok, r in results if ok]
        failures = [r for ok, r in results if not ok]
        if failures:
            for port in self.ports:
                port.stopListening()
            self.ports = []
            reasons = "; ".join(f.getErrorMessage() for f in failures)
            raise SystemExit(f"lxd-image-proxy: metrics.listen: cannot listen: {reasons}")
        addresses = [cast(IPv4Address | IPv6Address, p.getHost()) for p in self.ports]
        log.info(
            "metrics, /healthz and /readyz over plain HTTP on {addresses}",
            addresses=" ".join(
                f"[{a.host}]:{a.port}" if ":" in a.host else f"{a.host}:{a.port}" for a in addresses
            ),
        )
        self.ready.callback([a.port for a in addresses])

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        ports, self.ports = self.ports, []
        return DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


__all__ = ["MetricsListenService", "MetricsResource", "QuietSite", "exporter_site"]
