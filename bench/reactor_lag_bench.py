"""Reactor lag benchmark: how long the proxy's reactor thread is blocked, phase by phase.

    python3 bench/reactor_lag_bench.py [--quick] [--keep] > /tmp/lag.md

The proxy runs in this process, on the global reactor in a thread of its own; the driver (this
module's main thread) starts the clients and waits for them, so that nothing it does runs on the
reactor. A lag probe on the reactor re-arms a 5 ms timer each time it fires and records how late
each firing was (actual - scheduled): a reactor blocked for 300 ms shows as one firing 300 ms late.

Everything else is a separate process on 127.0.0.1, stopped at the end (also on error): the
upstream (`upstream_server.py`: the tests' `TreeResource` over TLS with a throwaway CA) and the
clients (`fetch_client.py`, which report their longest wait between two reads).

Phases, reported separately (sizes with `--quick` in brackets):

* idle: nothing to do, the probe's noise floor;
* the first fetch of the index and a 30 MB [3 MB] products file shaped like Ubuntu's, then the
  first lookup of a file in it (the lookup parses the products file);
* (a) a cold 1 GiB [64 MiB] download with one client, through the commit (fsync, rename, index);
* (d) 8 clients reading that file, now cached, at once;
* (c) gc, then one prefetcher run, over an index of 100,000 [10,000] file records;
* (b) the products file changed upstream and refreshed (index, products file, a lookup), then the
  upstream forced offline and the filtered offline catalogue built.

Coupling to the proxy's internals is kept to the functions of the section "the proxy" below
(`start_service`, `fill_index`, `run_gc`, `run_prefetcher`, `force_offline`, `stop_service`) and
to the `TIMED` list of calls timed for attribution: adapt them when the code moves. Calls into
the proxy go through `ReactorThread.call`, which takes a plain value, a Deferred or a coroutine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import hashlib
import importlib
import inspect
import json
import os
import queue
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The checkout this script lives in, not an installed copy: the proxy and the tests' helpers.
sys.path.insert(0, str(HERE.parent))

from serve_bench import (  # noqa: E402
    MIB,
    PHASE_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    UPSTREAM_NAME,
    BigFile,
    ClientSpec,
    Processes,
    build_tree,
    client,
    log,
    machine,
    run_phase,
    wait_for_file,
    workspace,
)
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, maybeDeferred  # noqa: E402
from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from tests.test_catalogue import _big_products  # noqa: E402

PROBE_SECONDS = 0.005
LAG_GOAL_SECONDS = 0.050
STALL_GOAL_SECONDS = 0.100
# After a phase, so that the probe's firing that ends a block is counted in its phase.
SETTLE_SECONDS = 0.3
IDLE_SECONDS = 3.0
HITS = 8
METADATA_TTL_SECONDS = 1.0
DAY = 86400.0
# Of the filler records: expired (older than the 10-day default, with a tiny blob that gc
# deletes) and recently used (what the prefetcher follows), one in EXPIRED_EVERY and USED_EVERY.
EXPIRED_EVERY = 100
USED_EVERY = 2
INDEX_PATH = "streams/v1/index.json"
PRODUCTS_PATH = "streams/v1/images.json"


@dataclass(frozen=True)
class Sizes:
    file_mib: int
    products_bytes: int
    records: int


FULL = Sizes(1024, 30 * MIB, 100_000)
QUICK = Sizes(64, 3 * MIB, 10_000)


# -- the tree -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    big: BigFile
    meta_path: str  # the big file's small lxd.tar.xz
    products_v2: Path  # the changed products file, moved into place for (b)
    products_sizes: tuple[int, int]


def build_catalogue_tree(root: Path, sizes: Sizes) -> Tree:
    """serve_bench's tree (one product with a random rootfs) plus the tests' big products file."""
    big = build_tree(root, [sizes.file_mib])[sizes.file_mib]
    streams = root / "streams/v1"
    doc = json.loads((streams / "images.json").read_text())
    filler: dict[str, Any] = json.loads(_big_products(sizes.products_bytes))["products"]
    doc["products"].update(filler)
    index = json.loads((streams / "index.json").read_text())
    index["index"]["images"]["products"] = list(doc["products"])
    (streams / "index.json").write_text(json.dumps(index))
    (streams / "images.json").write_text(json.dumps(doc))
    # The change an upstream publishes: a new version of one product.
    changed = copy.deepcopy(doc)
    changed["updated"] = "Tue, 02 Jan 2024 00:00:00 +0000"
    product = changed["products"][next(iter(filler))]
    version = copy.deepcopy(product["versions"][max(product["versions"])])
    for n, item in enumerate(version["items"].values()):
        item["sha256"] = hashlib.sha256(f"v2-{n}".encode()).hexdigest()
        item["path"] = item["path"].replace("release-", "release-v2-")
    product["versions"]["29991231"] = version
    v2 = root.parent / "images.v2.json"
    v2.write_text(json.dumps(changed))
    meta_path = big.path.rsplit("/", 1)[0] + "/lxd.tar.xz"
    return Tree(big, meta_path, v2, ((streams / "images.json").stat().st_size, v2.stat().st_size))


# -- the reactor, the probe and the timed calls --------------------------------------------------


class ReactorThread:
    """The global reactor, run in a thread; `call` runs a function on it and waits (bounded)."""

    def __init__(self) -> None:
        self.ident = 0
        self._thread = threading.Thread(
            target=self._run, name="reactor", daemon=True,
        )

    def _run(self) -> None:
        self.ident = threading.get_ident()
        reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]

    def start(self) -> None:
        self._thread.start()
        self.call(lambda: None, timeout=STOP_TIMEOUT_SECONDS)

    def call(self, f: Callable[..., Any], *args: Any, timeout: float = PHASE_TIMEOUT_SECONDS) -> Any:
        results: queue.Queue[Any] = queue.Queue()

        def run() -> None:
            # maybeDeferred takes plain values, Deferreds and coroutines alike.
            d: Deferred[Any] = maybeDeferred(f, *args)
            d.addTimeout(timeout, reactor).addBoth(results.put)

        reactor.callFromThread(run)  # type: ignore[attr-defined]
        try:
            # Bounded even if the reactor is stuck or gone.
            result = results.get(timeout=timeout + STOP_TIMEOUT_SECONDS)
        except queue.Empty:
            raise RuntimeError(f"the reactor did not answer within {timeout:.0f} s") from None
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def stop(self) -> None:
        if self._thread.is_alive():
            reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]
            self._thread.join(STOP_TIMEOUT_SECONDS)


class LagProbe:
    """A timer every PROBE_SECONDS on the reactor; records (when it fired, how late)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._due = 0.0

    def start(self) -> None:
        self._due = time.monotonic() + PROBE_SECONDS
        reactor.callLater(PROBE_SECONDS, self._fire)

    def _fire(self) -> None:
        now = time.monotonic()
        self.samples.append((now, now - self._due))
        self.start()


@dataclass(frozen=True)
class Span:
    name: str
    start: float
    end: float


# Calls timed where they are found: only the time spent inside them on the reactor thread counts
# (a call that hands its work to a thread and returns a Deferred shows as short). Names missing
# after a refactor are listed in the report; async functions are skipped (their call is instant).
TIMED = (
    ("proxy.blobs", "PartialBlob.commit"),
    ("proxy.fetch", "Fetcher._commit"),
    ("proxy.index", "CacheIndex.put"),
    ("proxy.index", "CacheIndex.put_metadata"),
    ("proxy.index", "CacheIndex.flush_usage"),
    ("proxy.index", "CacheIndex.remove_cached"),
    ("proxy.metadata", "parse_products"),
    ("proxy.metadata", "parse_images"),
    ("proxy.metadata", "filter_products"),
    ("proxy.metadata", "UpstreamMetadata.read"),
    ("proxy.lifecycle", "CacheLifecycle.gc"),
    ("proxy.lifecycle", "CacheLifecycle._records"),
    ("proxy.prefetch", "Prefetcher._released"),
)


def time_internals(spans: list[Span], on_reactor: Callable[[], bool]) -> list[str]:
    """Wrap every TIMED callable found; return the names not found."""
    missing = []
    for module_name, dotted in TIMED:
        *parents, attribute = dotted.split(".")
        try:
            owner: Any = importlib.import_module(module_name)
            for parent in parents:
                owner = getattr(owner, parent)
            original = inspect.getattr_static(owner, attribute)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{dotted}")
            continue
        if not inspect.isfunction(original) or inspect.iscoroutinefunction(original) or (
            inspect.isgeneratorfunction(original)
        ):
            missing.append(f"{module_name}.{dotted} (not a plain function)")
            continue
        setattr(owner, attribute, _timed(original, dotted, spans, on_reactor))
    # Python's own garbage collector stops the thread that triggered it.
    started: list[float] = []

    def collecting(phase: str, info: dict[str, Any]) -> None:
        if not on_reactor():
            return
        if phase == "start":
            started[:] = [time.monotonic()]
        elif started:
            spans.append(Span("Python's cyclic garbage collector", started[0], time.monotonic()))

    gc.callbacks.append(collecting)
    return missing


def _timed(
    f: Callable[..., Any], name: str, spans: list[Span], on_reactor: Callable[[], bool],
) -> Callable[..., Any]:
    @functools.wraps(f)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if not on_reactor():
            return f(*args, **kwargs)
        start = time.monotonic()
        try:
            return f(*args, **kwargs)
        finally:
            spans.append(Span(name, start, time.monotonic()))

    return timed


# -- the proxy: every use of its internals is here ------------------------------------------------


def write_config(work: Path, upstream_port: int) -> Path:
    """Loopback only: the proxy on 127.0.0.1 port 0, its one upstream the bench's upstream."""
    config = work / "proxy.toml"
    config.write_text(
        "[server]\n"
        'listen = ["127.0.0.1:0"]\n'
        'tls_names = ["localhost"]\n'
        f"port_file = {json.dumps(str(work / 'proxy.port'))}\n"
        "[cache]\n"
        f"dir = {json.dumps(str(work / 'cache'))}\n"
        f"metadata_ttl = {METADATA_TTL_SECONDS}\n"
        # Prefetcher runs are triggered by the bench, not by the timer.
        "auto_update_interval = 0\n"
        f"[upstreams.{UPSTREAM_NAME}]\n"
        f'url = "https://127.0.0.1:{upstream_port}/up"\n'
        f"ca_file = {json.dumps(str(work / 'upstream-ca.pem'))}\n"
    )
    return config


def start_service(config_path: Path) -> Any:
    """What `proxy/tap.py` does, then start it (on the reactor thread)."""
    from proxy.config import load_config
    from proxy.service import build_service

    service = build_service(load_config(str(config_path)), reactor)
    service.startService()
    return service


def fill_index(service: Any, count: int, blob_path: Callable[[str], Path]) -> None:
    """
    Add `count` file records in one write transaction (a synced commit each would take minutes).
    Only the expired ones get a blob (of the recorded size), since gc deletes it; records are
    added after start-up, whose reconcile would drop those without one.
    """
    from proxy.index import FileRecord

    index = service.cache.index
    now = time.time()
    records = []
    for i in range(count):
        expired = i % EXPIRED_EVERY == 0
        used = now - (30 * DAY if expired else (i % 7) * DAY)
        sha = hashlib.sha256(f"fill-{i}".encode()).hexdigest()
        records.append(FileRecord(
            sha256=sha, size=4096 + i % 4096, upstream=UPSTREAM_NAME,
            paths=(f"{UPSTREAM_NAME}/fill/{i // 1000}/{i}/rootfs.squashfs",),
            product=f"fill:{i // 20}:amd64:default", version=f"2024{i % 20:04d}",
            stored_at=used - DAY, last_used_at=used, use_count=1 if i % USED_EVERY == 0 else 0,
        ))
        if expired:
            path = blob_path(sha)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(bytes(records[-1].size))
    put_many = getattr(index, "put_many", None)
    if put_many is not None:
        put_many(records)
        return
    with index._env.begin(write=True) as txn:
        for record in records:
            for item in record.paths:
                index._claim_location_in(txn, record.sha256, item)
            index._write_file_in(txn, record)
    index.recount_size()


def run_gc(service: Any) -> Any:
    return service.cache.gc()


def run_prefetcher(service: Any) -> Any:
    return service.cache.prefetcher.run()


def force_offline(service: Any) -> None:
    service.cache.health[UPSTREAM_NAME].forced_offline = True


def stop_service(service: Any) -> Any:
    return service.stopService()


# -- phases ---------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    what: str
    t0: float
    t1: float = 0.0
    clients: list[dict[str, Any]] = field(default_factory=list)
    streaming: bool = False  # whether the stall goal applies


@dataclass
class Bench:
    procs: Processes
    work: Path
    rt: ReactorThread
    port: int = 0
    cafile: str = ""
    phases: list[Phase] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def spec(self, path: str, **kw: Any) -> ClientSpec:
        return client(self.port, f"/{UPSTREAM_NAME}/{path}", self.cafile, **kw)

    def fetch(self, specs: Sequence[ClientSpec], what: str, size: int | None = None,
              blob: Path | None = None) -> list[dict[str, Any]]:
        results = run_phase(self.procs, self.work, specs, blob=blob).results
        for r in results:
            if r["status"] != 200 or not r["complete"] or r.get("sha256_ok") is False or (
                size is not None and r["bytes"] != size
            ):
                raise RuntimeError(f"{what}: a client failed: {r}")
        return results

    def phase(self, name: str, what: str, body: Callable[[], list[dict[str, Any]]],
              streaming: bool = False) -> None:
        log(f"phase {name}: {what}")
        time.sleep(SETTLE_SECONDS)
        phase = Phase(name, what, time.monotonic(), streaming=streaming)
        phase.clients = body()
        time.sleep(SETTLE_SECONDS)
        phase.t1 = time.monotonic()
        self.phases.append(phase)


def run_bench(bench: Bench, tree: Tree, sizes: Sizes, upstream_port: int) -> None:
    rt, work, big = bench.rt, bench.work, tree.big
    service = rt.call(start_service, write_config(work, upstream_port))
    bench.port = int((work / "proxy.port").read_text().split()[0])
    bench.cafile = str(work / "cache" / "tls" / "server.crt")

    def blob(sha256: str) -> Path:
        return work / "cache" / "blobs" / "sha256" / sha256[:2] / sha256

    def metadata(products_size: int) -> list[dict[str, Any]]:
        return [*bench.fetch([bench.spec(INDEX_PATH)], "index"),
                *bench.fetch([bench.spec(PRODUCTS_PATH)], "products", products_size)]

    def lookup() -> list[dict[str, Any]]:
        return bench.fetch([bench.spec(tree.meta_path)], "small file")

    def idle() -> list[dict[str, Any]]:
        time.sleep(IDLE_SECONDS)
        return []

    def cache_gc() -> list[dict[str, Any]]:
        report = rt.call(run_gc, service)
        bench.notes.append(f"gc: {getattr(report, 'expired', '?')} expired, {getattr(report, 'evicted', '?')}"
                           f" evicted, {getattr(report, 'files', '?')} files left.")
        return []

    def prefetch() -> list[dict[str, Any]]:
        report = rt.call(run_prefetcher, service)
        bench.notes.append(f"prefetcher: {getattr(report, 'images', '?')} images checked,"
                           f" {len(getattr(report, 'downloaded', []))} files downloaded.")
        return []

    def offline() -> list[dict[str, Any]]:
        return [*bench.fetch([bench.spec(PRODUCTS_PATH)], "offline products"),
                *bench.fetch([bench.spec(INDEX_PATH)], "offline index")]

    try:
        log(f"filling the index with {sizes.records} records")
        rt.call(fill_index, service, sizes.records, blob)
        bench.phase("idle", f"nothing for {IDLE_SECONDS:.0f} s", idle)
        bench.phase("metadata", f"first fetch of the index and the {tree.products_sizes[0] / 1e6:.0f} MB"
                    " products file", lambda: metadata(tree.products_sizes[0]))
        bench.phase("lookup", "first lookup of a file (a small one) in that products file", lookup)
        bench.phase("(a) cold download", f"one client, {big.size // MIB} MiB, through the commit",
                    lambda: bench.fetch([bench.spec(big.path, sha256=big.sha256)], "cold download",
                                        big.size, blob=blob(big.sha256)), streaming=True)
        bench.phase("(d) hits", f"{HITS} clients reading the cached {big.size // MIB} MiB at once",
                    lambda: bench.fetch([bench.spec(big.path, sha256=big.sha256 if i == 0 else "")
                                         for i in range(HITS)], "hits", big.size), streaming=True)
        bench.phase("(c) gc", f"expiry and size cap over {sizes.records} records"
                    f" ({sizes.records // EXPIRED_EVERY} expired, with blobs)", cache_gc)
        bench.phase("(c) prefetcher", f"one auto-update run over {sizes.records} records"
                    f" ({sizes.records // USED_EVERY} used lately) and the catalogue", prefetch)
        os.replace(tree.products_v2, work / "tree" / PRODUCTS_PATH)
        time.sleep(METADATA_TTL_SECONDS)
        bench.phase("(b) refresh", "the products file changed upstream: index, products file",
                    lambda: metadata(tree.products_sizes[1]))
        bench.phase("(b) lookup", "a lookup after the refresh (the new products file)", lookup)
        rt.call(force_offline, service)
        bench.phase("(b) offline view", "upstream forced offline: the filtered products file, then"
                    " the index", offline)
    finally:
        rt.call(stop_service, service, timeout=STOP_TIMEOUT_SECONDS)


# -- the report -----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] if ordered else 0.0


def render(bench: Bench, samples: list[tuple[float, float]], spans: list[Span], missing: list[str],
           header: Sequence[str], command: str, elapsed: float) -> str:
    out = ["## Run", "", *header, f"- command: `{command}`", f"- total run time: {elapsed:.0f} s", ""]
    out += [
        "### Reactor lag per phase",
        "",
        f"Lag: how late a {PROBE_SECONDS * 1000:.0f} ms timer on the proxy's reactor fired (a block of"
        " N ms shows as one firing N ms late). Stall: the longest wait between two reads of any"
        " client of the phase (a cold download's includes the last byte, held back until the commit)."
        f" Goals: worst lag < {ms(LAG_GOAL_SECONDS)} ms; stall < {ms(STALL_GOAL_SECONDS)} ms for"
        " streaming phases. Times in ms.",
        "",
        "| phase | what | seconds | probe firings | worst lag | p99 | lags > 50 ms | clients' longest stall |"
        " goals met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    where = []
    calls = []
    for p in bench.phases:
        mine = [(t, lag) for t, lag in samples if p.t0 <= t < p.t1]
        lags = [lag for _, lag in mine]
        worst = max(lags, default=0.0)
        stall = max((float(r["max_gap"]) for r in p.clients), default=None)
        ok = worst < LAG_GOAL_SECONDS and (not p.streaming or (stall or 0.0) < STALL_GOAL_SECONDS)
        out.append(
            f"| {p.name} | {p.what} | {p.t1 - p.t0:.1f} | {len(lags)} | {ms(worst)} |"
            f" {ms(percentile(lags, 0.99))} | {sum(lag > LAG_GOAL_SECONDS for lag in lags)} |"
            f" {'-' if stall is None else ms(stall)} | {'yes' if ok else 'no'} |"
        )
        top = sorted(mine, key=lambda s: -s[1])[:3]
        blamed = []
        for t, lag in top:
            # Calls that took a tenth of the block at least.
            names = sorted({s.name for s in spans
                            if min(s.end, t) - max(s.start, t - lag) >= max(0.001, lag / 10)})
            blamed.append(f"{ms(lag)} at {t - lag - p.t0:.2f} s" + (f" ({', '.join(names)})" if names else ""))
        where.append(f"| {p.name} | {'; '.join(blamed)} |")
        totals: dict[str, list[float]] = {}
        for s in spans:
            if p.t0 <= s.start < p.t1:
                totals.setdefault(s.name, []).append(s.end - s.start)
        for name, durations in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
            if sum(durations) >= 0.001:
                calls.append(f"| {p.name} | `{name}` | {len(durations)} | {ms(sum(durations))} |"
                             f" {ms(max(durations))} |")
    out += [
        "",
        "### Where the worst lags fell",
        "",
        "The three latest firings of each phase: lag (ms), when the block began (s into the phase),"
        " and the timed calls that filled a tenth of it at least. A block with none is code that is"
        " not timed (scans of the index inside async functions, say).",
        "",
        "| phase | worst lags |",
        "|---|---|",
        *where,
        "",
        "### Timed calls on the reactor thread",
        "",
        "Time spent inside each call on the reactor thread (nested calls count in both).",
        "",
        "| phase | call | calls | total ms | longest ms |",
        "|---|---|---|---|---|",
        *calls,
    ]
    out += ["", *(f"- {note}" for note in bench.notes)]
    if missing:
        out += ["", "Not timed (not found in this version of the code): " + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 64 MiB file, 3 MB products file, 10,000 records")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (tree, logs, results)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    command = shlex.join(["python3", "bench/reactor_lag_bench.py", *sys.argv[1:]])
    header = machine()
    started = time.monotonic()
    # SIGTERM/SIGHUP end the run through the same cleanup as an error.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(1))
    import proxy

    log(f"proxy from {proxy.__file__}")
    procs = Processes()
    rt = ReactorThread()
    probe = LagProbe()
    spans: list[Span] = []
    missing = time_internals(spans, lambda: threading.get_ident() == rt.ident)
    with workspace(args.keep) as work:
        bench = Bench(procs, work, rt)
        log_file = (work / "proxy.log").open("w")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
        try:
            log(f"writing the tree ({sizes.file_mib} MiB file, {sizes.products_bytes / 1e6:.0f} MB products)"
                f" under {work}")
            tree = build_catalogue_tree(work / "tree", sizes)
            upstream = procs.start(
                [sys.executable, str(HERE / "upstream_server.py"), str(work / "tree"), str(work)],
                work / "upstream.log",
            )
            upstream_port = int(wait_for_file(work / "upstream.port", upstream, "upstream"))
            rt.start()
            rt.call(probe.start)
            run_bench(bench, tree, sizes, upstream_port)
        finally:
            rt.stop()
            procs.stop_all()
            log_file.close()
        problems = sum(line.count("Traceback") + line.count("Unhandled")
                       for line in (work / "proxy.log").read_text().splitlines())
        report = render(bench, list(probe.samples), list(spans), missing, header, command,
                        time.monotonic() - started)
        report += f"\nLines with \"Traceback\" or \"Unhandled\" in the proxy's log: {problems}.\n"
        sys.stdout.write(report)


if __name__ == "__main__":
    main()
