"""The proxy as a real process (C{python -m twisted lxd-image-proxy}), and a client of it.

L{ProxyProcess} starts the proxy with a configuration file whose C{[server]} table names a
C{port_file}, waits for that file without blocking the test's reactor (a loopback upstream may
live in it), and kills or stops the process. L{https_client} trusts the proxy's certificate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

ROOT = Path(__file__).resolve().parent.parent.parent
reactor: Any = _reactor
START_TIMEOUT_SECONDS = 30.0


def env(**extra: str) -> dict[str, str]:
    """The test's environment for a child proxy: no HTTP proxy settings, this checkout first."""
    values = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    values["PYTHONPATH"] = str(ROOT)
    values.update(extra)
    return values


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Send C{sig} and wait, blocking; a process still running after 15 s is killed."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


class ProxyProcess:
    """The proxy started with C{python -m twisted lxd-image-proxy --config FILE}."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.dir = config.parent
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "proxy.log"

    async def start(self) -> int:
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-format", "text", "lxd-image-proxy",
             "--config", str(self.config)],
            cwd=self.dir, env=env(), stdout=out, stderr=subprocess.STDOUT,
        )
        out.close()
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            assert self.process.poll() is None, self.log.read_text()
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("the proxy did not write its port file:\n" + self.log.read_text())

    def kill(self) -> None:
        if self.process is not None:
            stop(self.process, signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM, then wait without blocking the reactor (the upstream lives in it)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            code = self.process.poll()
            if code is not None:
                return code
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("the proxy did not stop on SIGTERM:\n" + self.log.read_text())


def https_client(cert_pem: bytes) -> HTTPClient:
    trust = trustRootFromCertificates([Certificate.loadPEM(cert_pem)])
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool))


def write_loopback_config(tmp_path: Path, upstream_url: str, ca_pem: bytes, workers: int = 1) -> Path:
    """
    C{tmp_path/proxy.toml}: one upstream C{cache} at C{upstream_url} trusted by C{ca_pem}, TLS and
    metrics on loopback port 0 (the bound port in C{port}), state in C{state}, C{workers}
    processes.
    """
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[server]
listen = ["127.0.0.1:0"]
tls_names = ["localhost"]
port_file = "port"
workers = {workers}

[metrics]
listen = ["127.0.0.1:0"]
[cache]
dir = "state"
download_idle_timeout = "20s"

[upstreams.cache]
url = "{upstream_url}"
ca_file = "ca.pem"
"""
    )
    return config
