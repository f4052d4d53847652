"""
The real Prometheus server (Debian's C{prometheus}) scrapes a real proxy on loopback, and the
counts it stores are the requests the test made: read back through its HTTP API.

The proxy runs in the test's reactor in front of a loopback upstream; Prometheus is a child
process with a generated configuration, its own storage in the test's temp directory and its
web port on 127.0.0.1; it is stopped at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from tests.helpers.certs import make_ca
from tests.helpers.proxy_process import https_client
from tests.helpers.running_proxy import start_proxy
from tests.helpers.tree import build_tree
from tests.helpers.upstream import start_https_upstream

reactor: Any = _reactor
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
POLL_SECONDS = 0.2
# Rounds of POLL_SECONDS: Prometheus starts in a second or two and scrapes every second.
MOST_POLLS = 300

pytestmark = [
    pytest.mark.loopback,
    pytest.mark.skipif(
        not os.access(PROMETHEUS, os.X_OK),
        reason="the Prometheus server is not installed (Debian package prometheus; .ci/run installs it)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_prometheus(work: Path, target_port: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: lxd-image-proxy\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=work, stdout=out, stderr=subprocess.STDOUT,
        )
    return process, port, log


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


async def query(port: int, expression: str) -> list[dict[str, Any]]:
    """The vector result of an instant query; empty while Prometheus has nothing (or is starting)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urlencode({"query": expression})
    try:
        response = await treq.get(url)
        body = json.loads(await treq.content(response))
    except Exception:
        return []
    if body.get("status") != "success":
        return []
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def wait_for_value(port: int, expression: str, expected: float, log: Path) -> None:
    """Poll (bounded) until C{expression} has C{expected} as its one value."""
    last: list[dict[str, Any]] = []
    for _ in range(MOST_POLLS):
        last = await query(port, expression)
        if len(last) == 1 and float(last[0]["value"][1]) == expected:
            return
        await deferLater(reactor, POLL_SECONDS, lambda: None)
    raise AssertionError(f"{expression}: {last!r}, expected {expected}\n{log.read_text()[-3000:]}")


@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_the_proxy_and_stores_what_it_served(tmp_path: Path) -> None:
    tree = build_tree(tmp_path / "tree")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = await start_proxy(reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)})
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        assert proxy.metrics_port is not None
        client = https_client(proxy.cert_pem)
        base = f"https://localhost:{proxy.port}"
        image = tree.images[0].meta
        body = tree.read(image)
        # One miss, two hits, one catalogue fetch and a 404.
        for path in ["streams/v1/index.json", image.path, image.path, image.path, "no/such"]:
            response = await client.get(f"{base}/cache/{path}")
            await treq.content(response)
        # The health checks on the HTTPS port too.
        for path, expected in [("healthz", {"status": "ok"}), ("readyz", None)]:
            response = await client.get(f"{base}/{path}")
            assert response.code == 200
            answer = json.loads(await treq.content(response))
            if expected is not None:
                assert answer == expected
            else:
                assert answer["status"] == "ready"
                assert answer["upstreams"] == [{"name": "cache", "online": True}]

        prometheus, port, log = start_prometheus(tmp_path, proxy.metrics_port)
        await wait_for_value(port, 'up{job="lxd-image-proxy"}', 1, log)
        await wait_for_value(
            port, 'lxd_image_proxy_served_bytes_total{upstream="cache",source="cache"}',
            2 * len(body), log,
        )
        await wait_for_value(
            port, 'lxd_image_proxy_served_files_total{upstream="cache",source="download"}', 1, log,
        )
        await wait_for_value(
            port, 'sum(lxd_image_proxy_requests_total{face="simplestreams",status="200"})', 4, log,
        )
        await wait_for_value(
            port, 'lxd_image_proxy_requests_total{face="simplestreams",status="404"}', 1, log,
        )
        await wait_for_value(port, 'lxd_image_proxy_upstream_up{upstream="cache"}', 1, log)
        await wait_for_value(port, "lxd_image_proxy_cache_files", 1, log)
        # The metrics listener's own /readyz.
        response = await treq.get(f"http://127.0.0.1:{proxy.metrics_port}/readyz")
        assert response.code == 200
        assert json.loads(await treq.content(response))["listening"] is True
    finally:
        if prometheus is not None:
            stop(prometheus)
        await proxy.stop()
        await upstream.stop()
