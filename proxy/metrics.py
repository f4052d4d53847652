# -*- test-case-name: tests.test_metrics -*-
"""The proxy's Prometheus metrics: every family defined here, one registry per service.

Counters are incremented where the proxy already counts (a response served, a download
started, joined or verified, an upstream request, an eviction, an auto-update run), through the
few methods of L{Metrics}, so that the label names and values live in this module only. Gauges
that can be read from state at scrape time are not kept up to date on every change: the
L{StateCollector} reads them when Prometheus asks, from memory and from the index's kept totals
(point reads of its memory map, never a scan), so a scrape costs the reactor no disk wait.

A proxy whose C{[metrics] listen} is empty counts nothing: its L{Metrics} is made with
C{enabled=False}, and every method returns at once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from proxy import __version__

PREFIX = "lxd_image_proxy"

# The faces a request can reach, by the first segment of its path; an upstream's name is the
# simplestreams face, anything else not listed here is "unknown" (a 404).
FACE_OF_SEGMENT = {
    "": "root",
    "1.0": "lxd",
    "import": "import",
    "healthz": "health",
    "readyz": "health",
}
SIMPLESTREAMS_FACE = "simplestreams"
UNKNOWN_FACE = "unknown"
# Anything but these is counted as "other": a client cannot grow the label set.
COUNTED_METHODS = frozenset({b"GET", b"HEAD"})
# A response whose connection was lost before it was finished.
ABORTED = "aborted"

# Why files left the cache.
EXPIRED = "expired"
EVICTED = "evicted"


def face_of(segment: str, upstreams: Collection[str]) -> str:
    """The face a request whose path starts with C{segment} reaches."""
    if segment in upstreams:
        return SIMPLESTREAMS_FACE
    return FACE_OF_SEGMENT.get(segment, UNKNOWN_FACE)


class Metrics:
    """
    The counters of one proxy, on a registry of its own (never the process-wide default, so
    that two services, or two tests, never count into each other).

    @ivar registry: what the C{/metrics} resource exposes; collectors of state are added to it
        with L{CollectorRegistry.register}.
    @ivar enabled: whether anything is counted.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, help: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", help, list(labels), registry=r)

        self.requests = counter(
            "requests", "HTTP responses finished on the HTTPS port, by face, method and status "
            "(\"aborted\": the connection was lost first).", ["face", "method", "status"],
        )
        self.served_bytes = counter(
            "served_bytes", "Image file body bytes sent to clients, from a stored file "
            "(source=\"cache\") or from a download in flight (source=\"download\").",
            ["upstream", "source"],
        )
        self.served_files = counter(
            "served_files", "Image file (or export) responses whose body was sent, by source: "
            "hits (\"cache\") and misses (\"download\").", ["upstream", "source"],
        )
        self.upstream_requests = counter(
            "upstream_requests", "Requests sent to upstreams, by kind (\"file\": an image file "
            "or export; \"metadata\": a catalogue file) and status (\"error\": no answer).",
            ["upstream", "kind", "status"],
        )
        self.upstream_bytes = counter(
            "upstream_bytes", "Body bytes received from upstreams, by kind.", ["upstream", "kind"],
        )
        self.downloads = counter(
            "downloads", "Downloads started, by trigger (\"client\": a client's miss; "
            "\"background\": auto-update or prefetch).", ["upstream", "trigger"],
        )
        self.download_joins = counter(
            "download_joins", "Requests that joined a download already in flight instead of "
            "starting one: (downloads + joins) / downloads is the coalescing ratio.",
            ["upstream"],
        )
        self.verification_failures = counter(
            "verification_failures", "Downloads discarded because their size or sha256 did not "
            "match the catalogue (or the fingerprint, for an export).", ["upstream"],
        )
        self.download_failures = counter(
            "download_failures", "Downloads that failed for any reason, verification included.",
            ["upstream"],
        )
        self.not_stored = counter(
            "not_stored", "Downloads streamed to their clients but not stored for lack of room.",
            ["upstream"],
        )
        self.not_stored_bytes = counter(
            "not_stored_bytes", "Bytes of the downloads not stored for lack of room.", ["upstream"],
        )
        self.evictions = counter(
            "evictions", "Files removed from the cache, by reason (\"expired\": unused for "
            "cache.expiry_days; \"evicted\": to keep cache.max_size or cache.min_free).",
            ["reason"],
        )
        self.evicted_bytes = counter(
            "evicted_bytes", "Bytes of the files removed from the cache, by reason.", ["reason"],
        )
        self.peer_fills = counter(
            "peer_fills", "Misses that asked the pool's peers first ([cluster] peers), by "
            "outcome (\"peer\": copied from one; \"upstream\": none held it in time).",
            ["upstream", "source"],
        )
        self.peer_requests = counter(
            "peer_requests", "Cached-only requests answered (a peer's question), by result "
            "(\"hit\": served from the store; \"miss\": 504, nothing fetched).", ["result"],
        )
        self.auto_update_runs = counter("auto_update_runs", "Auto-update runs finished.")
        self.auto_update_failures = counter(
            "auto_update_failures", "Auto-update runs that failed, or in which a download failed "
            "or a pinned alias could not be resolved.",
        )
        self.auto_update_last_run = Gauge(
            f"{PREFIX}_auto_update_last_run_timestamp_seconds",
            "When the last auto-update run finished (Unix time).", registry=r,
            # With several workers (proxy.workers): the latest of theirs, not one per pid.
            multiprocess_mode="max",
        )
        info = Gauge(
            f"{PREFIX}_build_info", "The proxy's version; always 1.", ["version"], registry=r,
            multiprocess_mode="max",
        )
        info.labels(__version__).set(1)

    # -- the HTTPS port ------------------------------------------------------------------------

    def observe_request(self, face: str, request: Request) -> None:
        """Count C{request}'s response once it is finished (or its connection lost)."""
        if not self.enabled:
            return
        method = request.method.decode("ascii") if request.method in COUNTED_METHODS else "other"

        def finished(result: object) -> None:
            status = ABORTED if result is not None else str(request.code)
            self.requests.labels(face, method, status).inc()

        request.notifyFinish().addBoth(finished)

    def served(self, upstream: str, hit: bool, nbytes: int) -> None:
        """A response's body of C{nbytes} went out, from a stored file (C{hit}) or a download."""
        if not self.enabled:
            return
        source = "cache" if hit else "download"
        self.served_files.labels(upstream, source).inc()
        self.served_bytes.labels(upstream, source).inc(nbytes)

    # -- upstreams -----------------------------------------------------------------------------

    def upstream_answer(self, upstream: str, kind: str, code: int | None) -> None:
        """An upstream answered a C{kind} request with C{code}, or did not answer (None)."""
        if not self.enabled:
            return
        status = "error" if code is None else str(code)
        self.upstream_requests.labels(upstream, kind, status).inc()

    def upstream_received(self, upstream: str, kind: str, nbytes: int) -> None:
        if not self.enabled or nbytes <= 0:
            return
        self.upstream_bytes.labels(upstream, kind).inc(nbytes)

    def download_started(self, upstream: str, background: bool) -> None:
        if not self.enabled:
            return
        self.downloads.labels(upstream, "background" if background else "client").inc()

    def peer_fill(self, upstream: str, found: bool) -> None:
        if self.enabled:
            self.peer_fills.labels(upstream, "peer" if found else "upstream").inc()

    def peer_request(self, hit: bool) -> None:
        if self.enabled:
            self.peer_requests.labels("hit" if hit else "miss").inc()

    def download_joined(self, upstream: str) -> None:
        if not self.enabled:
            return
        self.download_joins.labels(upstream).inc()

    def download_failed(self, upstream: str, verification: bool) -> None:
        if not self.enabled:
            return
        self.download_failures.labels(upstream).inc()
        if verification:
            self.verification_failures.labels(upstream).inc()

    def download_not_stored(self, upstream: str, nbytes: int) -> None:
        if not self.enabled:
            return
        self.not_stored.labels(upstream).inc()
        self.not_stored_bytes.labels(upstream).inc(nbytes)

    # -- the lifecycle -------------------------------------------------------------------------

    def removed(self, reason: str, sizes: Iterable[int]) -> None:
        """Files of C{sizes} bytes left the cache for C{reason}; thread-safe (a worker calls it)."""
        if not self.enabled:
            return
        sizes = list(sizes)
        if sizes:
            self.evictions.labels(reason).inc(len(sizes))
            self.evicted_bytes.labels(reason).inc(sum(sizes))

    def auto_update_ran(self, failed: bool, at: float) -> None:
        if not self.enabled:
            return
        self.auto_update_runs.inc()
        if failed:
            self.auto_update_failures.inc()
        self.auto_update_last_run.set(at)


# -- state read at scrape time ---------------------------------------------------------------


class HealthState(Protocol):
    """What the collector reads of an upstream's health (L{proxy.health.UpstreamHealth})."""

    @property
    def offline(self) -> bool: ...

    @property
    def forced(self) -> bool: ...

    @property
    def last_success_at(self) -> float | None: ...


class IndexTotals(Protocol):
    """The index's kept totals (L{proxy.index.CacheIndex}): each a point read, never a scan."""

    @property
    def is_open(self) -> bool: ...

    def total_size(self) -> int: ...

    def file_count(self) -> int: ...

    def pinned_totals(self) -> tuple[int, int]: ...

    def catalogue_checked_at(self, upstream: str, path: str) -> float | None: ...


class MirrorStates(Protocol):
    """The mirrors of one upstream (L{proxy.mirrors.Mirrors}), as the gauges read them."""

    def states(self) -> Iterable[Any]: ...


class StateCollector(Collector):
    """
    The gauges of the proxy's state, read when Prometheus scrapes: the cache's size, files and
    pinned files (the index's kept totals), downloads in flight and the clients following them,
    each upstream's health and the age of its catalogue.

    @param catalogue_paths: by upstream, the catalogue file whose last check gives its age
        (C{streams/v1/index.json}, or an LXD server's image list).
    @param in_flight: the upstream of every download running (not queued).
    @param following: by upstream, the responses streaming a download now.
    @param queued: by upstream, the downloads waiting for their turn.
    """

    def __init__(
        self,
        clock: IReactorTime,
        index: IndexTotals,
        health: Mapping[str, HealthState],
        catalogue_paths: Mapping[str, str],
        in_flight: Callable[[], Iterable[str]],
        following: Callable[[], Mapping[str, int]],
        max_size: int | None,
        mirrors: Mapping[str, MirrorStates] | None = None,
        *,
        queued: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self._mirrors = dict(mirrors or {})
        self._queued = queued
        self._clock = clock
        self._index = index
        self._health = health
        self._catalogue_paths = dict(catalogue_paths)
        self._in_flight = in_flight
        self._following = following
        self._max_size = max_size

    def describe(self) -> list[Metric]:
        # Registering must not read state (the index may not be open yet).
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._cache()
        yield from self._downloads()
        yield from self._upstreams()

    def _cache(self) -> Iterator[Metric]:
        if self._max_size is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_cache_max_bytes", "The cache's size cap (cache.max_size).",
                value=self._max_size,
            )
        if not self._index.is_open:
            return
        try:
            size = self._index.total_size()
            files = self._index.file_count()
            pinned_files, pinned_bytes = self._index.pinned_totals()
        except Exception:
            # A full LMDB reader table (IndexBusy) must not fail the whole scrape.
            return
        yield GaugeMetricFamily(f"{PREFIX}_cache_bytes", "Bytes of stored files.", value=size)
        yield GaugeMetricFamily(f"{PREFIX}_cache_files", "Stored files.", value=files)
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_pinned_files", "Stored files that are pinned (never expired or evicted).",
            value=pinned_files,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_pinned_bytes", "Bytes of the pinned stored files.", value=pinned_bytes,
        )

    def _downloads(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            f"{PREFIX}_downloads_in_flight", "Upstream downloads running now.", labels=["upstream"],
        )
        counts: dict[str, int] = {}
        for upstream in self._in_flight():
            counts[upstream] = counts.get(upstream, 0) + 1
        for upstream in self._catalogue_paths:
            running.add_metric([upstream], counts.get(upstream, 0))
        yield running
        waiting = GaugeMetricFamily(
            f"{PREFIX}_downloads_queued", "Upstream downloads waiting for their turn "
            "(cache.upstream_concurrency); their clients have response headers, no bytes yet.",
            labels=["upstream"],
        )
        now_queued = self._queued()
        for upstream in self._catalogue_paths:
            waiting.add_metric([upstream], now_queued.get(upstream, 0))
        yield waiting
        following = GaugeMetricFamily(
            f"{PREFIX}_download_followers", "Client responses streaming a download in flight now.",
            labels=["upstream"],
        )
        now_following = self._following()
        for upstream in self._catalogue_paths:
            following.add_metric([upstream], now_following.get(upstream, 0))
        yield following

    def _upstreams(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_upstream_up", "1 while the upstream is online, 0 while it is offline.",
            labels=["upstream"],
        )
        forced = GaugeMetricFamily(
            f"{PREFIX}_upstream_forced_offline",
            "1 when the upstream is offline by configuration (upstreams.NAME.offline).",
            labels=["upstream"],
        )
        success = GaugeMetricFamily(
            f"{PREFIX}_upstream_last_success_timestamp_seconds",
            "When the upstream last answered a request (Unix time); absent before any answer.",
            labels=["upstream"],
        )
        for name, health in self._health.items():
            up.add_metric([name], 0 if health.offline else 1)
            forced.add_metric([name], 1 if health.forced else 0)
            if health.last_success_at is not None:
                success.add_metric([name], health.last_success_at)
        yield up
        yield forced
        yield success
        if self._mirrors:
            mirror_up = GaugeMetricFamily(
                f"{PREFIX}_upstream_mirror_up",
                "1 while the mirror (upstreams.NAME.urls) is up, 0 while it is marked down.",
                labels=["upstream", "url"],
            )
            for name, mirrors in self._mirrors.items():
                for state in mirrors.states():
                    mirror_up.add_metric([name, state.url], 0 if state.down else 1)
            yield mirror_up
        age = GaugeMetricFamily(
            f"{PREFIX}_metadata_age_seconds",
            "Seconds since the upstream's catalogue was last fetched or revalidated; absent "
            "while none is held.", labels=["upstream"],
        )
        if self._index.is_open:
            now = self._clock.seconds()
            for name, path in self._catalogue_paths.items():
                try:
                    checked = self._index.catalogue_checked_at(name, path)
                except Exception:
                    continue
                if checked is not None:
                    age.add_metric([name], max(0.0, now - checked))
        yield age


def render_metrics(registry: CollectorRegistry, accept: bytes | None) -> tuple[bytes, bytes]:
    """The exposition of C{registry} in the format C{accept} asks for: (body, content type)."""
    encoder, content_type = choose_encoder((accept or b"").decode("latin-1"))
    return encoder(registry), content_type.encode("ascii")


# What a part made without metrics (the admin command, a test) counts into: nothing, so one
# instance can be shared.
NO_METRICS = Metrics(enabled=False)


__all__ = [
    "ABORTED",
    "EVICTED",
    "EXPIRED",
    "FACE_OF_SEGMENT",
    "Metrics",
    "NO_METRICS",
    "SIMPLESTREAMS_FACE",
    "StateCollector",
    "UNKNOWN_FACE",
    "face_of",
    "render_metrics",
]
