"""A real HAProxy (Debian's C{haproxy}) in front of proxy nodes on loopback, from C{conf/haproxy.cfg}.

L{loopback_config} rewrites the shipped configuration for the test: the frontend on a loopback
port with the test's certificate, one C{server} line per node (its HTTPS port, its metrics
port for the check, the name its certificate carries), the nodes' CA, no syslog. Everything
else (hashing, checks, timeouts, retries) is the shipped file's, so the test runs what an
operator installs. L{HAProxy} runs it in the foreground (C{-db}), waits (bounded) until the
frontend accepts connections, and stops it.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from tests.helpers.proxy_process import ROOT, env, stop

reactor: Any = _reactor
SHIPPED = ROOT / "conf" / "haproxy.cfg"
START_TIMEOUT_SECONDS = 15.0


@frozen
class Node:
    """One C{server} line: its name, HTTPS port, metrics port and certificate name."""

    name: str
    port: int
    metrics_port: int
    tls_name: str


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound and released at once: for configs written ahead)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def loopback_config(port: int, crt: Path, nodes_ca: Path, nodes: list[Node]) -> str:
    """The shipped configuration, on loopback, for C{nodes} (see the module)."""
    text = SHIPPED.read_text()
    text = text.replace("    log /dev/log local0\n", "")
    text = re.sub(r"bind :8443 ssl crt \S+", f"bind 127.0.0.1:{port} ssl crt {crt}", text)
    text = text.replace("/etc/haproxy/lxd-image-proxy-nodes.pem", str(nodes_ca))
    # Each node's metrics listener has a port of its own here: given per server line.
    assert " check port 9464 " in text
    text = text.replace(" check port 9464 ", " check ")
    servers = [line for line in text.splitlines() if line.startswith("    server ")]
    assert servers, "the shipped configuration has no server line"
    lines = "\n".join(
        f"    server {n.name} 127.0.0.1:{n.port} port {n.metrics_port} sni str({n.tls_name}) "
        f"verifyhost {n.tls_name}"
        for n in nodes
    )
    head, _, _ = text.partition(servers[0])
    return head + lines + "\n"


class HAProxy:
    """C{haproxy -f CFG -db}, started and stopped by the test."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.config = directory / "haproxy.cfg"
        self.log = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, text: str, port: int) -> None:
        executable = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(text)
        checked = subprocess.run(
            [executable, "-c", "-f", str(self.config)], capture_output=True, timeout=30,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            [executable, "-f", str(self.config), "-db"], cwd=self.dir, env=env(),
            stdout=out, stderr=subprocess.STDOUT,
        )
        out.close()
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            assert self.process.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError("haproxy did not listen:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.process is not None:
            # SIGUSR1 would wait for the sessions to end; the test is done with them.
            stop(self.process, signal.SIGTERM)
            self.process = None
