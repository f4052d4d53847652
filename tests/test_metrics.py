"""
Every metric family, counted where the proxy counts: the request path wired in memory
(L{tests.helpers.wired.Harness}) with a L{Metrics} of the test's own, read back with
C{registry.get_sample_value}.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import Request

from proxy import __version__
from proxy.config import Config, default_config
from proxy.health import UpstreamHealth
from proxy.index import CacheIndex, MetadataRecord
from proxy.lifecycle import SECONDS_PER_DAY
from proxy.metadata import INDEX_PATH
from proxy.metrics import Metrics, StateCollector, render_metrics
from proxy.prefetch import Prefetcher
from tests.helpers.harness import Closing
from tests.helpers.scripted import META_PATH, ROOTFS_PATH, sha, simple_tree
from tests.helpers.wired import Harness

P = "lxd_image_proxy_"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value; 0 for a sample never counted."""
    found = metrics.registry.get_sample_value(P + name, labels)
    return 0.0 if found is None else found


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def h(tmp_path: Any, closing: Closing, metrics: Metrics) -> Harness:
    return closing(Harness(tmp_path, simple_tree(), metrics=metrics))


def test_a_miss_then_a_hit_count_bytes_by_source_and_the_upstream_traffic(
    h: Harness, metrics: Metrics
) -> None:
    body = h.files[ROOTFS_PATH]
    assert h.fetch(ROOTFS_PATH)[:2] == (200, body)
    assert h.fetch(ROOTFS_PATH)[:2] == (200, body)
    h.settle()
    assert value(metrics, "served_files_total", upstream="up", source="download") == 1
    assert value(metrics, "served_files_total", upstream="up", source="cache") == 1
    assert value(metrics, "served_bytes_total", upstream="up", source="download") == len(body)
    assert value(metrics, "served_bytes_total", upstream="up", source="cache") == len(body)
    assert value(metrics, "downloads_total", upstream="up", trigger="client") == 1
    assert value(metrics, "upstream_requests_total", upstream="up", kind="file", status="200") == 1
    assert value(metrics, "upstream_bytes_total", upstream="up", kind="file") == len(body)
    # The index and the products file, once each (the TTL has not run out).
    assert value(metrics, "upstream_requests_total", upstream="up", kind="metadata", status="200") == 2
    assert value(metrics, "upstream_bytes_total", upstream="up", kind="metadata") == (
        len(h.files[INDEX_PATH]) + len(h.files["streams/v1/images.json"])
    )


def test_requests_are_counted_by_face_method_and_status(h: Harness, metrics: Metrics) -> None:
    h.fetch(INDEX_PATH)
    h.fetch("no/such/file")
    h.run(h.proxy.head(f"https://proxy.test/up/{INDEX_PATH}"))
    h.run(h.proxy.request("DELETE", f"https://proxy.test/up/{INDEX_PATH}"))
    h.run(h.proxy.get("https://proxy.test/nothing-here/x"))
    h.run(h.proxy.get("https://proxy.test/"))
    h.settle()
    assert value(metrics, "requests_total", face="simplestreams", method="GET", status="200") == 1
    assert value(metrics, "requests_total", face="simplestreams", method="GET", status="404") == 1
    assert value(metrics, "requests_total", face="simplestreams", method="HEAD", status="200") == 1
    assert value(metrics, "requests_total", face="simplestreams", method="other", status="405") == 1
    assert value(metrics, "requests_total", face="unknown", method="GET", status="404") == 1
    assert value(metrics, "requests_total", face="root", method="GET", status="200") == 1


def test_a_response_whose_connection_was_lost_is_counted_as_aborted(metrics: Metrics) -> None:
    gone = _Finishing(b"GET")
    done = _Finishing(b"PROPFIND")
    metrics.observe_request("lxd", cast(Request, gone))
    metrics.observe_request("lxd", cast(Request, done))
    # Counted when the response ends, not when it starts.
    assert value(metrics, "requests_total", face="lxd", method="GET", status="aborted") == 0
    gone.finished.errback(Failure(ConnectionLost()))
    done.code = 403
    done.finished.callback(None)
    assert value(metrics, "requests_total", face="lxd", method="GET", status="aborted") == 1
    assert value(metrics, "requests_total", face="lxd", method="other", status="403") == 1


def test_clients_joining_a_download_in_flight_are_counted_as_joins(
    h: Harness, metrics: Metrics
) -> None:
    h.upstream.held_paths.add(ROOTFS_PATH)
    h.fetch("streams/v1/images.json")
    responses = [h.get(ROOTFS_PATH) for _ in range(4)]
    h.settle()
    held = h.upstream.held[ROOTFS_PATH][0]
    body = h.files[ROOTFS_PATH]
    held.write(body[:1000])
    got = [h.run(d) for d in responses]
    h.settle()
    assert value(metrics, "downloads_total", upstream="up", trigger="client") == 1
    assert value(metrics, "download_joins_total", upstream="up") == 3
    # While the four stream it, the scrape sees one download and four followers.
    state = scrape(h)
    assert state[(P + "downloads_in_flight", (("upstream", "up"),))] == 1
    assert state[(P + "download_followers", (("upstream", "up"),))] == 4
    bodies = [treq.content(r) for r in got]
    held.write(body[1000:])
    held.finish()
    for d in bodies:
        assert h.run(d) == body
    h.settle()
    state = scrape(h)
    assert state[(P + "downloads_in_flight", (("upstream", "up"),))] == 0
    assert state[(P + "download_followers", (("upstream", "up"),))] == 0
    assert value(metrics, "served_files_total", upstream="up", source="download") == 4


def test_a_corrupt_download_is_a_verification_failure(h: Harness, metrics: Metrics) -> None:
    body = h.files[ROOTFS_PATH]
    h.files[ROOTFS_PATH] = b"X" + body[1:]
    try:
        h.fetch(ROOTFS_PATH)
    except Exception:
        pass
    h.settle()
    assert value(metrics, "verification_failures_total", upstream="up") == 1
    assert value(metrics, "download_failures_total", upstream="up") == 1


def test_an_upstream_that_fails_is_counted_by_status(h: Harness, metrics: Metrics) -> None:
    h.upstream_down()
    h.fetch(INDEX_PATH)
    h.settle()
    assert value(metrics, "upstream_requests_total", upstream="up", kind="metadata", status="error") == 1
    state = scrape(h)
    assert state[(P + "upstream_up", (("upstream", "up"),))] == 0


def test_a_download_without_room_is_counted_as_not_stored(tmp_path: Any, closing: Closing) -> None:
    metrics = Metrics()
    files = simple_tree()
    h = closing(Harness(tmp_path, files, max_size=100, metrics=metrics))
    assert h.fetch(ROOTFS_PATH)[:2] == (200, files[ROOTFS_PATH])
    h.settle()
    assert value(metrics, "not_stored_total", upstream="up") == 1
    assert value(metrics, "not_stored_bytes_total", upstream="up") == len(files[ROOTFS_PATH])


def test_expiry_and_eviction_are_counted_by_reason(tmp_path: Any, closing: Closing) -> None:
    metrics = Metrics()
    files = simple_tree()
    h = closing(Harness(tmp_path, files, metrics=metrics))
    old = h.seed_file(META_PATH)
    h.clock.advance(11 * SECONDS_PER_DAY)
    h.lifecycle.gc()
    assert value(metrics, "evictions_total", reason="expired") == 1
    assert value(metrics, "evicted_bytes_total", reason="expired") == old.size
    assert value(metrics, "evictions_total", reason="evicted") == 0
    # A cap the stored file does not fit: it is evicted to make room for a new one.
    capped = closing(Harness(tmp_path / "capped", files, max_size=400_000, metrics=metrics))
    capped.seed_file(ROOTFS_PATH)
    capped.clock.advance(1)
    assert capped.lifecycle.make_room(200_000)
    assert value(metrics, "evictions_total", reason="evicted") == 1
    assert value(metrics, "evicted_bytes_total", reason="evicted") == len(files[ROOTFS_PATH])


def test_auto_update_runs_are_counted(tmp_path: Any) -> None:
    metrics = Metrics()
    clock = Clock()
    clock.advance(5000)
    index = CacheIndex(str(tmp_path / "index"), clock)
    try:
        config: Config = default_config()
        prefetcher = Prefetcher(
            config, {}, _NoFetcher(), index, clock, host_arch="x86_64", metrics=metrics,
        )
        prefetcher.run()
        assert value(metrics, "auto_update_runs_total") == 1
        assert value(metrics, "auto_update_failures_total") == 0
        assert value(metrics, "auto_update_last_run_timestamp_seconds") == 5000
        # A pin on an upstream with no catalogue cannot be resolved: a failed run.
        index.put_pin(_pin())
        prefetcher.run()
        assert value(metrics, "auto_update_runs_total") == 2
        assert value(metrics, "auto_update_failures_total") == 1
    finally:
        index.close()


def test_the_cache_gauges_read_the_index_totals(h: Harness) -> None:
    cached = h.seed_file(META_PATH)
    pinned = h.seed_file(ROOTFS_PATH, cached=False)
    state = scrape(h)
    assert state[(P + "cache_bytes", ())] == cached.size + pinned.size
    assert state[(P + "cache_files", ())] == 2
    assert state[(P + "cache_pinned_files", ())] == 1
    assert state[(P + "cache_pinned_bytes", ())] == pinned.size
    # No cap configured: no cap gauge.
    assert (P + "cache_max_bytes", ()) not in state


def test_upstream_health_and_catalogue_age_are_read_at_scrape_time(h: Harness) -> None:
    state = scrape(h)
    assert state[(P + "upstream_up", (("upstream", "up"),))] == 1
    assert (P + "upstream_last_success_timestamp_seconds", (("upstream", "up"),)) not in state
    assert (P + "metadata_age_seconds", (("upstream", "up"),)) not in state
    h.fetch(INDEX_PATH)
    fetched_at = h.clock.seconds()
    h.clock.advance(42)
    state = scrape(h)
    assert state[(P + "upstream_last_success_timestamp_seconds", (("upstream", "up"),))] == fetched_at
    assert state[(P + "metadata_age_seconds", (("upstream", "up"),))] == 42
    forced = UpstreamHealth("far", h.clock, forced_offline=True)
    state = scrape(h, health={"up": h.health, "far": forced})
    assert state[(P + "upstream_up", (("upstream", "far"),))] == 0
    assert state[(P + "upstream_forced_offline", (("upstream", "far"),))] == 1
    assert state[(P + "upstream_forced_offline", (("upstream", "up"),))] == 0


def test_a_closed_index_leaves_the_cache_gauges_out_rather_than_failing(h: Harness) -> None:
    h.index.put_metadata(MetadataRecord(
        upstream="up", path=INDEX_PATH, sha256=sha(b"x"), etag=None, last_modified=None,
        fetched_at=0, checked_at=0,
    ))
    h.index.close()
    state = scrape(h)
    assert (P + "cache_bytes", ()) not in state
    assert state[(P + "upstream_up", (("upstream", "up"),))] == 1


def test_disabled_metrics_count_nothing(tmp_path: Any, closing: Closing) -> None:
    metrics = Metrics(enabled=False)
    h = closing(Harness(tmp_path, simple_tree(), metrics=metrics))
    h.fetch(ROOTFS_PATH)
    h.settle()
    assert value(metrics, "served_files_total", upstream="up", source="download") == 0
    assert value(metrics, "requests_total", face="simplestreams", method="GET", status="200") == 0


def test_the_exposition_has_help_and_the_build_info(metrics: Metrics) -> None:
    body, content_type = render_metrics(metrics.registry, None)
    assert content_type.startswith(b"text/plain")
    text = body.decode()
    assert f'{P}build_info{{version="{__version__}"}} 1.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        assert family.name.startswith(P) and family.documentation, family.name
    assert families[P + "requests"].type == "counter"
    _, openmetrics = render_metrics(
        metrics.registry, b"application/openmetrics-text; version=1.0.0"
    )
    assert openmetrics.startswith(b"application/openmetrics-text")


# -- helpers ---------------------------------------------------------------------------------


def scrape(h: Harness, health: dict[str, UpstreamHealth] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a L{StateCollector} over the harness, by name and sorted labels."""
    collector = StateCollector(
        h.clock, h.index, health if health is not None else {"up": h.health},
        {"up": INDEX_PATH},
        lambda: [job.upstream for job in h.fetcher.in_flight().values()],
        lambda: h.files_of_cache.following,
        None,
    )
    found = {}
    for family in collector.collect():
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class _Finishing:
    """What L{Metrics.observe_request} reads of a request: its method, code and end."""

    def __init__(self, method: bytes) -> None:
        self.method = method
        self.code = 200
        self.finished: Deferred[None] = Deferred()

    def notifyFinish(self) -> "Deferred[None]":
        return self.finished


class _NoFetcher:
    def get(self, upstream: str, item: Any, *, background: bool = False) -> Any:
        raise AssertionError("nothing to fetch")

    def client_downloads(self) -> int:
        return 0

    def in_flight(self) -> dict[str, Any]:
        return {}


def _pin() -> Any:
    from proxy.index import PinRecord

    return PinRecord(upstream="images", alias="ubuntu/24.04", type="container", arch="x86_64", pinned_at=0)
