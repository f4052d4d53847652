"""Slowloris benchmark: a normal client's latency while a thousand connections hold the proxy.

    python3 bench/slowloris_bench.py [--connections 1000] [--record-bytes 250] [--requests 200]

Everything runs on 127.0.0.1, in separate processes, and is stopped at the end (also on error):

* an upstream (`upstream_server.py`) serving a small generated simplestreams tree over TLS;
* the proxy, `python3 -m twisted lxd-image-proxy --config FILE`, with its default limits
  (30 s request-head deadline, 10 s TLS handshake deadline, 4096 connections), its index.json
  fetched once so that it is a cached metadata file;
* the load (this script with `load`): `--connections` connections kept open, reopened as soon
  as the proxy cuts one, as a slowloris attacker does. `--record-bytes` of them send the first
  byte of a TLS record and nothing more; the others complete the TLS handshake and trickle a
  request head a byte every 5 s, never ending it.

The normal client (this process, `http.client` over TLS) makes `--requests` sequential GETs of
the cached `streams/v1/index.json`, each on a fresh connection (connect, handshake, request,
whole body), then as many on one keep-alive connection; first without the load, then with it.
It reports p50, p99 and the worst latency of each series (target: p99 under 100 ms with the
load), what the load held and how the proxy cut it, and the proxy's memory and open files.

It prints a Markdown report (machine, date, command, tables) to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shlex
import signal
import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from serve_bench import (  # noqa: E402
    UPSTREAM_NAME,
    Processes,
    _status_kib,
    build_tree,
    log,
    machine,
    open_fds,
    start_proxy,
    stop_proxy,
    wait_for_file,
    workspace,
)

INDEX_PATH = f"/{UPSTREAM_NAME}/streams/v1/index.json"
TRICKLE_EVERY_SECONDS = 5.0
OPEN_BATCH = 50
STATUS_EVERY_SECONDS = 0.5
LOAD_START_TIMEOUT_SECONDS = 120.0
REQUEST_TIMEOUT_SECONDS = 30.0
P99_GOAL_MS = 100.0
# Measured from the moment the load is up: past the head deadline (30 s) of every trickler.
CHURN_SECONDS = 35.0
CHURN_PAUSE_SECONDS = 0.05
HEAD = b"GET " + INDEX_PATH.encode() + b" HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"s" * 4096


# -- the load (a process of its own) --------------------------------------------------------------


def run_load(port: int, cafile: str, connections: int, record_bytes: int, status: Path) -> None:
    """Keep `connections` slow connections open until SIGTERM; write counters to `status`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
    from twisted.internet.interfaces import IHandshakeListener
    from twisted.internet.protocol import Factory, Protocol, connectionDone
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.internet.task import LoopingCall
    from twisted.python.failure import Failure
    from zope.interface import implementer

    tls = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(Path(cafile).read_bytes()))
    plain = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)
    secure = wrapClientTLS(tls, plain)
    counts = {"held": 0, "opened": 0, "cut_408": 0, "cut_silent": 0, "connect_failed": 0}

    class Slow(Protocol):
        def __init__(self) -> None:
            self.holding = False
            self.received = b""

        def hold(self) -> None:
            self.holding = True
            counts["held"] += 1

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            if self.holding:
                counts["held"] -= 1
            counts["cut_408" if self.received.startswith(b"HTTP/1.1 408") else "cut_silent"] += 1
            reactor.callLater(0, open_one, type(self))  # type: ignore[attr-defined]

    @implementer(IHandshakeListener)
    class Trickler(Slow):
        sent = 0

        def handshakeCompleted(self) -> None:
            self.hold()
            self.call = LoopingCall(self.trickle)
            self.call.clock = reactor
            self.call.start(TRICKLE_EVERY_SECONDS)

        def trickle(self) -> None:
            assert self.transport is not None
            self.transport.write(HEAD[self.sent : self.sent + 1])
            self.sent = (self.sent + 1) % len(HEAD)

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            call = getattr(self, "call", None)
            if call is not None and call.running:
                call.stop()
            super().connectionLost(reason)

    class RecordByte(Slow):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"\x16")
            self.hold()

    def open_one(kind: type[Slow]) -> None:
        counts["opened"] += 1
        endpoint = secure if kind is Trickler else plain
        d = endpoint.connect(Factory.forProtocol(kind))

        def failed(_: Failure) -> None:
            counts["connect_failed"] += 1
            reactor.callLater(0.1, open_one, kind)  # type: ignore[attr-defined]

        d.addErrback(failed)

    kinds = [RecordByte] * record_bytes + [Trickler] * (connections - record_bytes)

    def open_batch(start: int) -> None:
        for kind in kinds[start : start + OPEN_BATCH]:
            open_one(kind)
        if start + OPEN_BATCH < len(kinds):
            reactor.callLater(0.05, open_batch, start + OPEN_BATCH)  # type: ignore[attr-defined]

    def write_status() -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(counts))
        os.replace(tmp, status)

    reactor.callWhenRunning(open_batch, 0)  # type: ignore[attr-defined]
    LoopingCall(write_status).start(STATUS_EVERY_SECONDS)
    reactor.run()  # type: ignore[attr-defined]


# -- the normal client ----------------------------------------------------------------------------


def tls_context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    return context


def get(conn: http.client.HTTPSConnection) -> int:
    conn.request("GET", INDEX_PATH, headers={"User-Agent": "slowloris-bench"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200 or not body:
        raise RuntimeError(f"normal client: {response.status} with {len(body)} bytes")
    return len(body)


def series(port: int, cafile: str, count: int, fresh: bool) -> list[float]:
    """Latencies in ms of `count` sequential GETs, each on a fresh connection or all on one."""
    context = tls_context(cafile)
    latencies = []
    conn = None
    for _ in range(count):
        started = time.perf_counter()
        if conn is None or fresh:
            conn = http.client.HTTPSConnection(
                "localhost", port, context=context, timeout=REQUEST_TIMEOUT_SECONDS
            )
        get(conn)
        latencies.append((time.perf_counter() - started) * 1000)
        if fresh:
            conn.close()
    if conn is not None:
        conn.close()
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    return (
        f"{statistics.median(values):.1f} | {percentile(values, 99):.1f} | {max(values):.1f}"
    )


def read_status(path: Path) -> dict[str, int]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        _, _, port, cafile, connections, record_bytes, status = sys.argv
        run_load(int(port), cafile, int(connections), int(record_bytes), Path(status))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="slow connections held")
    parser.add_argument(
        "--record-bytes", type=int, default=250,
        help="of them, those sending one byte of a TLS record (the others trickle a head)",
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per series")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    command = shlex.join(["python3", "bench/slowloris_bench.py", *sys.argv[1:]])
    header = machine()
    started = time.monotonic()
    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(1))
    rows: dict[str, dict[str, list[float]]] = {}
    with workspace(args.keep) as work:
        try:
            build_tree(work / "tree", [1])
            upstream = procs.start(
                [sys.executable, str(HERE / "upstream_server.py"), str(work / "tree"), str(work)],
                work / "upstream.log",
            )
            upstream_port = int(wait_for_file(work / "upstream.port", upstream, "upstream"))
            proxy = start_proxy(procs, work, "proxy", upstream_port)
            pid = proxy.process.pid
            log(f"proxy on port {proxy.port}; {proxy.idle_fds} open files, {proxy.idle_kib} KiB")

            log("without load")
            rows["without load"] = {
                "fresh": series(proxy.port, proxy.cafile, args.requests, fresh=True),
                "keep-alive": series(proxy.port, proxy.cafile, args.requests, fresh=False),
            }

            status = work / "load.json"
            load = procs.start(
                [sys.executable, str(Path(__file__).resolve()), "load", str(proxy.port),
                 proxy.cafile, str(args.connections), str(args.record_bytes), str(status)],
                work / "load.log",
            )
            deadline = time.monotonic() + LOAD_START_TIMEOUT_SECONDS
            while read_status(status).get("held", 0) < args.connections:
                if load.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the load did not reach {args.connections}: {read_status(status)}")
                time.sleep(0.1)
            held_at = time.monotonic()
            loaded_kib = _status_kib(pid, "VmRSS")
            loaded_fds = open_fds(pid)
            log(f"load holding {args.connections}; proxy {loaded_fds} open files, {loaded_kib} KiB")
            before = read_status(status)
            rows["with load"] = {
                "fresh": series(proxy.port, proxy.cafile, args.requests, fresh=True),
                "keep-alive": series(proxy.port, proxy.cafile, args.requests, fresh=False),
            }
            during = time.monotonic() - held_at
            after = read_status(status)
            # Until every trickled head has reached its 30 s deadline once: the cuts and the
            # reopening (a burst of handshakes) fall inside this series.
            log("fresh connections through the deadline cuts")
            churn: list[float] = []
            while time.monotonic() - held_at < CHURN_SECONDS:
                churn += series(proxy.port, proxy.cafile, 1, fresh=True)
                time.sleep(CHURN_PAUSE_SECONDS)
            rows["with load, through the cuts"] = {"fresh": churn}
            later = read_status(status)
            held_min = later.get("held", 0)
            procs.stop(load)
            stop_proxy(procs, proxy)
        finally:
            procs.stop_all()
    out = ["## Run", "", *header, f"- command: `{command}`",
           f"- total run time: {time.monotonic() - started:.0f} s", ""]
    out += [
        f"Normal client: sequential GETs of the cached `streams/v1/index.json` (ms); "
        f"{args.requests} per series, and through the cuts one every "
        f"{CHURN_PAUSE_SECONDS * 1000:.0f} ms until {CHURN_SECONDS:.0f} s after the load was up:",
        "",
        "| series | connection | requests | p50 | p99 | max |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_kind in rows.items():
        for kind, values in by_kind.items():
            out.append(f"| {name} | {kind} | {len(values)} | {summary(values)} |")
    loaded_p99 = max(
        percentile(v, 99) for name, by_kind in rows.items() if name != "without load"
        for v in by_kind.values()
    )
    out += [
        "",
        f"p99 with load under {P99_GOAL_MS:.0f} ms: {'yes' if loaded_p99 < P99_GOAL_MS else 'no'}"
        f" (worst p99 {loaded_p99:.1f} ms)",
        "",
        f"Load: {args.connections} connections held ({args.record_bytes} with one byte of a TLS "
        f"record, {args.connections - args.record_bytes} trickling a head a byte every "
        f"{TRICKLE_EVERY_SECONDS:.0f} s), reopened when cut. While the normal client ran "
        f"({during:.1f} s): cut with 408 {after.get('cut_408', 0) - before.get('cut_408', 0)}, "
        f"cut silently {after.get('cut_silent', 0) - before.get('cut_silent', 0)}. "
        f"By {CHURN_SECONDS:.0f} s after the load was up: opened {later.get('opened', 0)}, "
        f"cut with 408 {later.get('cut_408', 0)}, cut silently (handshake deadline) "
        f"{later.get('cut_silent', 0)}, failed connects {later.get('connect_failed', 0)}, "
        f"held at that moment {held_min}.",
        "",
        f"Proxy: {proxy.idle_fds} open files and {proxy.idle_kib / 1024:.0f} MiB RSS idle; "
        f"{loaded_fds} open files and {loaded_kib / 1024:.0f} MiB RSS with the load "
        f"({(loaded_kib - proxy.idle_kib) / args.connections:.0f} KiB per held connection).",
    ]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
