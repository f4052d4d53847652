"""
C{[server] workers}: the supervisor, the worker processes on one set of ports, and the leader
that runs the background jobs (L{proxy.workers}, L{proxy.worker}, L{proxy.leader}).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater

from proxy.leader import Leadership
from proxy.workers import MAX_RESTART_BACKOFF_SECONDS, restart_delay
from twisted.application.service import Service
from tests.helpers.certs import make_ca
from tests.helpers.proxy_process import START_TIMEOUT_SECONDS, ProxyProcess, write_loopback_config
from tests.helpers.proxy_process import env as _env
from tests.helpers.proxy_process import https_client
from tests.helpers.tree import build_tree
from tests.helpers.upstream import TreeResource, start_https_upstream

reactor: Any = _reactor


# -- pieces ------------------------------------------------------------------------------


def test_restart_backoff_doubles_and_is_capped() -> None:
    assert restart_delay(1) == 0.0
    assert [restart_delay(n) for n in (2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == MAX_RESTART_BACKOFF_SECONDS


class _Job(Service):
    def __init__(self) -> None:
        self.starts = 0

    def startService(self) -> None:
        super().startService()
        self.starts += 1


def test_one_leader_at_a_time_and_another_takes_over(tmp_path: Path) -> None:
    """Two workers' leaderships on one directory: one runs the jobs; when it stops, the other does."""
    clock = Clock()
    first, second = Leadership(str(tmp_path), clock), Leadership(str(tmp_path), clock)
    jobs = []
    for leadership in (first, second):
        job = _Job()
        job.setServiceParent(leadership)
        jobs.append(job)
    first.startService()
    second.startService()
    assert (first.leading, second.leading) == (True, False)
    assert [j.starts for j in jobs] == [1, 0]
    clock.advance(10)
    assert [j.starts for j in jobs] == [1, 0]
    first.stopService()
    assert not jobs[0].running and not first.leading
    # The other's next try takes the lock.
    clock.advance(2)
    assert second.leading and jobs[1].running
    second.stopService()
    assert clock.getDelayedCalls() == []


# -- the real processes -----------------------------------------------------------------


async def _wait_for(proxy: ProxyProcess, pattern: str, count: int = 1) -> list[Any]:
    """The matches of C{pattern} in the proxy's log once there are C{count} (bounded wait)."""
    found: list[Any] = []
    for _ in range(int(START_TIMEOUT_SECONDS * 10)):
        found = re.findall(pattern, proxy.log.read_text())
        if len(found) >= count:
            return found
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"{pattern!r} not {count} times in the log:\n" + proxy.log.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_two_workers_serve_one_port_restart_and_stop(tmp_path: Path) -> None:
    tree = build_tree(tmp_path / "tree")
    image = tree.image("testos/1.0")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = ProxyProcess(write_loopback_config(tmp_path, upstream.url, ca.cert_pem, 2))
    try:
        port = await proxy.start()
        pids = {int(s): int(p) for s, p in await _wait_for(proxy, r"worker (\d) started \(pid (\d+)\)", 2)}
        await _wait_for(proxy, r"worker \d serves the listening ports", 2)
        assert set(pids) == {1, 2}
        client = https_client((tmp_path / "state" / "tls" / "server.crt").read_bytes())
        url = f"https://localhost:{port}/cache/{image.meta.path}"

        async def one() -> str:
            response = await client.get(url)
            assert response.code == 200
            return hashlib.sha256(await treq.content(response)).hexdigest()

        digests = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(16)])
        assert set(digests) == {image.meta.sha256}
        # Both workers took connections: the kernel spreads them over their sockets.
        served = re.findall(r"\[worker (\d)\] .*GET /cache/images/", proxy.log.read_text())
        assert len(served) == 16 and set(served) == {"1", "2"}, served

        # The one metrics listener counts every worker's requests; it is ready.
        metrics_port = int((await _wait_for(proxy, r"/readyz over plain HTTP on 127\.0\.0\.1:(\d+)"))[0])
        exposition = (await treq.text_content(
            await treq.get(f"http://127.0.0.1:{metrics_port}/metrics")
        ))
        counted = sum(
            float(value) for value in re.findall(
                r'^lxd_image_proxy_requests_total\{[^}]*face="simplestreams"[^}]*\} (\S+)$', exposition, re.M,
            )
        )
        assert counted == 16, exposition
        assert "lxd_image_proxy_cache_files 1" in exposition.replace(".0", ""), exposition
        ready = await treq.get(f"http://127.0.0.1:{metrics_port}/readyz")
        assert ready.code == 200

        # The admin command reads the same state while the workers run.
        listed = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "--config", str(proxy.config), "list"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert image.meta.sha256[:12] in listed.stdout, listed.stdout

        # One worker runs the background jobs.
        leaders = await _wait_for(proxy, r"\[worker (\d)\] this worker runs the background jobs")
        assert len(leaders) == 1
        leader = int(leaders[0])

        # A worker killed (the leader) is started again; the port keeps serving meanwhile,
        # and another worker, or the new one, runs the jobs.
        os.kill(pids[leader], signal.SIGKILL)
        restarted = await _wait_for(proxy, rf"worker {leader} started \(pid (\d+)\)", 2)
        await _wait_for(proxy, rf"worker {leader} serves the listening ports", 2)
        assert int(restarted[1]) != pids[leader]
        pids[leader] = int(restarted[1])
        assert len(await _wait_for(proxy, r"this worker runs the background jobs", 2)) == 2
        assert await one() == image.meta.sha256

        assert await proxy.stop() in (0, -signal.SIGTERM)
        assert not any(_alive(pid) for pid in pids.values())
        assert "Traceback" not in proxy.log.read_text()
    finally:
        proxy.kill()
        await upstream.stop()


async def _timed_get(client: Any, url: str, started: float) -> tuple[int, str, float]:
    """One GET: its status, the sha256 of its body, and when its first body byte came."""
    response = await client.get(url, unbuffered=True)
    digest = hashlib.sha256()
    first: list[float] = []

    def chunk(data: bytes) -> None:
        if not first:
            first.append(time.monotonic() - started)
        digest.update(data)

    await treq.collect(response, chunk)
    return response.code, digest.hexdigest(), first[0] if first else -1.0


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_cold_clients_over_workers_cause_one_upstream_get(tmp_path: Path) -> None:
    """
    16 concurrent cold clients of one file, spread over 2 workers by the kernel: one upstream
    GET; every client, in either worker, gets its first bytes while the (paced) upstream is
    still sending, and the whole verified file.
    """
    size = 4 * 1024 * 1024
    tree = build_tree(tmp_path / "tree", big_rootfs_bytes=size)
    image = tree.image("bigos/1.0")
    assert image.root is not None
    ca = make_ca()
    resource = TreeResource(tree.root, clock=reactor)
    upstream = start_https_upstream(reactor, tree.root, ca, resource=resource)
    proxy = ProxyProcess(write_loopback_config(tmp_path, upstream.url, ca.cert_pem, 2))
    try:
        port = await proxy.start()
        await _wait_for(proxy, r"worker \d serves the listening ports", 2)
        client = https_client((tmp_path / "state" / "tls" / "server.crt").read_bytes())
        # About 4 s for the file.
        resource.rate(image.root.path, 1024 * 1024)
        root_path = image.root.path
        url = f"https://localhost:{port}/cache/{root_path}"
        started = time.monotonic()
        running = gatherResults(
            [Deferred.fromCoroutine(_timed_get(client, url, started)) for _ in range(16)]
        )
        # When the upstream has sent the whole file (polled: bounded by the timeout below).
        sent_all: list[float] = []

        async def watch() -> None:
            for _ in range(2400):
                if resource.sent.get(root_path, 0) >= size:
                    sent_all.append(time.monotonic() - started)
                    return
                await deferLater(reactor, 0.05, lambda: None)

        watching = Deferred.fromCoroutine(watch())
        # While it runs, the status page of either worker lists the one download.
        for _ in range(40):
            await deferLater(reactor, 0.1, lambda: None)
            if resource.sent.get(image.root.path, 0) > 0:
                break
        for _ in range(4):
            status = await treq.json_content(
                await client.get(f"https://localhost:{port}/status.json")
            )
            listed = [d for d in status["downloads"] if d["subject"] == image.root.path]
            assert len(listed) == 1 and listed[0]["received"] < size, status["downloads"]
        results = await running.addTimeout(120, reactor)
        await watching
        took = time.monotonic() - started
        assert [code for code, _, _ in results] == [200] * 16
        assert {digest for _, digest, _ in results} == {image.root.sha256}
        assert resource.count(image.root.path) == 1
        # Every client had bytes before the upstream had sent the whole file.
        assert sent_all and max(first for _, _, first in results) < sent_all[0], (results, sent_all)
        log = proxy.log.read_text()
        served = re.findall(r"\[worker (\d)\] .*GET /cache/images/bigos\S* 200", log)
        assert len(served) == 16, log
        # The kernel spread them (all 16 on one of 2 workers: odds of 1 in 2^15).
        assert set(served) == {"1", "2"}, served
        assert await proxy.stop() in (0, -signal.SIGTERM)
        assert "Traceback" not in proxy.log.read_text()
    finally:
        proxy.kill()
        await upstream.stop()


async def _outcome(client: Any, url: str) -> str:
    """The sha256 of a GET's whole body, or "cut" when its connection broke off."""
    try:
        response = await client.get(url, unbuffered=True)
        digest = hashlib.sha256()
        await treq.collect(response, digest.update)
    except Exception:
        return "cut"
    return digest.hexdigest() if response.code == 200 else f"status {response.code}"


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_sigkill_of_the_downloading_worker_another_takes_over(tmp_path: Path) -> None:
    """
    The worker downloading a file is killed mid-way: the supervisor starts it again, a
    follower in the other worker continues the download from the partial (a Range request),
    its clients get the whole verified file, the killed worker's clients are cut (never a
    wrong body that looks complete), and the upstream sends the file about once.
    """
    size = 4 * 1024 * 1024
    tree = build_tree(tmp_path / "tree", big_rootfs_bytes=size)
    image = tree.image("bigos/1.0")
    assert image.root is not None
    ca = make_ca()
    resource = TreeResource(tree.root, clock=reactor)
    upstream = start_https_upstream(reactor, tree.root, ca, resource=resource)
    proxy = ProxyProcess(write_loopback_config(tmp_path, upstream.url, ca.cert_pem, 2))
    try:
        port = await proxy.start()
        pids = {int(s): int(p) for s, p in await _wait_for(proxy, r"worker (\d) started \(pid (\d+)\)", 2)}
        await _wait_for(proxy, r"worker \d serves the listening ports", 2)
        client = https_client((tmp_path / "state" / "tls" / "server.crt").read_bytes())
        resource.rate(image.root.path, 1600 * 1024)
        url = f"https://localhost:{port}/cache/{image.root.path}"
        outcomes = gatherResults([Deferred.fromCoroutine(_outcome(client, url)) for _ in range(16)])
        owner = int((await _wait_for(proxy, r"\[worker (\d)\] fetching https://\S+bigos"))[0])
        # Some way into the file, then the owner dies.
        for _ in range(100):
            if resource.sent.get(image.root.path, 0) > size // 3:
                break
            await deferLater(reactor, 0.05, lambda: None)
        os.kill(pids[owner], signal.SIGKILL)
        results = await outcomes.addTimeout(120, reactor)
        assert set(results) <= {image.root.sha256, "cut"}, results
        assert results.count(image.root.sha256) >= 1, results
        await _wait_for(proxy, rf"worker {owner} started \(pid (\d+)\)", 2)
        asked = [r for r in resource.requests if r.path == image.root.path]
        assert [r.header("Range") is not None for r in asked] == [False, True], asked
        assert resource.sent[image.root.path] <= 1.05 * size + 256 * 1024
        assert "continues it" in proxy.log.read_text()
        # The file is stored once, whole: a hit now.
        assert await _outcome(client, url) == image.root.sha256
        assert len([r for r in resource.requests if r.path == image.root.path]) == 2
        assert await proxy.stop() in (0, -signal.SIGTERM)
        assert "Traceback" not in proxy.log.read_text()
    finally:
        proxy.kill()
        await upstream.stop()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_twistd_daemon_with_workers_starts_serves_and_stops(tmp_path: Path) -> None:
    """
    twistd as a daemon (the workers start after its fork): it serves, and SIGTERM to the
    pid in its pidfile stops it and every worker.
    """
    tree = build_tree(tmp_path / "tree")
    image = tree.image("testos/1.0")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    config = write_loopback_config(tmp_path, upstream.url, ca.cert_pem, 2)
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    twistd = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
    started = subprocess.run(
        twistd + [f"--pidfile={pidfile}", f"--logfile={logfile}", "lxd-image-proxy",
                  "--config", str(config)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    daemon = int(pidfile.read_text())
    try:
        text = ""
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            text = logfile.read_text() if logfile.exists() else ""
            if len(re.findall(r"worker \d serves the listening ports", text)) == 2:
                break
            await deferLater(reactor, 0.1, lambda: None)
        workers = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", text)]
        assert len(workers) == 2, text
        port = int((tmp_path / "port").read_text().split()[0])
        client = https_client((tmp_path / "state" / "tls" / "server.crt").read_bytes())
        response = await client.get(f"https://localhost:{port}/cache/{image.meta.path}")
        assert hashlib.sha256(await treq.content(response)).hexdigest() == image.meta.sha256
        os.kill(daemon, signal.SIGTERM)
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            if not _alive(daemon):
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert not _alive(daemon)
        assert not any(_alive(pid) for pid in workers)
        assert "Traceback" not in logfile.read_text()
    finally:
        if _alive(daemon):
            os.kill(daemon, signal.SIGKILL)
        await upstream.stop()


async def _metric(port: int, name: str) -> str | None:
    """The value of C{name} for upstream "cache" on the supervisor's /metrics, or None."""
    exposition = await treq.text_content(await treq.get(f"http://127.0.0.1:{port}/metrics"))
    found = re.search(rf'^lxd_image_proxy_{name}\{{upstream="cache"\}} (\S+)$', exposition, re.M)
    return found.group(1) if found else None


async def _until_metric(port: int, name: str, value: str) -> None:
    for _ in range(100):
        if await _metric(port, name) == value:
            return
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"{name} never {value}: {await _metric(port, name)}")


async def _statuses(client: Any, port: int, count: int) -> list[dict[str, Any]]:
    """The upstream "cache" as C{count} /status.json answers (fresh connections) describe it."""
    found = []
    for _ in range(count):
        status = await treq.json_content(await client.get(f"https://localhost:{port}/status.json"))
        [upstream] = [u for u in status["upstreams"] if u["name"] == "cache"]
        found.append({k: upstream[k] for k in ("online", "offline_since", "reason")})
    return found


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_upstream_health_is_the_whole_proxys(tmp_path: Path) -> None:
    """
    One worker finds the upstream offline: the supervisor's /readyz and /metrics say so, both
    workers' /status.json agree, and while one request probes it every other, in either
    worker, gets the fast answer (the stored catalogue, a 503 for a file not in the cache)
    without asking the upstream; found back, it is back for all.
    """
    tree = build_tree(tmp_path / "tree")
    image = tree.image("testos/1.0")
    ca = make_ca()
    resource = TreeResource(tree.root, clock=reactor)
    upstream = start_https_upstream(reactor, tree.root, ca, resource=resource)
    config = write_loopback_config(tmp_path, upstream.url, ca.cert_pem, 2)
    # A catalogue checked again a second after it was fetched: a request finds the outage.
    config.write_text(config.read_text().replace("[cache]\n", '[cache]\nmetadata_ttl = "1s"\n'))
    proxy = ProxyProcess(config)
    index, products = "streams/v1/index.json", "streams/v1/images.json"
    probe: Deferred[Any] | None = None
    try:
        port = await proxy.start()
        await _wait_for(proxy, r"worker \d serves the listening ports", 2)
        metrics_port = int((await _wait_for(proxy, r"/readyz over plain HTTP on 127\.0\.0\.1:(\d+)"))[0])
        client = https_client((tmp_path / "state" / "tls" / "server.crt").read_bytes())
        base = f"https://localhost:{port}/cache/"
        for path in (index, products):
            assert (await client.get(base + path)).code == 200
        assert await _metric(metrics_port, "upstream_up") == "1.0"
        await deferLater(reactor, 1.5, lambda: None)

        # One worker's revalidation finds the catalogue failing: the upstream is offline.
        resource.status(index, 503, times=1)
        assert (await client.get(base + index)).code == 200
        found = await _wait_for(proxy, r"\[worker (\d)\] upstream cache is failing")
        await _until_metric(metrics_port, "upstream_up", "0.0")
        ready = await treq.json_content(await treq.get(f"http://127.0.0.1:{metrics_port}/readyz"))
        assert ready["upstreams"][0]["online"] is False, ready
        assert "503" in ready["upstreams"][0]["reason"], ready
        statuses = await _statuses(client, port, 16)
        assert all(s == statuses[0] for s in statuses) and statuses[0]["online"] is False, statuses
        answered = re.findall(r'\[worker (\d)\] .*"GET /status\.json" 200', proxy.log.read_text())
        assert set(answered) == {"1", "2"}, answered
        # Only the worker that found it says so at warning level.
        assert len(found) == 1 and proxy.log.read_text().count("is failing") == 1

        # The next request of the catalogue probes, and the upstream does not answer for now.
        resource.silence(index)
        asked = len(resource.requests)
        probe = client.get(base + index)
        for _ in range(100):
            if len(resource.requests) > asked:
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert resource.paths()[asked:] == [index]
        await deferLater(reactor, 0.3, lambda: None)
        # Meanwhile every other request, in either worker, is answered at once without a
        # connection to the upstream: the stored catalogue, a 503 for an image file.
        started = time.monotonic()
        codes = [(await client.get(base + image.meta.path)).code for _ in range(16)]
        codes += [(await client.get(base + products)).code for _ in range(4)]
        assert codes == [503] * 16 + [200] * 4 and time.monotonic() - started < 10, codes
        assert len(resource.requests) == asked + 1, resource.paths()[asked:]
        refused = re.findall(
            rf'\[worker (\d)\] .*"GET /cache/{re.escape(image.meta.path)}" 503', proxy.log.read_text()
        )
        assert set(refused) == {"1", "2"}, refused

        # The upstream is back: the probe ends, the next request finds it, for all.
        resource.clear(index)
        assert (await probe.addTimeout(30, reactor)).code == 200
        probe = None
        for _ in range(20):
            if (await client.get(base + image.meta.path)).code == 200:
                break
            await deferLater(reactor, 0.2, lambda: None)
        await _until_metric(metrics_port, "upstream_up", "1.0")
        assert float(await _metric(metrics_port, "upstream_last_success_timestamp_seconds") or 0) > 0
        statuses = await _statuses(client, port, 16)
        assert statuses == [{"online": True, "offline_since": None, "reason": ""}] * 16, statuses
        assert (await client.get(base + image.meta.path)).code == 200

        assert await proxy.stop() in (0, -signal.SIGTERM)
        assert "Traceback" not in proxy.log.read_text()
    finally:
        if probe is not None:
            probe.cancel()
        proxy.kill()
        await upstream.stop()
