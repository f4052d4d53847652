"""Side by side with nginx: the proxy against nginx `proxy_cache` on the same files, in one run.

    python3 bench/nginx_bench.py [--only export,warm,index,cold] [--workers N] [--profile]

Everything runs on 127.0.0.1 and is stopped at the end (also on error, Ctrl-C or SIGTERM):

* the upstream (`upstream_server.py`, TLS) serving a generated simplestreams tree with one split
  image per size (`serve_bench.build_tree`): the export image, the warm file, the cold file;
* the proxy from the checkout under `twistd -n` (`serve_bench.start_proxy`), `[server] workers`
  written only when `--workers` is given;
* one nginx (Debian's `nginx-light`, `worker_processes auto`) with two servers: `proxy_cache` of
  the same upstream with TLS to clients on one port and plain HTTP on another (sendfile on), and
  a static server of the tree itself answering both TLS and plain HTTP on one port (a plain
  request on its TLS port is served through `error_page 497`), the fastest origin an LXD client
  can have: its plain-HTTP first attempt at each image file succeeds with sendfile;
* clients: the real `lxc` (one `LXD_CONF` per concurrent client, every server's certificate
  pinned as the e2e tests do), `fetch_client.py` processes, and `wrk`.

Phases (`--only`; each reports ratios proxy / nginx):

* export: `lxc image export` of the warm export image, alone and `--concurrent` at once, from the
  proxy (its files over plain HTTP on its HTTPS port), nginx `proxy_cache` (TLS; its TLS port
  refuses the plain attempt at once) and the static nginx (plain), `--rounds` rounds interleaved;
* warm: `--clients` concurrent warm downloads of the warm file, over plain HTTP and over TLS, from
  the proxy and nginx: aggregate throughput, server CPU seconds per GB (user + sys of the whole
  process tree, from /proc, children included) and the proxy's peak RSS (VmRSS summed over its
  process tree, sampled every 10 ms);
* index: `wrk` with `--connections` connections on `streams/v1/index.json` over TLS, with the
  CPU of wrk and of the server, to show which one is the bottleneck;
* cold: `--cold-clients` clients at once on a file neither has, over TLS: upstream GETs of it
  (the upstream's request log), each client's first body byte and end.

`--profile` attaches `py-spy record` to each proxy process during the warm and index phases and
adds the top functions by samples to the report (`--py-spy PATH` if it is not on PATH).

Markdown on stdout; progress on stderr. Install what it drives (not needed by the tests):
`apt-get install --no-install-recommends nginx-light wrk lxd-client`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_bench import (
    MIB,
    POLL_SECONDS,
    REPO,
    STOP_TIMEOUT_SECONDS,
    UPSTREAM_NAME,
    BigFile,
    ClientSpec,
    PhaseResult,
    Processes,
    Proxy,
    build_tree,
    check,
    log,
    machine,
    run_phase,
    start_proxy,
    start_upstream,
    workspace,
)

sys.path.insert(0, str(REPO))

from twisted.python.filepath import FilePath  # noqa: E402

from proxy.tls import ensure_server_certificate  # noqa: E402
from tests.e2e.lxd import _descendants  # noqa: E402

PHASES = ("export", "warm", "index", "cold")
GB = 10**9
LXC_TIMEOUT_SECONDS = 300.0
WRK_THREADS = 2
# The remote name of each side in every client's LXD_CONF.
PROXY, NGINX, STATIC = "proxy", "nginx", "static"
TREE_REFRESH_SECONDS = 0.5


# -- process trees --------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # The command may hold spaces and parentheses: split after the last ")".
        return f.read().rsplit(")", 1)[1].split()


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and every live descendant, with the reaped children of each
    (cutime + cstime): the CPU the whole tree used since it started."""
    ticks = 0
    for p in [pid, *_descendants(pid)]:
        try:
            fields = _stat_fields(p)
        except OSError:
            continue  # gone between the listing and the read
        # Fields 14-17 of stat(5); fields[0] here is field 3.
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeRssSampler:
    """Samples the sum of VmRSS over a process and its descendants every 10 ms, in a thread
    (the list of descendants is refreshed every 0.5 s: listing /proc is the costly part)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._pids = [pid, *_descendants(pid)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(POLL_SECONDS):
            if time.monotonic() - refreshed > TREE_REFRESH_SECONDS:
                self._pids = [self.pid, *_descendants(self.pid)]
                refreshed = time.monotonic()
            self.peak_kib = max(self.peak_kib, sum(_rss_kib(p) for p in self._pids))

    def now_kib(self) -> int:
        return sum(_rss_kib(p) for p in [self.pid, *_descendants(self.pid)])

    def reset(self) -> int:
        self._pids = [self.pid, *_descendants(self.pid)]
        self.peak_kib = self.now_kib()
        return self.peak_kib

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)


@dataclass
class Server:
    """One side of the comparison: where it listens and how to measure its process tree."""

    name: str
    pid: int
    tls_port: int
    plain_port: int
    cafile: str
    sampler: TreeRssSampler
    processes: int = 0  # in its tree, counted at the start

    def spec(self, path: str, plain: bool = False, sha256: str = "") -> ClientSpec:
        return ClientSpec(self.plain_port if plain else self.tls_port, path, self.cafile,
                          sha256=sha256, plain=plain)


@dataclass
class Measured:
    """A phase's client results plus what the server's process tree used meanwhile."""

    phase: PhaseResult
    cpu_seconds: float
    peak_kib: int

    @property
    def bytes(self) -> int:
        return sum(int(r["bytes"]) for r in self.phase.results)

    def aggregate(self) -> float:
        start = min(float(r["t_start"]) for r in self.phase.results)
        end = max(float(r["t_end"]) for r in self.phase.results)
        return self.bytes / (end - start)

    def cpu_per_gb(self) -> float:
        return self.cpu_seconds / (self.bytes / GB)


def measured_phase(procs: Processes, work: Path, server: Server, specs: Sequence[ClientSpec]) -> Measured:
    server.sampler.reset()
    before = tree_cpu_seconds(server.pid)
    phase = run_phase(procs, work, specs)
    return Measured(phase, tree_cpu_seconds(server.pid) - before, server.sampler.peak_kib)


# -- nginx ----------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free now (nginx cannot report the port it got for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NGINX_CONF = """\
worker_processes auto;
daemon off;
user root;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ application/json json; }}
    default_type application/octet-stream;
    # An access log as Debian's default configuration writes it (the proxy logs every request too).
    access_log {work}/nginx-access.log;
    log_format plain_or_tls '$request $status $body_bytes_sent https=$https';
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/nginx-tmp/body;
    proxy_temp_path {work}/nginx-tmp/proxy;
    fastcgi_temp_path {work}/nginx-tmp/fastcgi;
    uwsgi_temp_path {work}/nginx-tmp/uwsgi;
    scgi_temp_path {work}/nginx-tmp/scgi;
    # nginx 1.22's default leaves TLS 1.3 out, and the LXD client asks for TLS 1.3 only.
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    proxy_cache_path {work}/nginx-cache levels=1:2 keys_zone=bench:10m max_size=20g
                     inactive=1d use_temp_path=off;

    # proxy_cache, the way a pull-through cache of images is set up: everything cached,
    # one upstream request per file at a time (proxy_cache_lock, its timeouts left at 5 s).
    server {{
        listen 127.0.0.1:{cache_tls} ssl;
        listen 127.0.0.1:{cache_plain};
        location /{name}/ {{
            proxy_pass https://127.0.0.1:{upstream}/up/;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {work}/upstream-ca.pem;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            # Not the default $scheme$proxy_host$request_uri: plain and TLS clients share a copy.
            proxy_cache_key $proxy_host$request_uri;
            proxy_cache_valid 200 1d;
            proxy_ignore_headers Cache-Control Expires Set-Cookie X-Accel-Expires;
            proxy_cache_lock on;
        }}
    }}

    # The same tree as static files: TLS, and plain HTTP on the same port (error 497 is nginx's
    # "plain HTTP request on a TLS port"; served as a file rather than refused).
    server {{
        listen 127.0.0.1:{static} ssl;
        access_log {work}/nginx-static.log plain_or_tls;
        error_page 497 = @plain;
        location /{name}/ {{ alias {work}/tree/; }}
        location @plain {{ root {work}/tree-plain; }}
    }}
}}
"""


def start_nginx(procs: Processes, work: Path, upstream_port: int) -> tuple[Server, Server]:
    """nginx, as its `proxy_cache` server and its static server (one process tree)."""
    nginx = shutil.which("nginx")
    if nginx is None:
        raise RuntimeError("nginx is not installed: apt-get install --no-install-recommends nginx-light")
    cert, key = ensure_server_certificate(FilePath(str(work / "nginx")), ["localhost", "127.0.0.1"])
    (work / "nginx-tmp").mkdir()
    # The plain location's root: the tree under the remote's path, /bench/... -> tree/...
    (work / "tree-plain").mkdir()
    (work / "tree-plain" / UPSTREAM_NAME).symlink_to(work / "tree")
    ports = {"cache_tls": free_port(), "cache_plain": free_port(), "static": free_port()}
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, cert=cert.path, key=key.path, name=UPSTREAM_NAME,
                                      upstream=upstream_port, **ports))
    process = procs.start([nginx, "-c", str(conf), "-p", str(work)], work / "nginx.out")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: "
                               + (work / "nginx.err").read_text()[-2000:])
        if all(_listening(p) for p in ports.values()):
            break
        time.sleep(0.05)
    else:
        raise RuntimeError("nginx did not listen within 30 s")
    cache = Server(NGINX, process.pid, ports["cache_tls"], ports["cache_plain"], cert.path,
                   TreeRssSampler(process.pid))
    cache.processes = 1 + len(_descendants(process.pid))
    static = Server(STATIC, process.pid, ports["static"], ports["static"], cert.path, cache.sampler)
    return cache, static


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def proxy_server(proxy: Proxy) -> Server:
    server = Server(PROXY, proxy.process.pid, proxy.port, proxy.port, proxy.cafile,
                    TreeRssSampler(proxy.process.pid))
    server.processes = 1 + len(_descendants(proxy.process.pid))
    return server


# -- lxc ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LxcConf:
    """One client's LXD_CONF, with a remote for each side, its certificate pinned."""

    directory: Path

    def env(self) -> dict[str, str]:
        # No proxy variables and no inherited LXD_DIR/LXD_CONF: only loopback traffic.
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                "LXD_CONF": str(self.directory), "HOME": str(self.directory / "home")}

    def add_remote(self, name: str, port: int, cert_pem: bytes) -> None:
        (self.directory / "home").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["lxc", "remote", "add", name, f"https://127.0.0.1:{port}/{UPSTREAM_NAME}",
             "--protocol=simplestreams", "--public"],
            env=self.env(), check=True, capture_output=True, timeout=60,
        )
        # lxc verifies a pinned certificate against its first DNS name (tests/e2e/lxd.py).
        (self.directory / "servercerts").mkdir(exist_ok=True)
        (self.directory / "servercerts" / f"{name}.crt").write_bytes(cert_pem)


def lxc_conf(work: Path, index: int, servers: Sequence[Server]) -> LxcConf:
    conf = LxcConf(work / f"lxc-{index}")
    for server in servers:
        conf.add_remote(server.name, server.tls_port, Path(server.cafile).read_bytes())
    return conf


def exports(confs: Sequence[LxcConf], remote: str, alias: str, out: Path, sizes: Sequence[int]) -> float:
    """`lxc image export` by each of `confs` at once; the seconds until the last one ended.
    Checks every export's files (lxc itself checked their sha256 against the catalogue)."""
    dirs = [out / f"{remote}-{i}" for i in range(len(confs))]
    for d in dirs:
        d.mkdir(parents=True)
    started = time.monotonic()
    running = [
        subprocess.Popen(["lxc", "image", "export", f"{remote}:{alias}", f"{d}/"], env=c.env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c, d in zip(confs, dirs)
    ]
    try:
        outputs = [p.communicate(timeout=LXC_TIMEOUT_SECONDS) for p in running]
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait(STOP_TIMEOUT_SECONDS)
    elapsed = time.monotonic() - started
    for p, (_, err), d in zip(running, outputs, dirs):
        got = sorted(f.stat().st_size for f in d.iterdir())
        if p.returncode != 0 or got != sorted(sizes):
            raise RuntimeError(f"lxc image export {remote}:{alias}: exit {p.returncode}, files {got}: {err.decode()[-1000:]}")
    for d in dirs:
        shutil.rmtree(d)
    return elapsed


# -- wrk ------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests_s: float
    errors: str
    wrk_cpu: float
    server_cpu: float
    seconds: float


def run_wrk(server: Server, path: str, connections: int, duration: int) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: apt-get install --no-install-recommends wrk")
    threads = min(WRK_THREADS, connections)
    url = f"https://127.0.0.1:{server.tls_port}{path}"
    before = tree_cpu_seconds(server.pid)
    started = time.monotonic()
    process = subprocess.Popen([wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", url],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    out = process.stdout.read().decode()
    # wait4 gives the CPU wrk used: is the client or the server the bottleneck?
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    server_cpu = tree_cpu_seconds(server.pid) - before
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if process.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {out}")
    errors = []
    for pattern in (r"Non-2xx or 3xx responses: \d+", r"Socket errors: [^\n]+"):
        errors += re.findall(pattern, out)
    return WrkResult(float(found.group(1)), "; ".join(errors), usage.ru_utime + usage.ru_stime,
                     server_cpu, elapsed)


# -- profiling ------------------------------------------------------------------------------------


class Profiler:
    """`py-spy record` on every process of the proxy's tree for the length of a phase."""

    def __init__(self, py_spy: str | None, work: Path) -> None:
        self.py_spy = py_spy
        self.work = work
        self.results: dict[str, Counter[str]] = {}
        self.samples: dict[str, int] = {}
        self.inclusive: dict[str, Counter[str]] = {}

    @contextmanager
    def phase(self, name: str, server: Server) -> Iterator[None]:
        if self.py_spy is None or server.name != PROXY:
            yield
            return
        running = []
        for pid in [server.pid, *_descendants(server.pid)]:
            out = self.work / f"py-spy-{name}-{pid}.txt"
            running.append((subprocess.Popen(
                # Blocking (py-spy pauses the process for each sample): whole stacks; the
                # nonblocking mode lost the outer frames of a quarter of the samples.
                [self.py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                 "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
        time.sleep(0.5)  # attached before the clients start
        try:
            yield
        finally:
            for p, _ in running:
                p.send_signal(signal.SIGINT)
            for p, _ in running:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(STOP_TIMEOUT_SECONDS)
            self._read(name, [out for _, out in running])

    def _read(self, name: str, outs: Sequence[Path]) -> None:
        leaf: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for out in outs:
            if not out.exists():
                continue
            for line in out.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                # Without --threads/--subprocesses a line is the frames alone, outermost first.
                frames = [_frame(f) for f in stack.split(";")]
                if not frames or frames[-1] in IDLE_FRAMES:
                    continue  # a thread waiting, not working: not counted
                leaf[frames[-1]] += n
                total += n
                for f in set(frames):
                    inclusive[f] += n
        self.results[name], self.inclusive[name], self.samples[name] = leaf, inclusive, total


# Waits that py-spy (pausing the process for each sample) counts as samples: the reactor in
# epoll_wait, the idle threads of the thread pools.
IDLE_FRAMES = frozenset({"EPollReactor.doPoll (epollreactor.py)", "Condition.wait (threading.py)"})

# The reactor's and twistd's own frames, on every stack: left out of the inclusive list.
GENERIC_FRAMES = re.compile(
    r"^(<module>|run|main|_run_\w*|run_module|runApp|runReactorWithLogging|(Unix)?ApplicationRunner\.\w+|"
    r"ReactorBase\.(run|mainLoop|runUntilCurrent)|EPollReactor\.doPoll|callWithLogger|callWithContext|"
    r"\w*ContextTracker\.callWithContext|_PollLikeMixin\._doReadOrWrite|Thread\.\w+|_bootstrap\w*) "
)


def _generic(frame: str) -> bool:
    return GENERIC_FRAMES.match(frame) is not None


def _frame(frame: str) -> str:
    """`function (path/to/module.py:LINE)` -> `function (module.py)`."""
    found = re.match(r"(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$", frame.strip())
    return f"{found.group(1)} ({found.group(2)})" if found else frame.strip()


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Report:
    export: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    export_via: dict[str, int] = field(default_factory=dict)
    warm: dict[tuple[str, str], list[Measured]] = field(default_factory=dict)
    warm_upstream_gets: int = 0
    index: dict[str, WrkResult] = field(default_factory=dict)
    cold: dict[str, Measured] = field(default_factory=dict)
    cold_gets: dict[str, int] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)


def upstream_gets(work: Path, path: str) -> int:
    log_file = work / "upstream-requests.log"
    if not log_file.exists():
        return 0
    return sum(1 for line in log_file.read_text().splitlines() if line == f"GET /up/{path}")


def warm_up(procs: Processes, work: Path, servers: Sequence[Server], files: Sequence[tuple[str, int, str]]) -> None:
    """Each file through each side once, in turn, so that the timed phases are hits."""
    for server in servers:
        for path, size, sha256 in files:
            [r] = run_phase(procs, work, [server.spec(f"/{UPSTREAM_NAME}/{path}", sha256=sha256)]).results
            if r["status"] != 200 or not r["complete"] or (size and r["bytes"] != size) or r.get("sha256_ok") is False:
                raise RuntimeError(f"warm-up of {path} through {server.name}: {r}")


def bench_export(work: Path, servers: Sequence[Server], image: tuple[str, int, int], args: argparse.Namespace,
                 report: Report) -> None:
    alias, meta_size, root_size = image
    counts = sorted({1, args.concurrent})
    confs = [lxc_conf(work, i, servers) for i in range(max(counts))]
    out = work / "exports"
    for round_ in range(args.rounds):
        # Rotate who goes first, so that no side always runs on a cache the other just warmed.
        order = list(servers[round_ % len(servers):]) + list(servers[:round_ % len(servers)])
        for n in counts:
            for server in order:
                log(f"export round {round_ + 1}: {n} x lxc image export {server.name}:{alias}")
                elapsed = exports(confs[:n], server.name, alias, out, [meta_size, root_size])
                report.export.setdefault((server.name, n), []).append(elapsed)


def bench_warm(procs: Processes, work: Path, servers: Sequence[Server], big: BigFile, args: argparse.Namespace,
               report: Report, profiler: Profiler) -> None:
    path = f"/{UPSTREAM_NAME}/{big.path}"
    for round_ in range(args.rounds):
        for scheme in ("plain", "tls"):
            for server in servers if round_ % 2 == 0 else list(reversed(servers)):
                log(f"warm round {round_ + 1}: {args.clients} x {big.size // MIB} MiB over {scheme} from {server.name}")
                specs = [server.spec(path, plain=scheme == "plain", sha256=big.sha256 if i == 0 else "")
                         for i in range(args.clients)]
                with profiler.phase(f"warm {scheme}" if round_ == 0 else f"warm {scheme} {round_}", server):
                    m = measured_phase(procs, work, server, specs)
                check(m.phase.results, big.size, f"warm {scheme} {server.name}")
                report.warm.setdefault((server.name, scheme), []).append(m)


def bench_index(servers: Sequence[Server], args: argparse.Namespace, report: Report, profiler: Profiler) -> None:
    for server in servers:
        log(f"index: wrk -c{args.connections} on index.json from {server.name}")
        with profiler.phase("index", server):
            report.index[server.name] = run_wrk(server, f"/{UPSTREAM_NAME}/streams/v1/index.json",
                                                args.connections, args.wrk_seconds)


def bench_cold(procs: Processes, work: Path, servers: Sequence[Server], big: BigFile, args: argparse.Namespace,
               report: Report) -> None:
    # A file of its own per side: both cold. The tree has one, so nginx's is the same bytes
    # under another cache key (a query string nginx passes on and the upstream ignores).
    for server in servers:
        query = "" if server.name == PROXY else "?cold"
        log(f"cold: {args.cold_clients} clients at once on {big.size // MIB} MiB through {server.name}")
        before = upstream_gets(work, big.path + query)
        specs = [server.spec(f"/{UPSTREAM_NAME}/{big.path}{query}", sha256=big.sha256 if i == 0 else "")
                 for i in range(args.cold_clients)]
        m = measured_phase(procs, work, server, specs)
        check(m.phase.results, big.size, f"cold {server.name}")
        time.sleep(1)  # any request still on its way to the upstream
        report.cold[server.name] = m
        report.cold_gets[server.name] = upstream_gets(work, big.path + query) - before


# -- the report -----------------------------------------------------------------------------------


GOAL = "goal"


def _ratio_range(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _div(a: float, b: float) -> float:
    """a / b, infinite for b == 0 (a CPU time under the clock tick of 10 ms)."""
    return a / b if b else float("inf")


def _met(ok: bool) -> str:
    return "**yes**" if ok else "**no**"


def render(report: Report, args: argparse.Namespace, command: str, header: Sequence[str], elapsed: float,
           profiler: Profiler) -> str:
    # The RSS goal is per worker: --workers if given, else the processes under the supervisor
    # (with workers = 1 the twistd process serves by itself; the default is one per CPU).
    processes = report.processes.get(PROXY, 1)
    workers = args.workers or (processes - 1 if processes > 1 else 1)
    out = ["## Run", "", *header, f"- command: `{command}`", f"- total run time: {elapsed:.0f} s",
           f"- processes: proxy {report.processes.get(PROXY, '-')} (`workers` "
           f"{args.workers if args.workers is not None else 'not set'}), nginx {report.processes.get(NGINX, '-')}"
           " (master + `worker_processes auto`)", ""]
    goals: list[str] = []
    out += ["### Table", "", "| measure | proxy | nginx | proxy / nginx | goal | met |", "|---|---|---|---|---|---|"]

    if report.export:
        for n in sorted({k[1] for k in report.export}):
            p, g, s = (report.export[(side, n)] for side in (PROXY, NGINX, STATIC))
            ratios = [a / b for a, b in zip(p, g)]
            limits = [a / b for a, b in zip(s, g)]
            med = statistics.median(ratios)
            what = "alone" if n == 1 else f"{n} at once (last to end)"
            out.append(
                f"| `lxc image export` {args.export_mib} MiB, {what}, s (median of {len(p)}) |"
                f" {statistics.median(p):.2f} | {statistics.median(g):.2f} | {med:.2f} (rounds {_ratio_range(ratios)});"
                f" static nginx plain: {statistics.median(s):.2f} s, {statistics.median(limits):.2f} ({_ratio_range(limits)});"
                f" proxy / static {statistics.median(a / b for a, b in zip(p, s)):.2f} |"
                f" <= 0.92 | {_met(med <= 0.92)} |"
            )
    if report.warm:
        for scheme in ("plain", "tls"):
            pw, gw = report.warm[(PROXY, scheme)], report.warm[(NGINX, scheme)]
            pa, ga = [m.aggregate() / MIB for m in pw], [m.aggregate() / MIB for m in gw]
            ratios = [a / b for a, b in zip(pa, ga)]
            goal = 1.0 if scheme == "plain" else 0.5
            med = statistics.median(ratios)
            out.append(
                f"| {args.clients} warm downloads of {args.warm_mib} MiB over {scheme}, aggregate MiB/s |"
                f" {', '.join(f'{x:.0f}' for x in pa)} | {', '.join(f'{x:.0f}' for x in ga)} |"
                f" {med:.2f} ({_ratio_range(ratios)}) | >= {goal} | {_met(med >= goal)} |"
            )
        pc = [m.cpu_per_gb() for m in report.warm[(PROXY, "plain")]]
        gc = [m.cpu_per_gb() for m in report.warm[(NGINX, "tls")]]
        med = _div(statistics.median(pc), statistics.median(gc))
        out.append(
            f"| CPU s per GB served: proxy over plain vs nginx over TLS |"
            f" {', '.join(f'{x:.2f}' for x in pc)} | {', '.join(f'{x:.2f}' for x in gc)} | {med:.2f} | <= 1.0 | {_met(med <= 1.0)} |"
        )
        for scheme, other in (("tls", "plain"), ("plain", "tls")):
            a = [m.cpu_per_gb() for m in report.warm[(PROXY, scheme)]]
            b = [m.cpu_per_gb() for m in report.warm[(NGINX, scheme)]]
            out.append(f"| CPU s per GB served, both over {scheme} | {', '.join(f'{x:.2f}' for x in a)} |"
                       f" {', '.join(f'{x:.2f}' for x in b)} | {_div(statistics.median(a), statistics.median(b)):.2f} | - | - |")
        peak = max(m.peak_kib for scheme in ("plain", "tls") for m in report.warm[(PROXY, scheme)]) / 1024
        npeak = max(m.peak_kib for scheme in ("plain", "tls") for m in report.warm[(NGINX, scheme)]) / 1024
        out.append(
            f"| peak RSS of all processes while {args.clients} clients stream, MiB | {peak:.0f}"
            f" ({report.processes.get(PROXY, 1)} process(es)) | {npeak:.0f} | - | <= {100 * workers} |"
            f" {_met(peak <= 100 * workers)} |"
        )
    if report.index:
        pi, gi = report.index[PROXY], report.index[NGINX]
        ratio = pi.requests_s / gi.requests_s
        out.append(
            f"| `index.json`, {args.connections} connections (wrk, TLS, keep-alive), requests/s |"
            f" {pi.requests_s:,.0f} | {gi.requests_s:,.0f} | {ratio:.2f} | >= 0.3 | {_met(ratio >= 0.3)} |"
        )
    if report.cold:
        pcold, gcold = report.cold[PROXY], report.cold[NGINX]

        def firsts(m: Measured) -> list[float]:
            return [float(r["t_first"]) - float(r["t_start"]) for r in m.phase.results]

        def ends(m: Measured) -> float:
            return max(float(r["t_end"]) for r in m.phase.results) - min(float(r["t_start"]) for r in m.phase.results)

        pf, gf = firsts(pcold), firsts(gcold)
        ok = report.cold_gets[PROXY] == 1 and max(pf) <= 0.1
        out.append(
            f"| {args.cold_clients} cold clients of {args.cold_mib} MiB (TLS): upstream GETs |"
            f" {report.cold_gets[PROXY]} | {report.cold_gets[NGINX]} | - | 1 | {_met(report.cold_gets[PROXY] == 1)} |"
        )
        out.append(
            f"| the same: first body byte, s, max / median | {max(pf):.3f} / {statistics.median(pf):.3f} |"
            f" {max(gf):.3f} / {statistics.median(gf):.3f} | - | <= 0.1 for all | {_met(ok)} |"
        )
        out.append(f"| the same: all done, s | {ends(pcold):.2f} | {ends(gcold):.2f} | {ends(pcold) / ends(gcold):.2f} | - | - |")

    out += [""]
    if report.export:
        out.append(
            "Export: wall time of `lxc image export` (index, products, then both files, each checked"
            " by lxc against the catalogue's sha256) from the start until the last client ended,"
            f" {args.rounds} rounds, the sides' order rotating per round; the ratio is per round."
            " The proxy served the files over plain HTTP on its HTTPS port (its access log:"
            f" {report.export_via.get('plain', 0)} rootfs requests `via=plain`, {report.export_via.get('tls', 0)}"
            " `via=tls`); nginx `proxy_cache` over TLS (its TLS port answers the plain attempt with a"
            " 400 at once); the static nginx over plain HTTP with sendfile"
            f" ({report.export_via.get('static plain', 0)} plain rootfs requests in its log), the limit"
            " of this client."
        )
    if report.warm:
        out.append("")
        out.append(
            f"Warm: {args.clients} `fetch_client.py` processes released at once (one checks the"
            " sha256), aggregate = all bytes / (last end - first start), per round; CPU = user + sys"
            " of the server's whole process tree (children included) over the phase, per 10^9 bytes"
            " served; RSS = VmRSS summed over the tree, sampled every 10 ms, the largest of the"
            " plain and TLS phases. Upstream GETs during the warm phases:"
            f" {report.warm_upstream_gets}."
        )
    if report.index:
        out.append("")
        lines = []
        for name in (PROXY, NGINX):
            r = report.index[name]
            lines.append(
                f"{name}: {r.requests_s:,.0f} requests/s, server CPU {r.server_cpu / r.seconds:.2f} cores,"
                f" wrk CPU {r.wrk_cpu / r.seconds:.2f} cores{', ' + r.errors if r.errors else ''}"
            )
        out.append(
            f"Index: `wrk -t{WRK_THREADS} -c{args.connections} -d{args.wrk_seconds}s` over TLS (keep-alive),"
            " CPU over the run in cores busy (2 on this machine): " + "; ".join(lines) + "."
        )
    if report.cold:
        out.append("")
        out.append(
            "Cold: all clients released at once on a file neither side had; first body byte and"
            " end from each client's start (its connect and TLS handshake included). nginx's"
            " cold file is the same bytes under another cache key."
        )
    if profiler.results:
        out += ["", "### Profile (py-spy, the proxy's processes)", ""]
        for name, leaf in profiler.results.items():
            total = profiler.samples[name] or 1
            top = ", ".join(f"{f} {n * 100 / total:.0f} %" for f, n in leaf.most_common(12))
            out.append(f"- {name}, {total} busy samples (waits left out), by leaf function: {top}")
            incl = profiler.inclusive[name]
            wanted = [f for f, _ in incl.most_common(80) if not _generic(f)]
            out.append("  inclusive: " + ", ".join(f"{f} {incl[f] * 100 / total:.0f} %" for f in wanted[:15]))
    return "\n".join(out) + "\n"


def proxy_vias(work: Path, name: str, path: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for line in (work / f"{name}.log").read_text(errors="replace").splitlines():
        # An access line: `... "GET /bench/PATH" 200 ... via=plain done`, the namespace in front
        # `[proxy.access#info]` from one process, `[worker N]` as relayed by the supervisor.
        if f'"GET /{UPSTREAM_NAME}/{path}"' in line:
            via = re.search(r"via=(\w+)", line)
            if via:
                found[via.group(1)] += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases, comma-separated: {', '.join(PHASES)}")
    parser.add_argument("--workers", type=int, default=None,
                        help="write [server] workers = N into the proxy's configuration (default: not written)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the export and warm phases")
    parser.add_argument("--export-mib", type=int, default=256)
    parser.add_argument("--concurrent", type=int, default=4, help="concurrent exports")
    parser.add_argument("--warm-mib", type=int, default=64)
    parser.add_argument("--clients", type=int, default=64, help="concurrent warm downloads")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections on index.json")
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--cold-mib", type=int, default=128)
    parser.add_argument("--cold-clients", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy in the warm and index phases")
    parser.add_argument("--py-spy", default=None, help="path of py-spy (default: found on PATH)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (tree, logs, configurations)")
    args = parser.parse_args()
    only = [p for p in args.only.split(",") if p]
    if unknown := set(only) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    sizes = [args.export_mib, args.warm_mib, args.cold_mib]
    if len(set(sizes)) != 3:
        parser.error("--export-mib, --warm-mib and --cold-mib must differ (one product per size)")
    py_spy = None
    if args.profile:
        py_spy = args.py_spy or shutil.which("py-spy")
        if py_spy is None:
            parser.error("--profile needs py-spy (pip install py-spy; --py-spy PATH)")
    command = shlex.join(["python3", "bench/nginx_bench.py", *sys.argv[1:]])
    header = machine()
    started = time.monotonic()
    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(1))
    report = Report()
    samplers: list[TreeRssSampler] = []
    with workspace(args.keep) as work:
        profiler = Profiler(py_spy, work)
        try:
            log(f"writing the tree ({' + '.join(f'{s} MiB' for s in sizes)}) under {work}")
            big = build_tree(work / "tree", sizes)
            upstream_port = start_upstream(procs, work)
            proxy = start_proxy(procs, work, "proxy", upstream_port, workers=args.workers, twistd=True)
            proxy.sampler.close()  # one process only; the tree samplers below replace it
            nginx, static = start_nginx(procs, work, upstream_port)
            servers = [proxy_server(proxy), nginx]
            samplers += [s.sampler for s in servers]
            report.processes = {s.name: s.processes for s in servers}
            meta = {mib: (f"{b.path.rsplit('/', 1)[0]}/lxd.tar.xz", len(f"bench {mib}m metadata\n"))
                    for mib, b in big.items()}
            files = [("streams/v1/index.json", 0, ""), ("streams/v1/images.json", 0, "")]
            for mib in (args.export_mib, args.warm_mib):
                files += [(meta[mib][0], meta[mib][1], ""), (big[mib].path, big[mib].size, big[mib].sha256)]
            log("warming both caches")
            warm_up(procs, work, servers, files)
            if "export" in only:
                before = proxy_vias(work, "proxy", big[args.export_mib].path)
                static_log = work / "nginx-static.log"
                bench_export(work, [*servers, static], (f"{UPSTREAM_NAME}/{args.export_mib}m",
                             meta[args.export_mib][1], big[args.export_mib].size), args, report)
                after = proxy_vias(work, "proxy", big[args.export_mib].path)
                report.export_via = {k: after[k] - before[k] for k in ("plain", "tls")}
                report.export_via["static plain"] = sum(
                    1 for line in static_log.read_text().splitlines()
                    if "rootfs.squashfs" in line and line.endswith("https=") and " 200 " in line
                ) if static_log.exists() else 0
            if "warm" in only:
                gets = sum(upstream_gets(work, f[0]) for f in files)
                bench_warm(procs, work, servers, big[args.warm_mib], args, report, profiler)
                report.warm_upstream_gets = sum(upstream_gets(work, f[0]) for f in files) - gets
            if "index" in only:
                bench_index(servers, args, report, profiler)
            if "cold" in only:
                bench_cold(procs, work, servers, big[args.cold_mib], args, report)
            problems = [line for line in (work / "proxy.log").read_text(errors="replace").splitlines()
                        if "Traceback" in line or "Unhandled" in line]
            if problems:
                log(f"{len(problems)} lines with Traceback/Unhandled in the proxy's log, the first: {problems[0]}")
        finally:
            for sampler in samplers:
                sampler.close()
            procs.stop_all()
        sys.stdout.write(render(report, args, command, header, time.monotonic() - started, profiler))


if __name__ == "__main__":
    main()
