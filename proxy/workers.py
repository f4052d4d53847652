# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes on one set of listening ports (C{[server] workers} above 1).

The process twistd runs (daemonised or not) is the supervisor: it holds the state lock,
sweeps and reconciles the cache directory once, binds every listening socket itself (one
per worker and address, with C{SO_REUSEPORT}, so that the kernel spreads the connections
over the workers) and hands them to N workers (C{python -m proxy.worker}, through
C{spawnProcess}'s C{childFDs}), which adopt them. Binding in the supervisor rather than in
each worker keeps port 0 and the port file meaning one port, a bind error one sentence at
start-up, and a dead worker's queued connections waiting for its restart (the supervisor
keeps its sockets open) rather than reset.

It restarts a worker that dies (at once the first time, then after a backoff doubling up
to L{MAX_RESTART_BACKOFF_SECONDS} while they keep dying young), stops them all on stop
(SIGTERM, L{WORKER_STOP_SECONDS}, then SIGKILL), serves the metrics listener with the
workers' counters summed (C{prometheus_client}'s multiprocess mode, in
C{<cache.dir>/metrics}) and their upstream health merged (L{proxy.health_share}, which it
also relays from each worker to the others), and publishes their log events in its own log.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, cast

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import CannotListenError, ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import Site

import lmdb

from proxy.blobs import BlobStore
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.exporter import MetricsListenService, exporter_site
from proxy.health import UpstreamHealth
from proxy.health_share import HEALTH_KEY, HealthExchange
from proxy.index import CacheIndex, IndexFormatError, reconcile
from proxy.listen import listen_handed
from proxy.metrics import StateCollector
from proxy.probes import Readiness, readiness
from proxy.service import ListenService
from proxy.statedir import StateLock

log = Logger()

# A worker stopped with SIGTERM has this long to finish (its downloads keep their bytes for
# the next one) before SIGKILL; the systemd unit allows 30 s for the whole stop.
WORKER_STOP_SECONDS = 15.0
# After SIGKILL, how long to wait for the kernel to report the worker gone.
WORKER_KILL_WAIT_SECONDS = 5.0
# A worker that lived less than this counts as a crash in a row; the wait before starting it
# again doubles from the second such death on, up to the maximum.
MIN_UPTIME_SECONDS = 10.0
FIRST_RESTART_BACKOFF_SECONDS = 1.0
MAX_RESTART_BACKOFF_SECONDS = 30.0
METRICS_DIR_NAME = "metrics"
# The first file descriptor of the handed sockets in a worker (0-2 are its standard streams).
FIRST_HANDED_FD = 3


def restart_delay(crashes: int) -> float:
    """The wait before starting a worker again after C{crashes} young deaths in a row."""
    if crashes <= 1:
        return 0.0
    return min(MAX_RESTART_BACKOFF_SECONDS, FIRST_RESTART_BACKOFF_SECONDS * 2 ** (crashes - 2))


class HandedPorts(ListenService):
    """
    The listening sockets of C{server.listen} and C{server.listen_plain}, bound here, one per
    worker and address with C{SO_REUSEPORT} (the kernel spreads connections over the
    workers; with one shared queue the first worker awake would take a whole burst), and
    never accepted from here. The port file and the start-up hints are written as by a
    single process. A dead worker's sockets stay open here: the connections queued on them
    wait for its restart rather than being reset.
    """

    def listenings(self) -> list[Deferred[IListeningPort]]:
        # The generated certificate is made once, here, not raced by N workers; the hints
        # need its fingerprint.
        self._load_certificate()
        server = self.config.server
        wanted = list(server.listen)
        if server.plain_http_files:
            wanted += list(server.listen_plain)
        self.handed: list[list[IListeningPort]] = []
        results: list[Deferred[IListeningPort]] = []
        for description in wanted:
            try:
                ports = listen_handed(self.reactor, description, server.workers)
            except CannotListenError as e:
                results.append(fail(e))
                continue
            self.handed.append(ports)
            results.append(succeed(ports[0]))
        return results

    def fds(self, slot: int) -> tuple[list[int], list[int]]:
        """The descriptors of worker C{slot}'s sockets: the TLS ports', the plain ones'."""
        mine = [cast(Any, ports[slot - 1]).fileno() for ports in self.handed]
        tls = len(self.config.server.listen)
        return mine[:tls], mine[tls:]

    def stopService(self) -> "Deferred[Any]":
        for ports in getattr(self, "handed", []):
            for port in ports[1:]:
                port.stopListening()
        self.handed = []
        return super().stopService()


class Worker(ProcessProtocol):
    """One worker process: its output published as log events, its end told to the supervisor."""

    def __init__(self, supervisor: "WorkerSupervisor", slot: int, started: float) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = started
        self.ready = False
        self.ended: Deferred[None] = Deferred()
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._buffers[childFD] = rest
        for line in lines:
            self._line(childFD, line.decode("utf-8", "replace"))

    def _line(self, fd: int, line: str) -> None:
        if not line.strip():
            return
        if fd == 1 and line.startswith("{"):
            try:
                event = eventFromJSON(line)
            except ValueError:
                event = None
            if event is not None and HEALTH_KEY in event:
                self.supervisor.health_report(self, event[HEALTH_KEY])
                return
            if event is not None:
                if event.get("worker_ready"):
                    self.ready = True
                # The format fields were flattened for the original format, not this one.
                event.pop("log_flattened", None)
                event["log_format"] = "{log_text}"
                event.setdefault("log_text", "")
                event["worker"] = self.slot
                event["log_system"] = f"worker {self.slot}"
                globalLogPublisher(event)
                return
        # Whatever else a worker prints (an interpreter's last words): shown as it is.
        log.warn("worker {slot}: {line}", slot=self.slot, line=line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in list(self._buffers.items()):
            if rest:
                self._line(fd, rest.decode("utf-8", "replace"))
        self._buffers = {}
        self.ready = False
        self.supervisor.ended(self, reason)
        if not self.ended.called:
            self.ended.callback(None)


class WorkerSupervisor(MultiService):
    """The twistd process when C{server.workers} is above 1; see the module docstring."""

    def __init__(self, config: Config, reactor: Any, config_path: str | None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.config_path = os.path.abspath(config_path) if config_path is not None else None
        self.lock = StateLock(config.cache.dir)
        self.root = FilePath(config.cache.dir)
        try:
            self.store = BlobStore(self.root)
            # Checked here, so that an unusable index stops start-up with one sentence.
            CacheIndex(self.root.child("index").path, reactor).close()
        except (OSError, lmdb.Error, IndexFormatError) as e:
            self.lock.release()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"cache.dir: cannot use {self.root.path}: {reason}") from None
        unused = Site(Resource())
        self.ports = HandedPorts(config, reactor, unused, plain_site=unused)
        self.ports.setServiceParent(self)
        self.metrics_dir = self.root.child(METRICS_DIR_NAME)
        # The proxy's upstream health: what the workers found, merged (proxy.health_share).
        self.health = HealthExchange({
            u.name: UpstreamHealth(u.name, reactor, forced_offline=u.offline)
            for u in config.upstreams
        })
        self.registry = CollectorRegistry()
        self.metrics_listener = MetricsListenService(
            config.metrics.listen, reactor, exporter_site(self.registry, self.readiness),
        )
        self.metrics_listener.setServiceParent(self)
        self.workers: dict[int, Worker] = {}
        self.index: CacheIndex | None = None
        self._crashes: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._stopping = False

    # -- start ---------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        self._prepare()
        super().privilegedStartService()

    def startService(self) -> None:
        self._prepare()
        super().startService()
        for slot in range(1, self.config.server.workers + 1):
            self._spawn(slot)

    _prepared = False

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        # twistd may have forked since __init__ (see CacheService.startService).
        self.lock.claim()
        # Kept open for the metrics' gauges of the cache (its kept totals, read at a scrape).
        index = self.index = CacheIndex(self.root.child("index").path, self.reactor)
        report = reconcile(index, self.store)
        files = index.file_count()
        log.info(
            "cache at {dir}: {files} files; start-up check removed {temp} temp files, "
            "{orphans} unrecorded blobs, {dangling} records without a blob; starting {workers} "
            "workers", dir=self.root.path, files=files, temp=report.temp_removed,
            orphans=report.orphan_blobs_removed, dangling=report.dangling_records_removed,
            workers=self.config.server.workers,
        )
        # The counters of the workers of an earlier run are not this run's.
        shutil.rmtree(self.metrics_dir.path, ignore_errors=True)
        self.metrics_dir.makedirs(ignoreExistingDirectory=True)
        if self.config.metrics.listen:
            # The workers' counters, summed; the cache's gauges from the shared index; the
            # upstreams' health as the workers found it; this process's own resources.
            # Downloads are each worker's.
            MultiProcessCollector(self.registry, path=self.metrics_dir.path)
            self.registry.register(StateCollector(
                self.reactor, index, self.health.health, {}, list, dict,
                self.config.cache.max_size,
            ))
            ProcessCollector(registry=self.registry)

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        if self._stopping:
            return
        tls, plain = self.ports.fds(slot)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        args = [sys.executable, "-m", "proxy.worker", "--slot", str(slot)]
        fd = FIRST_HANDED_FD
        for option, fds in (("--tls", tls), ("--plain", plain)):
            for handed in fds:
                child_fds[fd] = handed
                args += [option, str(fd)]
                fd += 1
        if self.config_path is not None:
            args += ["--config", self.config_path]
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir.path
        worker = Worker(self, slot, self.reactor.seconds())
        self.workers[slot] = worker
        process = self.reactor.spawnProcess(
            worker, sys.executable, args, env=env, path=os.getcwd(), childFDs=child_fds,
        )
        log.info("worker {slot} started (pid {pid})", slot=slot, pid=process.pid)
        if self.health.reports:
            # What the others found before it started; the pipe keeps it until it reads.
            process.write(self.health.line_for(slot))

    # -- upstream health -----------------------------------------------------------------

    def health_report(self, worker: Worker, verdicts: object) -> None:
        """Worker C{worker} found its upstreams so: tell every other worker (L{proxy.health_share})."""
        if self.workers.get(worker.slot) is not worker:
            return
        if not self.health.report(worker.slot, verdicts):
            log.warn("worker {slot} sent a health line that is not one", slot=worker.slot)
            return
        self._tell_workers(but=worker.slot)

    def _tell_workers(self, but: int | None = None) -> None:
        for slot, other in self.workers.items():
            if slot != but and other.transport is not None:
                try:
                    other.transport.write(self.health.line_for(slot))
                except (OSError, ProcessExitedAlready):
                    # Ending: its restart is told afresh.
                    pass

    # -- a worker ends -------------------------------------------------------------------

    def ended(self, worker: Worker, reason: Failure) -> None:
        pid = getattr(worker.transport, "pid", None)
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
            # Its outstanding probe ended with it.
            self.health.forget(worker.slot)
            if not self._stopping:
                self._tell_workers()
        if self._stopping:
            return
        lived = self.reactor.seconds() - worker.started
        crashes = self._crashes.get(worker.slot, 0) + 1 if lived < MIN_UPTIME_SECONDS else 1
        self._crashes[worker.slot] = crashes
        delay = restart_delay(crashes)
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        log.warn(
            "worker {slot} ended after {lived:.1f} s ({how}); starting it again in {delay:g} s",
            slot=worker.slot, lived=lived, how=how, delay=delay,
        )
        if pid is not None and self.config.metrics.listen:
            # Its counters stay in the sums; only its live gauges go.
            mark_process_dead(pid, self.metrics_dir.path)
        self._restarts[worker.slot] = self.reactor.callLater(delay, self._spawn, worker.slot)

    # -- stop ----------------------------------------------------------------------------

    def stopService(self) -> "Deferred[Any]":
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        d: Deferred[Any] = self._stop_workers()
        d.addBoth(lambda _: MultiService.stopService(self))
        d.addBoth(self._release)
        return d

    def _release(self, result: object) -> object:
        if self.index is not None:
            self.index.close()
        self.lock.release()
        return result

    def _stop_workers(self) -> "Deferred[Any]":
        running = list(self.workers.values())
        if not running:
            return succeed(None)
        for worker in running:
            self._signal(worker, "TERM")
        ended = DeferredList([w.ended for w in running])
        killer = self.reactor.callLater(WORKER_STOP_SECONDS, self._kill, running)

        def done(result: object) -> object:
            if killer.active():
                killer.cancel()
            return result

        return ended.addBoth(done)

    def _kill(self, workers: list[Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn(
                    "worker {slot} did not stop within {seconds:g} s: killing it",
                    slot=worker.slot, seconds=WORKER_STOP_SECONDS,
                )
                self._signal(worker, "KILL")
        # A process the kernel never reports gone must not hold up the stop for ever.
        for worker in workers:
            if not worker.ended.called:
                self.reactor.callLater(
                    WORKER_KILL_WAIT_SECONDS,
                    lambda w=worker: None if w.ended.called else w.ended.callback(None),
                )

    def _signal(self, worker: Worker, sig: str) -> None:
        try:
            cast(Any, worker.transport).signalProcess(sig)
        except ProcessExitedAlready:
            pass

    # -- what the metrics listener says ----------------------------------------------------

    def readiness(self) -> Readiness:
        """Ready once the ports listen and some worker serves them."""
        serving = any(w.ready for w in self.workers.values())
        return readiness(
            serving, bool(self.ports.ports) and serving,
            [u.name for u in self.config.upstreams], self.health.health,
        )

    def pids(self) -> dict[int, int]:
        """The pid of each running worker, by slot."""
        return {
            slot: cast(Any, w.transport).pid for slot, w in self.workers.items()
            if w.transport is not None
        }


__all__ = ["HandedPorts", "WorkerSupervisor", "restart_delay"]
