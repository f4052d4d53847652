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
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from proxy.listen import ListeningService
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


class MetricsListenService(ListeningService):
    """Listens for the metrics listener on every address of C{[metrics] listen}."""

    failure_prefix = "metrics.listen: cannot listen"

    def __init__(self, listen: tuple[str, ...], reactor: Any, site: Site) -> None:
        super().__init__()
        self.listen = listen
        self.reactor = reactor
        self.site = site

    def listenings(self) -> list[Deferred[IListeningPort]]:
        return [serverFromString(self.reactor, d).listen(self.site) for d in self.listen]

    def listened(self, ports: list[IListeningPort]) -> None:
        if not ports:
            return
        addresses = [cast(IPv4Address | IPv6Address, p.getHost()) for p in ports]
        log.info(
            "metrics, /healthz and /readyz over plain HTTP on {addresses}",
            addresses=" ".join(
                f"[{a.host}]:{a.port}" if ":" in a.host else f"{a.host}:{a.port}" for a in addresses
            ),
        )


__all__ = ["MetricsListenService", "MetricsResource", "QuietSite", "exporter_site"]
