"""
The metrics listener's resources (C{/metrics}, C{/healthz}, C{/readyz}) and the readiness
they report, through C{StubTreq} over the real tree.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from proxy.exporter import exporter_site
from proxy.health import UpstreamHealth
from proxy.metrics import Metrics
from proxy.probes import Readiness, readiness
from tests.helpers.harness import SiteClient


def client(metrics: Metrics, state: list[Readiness]) -> SiteClient:
    site = exporter_site(metrics.registry, lambda: state[0])
    return SiteClient(site.resource)


def test_metrics_serves_the_registry_as_prometheus_text() -> None:
    metrics = Metrics()
    metrics.served("images", True, 1234)
    c = client(metrics, [readiness(True, True, [], {})])
    response = c.request("GET", "http://metrics.test/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"Content-Type")[0].startswith(b"text/plain; version=0.0.4")
    body = c.body(response).decode()
    assert 'lxd_image_proxy_served_bytes_total{source="cache",upstream="images"} 1234.0' in body


def test_healthz_is_ok_while_the_reactor_runs() -> None:
    c = client(Metrics(), [readiness(False, False, [], {})])
    response = c.request("GET", "http://metrics.test/healthz")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"Cache-Control") == [b"no-store"]
    assert json.loads(c.body(response)) == {"status": "ok"}


def test_readyz_is_503_until_the_index_is_open_and_the_port_listens() -> None:
    state = [readiness(True, False, ["images"], {})]
    c = client(Metrics(), state)
    response = c.request("GET", "http://metrics.test/readyz")
    assert response.code == 503
    assert json.loads(c.body(response)) == {
        "status": "not ready", "index_open": True, "listening": False,
        "upstreams": [{"name": "images", "online": True}],
    }
    state[0] = readiness(True, True, ["images"], {})
    response = c.request("GET", "http://metrics.test/readyz")
    assert response.code == 200
    assert json.loads(c.body(response))["status"] == "ready"
    assert c.request("HEAD", "http://metrics.test/readyz").code == 200


def test_an_offline_upstream_is_reported_but_leaves_the_proxy_ready() -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    down = UpstreamHealth("images", clock)
    down.record_failure("connection refused", transport=True)
    forced = UpstreamHealth("vault", clock, forced_offline=True)
    up = UpstreamHealth("ubuntu", clock)
    state = readiness(True, True, ["images", "ubuntu", "vault"], {"images": down, "ubuntu": up, "vault": forced})
    c = client(Metrics(), [state])
    response = c.request("GET", "http://metrics.test/readyz")
    assert response.code == 200
    assert json.loads(c.body(response))["upstreams"] == [
        {"name": "images", "online": False, "forced": False, "reason": "connection refused",
         "offline_since": "2023-11-14T22:13:20Z"},
        {"name": "ubuntu", "online": True},
        {"name": "vault", "online": False, "forced": True, "reason": "upstreams.vault.offline = true"},
    ]


def test_the_listener_root_names_its_paths() -> None:
    c = client(Metrics(), [readiness(True, True, [], {})])
    response = c.request("GET", "http://metrics.test/")
    assert response.code == 200
    assert b"/metrics" in c.body(response)
    assert c.request("GET", "http://metrics.test/nothing").code == 404
