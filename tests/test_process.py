"""
The proxy as a real process: started by twistd and by the twist runner, killed with SIGKILL in
the middle of downloads, and started again on the same state.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
import treq
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath

from proxy.addresses import advertised_host, interface_addresses
from proxy.blobs import BlobStore
from proxy.index import CacheIndex
from tests.helpers.certs import make_ca
from tests.helpers.proxy_process import START_TIMEOUT_SECONDS, ProxyProcess, write_loopback_config
from tests.helpers.proxy_process import env as _env
from tests.helpers.proxy_process import https_client as _client
from tests.helpers.proxy_process import stop as _stop
from tests.helpers.tree import build_tree
from tests.helpers.upstream import start_https_upstream

reactor: Any = _reactor


def _twistd() -> list[str]:
    found = shutil.which("twistd")
    if found is not None:
        return [found]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_default_configuration_starts_and_stops(tmp_path: Path) -> None:
    """
    C{twistd -n lxd-image-proxy} with no configuration file: HTTPS on 8443, a generated
    certificate in the state directory, one C{lxc remote add} and one C{incus remote add}
    line per default upstream, naming an address of this host (the proxy listens on all of
    them), not 0.0.0.0. It is only started and stopped: its upstreams are public servers.
    """
    for port in (8443, 9464):
        if not _port_free(port):
            pytest.skip(f"port {port} is in use on this machine")
    state = tmp_path / "state"
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            _twistd() + ["-n", "--pidfile=", "lxd-image-proxy"],
            cwd=tmp_path, env=_env(STATE_DIRECTORY=str(state)), stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while time.monotonic() < deadline and process.poll() is None:
                if b"incus remote add linuxcontainers" in log.read_bytes() and (
                    b"over plain HTTP on" in log.read_bytes()
                ):
                    break
                time.sleep(0.1)
            text = log.read_text()
            assert process.poll() is None, text
            assert "listening with TLS on port(s) 8443" in text, text
            host = advertised_host("0.0.0.0")
            assert host != "0.0.0.0" and host.strip("[]") in interface_addresses() + ["127.0.0.1"]
            for client in ("lxc", "incus"):
                assert f"{client} remote add cache https://{host}:8443 --public" in text
                for name in ("images", "ubuntu", "ubuntu-daily", "linuxcontainers"):
                    assert (
                        f"{client} remote add {name} https://{host}:8443/{name} "
                        "--protocol simplestreams"
                    ) in text
            assert "sha256 fingerprint" in text
            assert "metrics, /healthz and /readyz over plain HTTP on 127.0.0.1:9464" in text, text
            assert (state / "tls" / "server.crt").exists()
            assert (state / "index").is_dir()
        finally:
            _stop(process)
    # twistd ends by re-raising the signal it stopped on.
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_sigkill_during_downloads_then_restart(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed (apt-get install squashfs-tools)")
    tree = build_tree(tmp_path / "tree", big_rootfs_bytes=2 * 1024 * 1024)
    image = tree.image("bigos/1.0")
    assert image.root is not None
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    try:
        proxy = ProxyProcess(write_loopback_config(tmp_path, upstream.url, ca.cert_pem))
        proxy_processes.append(proxy)
        port = await proxy.start()
        cert_pem = (tmp_path / "state" / "tls" / "server.crt").read_bytes()
        client = _client(cert_pem)
        url = f"https://localhost:{port}/cache/{image.root.path}"

        # One file completes; the big one is held upstream while three clients stream it.
        meta = await client.get(f"https://localhost:{port}/cache/{image.meta.path}")
        assert hashlib.sha256(await treq.content(meta)).hexdigest() == image.meta.sha256
        upstream.resource.hold(image.root.path)
        responses = [await client.get(url, unbuffered=True) for _ in range(3)]
        assert [r.code for r in responses] == [200, 200, 200]
        bodies = [treq.content(r) for r in responses]
        assert list((tmp_path / "state" / "tmp").iterdir()) != []

        proxy.kill()
        for body in bodies:
            with pytest.raises(Exception):
                await body.addTimeout(10, reactor)
        upstream.resource.clear(image.root.path)

        port = await proxy.start()
        # The twist runner starts the service (which writes the port file) before it starts
        # logging; the start-up lines reach the log a moment later.
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            log = proxy.log.read_text()
            if log.count("start-up check removed") == 2:
                break
            await deferLater(reactor, 0.1, lambda: None)
        # The partial download and its sidecar are kept; the next request continues it.
        assert "start-up check removed 0 temp files" in log, log
        assert "keeping 1 partial downloads" in log, log
        kept = sorted(p.suffix for p in (tmp_path / "state" / "tmp").iterdir())
        assert kept == [".part", ".resume"]
        response = await client.get(f"https://localhost:{port}/cache/{image.root.path}")
        assert response.code == 200
        assert hashlib.sha256(await treq.content(response)).hexdigest() == image.root.sha256
        asked = [r for r in upstream.resource.requests if r.path == image.root.path]
        assert [r.header("Range") is not None for r in asked] == [False, True]
        assert list((tmp_path / "state" / "tmp").iterdir()) == []
        # The file completed before the crash is still a hit.
        assert upstream.resource.count(image.meta.path) == 1
        response = await client.get(f"https://localhost:{port}/cache/{image.meta.path}")
        assert hashlib.sha256(await treq.content(response)).hexdigest() == image.meta.sha256
        assert upstream.resource.count(image.meta.path) == 1
        # Like twistd, the twist runner ends by re-raising the signal it stopped on.
        assert await proxy.stop() in (0, -signal.SIGTERM)
    finally:
        await upstream.stop()

    # Every record has its blob, every blob its record.
    state = tmp_path / "state"
    store = BlobStore(FilePath(str(state)))
    index = CacheIndex(str(state / "index"), reactor)
    try:
        recorded = {r.sha256 for r in index.records()} | {m.sha256 for m in index.metadata_records()}
        assert recorded == set(store.stored())
        assert {image.meta.sha256, image.root.sha256} <= recorded
    finally:
        index.close()


def _run_proxy(tmp_path: Path, config_text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "bad.toml"
    config.write_text(config_text)
    return subprocess.run(
        [sys.executable, "-m", "twisted", "--log-format", "text", "lxd-image-proxy",
         "--config", str(config)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS,
    )


_UPSTREAM_TABLE = """
[upstreams.cache]
url = "https://127.0.0.1:9"
"""


def test_a_port_in_use_stops_start_up_with_one_sentence(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_proxy(tmp_path, f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 1
[metrics]
listen = ["127.0.0.1:0"]
[cache]
dir = "state"
""" + _UPSTREAM_TABLE)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "cannot listen" in output and "in use" in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize("directory", ["/etc/passwd", "/proc/no/such/dir"])
def test_an_unusable_cache_dir_stops_start_up_with_one_sentence(tmp_path: Path, directory: str) -> None:
    result = _run_proxy(tmp_path, f"""
[server]
listen = ["127.0.0.1:0"]
workers = 1
[metrics]
listen = ["127.0.0.1:0"]
[cache]
dir = "{directory}"
""" + _UPSTREAM_TABLE)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"cache.dir: cannot use {directory}" in output, output
    assert "Traceback" not in output


def test_a_second_proxy_on_the_same_state_is_refused(tmp_path: Path) -> None:
    from proxy.statedir import StateLock

    held = StateLock(str(tmp_path / "state"))
    try:
        result = _run_proxy(tmp_path, """
[server]
listen = ["127.0.0.1:0"]
workers = 1
[metrics]
listen = ["127.0.0.1:0"]
[cache]
dir = "state"
""" + _UPSTREAM_TABLE)
    finally:
        held.release()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"is in use by another lxd-image-proxy (pid {os.getpid()})" in output, output
    assert "Traceback" not in output


async def _get_all(client: HTTPClient, url: str, count: int) -> list[tuple[int, str]]:
    """C{count} GETs of C{url} at once; each one's status and the sha256 of its body."""

    async def one() -> tuple[int, str]:
        response = await client.get(url, unbuffered=True)
        body = await treq.content(response)
        return response.code, hashlib.sha256(body).hexdigest()

    results = gatherResults([Deferred.fromCoroutine(one()) for _ in range(count)])
    return list(await results.addTimeout(120, reactor))


@pytest.mark.loopback
@pytest.mark.parametrize("workers", [1, 2], ids=["1 worker", "2 workers"])
@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
@pytest_twisted.ensureDeferred
async def test_64_concurrent_clients_cold_then_warm(tmp_path: Path, daemon: bool, workers: int) -> None:
    """
    Started as twistd starts it (C{-n}, or by default as a daemon, which opens the index after
    the fork), with one worker and with two (the default on a 2-CPU machine): 64 concurrent
    cold downloads of a multi-MiB file make one upstream fetch and all
    succeed; then 64 concurrent hits of it, twice, and 64 concurrent metadata requests all
    succeed, with no traceback in the log.
    """
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed (apt-get install squashfs-tools)")
    tree = build_tree(tmp_path / "tree", big_rootfs_bytes=4 * 1024 * 1024)
    image = tree.image("bigos/1.0")
    assert image.root is not None
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    config = write_loopback_config(tmp_path, upstream.url, ca.cert_pem, workers)
    pidfile = tmp_path / "twistd.pid"
    logfile = tmp_path / "twistd.log"
    command = _twistd() + [f"--pidfile={pidfile}", f"--logfile={logfile}"]
    foreground: subprocess.Popen[bytes] | None = None
    try:
        if daemon:
            started = subprocess.run(
                command + ["lxd-image-proxy", "--config", str(config)],
                cwd=tmp_path, env=_env(), capture_output=True, text=True,
                timeout=START_TIMEOUT_SECONDS,
            )
            # The parent returns once the daemon has started (or failed to).
            assert started.returncode == 0, started.stdout + started.stderr
        else:
            foreground = subprocess.Popen(
                command + ["-n", "lxd-image-proxy", "--config", str(config)],
                cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )
        port_file = tmp_path / "port"
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            if port_file.exists() and port_file.read_text().strip():
                break
            await deferLater(reactor, 0.1, lambda: None)
        port = int(port_file.read_text().split()[0])
        pid = int(pidfile.read_text())
        # The lock file names the process serving, not one that forked it and exited.
        assert (tmp_path / "state" / "lock").read_text().strip() == str(pid)
        client = _client((tmp_path / "state" / "tls" / "server.crt").read_bytes())
        base = f"https://localhost:{port}/cache"
        url = f"{base}/{image.root.path}"

        expected = (200, image.root.sha256)
        assert await _get_all(client, url, 64) == [expected] * 64
        for _round in range(2):
            assert await _get_all(client, url, 64) == [expected] * 64
        assert upstream.resource.count(image.root.path) == 1
        index_url = f"{base}/streams/v1/index.json"
        codes = {code for code, _ in await _get_all(client, index_url, 64)}
        assert codes == {200}
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            for _ in range(int(START_TIMEOUT_SECONDS * 10)):
                if not pidfile.exists():
                    break
                await deferLater(reactor, 0.1, lambda: None)
        if foreground is not None:
            _stop(foreground)
        await upstream.stop()
    log = logfile.read_text()
    assert not pidfile.exists(), log
    assert "Traceback" not in log and "Unhandled" not in log, log
    assert "MDB_READERS_FULL" not in log, log
