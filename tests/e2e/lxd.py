"""
Drive the real C{lxc} client and a real LXD daemon from tests running in the
pytest-twisted reactor.

The servers these tools talk to (the proxy, fake upstreams) run in the same
reactor as the test, so nothing here may block it while C{lxc} or C{lxd} is
waiting for them: every command runs through C{reactor.spawnProcess} and is
awaited.

Facts about LXD 5.0.2 that shaped this module (details in the e2e notes):

  - C{lxc remote add NAME URL --protocol=simplestreams} never contacts the
    server and stores no certificate. A self-signed server certificate has to
    be written to C{servercerts/NAME.crt} in the client's config directory.
    The client turns that certificate into a CA, adds it to the system pool
    and verifies the server against the certificate's I{first DNS SAN}, so
    the certificate must carry a DNS SAN even when the URL is an IP address.
  - C{lxc image copy} with a simplestreams source hands the URL and the pinned
    certificate to the daemon, which downloads by itself.
  - C{lxc} reaches a daemon through C{$LXD_DIR/unix.socket} when C{LXD_DIR}
    is set in its environment (the C{local:} remote is C{unix://}).
  - The daemon honours C{HTTP(S)_PROXY} from its environment but never sends
    loopback addresses or C{localhost} through it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

# Environment variables that must never reach a child unless a test asks for
# them: a proxy would send image traffic off this machine, and an inherited
# LXD_DIR/LXD_CONF would point lxc at somebody else's daemon or config.
_STRIPPED_ENV = frozenset(
    {
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "LXD_DIR",
        "LXD_CONF",
        "LXD_SOCKET",
    }
)

# A port on which nothing listens: the daemon's proxy variables point here so
# that its start-up lookups of public servers fail at once instead of leaving
# the machine.
DEAD_PROXY = "http://127.0.0.1:9"

# sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107

LXC_TIMEOUT_SECONDS = 120.0
LXD_READY_TIMEOUT_SECONDS = 60.0
LXD_STOP_TIMEOUT_SECONDS = 15.0


def _default_reactor() -> IReactorProcess:
    from twisted.internet import reactor

    return IReactorProcess(reactor)


def _base_env() -> dict[str, str]:
    return {
        "PATH": os.environ.get(
            "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ),
        "LANG": "C.UTF-8",
    }


@attrs.frozen
class Result:
    """What one finished command gave back."""

    code: int
    out: str
    err: str


class CommandFailed(Exception):
    """A command exited non-zero (or was killed)."""

    def __init__(self, argv: Sequence[str], result: Result, why: str = "failed") -> None:
        self.argv = tuple(argv)
        self.result = result
        super().__init__(
            f"{' '.join(self.argv)} {why} (exit {result.code})\n"
            f"--- stdout ---\n{result.out}\n--- stderr ---\n{result.err}"
        )


class CommandTimeout(CommandFailed):
    """A command ran past its time limit and was killed."""


class _Collector(ProcessProtocol):
    """Collect a child's output and fire C{ended} with its exit status."""

    def __init__(self, stdin: bytes) -> None:
        self._stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self._stdin:
            self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        if code is None:
            # Killed by a signal: report it the way a shell does.
            sig = getattr(value, "signal", None) or 0
            code = 128 + sig
        self.ended.callback(code)


async def run_process(
    argv: Sequence[str],
    env: Mapping[str, str],
    timeout: float,
    stdin: bytes = b"",
    cwd: str | None = None,
    reactor: IReactorProcess | None = None,
) -> Result:
    """
    Run C{argv} without blocking the reactor.

    @return: the exit code and decoded output; a non-zero exit is not an error
        here.
    @raise CommandTimeout: the command outlived C{timeout} seconds; it was
        sent SIGKILL and the output so far is attached.
    """
    process_reactor = reactor if reactor is not None else _default_reactor()
    clock = IReactorTime(process_reactor)
    collector = _Collector(stdin)
    transport = process_reactor.spawnProcess(
        collector, argv[0], list(argv), env=dict(env), path=cwd
    )
    timed_out = False

    def kill() -> None:
        nonlocal timed_out
        timed_out = True
        try:
            transport.signalProcess("KILL")
        except ierror.ProcessExitedAlready:
            pass

    killer = clock.callLater(timeout, kill)
    try:
        code = await collector.ended
    finally:
        if killer.active():
            killer.cancel()
    result = Result(
        code=code,
        out=collector.out.decode("utf-8", "replace"),
        err=collector.err.decode("utf-8", "replace"),
    )
    if timed_out:
        raise CommandTimeout(argv, result, f"timed out after {timeout:g}s")
    return result


@attrs.define
class LxcClient:
    """
    The real C{lxc} client with a configuration directory of its own.

    Every call runs with C{LXD_CONF=conf_dir}, C{HOME} in a private directory,
    no proxy variables and no inherited C{LXD_DIR}; C{env} adds to that
    (C{LxdDaemon.client} passes C{LXD_DIR} this way).
    """

    log: ClassVar[Logger] = Logger()

    conf_dir: Path
    env: Mapping[str, str] = attrs.field(factory=dict)
    timeout: float = LXC_TIMEOUT_SECONDS
    reactor: IReactorProcess | None = None
    lxc: str = attrs.field(factory=lambda: shutil.which("lxc") or "lxc")

    @property
    def home(self) -> Path:
        return self.conf_dir / "home"

    def environment(self) -> dict[str, str]:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        env = _base_env()
        env.update(LXD_CONF=str(self.conf_dir), HOME=str(self.home))
        env.update(self.env)
        return env

    async def run(self, *args: str, check: bool = False, timeout: float | None = None) -> Result:
        """
        Run C{lxc ARGS...}.

        @param check: raise L{CommandFailed} on a non-zero exit.
        @raise CommandTimeout: the call took longer than C{timeout} (default:
            the client's).
        """
        argv = [self.lxc, *args]
        limit = self.timeout if timeout is None else timeout
        self.log.debug("lxc {args}", args=args)
        result = await run_process(argv, self.environment(), limit, reactor=self.reactor)
        if check and result.code != 0:
            raise CommandFailed(argv, result)
        return result

    async def add_simplestreams_remote(
        self, name: str, url: str, cert_pem: bytes | None = None
    ) -> None:
        """
        Add a public simplestreams remote, pinning C{cert_pem} if given.

        The pinned certificate must name the server in its first DNS SAN; the
        client ignores IP SANs and the URL's host when a certificate is pinned.
        """
        await self.run(
            "remote", "add", name, url, "--protocol=simplestreams", "--public", check=True
        )
        if cert_pem is not None:
            certs = self.conf_dir / "servercerts"
            certs.mkdir(exist_ok=True)
            (certs / f"{name}.crt").write_bytes(cert_pem)

    async def add_lxd_remote(self, name: str, url: str) -> None:
        """Add a public remote of protocol C{lxd}, trusting whatever it presents."""
        await self.run(
            "remote", "add", name, url, "--protocol=lxd", "--accept-certificate", "--public",
            check=True,
        )

    async def image_list(self, remote: str, *filters: str) -> list[dict[str, Any]]:
        """The images of C{remote} as C{lxc image list --format json} gives them."""
        result = await self.run(
            "image", "list", _remote_ref(remote), *filters, "--format", "json", check=True
        )
        images: list[dict[str, Any]] = json.loads(result.out)
        return images

    async def image_info(self, ref: str) -> str:
        return (await self.run("image", "info", ref, check=True)).out

    async def image_export(self, ref: str, dest_dir: Path) -> list[Path]:
        """
        Export C{ref} into C{dest_dir}.

        @return: the files the export created, sorted by name (from a
            simplestreams remote they carry the base names of the item paths,
            e.g. C{lxd.tar.xz} and C{rootfs.squashfs}).
        """
        dest_dir.mkdir(parents=True, exist_ok=True)
        before = set(dest_dir.iterdir())
        # The trailing slash makes lxc treat the target as a directory.
        await self.run("image", "export", ref, f"{dest_dir}/", check=True)
        return sorted(set(dest_dir.iterdir()) - before)

    async def image_copy(self, ref: str, target_remote: str, *extra: str) -> Result:
        return await self.run(
            "image", "copy", ref, _remote_ref(target_remote), *extra, check=True
        )


def _remote_ref(remote: str) -> str:
    return remote if remote.endswith(":") else remote + ":"


def _descendants(pid: int) -> list[int]:
    """Every live descendant of C{pid}, found through /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after
        # the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below C{root}, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == prefix.rstrip("/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


@attrs.define
class LxdDaemon:
    """
    A private LXD daemon (C{lxd --group root}) in C{base_dir}.

    Layout: C{base_dir/d} is C{LXD_DIR}, C{base_dir/c} the config directory of
    the client L{client} returns. C{base_dir} must be short: the daemon's unix
    sockets live in C{LXD_DIR}. L{temporary} makes a suitable one.

    The daemon gets a C{dir} storage pool named C{default}, no network, and a
    default profile with a root disk. Its proxy variables point at a dead port,
    so nothing it does can reach a public server; loopback addresses are
    exempt from the proxy in Go, so it still reaches servers on 127.0.0.1.

    Use it as::

        daemon = LxdDaemon.temporary()
        try:
            await daemon.start()
            ...
        finally:
            await daemon.stop()
    """

    log: ClassVar[Logger] = Logger()

    base_dir: Path
    remove_base_dir: bool = False
    reactor: IReactorProcess | None = None
    ready_timeout: float = LXD_READY_TIMEOUT_SECONDS
    lxd: str = attrs.field(factory=lambda: shutil.which("lxd") or "lxd")
    _process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)
    _started: bool = attrs.field(default=False, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    @classmethod
    def temporary(cls, reactor: IReactorProcess | None = None) -> LxdDaemon:
        """A daemon in a fresh short directory under /tmp, removed by L{stop}."""
        return cls(Path(tempfile.mkdtemp(prefix="lxd-", dir="/tmp")), True, reactor)

    @staticmethod
    def skip_reason() -> str | None:
        """Why a real daemon cannot run here, or None if it can."""
        if os.geteuid() != 0:
            return "a real LXD daemon needs root"
        for tool in ("lxd", "lxc", "unsquashfs", "xz"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (apt-get install lxd lxd-client squashfs-tools xz-utils)"
        return None

    @classmethod
    def skip_if_unavailable(cls) -> None:
        reason = cls.skip_reason()
        if reason is not None:
            pytest.skip(reason)

    @property
    def lxd_dir(self) -> Path:
        return self.base_dir / "d"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "lxd.log"

    @property
    def socket_path(self) -> Path:
        return self.lxd_dir / "unix.socket"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _env(self) -> dict[str, str]:
        env = _base_env()
        env["LXD_DIR"] = str(self.lxd_dir)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = DEAD_PROXY
        return env

    def client(self, conf_dir: Path | None = None, timeout: float = LXC_TIMEOUT_SECONDS) -> LxcClient:
        """An L{LxcClient} whose C{local:} remote is this daemon."""
        return LxcClient(
            conf_dir if conf_dir is not None else self.base_dir / "c",
            {"LXD_DIR": str(self.lxd_dir)},
            timeout,
            self.reactor,
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def _lxd_command(self, *args: str, stdin: bytes = b"", timeout: float = 60.0) -> Result:
        argv = [self.lxd, *args]
        result = await run_process(argv, self._env(), timeout, stdin=stdin, reactor=self.reactor)
        if result.code != 0:
            raise CommandFailed(argv, result, "failed; daemon log:\n" + self.log_tail())
        return result

    async def start(self) -> None:
        """
        Start the daemon, wait until it is ready and initialise it.

        @raise RuntimeError: the socket path is too long, or the daemon
            exited during start-up.
        @raise CommandFailed: C{lxd waitready} or C{lxd init} failed or timed
            out; the daemon is left for L{stop} to clean up.
        """
        if self._started:
            raise RuntimeError("LxdDaemon.start called twice")
        longest = self.lxd_dir / "seccomp.socket"
        if len(str(longest).encode()) > _MAX_SOCKET_PATH:
            raise RuntimeError(f"LXD_DIR {self.lxd_dir} is too long for its unix sockets")
        self._started = True
        self.lxd_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o711)
        with open(self.log_file, "ab") as log:
            # Popen rather than spawnProcess: the daemon needs a session of its
            # own so that stop() can signal it and its helpers together; the
            # reactor is never blocked, as it only polls the exit status.
            self._process = subprocess.Popen(
                [self.lxd, "--group", "root", "--debug"],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log.info("started lxd pid {pid} in {dir}", pid=self._process.pid, dir=self.lxd_dir)
        # lxd waitready would sit out its whole timeout if the daemon died at
        # once, so first watch the process until its socket appears.
        clock = IReactorTime(self.reactor if self.reactor is not None else _default_reactor())
        for _ in range(int(self.ready_timeout / 0.05)):
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"lxd exited with {self._process.returncode} during start-up:\n"
                    + self.log_tail()
                )
            if self.socket_path.exists():
                break
            await deferLater(clock, 0.05)
        else:
            raise RuntimeError(f"lxd made no socket in {self.ready_timeout:g}s:\n" + self.log_tail())
        await self._lxd_command(
            "waitready", f"--timeout={int(self.ready_timeout)}", timeout=self.ready_timeout + 10
        )
        await self._lxd_command("init", "--preseed", stdin=self.preseed().encode())

    def preseed(self) -> str:
        # JSON is YAML: no YAML library needed.
        return json.dumps(
            {
                "config": {},
                "networks": [],
                "storage_pools": [{"name": "default", "driver": "dir", "config": {}}],
                "profiles": [
                    {
                        "name": "default",
                        "devices": {
                            "root": {"path": "/", "pool": "default", "type": "disk"}
                        },
                    }
                ],
            }
        )

    async def stop(self) -> None:
        """
        Stop the daemon and everything it started, unmount what it mounted and
        (for L{temporary} daemons) remove C{base_dir}. Safe to call twice and
        after a failed start.
        """
        if self._stopped:
            return
        self._stopped = True
        process = self._process
        if process is not None and process.poll() is None:
            await self._terminate(process)
        self._unmount()
        if self.remove_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    async def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        clock = IReactorTime(self.reactor if self.reactor is not None else _default_reactor())
        pids = [process.pid, *_descendants(process.pid)]
        self._signal(process.pid, pids, signal.SIGTERM)
        steps = int(LXD_STOP_TIMEOUT_SECONDS / 0.1)
        for _ in range(steps):
            if process.poll() is not None:
                break
            await deferLater(clock, 0.1)
        else:
            self.log.warn("lxd pid {pid} ignored SIGTERM; killing", pid=process.pid)
        # Helpers may outlive the daemon; whatever is left gets SIGKILL. The
        # daemon is reaped by now, so only the pids seen while it was alive
        # are used.
        self._signal(process.pid, pids[1:] if process.returncode is not None else pids, signal.SIGKILL)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.log.error("lxd pid {pid} survived SIGKILL", pid=process.pid)

    @staticmethod
    def _signal(group: int, pids: Iterable[int], sig: signal.Signals) -> None:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _unmount(self) -> None:
        for point in mounts_under(self.base_dir):
            # Lazy: a mount still busy (a helper not yet reaped) must not keep
            # the directory from being removed.
            done = subprocess.run(
                ["umount", "-l", point], capture_output=True, text=True, timeout=30
            )
            if done.returncode != 0:
                self.log.warn("umount {point}: {err}", point=point, err=done.stderr.strip())


@asynccontextmanager
async def running_daemon(reactor: IReactorProcess | None = None) -> AsyncIterator[LxdDaemon]:
    """
    A started L{LxdDaemon.temporary} daemon, stopped and removed on exit.
    Skips the test when no daemon can run here. For a pytest-twisted fixture::

        @pytest_twisted.async_yield_fixture
        async def lxd_daemon() -> AsyncIterator[LxdDaemon]:
            async with running_daemon() as daemon:
                yield daemon
    """
    LxdDaemon.skip_if_unavailable()
    daemon = LxdDaemon.temporary(reactor)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.stop()
