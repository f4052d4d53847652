"""
Real forward HTTP proxies on loopback for the outbound-proxy tests: Debian's C{tinyproxy} and
C{squid}, each run in the foreground as a child process with a configuration written to a temp
directory, its log (every request it got, C{CONNECT host:port} included) kept there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import define
from twisted.internet.task import deferLater

TINYPROXY = shutil.which("tinyproxy") or "/usr/sbin/tinyproxy"
SQUID = shutil.which("squid") or "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
# The user squid's workers run as when started by root (Debian's package creates it).
SQUID_USER = "proxy"
# Rounds of READY_POLL_SECONDS: tinyproxy listens within a few milliseconds.
READY_POLLS = 200
READY_POLL_SECONDS = 0.025
# Another process may take the free port between our check and tinyproxy's bind.
START_ATTEMPTS = 3
STOP_TIMEOUT_SECONDS = 10
TINYPROXY_CONNECT = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.[01]")
# squid's native access log: time elapsed client code/status bytes method URL user ...
SQUID_CONNECT = re.compile(r" CONNECT (\S+) ")


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
    connect_pattern: re.Pattern[str] = TINYPROXY_CONNECT
    # A directory of its own to remove once stopped (squid's, outside the test's).
    scratch: Path | None = None

    def url(self, credentials: str = "") -> str:
        """C{http://[CREDENTIALS@]127.0.0.1:PORT}."""
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connects(self) -> list[str]:
        """The C{host:port} of every CONNECT it was asked for, in order."""
        return self.connect_pattern.findall(self.log())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


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
        if await _listening(reactor, proxy):
            return proxy
        proxy.stop()
    raise AssertionError(f"tinyproxy did not start:\n{log_path.read_text(errors='replace')}")


async def start_squid(reactor: Any, *, credentials: tuple[str, str] | None = None) -> ForwardProxy:
    """
    Start squid on 127.0.0.1 (a free port), for clients on 127.0.0.1 only, caching nothing.

    Its directory is a temp directory of its own, given to C{SQUID_USER} when run as root:
    squid's workers drop to that user and must write their logs (the test's own temp
    directory is private to root).

    @param credentials: (user, password) it demands (C{basic_ncsa_auth}): 407 without them.
    @raise AssertionError: squid is missing or does not start (no skip: CI installs it).
    """
    assert os.access(SQUID, os.X_OK), "squid is not installed (Debian package squid; .ci/run installs it)"
    scratch = Path(tempfile.mkdtemp(prefix="lxd-image-proxy-squid-"))
    log_path = scratch / "access.log"
    lines = [
        f"pid_filename {scratch / 'squid.pid'}", f"access_log stdio:{log_path}",
        f"cache_log {scratch / 'cache.log'}", f"coredump_dir {scratch}", "cache deny all",
        "cache_mem 8 MB", "shutdown_lifetime 0 seconds", "pinger_enable off",
        # Loopback only: no name is ever looked up, and squid need not reach a DNS server.
        "dns_nameservers 127.0.0.1", "acl me src 127.0.0.1",
    ]
    if credentials is not None:
        user, password = credentials
        hashed = subprocess.run(["openssl", "passwd", "-apr1", password], check=True,
                                capture_output=True, text=True).stdout.strip()
        (scratch / "passwd").write_text(f"{user}:{hashed}\n")
        lines += [f"auth_param basic program {NCSA_AUTH} {scratch / 'passwd'}",
                  "auth_param basic children 2", "acl known proxy_auth REQUIRED",
                  "http_access deny !known"]
    lines += ["http_access allow me", "http_access deny all"]
    for _ in range(START_ATTEMPTS):
        port = free_port()
        (scratch / "squid.conf").write_text("\n".join([f"http_port 127.0.0.1:{port}", *lines]) + "\n")
        if os.geteuid() == 0:
            for path in [scratch, *scratch.iterdir()]:
                shutil.chown(path, SQUID_USER, SQUID_USER)
        with (scratch / "squid.out").open("wb") as out:
            process = subprocess.Popen(
                [SQUID, "-N", "-f", str(scratch / "squid.conf")], cwd=scratch, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        proxy = ForwardProxy(process, port, log_path, SQUID_CONNECT)
        if await _listening(reactor, proxy):
            proxy.scratch = scratch
            return proxy
        proxy.stop()
    said = "".join(p.read_text(errors="replace") for p in scratch.glob("*.out"))
    shutil.rmtree(scratch, ignore_errors=True)
    raise AssertionError(f"squid did not start:\n{said}")


async def _listening(reactor: Any, proxy: ForwardProxy) -> bool:
    """Wait (bounded) for C{proxy} to accept connections; False if it exits or never does."""
    for _ in range(READY_POLLS):
        if proxy.process.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
            return True
        except OSError:
            await deferLater(reactor, READY_POLL_SECONDS, lambda: None)
    return False
