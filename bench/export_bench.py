"""LXD-face export benchmark: `/1.0/images/FP/export` against the simplestreams face, in one run.

    python3 bench/export_bench.py [--sizes 256,1024] [--clients 1,8] [--slow 2] [--rounds 2]

The same set-up as `serve_bench.py`, whose helpers it imports (the tree, the upstream process, the
proxy with a loopback-only configuration, the client processes, the RSS sampler): everything on
127.0.0.1, in separate processes, stopped at the end (also on error). The tree's images are split
(a small `lxd.tar.xz` and a random `rootfs.squashfs` of each size) and their products entry
carries `combined_squashfs_sha256` = sha256(metadata || rootfs), so the LXD face lists them and
an export's two parts hash, in order, to the fingerprint.

Export clients are `fetch_client.py --multipart`: they find the parts of the `multipart/form-data`
body as it arrives and hash the parts' contents; every export client checks that hash against the
fingerprint and the parts' names and sizes, and every simplestreams client the rootfs's sha256,
so both kinds of client do the same work per byte (plus a boundary search for the export).

For each size, with N the largest of `--clients`:

1. cold miss through the export, on a fresh proxy: N fast clients plus `--slow` slow readers
   (256 KiB/s in 4 KiB reads, 4 KiB receive buffer), all at once; then the same without the slow
   readers on another fresh proxy (the control), then N fast clients downloading the rootfs
   through the simplestreams face on a third fresh proxy. Peak RSS, time until the rootfs is in
   the cache, the clients' times;
2. hits, on the first proxy (which now holds both files), `--rounds` times interleaved: for each
   client count n in `--clients`, n concurrent downloads of the rootfs through the simplestreams
   face, then n concurrent exports; then N exports plus `--slow` slow export readers (a slow
   reader must not slow the others: compared with the N exports just before it).

Markdown on stdout (machine, date, command, tables); progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_bench import (
    MIB,
    SLOW_CHUNK_BYTES,
    SLOW_RATE_BYTES,
    SLOW_RCVBUF_BYTES,
    UPSTREAM_NAME,
    BigFile,
    ClientSpec,
    PhaseResult,
    Processes,
    Proxy,
    _status_kib,
    build_tree,
    first_request,
    log,
    longest_stall,
    machine,
    open_fds,
    run_phase,
    seconds,
    start_proxy,
    start_upstream,
    stop_proxy,
    workspace,
)

EXPORT = "export"
SIMPLESTREAMS = "simplestreams"
FACES = (SIMPLESTREAMS, EXPORT)
META_PART, ROOT_PART = "metadata", "rootfs"
REQUEST_TIMEOUT_SECONDS = 30.0


# -- the images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchImage:
    """A split image of the tree, as its products entry describes it."""

    mib: int
    fingerprint: str
    meta_path: str
    meta_size: int
    root: BigFile

    @property
    def export_path(self) -> str:
        return f"/1.0/images/{self.fingerprint}/export"

    @property
    def root_path(self) -> str:
        return f"/{UPSTREAM_NAME}/{self.root.path}"


def images_of(tree: Path, big: dict[int, BigFile]) -> dict[int, BenchImage]:
    """Read the fingerprints back from the products file the proxy will read."""
    products = json.loads((tree / "streams/v1/images.json").read_text())["products"]
    images = {}
    for mib, root in big.items():
        versions = products[f"bench:{mib}m:amd64:default"]["versions"]
        [version] = versions.values()
        meta = version["items"]["lxd.tar.xz"]
        fingerprint = meta["combined_squashfs_sha256"]
        combined = hashlib.sha256()
        for path in (meta["path"], root.path):
            with (tree / path).open("rb") as f:
                while block := f.read(16 * MIB):
                    combined.update(block)
        if combined.hexdigest() != fingerprint:
            raise RuntimeError(f"{mib} MiB: combined_squashfs_sha256 is not sha256(meta || rootfs)")
        images[mib] = BenchImage(mib, fingerprint, meta["path"], meta["size"], root)
    return images


def content_prefix_sha256(tree: Path, image: BenchImage, size: int) -> str:
    """sha256 of the first `size` bytes of metadata || rootfs: what a slow export reader hashed."""
    digest = hashlib.sha256()
    left = size
    for path in (image.meta_path, image.root.path):
        with (tree / path).open("rb") as f:
            while left > 0 and (block := f.read(min(left, 16 * MIB))):
                digest.update(block)
                left -= len(block)
    return digest.hexdigest()


# -- clients --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportClient(ClientSpec):
    """A `fetch_client.py --multipart`: `sha256` is the fingerprint the parts must hash to."""

    def argv(self, start_at: float = 0.0) -> list[str]:
        return [*super().argv(start_at), "--multipart"]


def export_client(proxy: Proxy, image: BenchImage, slow: bool = False) -> ClientSpec:
    return ExportClient(proxy.port, image.export_path, proxy.cafile, slow=slow, sha256=image.fingerprint)


def root_client(proxy: Proxy, image: BenchImage) -> ClientSpec:
    return ClientSpec(proxy.port, image.root_path, proxy.cafile, sha256=image.root.sha256)


def check_export(results: Sequence[dict[str, Any]], image: BenchImage, what: str) -> None:
    for r in results:
        sizes = [(p["name"], p["size"]) for p in r.get("parts", [])]
        if (
            r["status"] != 200 or r["error"] or not r["complete"] or r.get("sha256_ok") is not True
            or sizes != [(META_PART, image.meta_size), (ROOT_PART, image.root.size)]
        ):
            raise RuntimeError(f"{what}: an export client failed: {r}")


def check_root(results: Sequence[dict[str, Any]], image: BenchImage, what: str) -> None:
    for r in results:
        if (
            r["status"] != 200 or r["error"] or not r["complete"] or r["bytes"] != image.root.size
            or r.get("sha256_ok") is not True
        ):
            raise RuntimeError(f"{what}: a client failed: {r}")


def check_slow(results: Sequence[dict[str, Any]], tree: Path, image: BenchImage, what: str) -> None:
    """Slow export readers, stopped early: right status, right parts so far, right bytes."""
    for r in results:
        names = [p["name"] for p in r.get("parts", [])]
        if (
            r["status"] != 200 or r["error"] or names not in ([META_PART], [META_PART, ROOT_PART])
            or r["sha256"] != content_prefix_sha256(tree, image, r["content_bytes"])
        ):
            raise RuntimeError(f"{what}: a slow reader failed or got wrong bytes: {r}")


def get_json(proxy: Proxy, path: str) -> Any:
    """One small GET over the proxy's TLS (HTTP/1.0: no chunking), its body as JSON."""
    context = ssl.create_default_context(cafile=proxy.cafile)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=REQUEST_TIMEOUT_SECONDS) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost:{proxy.port}\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body[:500]!r}")
    return json.loads(body)


def start_export_proxy(procs: Processes, work: Path, name: str, upstream_port: int, image: BenchImage) -> Proxy:
    """A fresh proxy (metadata fetched) whose LXD face has listed the image once; its idle RSS
    and descriptors are counted after that."""
    proxy = start_proxy(procs, work, name, upstream_port)
    try:
        listed = get_json(proxy, "/1.0/images")["metadata"]
        info = get_json(proxy, f"/1.0/images/{image.fingerprint}")["metadata"]
    except BaseException:
        stop_proxy(procs, proxy)
        raise
    if f"/1.0/images/{image.fingerprint}" not in listed or info["fingerprint"] != image.fingerprint:
        stop_proxy(procs, proxy)
        raise RuntimeError(f"proxy {name}: the LXD face does not list {image.fingerprint}: {listed}")
    proxy.idle_kib = _status_kib(proxy.process.pid, "VmRSS")
    proxy.idle_fds = open_fds(proxy.process.pid)
    return proxy


# -- measures -------------------------------------------------------------------------------------


def received(phase: PhaseResult) -> int:
    return sum(int(r["bytes"]) for r in phase.results)


def aggregate(phase: PhaseResult) -> float:
    """Bytes per second over every (fast) client of the phase, first start to last end."""
    end = max(float(r["t_end"]) for r in phase.results)
    return received(phase) / (end - first_request(phase))


def median_s(phase: PhaseResult) -> float:
    return statistics.median(seconds(r) for r in phase.results)


def client_cpu_per_gib(phase: PhaseResult) -> float:
    return sum(float(r["cpu_s"]) for r in phase.results) / (received(phase) / 1024 / MIB)


def proxy_cpu_per_gib(phase: PhaseResult) -> float:
    return phase.cpu_seconds / (received(phase) / 1024 / MIB)


def download_s(phase: PhaseResult) -> float:
    assert phase.t_blob is not None
    return phase.t_blob - first_request(phase)


def proxy_log_problems(path: Path) -> int:
    """Lines of a proxy log that speak of a traceback, an unhandled error or an abort."""
    words = ("Traceback", "Unhandled", "aborting")
    with path.open(errors="replace") as f:
        return sum(1 for line in f if any(w in line for w in words))


# -- the run --------------------------------------------------------------------------------------


@dataclass
class SizeReport:
    image: BenchImage
    idle_kib: int = 0
    miss_slow: PhaseResult | None = None
    miss_export: PhaseResult | None = None
    miss_simplestreams: PhaseResult | None = None
    # (face, clients) -> one phase per round
    hits: dict[tuple[str, int], list[PhaseResult]] = field(default_factory=dict)
    # the N exports run just before each of these, per round, are the control
    hits_slow: list[PhaseResult] = field(default_factory=list)
    idle_fds: int = 0
    end_fds: int = 0
    log_problems: dict[str, int] = field(default_factory=dict)

    @property
    def mib(self) -> int:
        return self.image.mib


def bench_size(
    procs: Processes, work: Path, upstream_port: int, image: BenchImage, args: argparse.Namespace,
) -> SizeReport:
    mib = image.mib
    tree = work / "tree"
    report = SizeReport(image)
    many = max(args.clients)

    def root_blob_of(proxy: Proxy) -> Path:
        return proxy.blob(image.root.sha256)

    proxy = start_export_proxy(procs, work, f"export-{mib}", upstream_port, image)
    try:
        report.idle_kib, report.idle_fds = proxy.idle_kib, proxy.idle_fds
        log(f"{mib} MiB: export cold miss, {many} fast + {args.slow} slow clients")
        report.miss_slow = run_phase(
            procs, work, [export_client(proxy, image) for _ in range(many)],
            [export_client(proxy, image, slow=True) for _ in range(args.slow)],
            blob=root_blob_of(proxy), proxy=proxy,
        )
        check_export(report.miss_slow.results, image, "export cold miss")
        check_slow(report.miss_slow.slow_results, tree, image, "export cold miss")
        if root_blob_of(proxy).stat().st_size != image.root.size:
            raise RuntimeError("export cold miss: the cached rootfs has the wrong size")

        for face, name in ((EXPORT, f"control-{mib}"), (SIMPLESTREAMS, f"simplestreams-{mib}")):
            log(f"{mib} MiB: {face} cold miss, {many} fast clients, fresh proxy")
            fresh = start_export_proxy(procs, work, name, upstream_port, image)
            try:
                if face == EXPORT:
                    specs = [export_client(fresh, image) for _ in range(many)]
                else:
                    specs = [root_client(fresh, image) for _ in range(many)]
                phase = run_phase(procs, work, specs, blob=root_blob_of(fresh), proxy=fresh)
            finally:
                stop_proxy(procs, fresh)
                shutil.rmtree(fresh.cache_dir, ignore_errors=True)
            report.log_problems[name] = proxy_log_problems(work / f"{name}.log")
            if face == EXPORT:
                check_export(phase.results, image, "export control miss")
                report.miss_export = phase
            else:
                check_root(phase.results, image, "simplestreams miss")
                report.miss_simplestreams = phase

        for round_ in range(args.rounds):
            for n in args.clients:
                for face in FACES:
                    log(f"{mib} MiB: round {round_ + 1}: {n} concurrent {face} hit(s)")
                    if face == EXPORT:
                        phase = run_phase(procs, work, [export_client(proxy, image)] * n, proxy=proxy)
                        check_export(phase.results, image, "export hits")
                    else:
                        phase = run_phase(procs, work, [root_client(proxy, image)] * n, proxy=proxy)
                        check_root(phase.results, image, "simplestreams hits")
                    report.hits.setdefault((face, n), []).append(phase)
            log(f"{mib} MiB: round {round_ + 1}: {many} export hits + {args.slow} slow export readers")
            phase = run_phase(
                procs, work, [export_client(proxy, image)] * many,
                [export_client(proxy, image, slow=True)] * args.slow, proxy=proxy,
            )
            check_export(phase.results, image, "export hits with slow readers")
            check_slow(phase.slow_results, tree, image, "export hits with slow readers")
            report.hits_slow.append(phase)
        # Give the proxy a moment to close what the stopped slow readers left.
        time.sleep(0.5)
        report.end_fds = open_fds(proxy.process.pid)
    finally:
        stop_proxy(procs, proxy)
        shutil.rmtree(proxy.cache_dir, ignore_errors=True)
    report.log_problems[f"export-{mib}"] = proxy_log_problems(work / f"export-{mib}.log")
    return report


# -- the report -----------------------------------------------------------------------------------


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _each(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def render(reports: Sequence[SizeReport], command: str, header: Sequence[str], args: argparse.Namespace,
           elapsed: float) -> str:
    many = max(args.clients)
    out = ["## Run", "", *header, f"- command: `{command}`", f"- total run time: {elapsed:.0f} s", ""]
    out += [
        "### Memory: the proxy's peak RSS per phase (MiB)",
        "",
        "Peak = max(VmHWM after resetting it with /proc/PID/clear_refs, VmRSS polled every 10 ms)."
        f" Hits: the largest of the {args.rounds} rounds.",
        "",
        f"| rootfs | idle | export miss, {many} + {args.slow} slow | export miss, {many} (control) |"
        f" simplestreams miss, {many} | export hits, {many} | simplestreams hits, {many} |"
        f" export hits, {many} + {args.slow} slow | peak / rootfs size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def hit_peak(r: SizeReport, face: str) -> int:
        return max(p.peak_kib for p in r.hits[(face, many)])

    def slow_peak(r: SizeReport) -> int:
        return max(p.peak_kib for p in r.hits_slow)

    for r in reports:
        assert r.miss_slow and r.miss_export and r.miss_simplestreams
        peaks = [r.miss_slow.peak_kib, r.miss_export.peak_kib, r.miss_simplestreams.peak_kib,
                 hit_peak(r, EXPORT), hit_peak(r, SIMPLESTREAMS), slow_peak(r)]
        out.append(
            f"| {r.mib} MiB | {_mib(r.idle_kib)} | " + " | ".join(_mib(p) for p in peaks)
            + f" | {max(peaks) / 1024 / r.mib:.3f} |"
        )
    if len(reports) >= 2:
        small, large = reports[0], reports[-1]
        assert small.miss_slow and large.miss_slow and small.miss_export and large.miss_export
        assert small.miss_simplestreams and large.miss_simplestreams

        def ratio(a: int, b: int) -> str:
            return f"{a / b:.2f}"

        out += [
            "",
            f"Peak RSS ratio {large.mib} MiB / {small.mib} MiB (size ratio {large.mib / small.mib:.0f}):"
            f" export miss with slow readers {ratio(large.miss_slow.peak_kib, small.miss_slow.peak_kib)},"
            f" export miss {ratio(large.miss_export.peak_kib, small.miss_export.peak_kib)},"
            f" export hits {ratio(hit_peak(large, EXPORT), hit_peak(small, EXPORT))},"
            f" export hits with slow readers {ratio(slow_peak(large), slow_peak(small))};"
            f" simplestreams miss {ratio(large.miss_simplestreams.peak_kib, small.miss_simplestreams.peak_kib)},"
            f" simplestreams hits {ratio(hit_peak(large, SIMPLESTREAMS), hit_peak(small, SIMPLESTREAMS))}.",
        ]
    out += [
        "",
        "Open file descriptors of the first proxy (upstream connections kept in its pool"
        " included), idle / at the end: "
        + ", ".join(f"{r.mib} MiB {r.idle_fds} / {r.end_fds}" for r in reports)
        + ". Lines with \"Traceback\", \"Unhandled\" or \"aborting\" in the proxies' logs: "
        + ", ".join(f"{name} {n}" for r in reports for name, n in sorted(r.log_problems.items()))
        + ".",
    ]

    out += [
        "",
        "### Hits: the export through /1.0 vs the same rootfs through the simplestreams face",
        "",
        f"n clients at once, {args.rounds} rounds interleaved (simplestreams then export, per n)."
        " Aggregate = all body bytes / (last end - first start), MiB/s; each round's value, and the"
        " ratio export / simplestreams of the medians. CPU: seconds per GiB delivered, of the proxy"
        " and of the clients (from their request on: TLS, hashing and, for the export, finding the"
        " parts). Stall: longest wait between two"
        " reads of body bytes, any client, any round.",
        "",
        "| rootfs | n | export, MiB/s | simplestreams, MiB/s | export / simplestreams |"
        " proxy CPU s/GiB, export / simplestreams | client CPU s/GiB, export / simplestreams |"
        " longest stall s, export / simplestreams | peak RSS MiB, export / simplestreams |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for n in args.clients:
            e, s = r.hits[(EXPORT, n)], r.hits[(SIMPLESTREAMS, n)]
            ea, sa = [aggregate(p) / MIB for p in e], [aggregate(p) / MIB for p in s]
            out.append(
                f"| {r.mib} MiB | {n} | {_each(ea, '{:.0f}')} | {_each(sa, '{:.0f}')} |"
                f" {statistics.median(ea) / statistics.median(sa):.2f} |"
                f" {statistics.median(proxy_cpu_per_gib(p) for p in e):.2f} /"
                f" {statistics.median(proxy_cpu_per_gib(p) for p in s):.2f} |"
                f" {statistics.median(client_cpu_per_gib(p) for p in e):.2f} /"
                f" {statistics.median(client_cpu_per_gib(p) for p in s):.2f} |"
                f" {max(longest_stall(p) for p in e):.3f} / {max(longest_stall(p) for p in s):.3f} |"
                f" {_mib(max(p.peak_kib for p in e))} / {_mib(max(p.peak_kib for p in s))} |"
            )

    out += [
        "",
        "### A slow export reader does not slow the other clients",
        "",
        f"Slow readers: {SLOW_RATE_BYTES // 1024} KiB/s in {SLOW_CHUNK_BYTES} B reads, SO_RCVBUF"
        f" {SLOW_RCVBUF_BYTES} B, stopped once the fast clients are done; each checks the sha256 of"
        " the part bytes it got against metadata || rootfs. Hits: each round's"
        f" {many} exports + {args.slow} slow readers against the {many} exports of the same round"
        " without them, just before. Cold miss: against the control miss on a fresh proxy."
        " \"download\": from the first request to the verified rootfs in the cache. Seconds.",
        "",
        "| rootfs | phase | fast median, with slow / without | ratio | fast max, with / without |"
        " longest stall, with / without | download, with / without | ratio |"
        " slow readers got (MiB each) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        assert r.miss_slow and r.miss_export
        m, c = r.miss_slow, r.miss_export
        got = [x["bytes"] / MIB for x in m.slow_results]
        out.append(
            f"| {r.mib} MiB | cold miss | {median_s(m):.2f} / {median_s(c):.2f} |"
            f" {median_s(m) / median_s(c):.2f} |"
            f" {max(seconds(x) for x in m.results):.2f} / {max(seconds(x) for x in c.results):.2f} |"
            f" {longest_stall(m):.3f} / {longest_stall(c):.3f} |"
            f" {download_s(m):.2f} / {download_s(c):.2f} | {download_s(m) / download_s(c):.2f} |"
            f" {_each(got, '{:.1f}')} |"
        )
        for i, (w, wo) in enumerate(zip(r.hits_slow, r.hits[(EXPORT, many)])):
            got = [x["bytes"] / MIB for x in w.slow_results]
            out.append(
                f"| {r.mib} MiB | hits, round {i + 1} | {median_s(w):.2f} / {median_s(wo):.2f} |"
                f" {median_s(w) / median_s(wo):.2f} |"
                f" {max(seconds(x) for x in w.results):.2f} / {max(seconds(x) for x in wo.results):.2f} |"
                f" {longest_stall(w):.3f} / {longest_stall(wo):.3f} | - | - | {_each(got, '{:.1f}')} |"
            )

    out += [
        "",
        "### Cold miss: the export vs the simplestreams face (fresh proxies, no slow readers)",
        "",
        f"{many} clients at once. Seconds; aggregate MiB/s as above.",
        "",
        "| rootfs | download, export / simplestreams | ratio | fast median, export / simplestreams |"
        " ratio | aggregate, export / simplestreams | proxy CPU s, export / simplestreams |"
        " longest stall, export / simplestreams |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        assert r.miss_export and r.miss_simplestreams
        em, sm = r.miss_export, r.miss_simplestreams
        out.append(
            f"| {r.mib} MiB | {download_s(em):.2f} / {download_s(sm):.2f} | {download_s(em) / download_s(sm):.2f} |"
            f" {median_s(em):.2f} / {median_s(sm):.2f} | {median_s(em) / median_s(sm):.2f} |"
            f" {aggregate(em) / MIB:.0f} / {aggregate(sm) / MIB:.0f} |"
            f" {em.cpu_seconds:.1f} / {sm.cpu_seconds:.1f} |"
            f" {longest_stall(em):.3f} / {longest_stall(sm):.3f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="rootfs sizes in MiB, comma-separated")
    parser.add_argument("--clients", default="1,8", help="concurrent clients of the hit comparison")
    parser.add_argument("--slow", type=int, default=2, help="slow export readers")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the hit comparison")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (tree, logs, results)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    args.clients = [int(n) for n in args.clients.split(",")]
    command = shlex.join(["python3", "bench/export_bench.py", *sys.argv[1:]])
    header = machine()
    started = time.monotonic()
    procs = Processes()
    # SIGTERM/SIGHUP end the run through the same cleanup as an error.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(1))
    with workspace(args.keep) as work:
        try:
            log(f"writing the tree ({' + '.join(f'{s} MiB' for s in sizes)}) under {work}")
            images = images_of(work / "tree", build_tree(work / "tree", sizes))
            upstream_port = start_upstream(procs, work)
            reports = [bench_size(procs, work, upstream_port, images[s], args) for s in sizes]
        finally:
            procs.stop_all()
        sys.stdout.write(render(reports, command, header, args, time.monotonic() - started))


if __name__ == "__main__":
    main()
