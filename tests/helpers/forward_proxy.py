"""
A real forward HTTP proxy on loopback for the outbound-proxy tests: Debian's C{tinyproxy},
run in the foreground as a child process with a configuration written to the test's temp
directory, its log (every request line it got, C{CONNECT host:port} included) kept there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import define
from twisted.internet.task import deferLater

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
# Rounds of READY_POLL_SECONDS: tinyproxy listens within a few milliseconds.
READY_POLLS = 200
READY_POLL_SECONDS = 0.025
# Another process may take the free port between our check and tinyproxy's bind.
START_ATTEMPTS = 3
STOP_TIMEOUT_SECONDS = 10
_CONNECT = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.[01]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@define
class ForwardProxy:
    """A running tinyproxy; C{stop()} it (the tests do, in C{finally})."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def url(self, credentials: str = "") -> str:
        """C{http://[CREDENTIALS@]127.0.0.1:PORT}."""
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connects(self) -> list[str]:
        """The C{host:port} of every CONNECT it was asked for, in order."""
        return _CONNECT.findall(self.log())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)


async def start_tinyproxy(
    reactor: Any,
    work: Path,
    *,
    credentials: tuple[str, str] | None = None,
    connect_ports: Sequence[int] = (),
) -> ForwardProxy:
    """
    Start tinyproxy on 127.0.0.1 (a free port), accepting clients from 127.0.0.1 only.

    @param credentials: (user, password) it demands (C{BasicAuth}): 407 without them.
    @param connect_ports: the only ports it tunnels to (C{ConnectPort}): 403 for others;
        empty: every port.
    @raise AssertionError: tinyproxy is missing or does not start (no skip: CI installs it).
    """
    assert os.access(TINYPROXY, os.X_OK), (
        "tinyproxy is not installed (Debian package tinyproxy; .ci/run installs it)"
    )
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "tinyproxy.log"
    for _ in range(START_ATTEMPTS):
        port = free_port()
        lines = [f"Port {port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 30",
                 "LogLevel Connect", "MaxClients 50"]
        if credentials is not None:
            lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
        lines += [f"ConnectPort {p}" for p in connect_ports]
        config = work / "tinyproxy.conf"
        config.write_text("\n".join(lines) + "\n")
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [TINYPROXY, "-d", "-c", str(config)], cwd=work, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        proxy = ForwardProxy(process, port, log_path)
        for _ in range(READY_POLLS):
            if process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proxy
            except OSError:
                await deferLater(reactor, READY_POLL_SECONDS, lambda: None)
        proxy.stop()
    raise AssertionError(f"tinyproxy did not start:\n{log_path.read_text(errors='replace')}")
