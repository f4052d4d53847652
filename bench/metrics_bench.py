"""Metrics benchmark: cache-hit throughput and CPU with metrics on and off, side by side in one run.

    python3 bench/metrics_bench.py [--size 256] [--clients 8] [--rounds 6] [--scrape-every 1]

Everything runs on 127.0.0.1, in separate processes, and is stopped at the end (also on error).
The upstream and the clients are `serve_bench.py`'s. Two proxies run at once from the same
checkout: one with `[metrics] listen` on a loopback port, scraped at `--scrape-every` seconds
(more often than any Prometheus is set up to) by a thread of this script while it serves; one
with `listen = []`, which counts nothing. After one miss has stored the file in each, every
round runs `--clients` concurrent hits against each proxy in turn (the order alternating, so
that neither always goes first on a warming machine) and records the aggregate throughput and
the proxy's CPU time per GiB served. The medians are compared: "nothing measurable" means the
difference is within the spread of the rounds.

It prints a Markdown report (machine, date, command, table) to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import serve_bench as sb

MIB = sb.MIB


@dataclass
class Side:
    name: str
    proxy: sb.Proxy
    metrics_port: int | None
    mib_s: list[float] = field(default_factory=list)
    cpu_per_gib: list[float] = field(default_factory=list)
    scrapes: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_proxy(procs: sb.Processes, work: Path, name: str, upstream_port: int, metrics_port: int | None) -> sb.Proxy:
    cache_dir = work / f"{name}-cache"
    port_file = work / f"{name}.port"
    config = work / f"{name}.toml"
    listen = f'["127.0.0.1:{metrics_port}"]' if metrics_port is not None else "[]"
    config.write_text(
        "[server]\n"
        'listen = ["127.0.0.1:0"]\n'
        'tls_names = ["localhost"]\n'
        f"port_file = {json.dumps(str(port_file))}\n"
        "[metrics]\n"
        f"listen = {listen}\n"
        "[cache]\n"
        f"dir = {json.dumps(str(cache_dir))}\n"
        f"[upstreams.{sb.UPSTREAM_NAME}]\n"
        f'url = "https://127.0.0.1:{upstream_port}/up"\n'
        f"ca_file = {json.dumps(str(work / 'upstream-ca.pem'))}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(sb.REPO))
    process = procs.start(
        [sys.executable, "-m", "twisted", "lxd-image-proxy", "--config", str(config)],
        work / f"{name}.log", env=env,
    )
    port = int(sb.wait_for_file(port_file, process, f"proxy {name}"))
    return sb.Proxy(process, port, str(cache_dir / "tls" / "server.crt"), cache_dir, sb.RssSampler(process.pid))


class Scraper(threading.Thread):
    """GETs /metrics every `every` seconds until stopped; counts the scrapes that worked."""

    def __init__(self, port: int, every: float) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.every = every
        self.done = threading.Event()
        self.count = 0
        self.last = ""

    def run(self) -> None:
        while not self.done.is_set():
            with urllib.request.urlopen(self.url, timeout=10) as response:
                self.last = response.read().decode()
            self.count += 1
            self.done.wait(self.every)

    def stop(self) -> None:
        self.done.set()
        self.join(15)


def served_bytes(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("lxd_image_proxy_served_bytes_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def one_round(procs: sb.Processes, work: Path, side: Side, big: sb.BigFile, clients: int, every: float) -> None:
    path = f"/{sb.UPSTREAM_NAME}/{big.path}"
    specs = [sb.client(side.proxy.port, path, side.proxy.cafile, sha256=big.sha256 if i == 0 else "")
             for i in range(clients)]
    scraper = Scraper(side.metrics_port, every) if side.metrics_port is not None else None
    if scraper is not None:
        scraper.start()
    try:
        phase = sb.run_phase(procs, work, specs, proxy=side.proxy)
    finally:
        if scraper is not None:
            scraper.stop()
            side.scrapes += scraper.count
    sb.check(phase.results, big.size, f"hits ({side.name})")
    side.mib_s.append(sb.aggregate(phase, big.size) / MIB)
    side.cpu_per_gib.append(phase.cpu_seconds / (clients * big.size / (1 << 30)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="rootfs size in MiB")
    parser.add_argument("--clients", type=int, default=8, help="concurrent hits per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side")
    parser.add_argument("--scrape-every", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    command = shlex.join(["python3", "bench/metrics_bench.py", *sys.argv[1:]])
    header = sb.machine()
    started = time.monotonic()
    procs = sb.Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(1))
    with sb.workspace(args.keep) as work:
        try:
            sb.log(f"writing the tree ({args.size} MiB) under {work}")
            big = sb.build_tree(work / "tree", [args.size])[args.size]
            upstream = procs.start(
                [sys.executable, str(sb.HERE / "upstream_server.py"), str(work / "tree"), str(work)],
                work / "upstream.log",
            )
            upstream_port = int(sb.wait_for_file(work / "upstream.port", upstream, "upstream"))
            metrics_port = free_port()
            on = Side("metrics on", start_proxy(procs, work, "on", upstream_port, metrics_port), metrics_port)
            off = Side("metrics off", start_proxy(procs, work, "off", upstream_port, None), None)
            path = f"/{sb.UPSTREAM_NAME}/{big.path}"
            for side in (on, off):
                sb.log(f"{side.name}: one miss to store the file")
                miss = sb.run_phase(procs, work, [sb.client(side.proxy.port, path, side.proxy.cafile)],
                                    blob=side.proxy.blob(big.sha256), proxy=side.proxy)
                sb.check(miss.results, big.size, f"miss ({side.name})")
            for r in range(args.rounds):
                order = (off, on) if r % 2 == 0 else (on, off)
                for side in order:
                    sb.log(f"round {r + 1}/{args.rounds}: {args.clients} concurrent hits, {side.name}")
                    one_round(procs, work, side, big, args.clients, args.scrape_every)
            # The counters saw every byte: the miss and every hit.
            assert on.metrics_port is not None
            with urllib.request.urlopen(f"http://127.0.0.1:{on.metrics_port}/metrics", timeout=10) as response:
                counted = served_bytes(response.read().decode())
            expected = big.size * (1 + args.rounds * args.clients)
            if counted != expected:
                raise RuntimeError(f"served_bytes_total is {counted}, expected {expected}")
        finally:
            procs.stop_all()
        sys.stdout.write(render(on, off, args, header, command, time.monotonic() - started))


def render(on: Side, off: Side, args: argparse.Namespace, header: list[str], command: str, elapsed: float) -> str:
    def row(side: Side) -> str:
        return (
            f"| {side.name} | {statistics.median(side.mib_s):.0f} | {min(side.mib_s):.0f}–{max(side.mib_s):.0f} |"
            f" {statistics.median(side.cpu_per_gib):.2f} | {min(side.cpu_per_gib):.2f}–{max(side.cpu_per_gib):.2f} |"
            f" {side.scrapes} |"
        )

    ratio = statistics.median(on.mib_s) / statistics.median(off.mib_s)
    cpu_ratio = statistics.median(on.cpu_per_gib) / statistics.median(off.cpu_per_gib)
    out = ["## Run", "", *header, f"- command: `{command}`", f"- total run time: {elapsed:.0f} s", ""]
    out += [
        f"{args.rounds} rounds per side of {args.clients} concurrent cache hits of a {args.size} MiB file,"
        f" the sides alternating; the metrics side scraped every {args.scrape_every:g} s meanwhile.",
        "",
        "| proxy | aggregate MiB/s (median) | range | proxy CPU s per GiB served (median) | range | scrapes |",
        "|---|---|---|---|---|---|",
        row(off),
        row(on),
        "",
        f"Throughput on / off: {ratio:.3f}; CPU per GiB on / off: {cpu_ratio:.3f}.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
