"""Streaming benchmark: the proxy's memory and throughput with large files, in one run.

    python3 bench/serve_bench.py [--sizes 256,1024] [--fast 12] [--slow 4] [--hits 16]

Everything runs on 127.0.0.1, in separate processes, and is stopped at the end (also on error):

* an upstream (`upstream_server.py`): the tests' `TreeResource` under `/up/` and
  `twisted.web.static.File` under `/static/`, over TLS, serving a generated simplestreams tree with
  one random rootfs per size (its products file lists the sha256 and size);
* the proxy, `python3 -m twisted lxd-image-proxy --config FILE`, started fresh for each size (and
  once more for the control run), its cache in the run's temp dir;
* clients (`fetch_client.py`), one process per download.

For each size it measures, side by side so that the ratios survive a noisy machine:

1. cold miss: `--fast` clients reading as fast as they can plus `--slow` clients reading 4 KiB
   at a time at 256 KiB/s with a 4 KiB receive buffer, all at once; the proxy's peak RSS (kernel
   VmHWM, reset before the phase through /proc/PID/clear_refs, and VmRSS polled every 10 ms), the
   time until the verified file is in the cache, and the fast clients' times;
2. the same cold miss without the slow readers, on a fresh proxy (the control: slow readers must
   not slow the download or the fast clients);
3. `--hits` concurrent hits, with the proxy's peak RSS, against as many concurrent downloads of
   the same file from the plain Twisted static server;
4. one hit at a time against one download from the static server (best of a few, interleaved),
   and one direct download from the upstream, which the cold-miss times are compared with.

It prints a Markdown report (machine, date, command, tables) to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1 << 20
UPSTREAM_NAME = "bench"
VERSION = "20240101_0000"
SLOW_RATE_BYTES = 256 * 1024
SLOW_CHUNK_BYTES = 4096
SLOW_RCVBUF_BYTES = 4096
POLL_SECONDS = 0.01
START_TIMEOUT_SECONDS = 30.0
PHASE_TIMEOUT_SECONDS = 240.0
STOP_TIMEOUT_SECONDS = 10.0
# Head start per client process before a phase's requests go out together.
CLIENT_START_SECONDS = 0.1


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- the tree -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BigFile:
    size: int
    path: str  # relative to the tree root, which is the upstream's base URL
    sha256: str


def _random_file(target: Path, size: int, digests: Sequence[Any]) -> None:
    """Write `size` pseudo-random bytes (AES-CTR over zeros: fast and incompressible)."""
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(16 * MIB)
    left = size
    with target.open("wb") as f:
        while left > 0:
            block = encryptor.update(zeros[: min(left, len(zeros))])
            f.write(block)
            for d in digests:
                d.update(block)
            left -= len(block)


def build_tree(root: Path, sizes_mib: Sequence[int]) -> dict[int, BigFile]:
    """One product per size: a small lxd.tar.xz and a random rootfs.squashfs of that size."""
    products: dict[str, Any] = {}
    big: dict[int, BigFile] = {}
    for mib in sizes_mib:
        release = f"{mib}m"
        base = f"images/bench/{release}/amd64/default/{VERSION}"
        directory = root / base
        directory.mkdir(parents=True, exist_ok=True)
        # Only bytes matter to the proxy; the metadata file need not be a real tarball.
        meta = f"bench {release} metadata\n".encode()
        (directory / "lxd.tar.xz").write_bytes(meta)
        meta_sha = hashlib.sha256(meta).hexdigest()
        root_digest = hashlib.sha256()
        combined = hashlib.sha256(meta)
        _random_file(directory / "rootfs.squashfs", mib * MIB, [root_digest, combined])
        big[mib] = BigFile(mib * MIB, f"{base}/rootfs.squashfs", root_digest.hexdigest())
        products[f"bench:{release}:amd64:default"] = {
            "aliases": f"bench/{release}",
            "arch": "amd64",
            "os": "bench",
            "release": release,
            "release_title": release,
            "variant": "default",
            "versions": {
                VERSION: {
                    "items": {
                        "lxd.tar.xz": {
                            "ftype": "lxd.tar.xz",
                            "path": f"{base}/lxd.tar.xz",
                            "sha256": meta_sha,
                            "size": len(meta),
                            "combined_squashfs_sha256": combined.hexdigest(),
                        },
                        "rootfs.squashfs": {
                            "ftype": "squashfs",
                            "path": f"{base}/rootfs.squashfs",
                            "sha256": big[mib].sha256,
                            "size": big[mib].size,
                        },
                    }
                }
            },
        }
    streams = root / "streams/v1"
    streams.mkdir(parents=True, exist_ok=True)
    updated = "Mon, 01 Jan 2024 00:00:00 +0000"
    (streams / "images.json").write_text(json.dumps({
        "content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
        "updated": updated, "products": products,
    }))
    (streams / "index.json").write_text(json.dumps({
        "format": "index:1.0", "updated": updated,
        "index": {"images": {
            "datatype": "image-downloads", "path": "streams/v1/images.json",
            "format": "products:1.0", "updated": updated, "products": list(products),
        }},
    }))
    return big


# -- processes ------------------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts; `stop_all` ends whichever are still running."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], stdout: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with stdout.open("wb") as out, stdout.with_suffix(".err").open("wb") as err:
            process = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=str(REPO))
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_SECONDS)
        if process in self.running:
            self.running.remove(process)

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process)


def wait_for_file(path: Path, process: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().split()[0]
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}; see {path.parent}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not write {path} within {START_TIMEOUT_SECONDS:.0f}s")


def start_upstream(procs: Processes, work: Path) -> int:
    """`upstream_server.py` serving `work/tree` over TLS (its CA in `work/upstream-ca.pem`): its port."""
    upstream = procs.start(
        [sys.executable, str(HERE / "upstream_server.py"), str(work / "tree"), str(work)],
        work / "upstream.log",
    )
    return int(wait_for_file(work / "upstream.port", upstream, "upstream"))


# -- memory of the proxy --------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Polls VmRSS of one process in a thread; `phase()` resets the kernel's peak and ours."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.peak_kib = max(self.peak_kib, _status_kib(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return

    def reset(self) -> int:
        """Start a phase: returns the RSS now."""
        # "5" resets VmHWM to the current RSS (proc(5), clear_refs).
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        now = _status_kib(self.pid, "VmRSS")
        self.peak_kib = now
        return now

    def peak(self) -> int:
        """The phase's peak: the larger of the kernel's high-water mark and our samples."""
        return max(self.peak_kib, _status_kib(self.pid, "VmHWM"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)


# -- the proxy ------------------------------------------------------------------------------------


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int
    cafile: str
    cache_dir: Path
    sampler: RssSampler
    idle_kib: int = 0
    idle_fds: int = 0

    def blob(self, sha256: str) -> Path:
        return self.cache_dir / "blobs" / "sha256" / sha256[:2] / sha256


def start_proxy(
    procs: Processes, work: Path, name: str, upstream_port: int, *, workers: int | None = None,
    twistd: bool = False,
) -> Proxy:
    """A fresh proxy from the checkout, its metadata fetched once.

    `workers`: written as `[server] workers = N` only when given (the default configuration
    otherwise). `twistd`: run it as `twistd -n --pidfile= lxd-image-proxy` (as the systemd unit
    does) rather than with `python3 -m twisted`."""
    cache_dir = work / f"{name}-cache"
    port_file = work / f"{name}.port"
    config = work / f"{name}.toml"
    config.write_text(
        "[server]\n"
        'listen = ["127.0.0.1:0"]\n'
        'tls_names = ["localhost"]\n'
        f"port_file = {json.dumps(str(port_file))}\n"
        + (f"workers = {workers}\n" if workers is not None else "")
        + "[cache]\n"
        f"dir = {json.dumps(str(cache_dir))}\n"
        # A port of its own, so that proxies side by side (or a proxy already running on this
        # machine) do not clash on the default 9464.
        "[metrics]\n"
        'listen = ["127.0.0.1:0"]\n'
        f"[upstreams.{UPSTREAM_NAME}]\n"
        f'url = "https://127.0.0.1:{upstream_port}/up"\n'
        f"ca_file = {json.dumps(str(work / 'upstream-ca.pem'))}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if twistd:
        runner = [str(Path(sys.executable).with_name("twistd")), "-n", "--pidfile="]
    else:
        runner = [sys.executable, "-m", "twisted"]
    process = procs.start(
        [*runner, "lxd-image-proxy", "--config", str(config)], work / f"{name}.log", env=env,
    )
    port = int(wait_for_file(port_file, process, f"proxy {name}"))
    proxy = Proxy(process, port, str(cache_dir / "tls" / "server.crt"), cache_dir, RssSampler(process.pid))
    # Fetch the metadata once so that the timed phases move image bytes only.
    for path in ("streams/v1/index.json", "streams/v1/images.json"):
        result = run_clients(procs, work, [client(proxy.port, f"/{UPSTREAM_NAME}/{path}", proxy.cafile)])[0]
        if result["status"] != 200 or not result["complete"]:
            raise RuntimeError(f"proxy {name}: {path}: {result}")
    proxy.idle_kib = _status_kib(process.pid, "VmRSS")
    proxy.idle_fds = open_fds(process.pid)
    return proxy


def stop_proxy(procs: Processes, proxy: Proxy) -> None:
    proxy.sampler.close()
    procs.stop(proxy.process)


# -- clients --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    port: int
    path: str
    cafile: str
    slow: bool = False
    sha256: str = ""
    server_name: str = "localhost"
    plain: bool = False  # plain HTTP instead of TLS

    def argv(self, start_at: float = 0.0) -> list[str]:
        args = [
            sys.executable, str(HERE / "fetch_client.py"), "--port", str(self.port),
            "--path", self.path, "--server-name", self.server_name, "--cafile", self.cafile,
            "--max-seconds", str(PHASE_TIMEOUT_SECONDS), "--start-at", str(start_at),
        ]
        if self.slow:
            args += ["--rate", str(SLOW_RATE_BYTES), "--chunk", str(SLOW_CHUNK_BYTES),
                     "--rcvbuf", str(SLOW_RCVBUF_BYTES), "--report-sha256"]
        if self.sha256:
            args += ["--sha256", self.sha256]
        if self.plain:
            args.append("--plain")
        return args


def client(port: int, path: str, cafile: str, **kw: Any) -> ClientSpec:
    return ClientSpec(port, path, cafile, **kw)


_counter = iter(range(1_000_000))


def _read_result(out: Path, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    text = out.read_text().strip()
    if not text:
        err = out.with_suffix(".err").read_text()[-2000:]
        return {"status": 0, "complete": False, "bytes": 0, "error": f"exit {process.returncode}: {err}"}
    result: dict[str, Any] = json.loads(text)
    return result


@dataclass
class PhaseResult:
    results: list[dict[str, Any]]
    slow_results: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0
    t_fast_done: float = 0.0
    t_blob: float | None = None
    peak_kib: int = 0
    start_kib: int = 0
    cpu_seconds: float = 0.0


def run_clients(
    procs: Processes,
    work: Path,
    specs: Sequence[ClientSpec],
    slow_specs: Sequence[ClientSpec] = (),
    blob: Path | None = None,
    proxy: Proxy | None = None,
) -> list[dict[str, Any]]:
    return run_phase(procs, work, specs, slow_specs, blob, proxy).results


def run_phase(
    procs: Processes,
    work: Path,
    specs: Sequence[ClientSpec],
    slow_specs: Sequence[ClientSpec] = (),
    blob: Path | None = None,
    proxy: Proxy | None = None,
) -> PhaseResult:
    """Start the slow clients, then the others; wait for the others (and `blob` to appear),
    then stop the slow ones. Measures the proxy's peak RSS and CPU time if `proxy` is given."""
    phase = PhaseResult([])
    if proxy is not None:
        phase.start_kib = proxy.sampler.reset()
        cpu_before = cpu_seconds(proxy.process.pid)
    phase.t0 = time.time()
    count = len(specs) + len(slow_specs)
    # Starting interpreters costs CPU; let them all come up before any request goes out.
    start_at = time.time() + CLIENT_START_SECONDS * count if count > 1 else 0.0
    slow = [(spec, work / f"client-{next(_counter)}.json") for spec in slow_specs]
    slow_started = [(procs.start(spec.argv(start_at), out), out) for spec, out in slow]
    fast = [(spec, work / f"client-{next(_counter)}.json") for spec in specs]
    fast_started = [(procs.start(spec.argv(start_at), out), out) for spec, out in fast]
    deadline = time.monotonic() + PHASE_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            if blob is not None and phase.t_blob is None and blob.exists():
                phase.t_blob = time.time()
            fast_done = all(p.poll() is not None for p, _ in fast_started)
            if fast_done and not phase.t_fast_done:
                phase.t_fast_done = time.time()
            if fast_done and (blob is None or phase.t_blob is not None):
                break
            if proxy is not None and proxy.process.poll() is not None:
                raise RuntimeError(f"the proxy exited with {proxy.process.returncode}")
            time.sleep(POLL_SECONDS)
        else:
            raise RuntimeError(f"phase did not end within {PHASE_TIMEOUT_SECONDS:.0f}s")
    finally:
        # SIGTERM makes a slow reader report how far it got.
        for p, _ in slow_started:
            procs.stop(p)
        for p, _ in fast_started:
            procs.stop(p)
    if proxy is not None:
        phase.peak_kib = proxy.sampler.peak()
        phase.cpu_seconds = cpu_seconds(proxy.process.pid) - cpu_before
    phase.results = [_read_result(out, p) for p, out in fast_started]
    phase.slow_results = [_read_result(out, p) for p, out in slow_started]
    return phase


def check(results: Sequence[dict[str, Any]], size: int, what: str) -> None:
    for r in results:
        if r["status"] != 200 or not r["complete"] or r["bytes"] != size or r.get("sha256_ok") is False:
            raise RuntimeError(f"{what}: a client failed: {r}")


def prefix_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(size))
    return digest.hexdigest()


def seconds(r: dict[str, Any]) -> float:
    return float(r["t_end"] - r["t_start"])


def first_request(phase: PhaseResult) -> float:
    """When the phase's first client started (after its interpreter did)."""
    return min(float(r["t_start"]) for r in [*phase.results, *phase.slow_results])


def longest_stall(phase: PhaseResult) -> float:
    """The longest wait for body bytes that any (fast) client of the phase saw."""
    return max(float(r["max_gap"]) for r in phase.results)


def aggregate(phase: PhaseResult, size: int) -> float:
    """Bytes per second over every client of the phase, first start to last end."""
    end = max(float(r["t_end"]) for r in phase.results)
    return size * len(phase.results) / (end - first_request(phase))


# -- the run --------------------------------------------------------------------------------------


@dataclass
class SizeReport:
    mib: int
    direct_s: float = 0.0
    direct_many: PhaseResult | None = None
    single_miss: PhaseResult | None = None
    static_s: float = 0.0
    hit_s: float = 0.0
    miss: PhaseResult | None = None
    control: PhaseResult | None = None
    hits: PhaseResult | None = None
    static_many: PhaseResult | None = None
    idle_kib: int = 0
    control_idle_kib: int = 0
    idle_fds: int = 0
    end_fds: int = 0


def bench_size(
    procs: Processes, work: Path, upstream_port: int, ca: str, big: BigFile, args: argparse.Namespace,
) -> SizeReport:
    mib = big.size // MIB
    report = SizeReport(mib)
    up_path = f"/up/{big.path}"
    static_path = f"/static/{big.path}"
    proxy_path = f"/{UPSTREAM_NAME}/{big.path}"
    tree_file = work / "tree" / big.path

    log(f"{mib} MiB: direct download from the upstream")
    direct = run_clients(procs, work, [client(upstream_port, up_path, ca)])
    check(direct, big.size, "direct")
    report.direct_s = seconds(direct[0])
    log(f"{mib} MiB: {args.fast} concurrent direct downloads from the upstream")
    report.direct_many = run_phase(procs, work, [client(upstream_port, up_path, ca)] * args.fast)
    check(report.direct_many.results, big.size, "direct, concurrent")

    # Two fresh proxies, so that the cold miss and its control run back to back.
    proxy = start_proxy(procs, work, f"proxy-{mib}", upstream_port)
    try:
        control = start_proxy(procs, work, f"control-{mib}", upstream_port)
        try:
            report.idle_kib, report.control_idle_kib = proxy.idle_kib, control.idle_kib
            log(f"{mib} MiB: cold miss, {args.fast} fast + {args.slow} slow clients")
            fast = [client(proxy.port, proxy_path, proxy.cafile, sha256=big.sha256 if i == 0 else "")
                    for i in range(args.fast)]
            slow = [client(proxy.port, proxy_path, proxy.cafile, slow=True) for _ in range(args.slow)]
            report.miss = run_phase(procs, work, fast, slow, blob=proxy.blob(big.sha256), proxy=proxy)
            check(report.miss.results, big.size, "cold miss")
            for r in report.miss.slow_results:
                if r["status"] != 200 or r["error"] or r["sha256"] != prefix_sha256(tree_file, r["bytes"]):
                    raise RuntimeError(f"cold miss: a slow client failed or got wrong bytes: {r}")
            if proxy.blob(big.sha256).stat().st_size != big.size:
                raise RuntimeError("cold miss: the cached blob has the wrong size")

            log(f"{mib} MiB: control cold miss, {args.fast} fast clients, no slow ones")
            fast = [client(control.port, proxy_path, control.cafile) for _ in range(args.fast)]
            report.control = run_phase(procs, work, fast, blob=control.blob(big.sha256), proxy=control)
            check(report.control.results, big.size, "control miss")
        finally:
            stop_proxy(procs, control)
            shutil.rmtree(control.cache_dir, ignore_errors=True)

        log(f"{mib} MiB: cold miss with one client, fresh proxy")
        single = start_proxy(procs, work, f"single-{mib}", upstream_port)
        try:
            report.single_miss = run_phase(
                procs, work, [client(single.port, proxy_path, single.cafile)],
                blob=single.blob(big.sha256), proxy=single,
            )
            check(report.single_miss.results, big.size, "single miss")
        finally:
            stop_proxy(procs, single)
            shutil.rmtree(single.cache_dir, ignore_errors=True)

        log(f"{mib} MiB: {args.hits} concurrent hits")
        hits = [client(proxy.port, proxy_path, proxy.cafile, sha256=big.sha256 if i == 0 else "")
                for i in range(args.hits)]
        report.hits = run_phase(procs, work, hits, proxy=proxy)
        check(report.hits.results, big.size, "hits")

        log(f"{mib} MiB: one hit vs one static download, {args.rounds} rounds interleaved")
        static_times, hit_times = [], []
        for _ in range(args.rounds):
            s = run_clients(procs, work, [client(upstream_port, static_path, ca)])
            check(s, big.size, "static")
            static_times.append(seconds(s[0]))
            h = run_clients(procs, work, [client(proxy.port, proxy_path, proxy.cafile)])
            check(h, big.size, "hit")
            hit_times.append(seconds(h[0]))
        report.static_s, report.hit_s = min(static_times), min(hit_times)
        report.idle_fds, report.end_fds = proxy.idle_fds, open_fds(proxy.process.pid)
    finally:
        stop_proxy(procs, proxy)
        shutil.rmtree(proxy.cache_dir, ignore_errors=True)

    log(f"{mib} MiB: {args.hits} concurrent downloads from the static server")
    report.static_many = run_phase(procs, work, [client(upstream_port, static_path, ca)] * args.hits)
    check(report.static_many.results, big.size, "static, concurrent")
    return report


# -- the report -----------------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = _meminfo("MemTotal")
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    return [
        f"- date: {date}",
        f"- machine: {os.cpu_count()} CPUs (nproc {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}), "
        f"{mem_kib / MIB:.1f} GiB RAM, CPU \"{cpu}\"; {platform.platform()}; Python {platform.python_version()}",
        f"- load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def mib_s(size: int, secs: float) -> str:
    return f"{size / MIB / secs:.0f}"


def render(reports: Sequence[SizeReport], command: str, header: Sequence[str], args: argparse.Namespace,
           elapsed: float) -> str:
    out = ["## Run", "", *header, f"- command: `{command}`", f"- total run time: {elapsed:.0f} s", ""]
    out += [
        "### Memory: the proxy's peak RSS per phase (MiB)",
        "",
        "Peak = max(VmHWM after resetting it with /proc/PID/clear_refs, VmRSS polled every 10 ms).",
        "",
        f"| file | idle (after start + metadata) | cold miss {args.fast} fast + {args.slow} slow |"
        f" cold miss {args.fast} fast (control) | {args.hits} concurrent hits | peak / file size |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        assert r.miss and r.control and r.hits
        worst = max(r.miss.peak_kib, r.control.peak_kib, r.hits.peak_kib)
        out.append(
            f"| {r.mib} MiB | {r.idle_kib / 1024:.1f} | {r.miss.peak_kib / 1024:.1f} |"
            f" {r.control.peak_kib / 1024:.1f} | {r.hits.peak_kib / 1024:.1f} |"
            f" {worst / 1024 / r.mib:.3f} |"
        )
    if len(reports) >= 2:
        small, large = reports[0], reports[-1]
        assert small.miss and large.miss and small.hits and large.hits
        out += [
            "",
            f"Peak RSS ratio {large.mib} MiB / {small.mib} MiB (file size ratio {large.mib / small.mib:.0f}):"
            f" cold miss {large.miss.peak_kib / small.miss.peak_kib:.2f},"
            f" hits {large.hits.peak_kib / small.hits.peak_kib:.2f}.",
        ]
    out += [
        "",
        "Open file descriptors of the proxy, idle / after every phase (slow readers gone, all clients"
        " done): " + ", ".join(f"{r.mib} MiB {r.idle_fds} / {r.end_fds}" for r in reports) + ".",
    ]
    out += [
        "",
        "### Cold miss: slow readers do not slow the download or the fast clients",
        "",
        f"Slow readers: {SLOW_RATE_BYTES // 1024} KiB/s in {SLOW_CHUNK_BYTES} B reads, SO_RCVBUF"
        f" {SLOW_RCVBUF_BYTES} B, stopped once the fast clients are done. The control is the same"
        " cold miss on a fresh proxy without them. \"download\" is from the first client's request"
        " to the verified blob appearing in the cache. A stall is the longest wait between two"
        " reads of body bytes; in a miss it includes the wait for the last byte, which is held"
        " back until the file is verified and committed. Times in seconds.",
        "",
        "| file | download, with slow / control | ratio | fast clients median, with slow / control |"
        " ratio | fast clients max, with slow / control | longest stall of a fast client, with slow / control |"
        " slow readers got (MiB each) | proxy CPU s, with slow / control |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        assert r.miss and r.control and r.miss.t_blob and r.control.t_blob
        m = [seconds(x) for x in r.miss.results]
        c = [seconds(x) for x in r.control.results]
        dm = r.miss.t_blob - first_request(r.miss)
        dc = r.control.t_blob - first_request(r.control)
        slow_got = [x["bytes"] / MIB for x in r.miss.slow_results]
        out.append(
            f"| {r.mib} MiB | {dm:.2f} / {dc:.2f} | {dm / dc:.2f} |"
            f" {statistics.median(m):.2f} / {statistics.median(c):.2f} |"
            f" {statistics.median(m) / statistics.median(c):.2f} | {max(m):.2f} / {max(c):.2f} |"
            f" {longest_stall(r.miss):.3f} / {longest_stall(r.control):.3f} |"
            f" {', '.join(f'{g:.1f}' for g in slow_got) or '-'} |"
            f" {r.miss.cpu_seconds:.1f} / {r.control.cpu_seconds:.1f} |"
        )
    out += [
        "",
        "### Cold miss vs downloading straight from the upstream",
        "",
        f"The same TLS client reading the same file from the upstream, alone and {args.fast} at once;"
        f" against a cold miss with one client (fresh proxy) and the {args.fast} fast clients of the"
        " cold miss with slow readers. Aggregate = all clients' bytes / (last end - first start)."
        " Seconds and MiB/s.",
        "",
        "| file | 1 direct | 1-client miss | 1-client miss / 1 direct (proxy CPU s) |"
        " fast median, miss | miss / 1 direct |"
        f" {args.fast} direct at once, median | miss / {args.fast} direct (median) |"
        " aggregate, miss | aggregate, direct | miss / direct (aggregate) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        assert r.miss and r.direct_many and r.single_miss
        one = seconds(r.single_miss.results[0])
        size = r.mib * MIB
        fm = statistics.median(seconds(x) for x in r.miss.results)
        d = statistics.median(seconds(x) for x in r.direct_many.results)
        am, ad = aggregate(r.miss, size), aggregate(r.direct_many, size)
        out.append(
            f"| {r.mib} MiB | {r.direct_s:.2f} | {one:.2f} |"
            f" {one / r.direct_s:.1f} ({r.single_miss.cpu_seconds:.1f}) | {fm:.2f} | {fm / r.direct_s:.1f} | {d:.2f} | {fm / d:.2f} |"
            f" {am / MIB:.0f} | {ad / MIB:.0f} | {am / ad:.2f} |"
        )
    out += [
        "",
        "### Hits: through the proxy vs the plain Twisted static server (same file, same TLS client)",
        "",
        f"One client: best of {args.rounds}, interleaved. Concurrent: {args.hits} clients at once;"
        " aggregate as above. MiB/s.",
        "",
        "| file | 1 hit | 1 static | hit / static | concurrent hits, aggregate | concurrent static, aggregate |"
        " hits / static | proxy CPU s for the concurrent hits | longest stall of a hit, concurrent (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        assert r.hits and r.static_many
        size = r.mib * MIB
        hits_agg, static_agg = aggregate(r.hits, size), aggregate(r.static_many, size)
        out.append(
            f"| {r.mib} MiB | {mib_s(size, r.hit_s)} | {mib_s(size, r.static_s)} |"
            f" {r.static_s / r.hit_s:.2f} | {hits_agg / MIB:.0f} | {static_agg / MIB:.0f} |"
            f" {hits_agg / static_agg:.2f} | {r.hits.cpu_seconds:.1f} | {longest_stall(r.hits):.3f} |"
        )
    return "\n".join(out) + "\n"


@contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="lxd-image-proxy-bench-"))
    try:
        yield work
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="rootfs sizes in MiB, comma-separated")
    parser.add_argument("--fast", type=int, default=12, help="fast clients in a cold miss")
    parser.add_argument("--slow", type=int, default=4, help="slow readers in a cold miss")
    parser.add_argument("--hits", type=int, default=16, help="concurrent hits")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the single-client comparison")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (tree, logs, results)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    command = shlex.join(["python3", "bench/serve_bench.py", *sys.argv[1:]])
    header = machine()
    started = time.monotonic()
    procs = Processes()
    # SIGTERM/SIGHUP end the run through the same cleanup as an error.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(1))
    with workspace(args.keep) as work:
        try:
            log(f"writing the tree ({' + '.join(f'{s} MiB' for s in sizes)}) under {work}")
            big = build_tree(work / "tree", sizes)
            upstream_port = start_upstream(procs, work)
            ca = str(work / "upstream-ca.pem")
            reports = [bench_size(procs, work, upstream_port, ca, big[s], args) for s in sizes]
        finally:
            procs.stop_all()
        sys.stdout.write(render(reports, command, header, args, time.monotonic() - started))


if __name__ == "__main__":
    main()
