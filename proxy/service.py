"""Wiring: from a L{Config} to the running proxy service."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, cast

import lmdb
from cryptography.hazmat.primitives import serialization

from prometheus_client import ProcessCollector
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from proxy.addresses import advertised_host
from proxy.admission import (
    FDS_PER_CONNECTION,
    RESERVED_FDS,
    ConnectionCap,
    fitting_cap,
    raise_open_file_limit,
)
from proxy.blobs import BlobStore
from proxy.exporter import MetricsListenService, exporter_site
from proxy.metadata import INDEX_PATH
from proxy.plain import PlainRoot
from proxy.metrics import Metrics, StateCollector, face_of
from proxy.probes import Healthz, Readiness, Readyz, readiness
from proxy.client_setup import SETUP_PATH, base_url, pinned_pubkey, setup_line
from proxy.channel import HeadLimits, ProxySite
from proxy.client_networks import ClientNetworks, UpstreamAccess
from proxy.config import LXD, Config, read_pem_certificates
# FAMILIES is named here too, for code that wires the faces as the service does.
from proxy.core import CLOSE_TIMEOUT_SECONDS, FAMILIES as FAMILIES, build_core
from proxy.errors import ConfigError
from proxy.index import CacheIndex, IndexFormatError, reconcile
from proxy.listen import (
    ListeningService,
    SniffingFactory,
    adopt_port,
    listen_plain,
    listen_tls,
    sniffing_tls_factory,
)
from proxy.files import CacheFiles
from proxy.images import FaceCatalogue, ImageSource, LxdRemoteImages, SimplestreamsImages
from proxy.lxd_face import LxdApiResource, ServerCertificate
from proxy.lxd_remote import API_PATH
from proxy.simplestreams import RootResource, UpstreamResource
from proxy.via import ViaGuard
from proxy.coalesce import DownloadLocks
from proxy.leader import Leadership, WorkerRole
from proxy.statedir import HeldByParent, StateLock
from proxy.status import StatusSource
from proxy.status_page import STATUS_JSON_PATH, SetupScript, StatusJson, StatusPage
from proxy.urlimport import ImportResource
from proxy.work import Workers, collect_frozen
from proxy.tls import (
    certificate_fingerprint,
    ensure_server_certificate,
    server_tls_options,
)

log = Logger()

GC_INTERVAL_SECONDS = 3600.0
# The client commands the start-up hints are written for.
CLIENTS = ("lxc", "incus")


class CacheService(Service):
    """
    Owns the index, the blob store and the upstream client for the lifetime of the process.

    On start it reconciles the index with the disk (a crash may have left temp files, blobs
    without a record or records without a blob); on stop it writes pending usage and closes.
    """

    def __init__(self, config: Config, reactor: Any, *, worker: bool = False) -> None:
        self.config = config
        self.reactor = reactor
        # A worker's supervisor holds the lock, and has swept and reconciled (proxy.workers).
        self.worker = worker
        self.lock: StateLock | HeldByParent = HeldByParent() if worker else StateLock(
            config.cache.dir
        )
        root = FilePath(config.cache.dir)
        self.root = root
        try:
            self.store = BlobStore(root)
            # Opened here only to check it, so that an unusable index stops start-up with one
            # sentence; it is opened for good in startService, after twistd has forked into a
            # daemon (LMDB forbids using an environment across fork()).
            CacheIndex(root.child("index").path, reactor).close()
            self.index = CacheIndex(root.child("index").path, reactor, open_now=False)
        except (OSError, lmdb.Error, IndexFormatError) as e:
            self.lock.release()
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"cache.dir: cannot use {root.path}: {reason}") from None
        # Commits, parses, scans and index writes run on these threads, never on the reactor.
        self.workers, self._pools = Workers.threads(reactor)
        self.index.writer = self.workers.index
        # Nothing is counted unless someone can read it.
        self.metrics = Metrics(enabled=bool(config.metrics.listen))
        if self.metrics.enabled and not worker:
            ProcessCollector(registry=self.metrics.registry)
        # Several workers download each file once between them (proxy.coalesce).
        self.download_locks = DownloadLocks(self.store.temp_dir.path) if worker else None
        core = build_core(
            config, reactor, self.index, self.store, self.workers, metrics=self.metrics,
            locks=self.download_locks,
        )
        self.core = core
        # The parts by name, as the site and the tests reach them.
        self.client = core.client
        self.health = core.health
        self.in_use = core.in_use
        self.lifecycle = core.lifecycle
        self.fetcher = core.fetcher
        self.agents = core.agents
        self.metadata = core.metadata
        self.families = core.families
        self.remotes = core.remotes
        self.prefetcher = core.prefetcher
        # The plain-HTTP site (proxy.plain), built with the HTTPS one in site().
        self.plain_site: Site | None = None

    def busy(self) -> set[str]:
        """Files that may not be evicted now: being served or being downloaded."""
        return self.core.busy()

    def gc(self) -> "Deferred[object]":
        # Runs from a TimerService: a failure would stop it for good.
        return self.lifecycle.gc_later().addErrback(
            lambda f: log.failure("applying expiry and the size cap failed", f)
        )

    def startService(self) -> None:
        # twistd may have forked since __init__: the pid in the lock file is ours from now on,
        # and threads started before a fork would not exist in the daemon.
        self.lock.claim()
        self.index.open()
        for pool in self._pools:
            pool.start()
        if self.worker:
            # The partials an earlier run left, for the first request of each to continue.
            self.store.find_resumable()
            super().startService()
            return
        # Before anything is served, so on the reactor thread: a start-up of a large cache
        # takes as long as this scan.
        report = reconcile(self.index, self.store)
        log.info(
            "cache at {dir}: {files} files; start-up check removed {temp} temp files, "
            "{orphans} unrecorded blobs, {dangling} records without a blob",
            dir=self.root.path, files=self.index.file_count(),
            temp=report.temp_removed, orphans=report.orphan_blobs_removed,
            dangling=report.dangling_records_removed,
        )
        # So that an operator can tell the proxies of a tier, or a loop, apart (proxy.via).
        log.info("this proxy is {pseudonym} in Via headers", pseudonym=self.core.pseudonym)
        if self.store.resumable:
            log.info(
                "keeping {count} partial downloads ({size} bytes) for their next request to "
                "continue", count=len(self.store.resumable), size=self.store.resumable_bytes(),
            )
        super().startService()

    def flush_usage(self) -> "Deferred[object]":
        # A TimerService whose call fails stops for good: never let one bad flush end the loop.
        return self.index.flush_usage_later().addErrback(
            lambda f: log.failure("writing usage counters to the index failed", f)
        )

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        # Downloads in flight end now, keeping their bytes for the next run to continue.
        self.fetcher.stop()
        # An expiry or eviction under way waits for the reactor thread now and then: it ends
        # before the pools are joined (on this thread), or the join would wait for it forever.
        d = self.lifecycle.idle().addTimeout(CLOSE_TIMEOUT_SECONDS, self.reactor)
        d.addErrback(lambda _: None)
        d.addCallback(lambda _: self._stop_work())
        return d

    def _stop_work(self) -> "Deferred[None]":
        # The work queued (commits, index writes) ends before the index closes; the pending
        # uses are then written here, as the last write.
        for pool in self._pools:
            pool.stop()
        try:
            self.index.flush_usage()
        except Exception:
            log.failure("writing usage counters to the index failed")
        # The index closes once the upstream connections are closed (or given up on).
        d = self.core.close()

        def close(_: object) -> None:
            self.index.close()
            self.lock.release()

        d.addBoth(close)
        return d

    def site(
        self, certificate: ServerCertificate, ready: Callable[[], Readiness] | None = None
    ) -> Site:
        # The one way the faces reach the cache's files, side by side.
        files = CacheFiles(
            self.store, self.index, self.fetcher, self.reactor, self.in_use, health=self.health,
            metrics=self.metrics, node_id=self.core.node_id,
        )
        self.metrics.registry.register(StateCollector(
            self.reactor, self.index, self.health,
            {u.name: API_PATH if u.protocol == LXD else INDEX_PATH for u in self.config.upstreams},
            lambda: [job.upstream for job in self.fetcher.in_flight().values() if not job.queued],
            lambda: files.following,
            self.config.cache.max_size,
            mirrors=self.core.mirrors,
            queued=self.fetcher.queued,
        ))
        upstreams = {
            name: UpstreamResource(
                meta, files, self.store, self.reactor,
                families=self.families.get(name), agents=self.agents, disk=self.workers.disk,
            )
            for name, meta in self.metadata.items()
        }
        sources: dict[str, ImageSource] = {}
        for name, meta in self.metadata.items():
            remote = self.remotes.get(name)
            if remote is not None:
                sources[name] = LxdRemoteImages(
                    remote, self.fetcher, self.store, self.index, self.reactor
                )
            else:
                sources[name] = SimplestreamsImages(meta, files, families=self.families.get(name))
        listed = FaceCatalogue([sources[u.name] for u in self.config.lxd_api_upstreams()])
        access = UpstreamAccess.of({u.name: u.allow for u in self.config.upstreams})
        others = {
            "1.0": LxdApiResource(
                listed, files, self.reactor, certificate, agents=self.agents, access=access,
            ),
            "import": ImportResource(sources, self.reactor, access=access),
            "healthz": Healthz(),
            "readyz": Readyz(ready if ready is not None else self.readiness),
        }
        # The status page and the set-up script read the certificate once it is loaded.
        status = StatusSource(
            self.config, self.index, self.store, self.health, self.fetcher, self.in_use,
            self.reactor, self.workers.disk, lambda: (certificate.pem, certificate.fingerprint),
            via=lambda url: str(self.client.outbound_proxy(url) or ""),
            mirrors=self.core.mirrors, shared=self.download_locks,
        )
        others[STATUS_JSON_PATH] = StatusJson(status, self.config)
        others[SETUP_PATH] = SetupScript(status, self.config)
        banner = "lxd-image-proxy: a caching proxy for LXD and Incus images.\nUpstreams:\n" + "".join(
            f"  /{u.name}/ -> {', '.join(u.base_urls)}\n" for u in self.config.upstreams
        )
        metrics = self.metrics
        names = frozenset(upstreams)

        def observe(segment: str, request: Any) -> None:
            metrics.observe_request(face_of(segment, names), request)

        root = RootResource(
            upstreams, banner, others, observe=observe if metrics.enabled else None,
            page=StatusPage(status, self.config),
            clients=ClientNetworks.of(self.config.server.allow), access=access,
        )
        limits = HeadLimits.from_config(self.config.server)
        site = ProxySite(root, limits, self.reactor)
        site.displayTracebacks = False
        site.via = ViaGuard(self.core.pseudonym)
        # Plain HTTP: the same upstreams' image files, nothing else (proxy.plain).
        self.plain_site = ProxySite(PlainRoot(root), limits, self.reactor)
        self.plain_site.displayTracebacks = False
        self.plain_site.via = site.via
        return site

    def readiness(self, listening: bool = True) -> Readiness:
        """Whether this cache can serve (see L{proxy.probes}), given whether its port listens."""
        return readiness(
            self.index.is_open, listening, [u.name for u in self.config.upstreams], self.health
        )


class ListenService(ListeningService):
    """Listens with TLS on every configured address and tells the admin how to reach the proxy."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        site: Site,
        certificate: ServerCertificate | None = None,
        plain_site: Site | None = None,
        role: WorkerRole | None = None,
    ) -> None:
        super().__init__()
        # In a worker, the sockets the supervisor listens on, handed over (proxy.workers).
        self.role = role
        self.config = config
        self.reactor = reactor
        self.site = site
        # Serves image files over plain HTTP (proxy.plain), unless server.plain_http_files is off.
        self.plain_site = plain_site if config.server.plain_http_files else None
        self.certificate = certificate if certificate is not None else ServerCertificate()
        self.cert_path = ""
        # Shared by every listener; set when listening starts.
        self.cap: ConnectionCap | None = None

    def stopService(self) -> "Deferred[Any]":
        stopped = super().stopService()
        # Connections kept alive would go on sending requests to a cache that is closing.
        for site in (self.site, self.plain_site):
            if isinstance(site, ProxySite):
                site.stop_serving()
        return stopped

    def listenings(self) -> list[Deferred[IListeningPort]]:
        server = self.config.server
        options = self._load_certificate()
        self.cap = ConnectionCap(self._connection_cap(), self.reactor)
        plain = self.plain_site
        if self.role is not None:
            return self._adopt(self.role, options)
        listening = [
            listen_tls(self.reactor, desc, options, self.site, self.cap, plain)
            for desc in server.listen
        ]
        if plain is not None:
            listening += [
                listen_plain(self.reactor, desc, plain, self.cap) for desc in server.listen_plain
            ]
        elif server.listen_plain:
            log.warn("server.plain_http_files is false: server.listen_plain is not listened on")
        return listening

    def _load_certificate(self) -> Any:
        """The server's TLS options; the certificate is generated first if it is to be."""
        server = self.config.server
        state = FilePath(self.config.cache.dir)
        try:
            if server.tls_cert:
                cert_path, key_path = server.tls_cert, server.tls_key
            else:
                cert, key = ensure_server_certificate(state, server.tls_names)
                cert_path, key_path = cert.path, key.path
            options = server_tls_options(cert_path, key_path)
            # The leaf of the chain: what an LXD server reports as its own certificate.
            leaf = read_pem_certificates(cert_path, "server.tls_cert")[0]
        except (ConfigError, OSError) as e:
            raise SystemExit(f"lxd-image-proxy: cannot set up TLS: {e}")
        self.cert_path = cert_path
        self.certificate.pem = leaf.public_bytes(serialization.Encoding.PEM).decode("ascii")
        self.certificate.fingerprint = certificate_fingerprint(cert_path)
        return options

    def _adopt(
        self, role: WorkerRole, options: Any,
    ) -> list[Deferred[IListeningPort]]:
        ports: list[IListeningPort] = []
        plain = self.plain_site
        for fd in role.tls_fds:
            ports.append(adopt_port(
                self.reactor, fd, sniffing_tls_factory(options, self.site, self.reactor, self.cap, plain)
            ))
        if plain is not None:
            for fd in role.plain_fds:
                ports.append(adopt_port(
                    self.reactor, fd, SniffingFactory(None, self.reactor, self.cap, plain)
                ))
        return [succeed(port) for port in ports]

    def _connection_cap(self) -> int:
        limit = raise_open_file_limit()
        if limit.soft != limit.before:
            log.info(
                "open-file limit raised from {before} to {soft} (the hard limit is {hard})",
                before=limit.before, soft=limit.soft, hard=limit.hard,
            )
        configured = self.config.server.max_connections
        cap = fitting_cap(configured, limit.soft)
        if cap < configured:
            log.warn(
                "server.max_connections = {configured} does not fit in the open-file limit "
                "of {soft} ({per} per connection and {reserve} kept for the rest): at most "
                "{cap} client connections at once; raise the limit (LimitNOFILE= in the "
                "systemd unit, ulimit -n) to allow more",
                configured=configured, soft=limit.soft, per=FDS_PER_CONNECTION,
                reserve=RESERVED_FDS, cap=cap,
            )
        return cap

    def listened(self, ports: list[IListeningPort]) -> None:
        if self.role is not None:
            # The supervisor wrote the port file and the hints once for all workers.
            # worker_ready: how the supervisor learns that this worker serves.
            log.info(
                "worker {slot} serves the listening ports", slot=self.role.slot, worker_ready=True
            )
            return
        bound = [cast(IPv4Address | IPv6Address, port.getHost()).port for port in ports]
        tls, plain = bound[:len(self.config.server.listen)], bound[len(self.config.server.listen):]
        if self.plain_site is not None:
            log.info(
                "image files over plain HTTP (LXD's first attempt) on port(s) {ports}",
                ports=" ".join(str(p) for p in tls + plain),
            )
        self._announce(tls)

    def _announce(self, bound: list[int]) -> None:
        server = self.config.server
        if server.port_file:
            tmp = server.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(f"{p}\n" for p in bound))
            os.replace(tmp, server.port_file)
        log.info("listening with TLS on port(s) {ports}", ports=" ".join(str(p) for p in bound))
        # The first listener's address, as clients elsewhere can reach it.
        first = cast(IPv4Address | IPv6Address, self.ports[0].getHost())
        host = advertised_host(first.host, server.tls_names)
        fingerprint = self.certificate.fingerprint
        log.info(
            "server certificate {cert} (sha256 fingerprint {fingerprint}); a client needs it as "
            "servercerts/<remote>.crt in its config directory unless a CA it trusts signed it",
            cert=self.cert_path, fingerprint=fingerprint,
        )
        port = bound[0]
        listed = ", ".join(u.name for u in self.config.lxd_api_upstreams())
        # The same line for each client; an Incus host reads the LXD image API as its own.
        for client in CLIENTS:
            log.info(
                "LXD image API ({listed}): {client} remote add cache https://{host}:{port} "
                "--public --accept-certificate",
                listed=listed, client=client, host=host, port=port,
            )
        for upstream in self.config.upstreams:
            for client in CLIENTS:
                log.info(
                    "upstream {name} ({url}): {client} remote add {name} "
                    "https://{host}:{port}/{name} --protocol simplestreams",
                    name=upstream.name, url=upstream.url, client=client, host=host, port=port,
                )
        self._announce_setup(host, port)

    def _announce_setup(self, host: str, port: int) -> None:
        # Its own event beside the remote-add hints: the one line that does all of it.
        if not self.certificate.pem:
            return
        line = setup_line(
            base_url(host, port), pinned_pubkey(self.certificate.pem),
            [u.name for u in self.config.upstreams],
        )
        log.info(
            "client set-up, run on each LXD or Incus host (pins this certificate, adds the "
            "remotes; also on the status page {page}): {line}",
            page=base_url(host, port) + "/", line=line,
        )



class ProxyService(MultiService):
    """The whole proxy: the cache first, then the listeners, then the periodic tasks."""

    def __init__(self, config: Config, reactor: Any, role: WorkerRole | None = None) -> None:
        super().__init__()
        self.cache = CacheService(config, reactor, worker=role is not None)
        self.cache.setServiceParent(self)
        certificate = ServerCertificate()
        site = self.cache.site(certificate, self.readiness)
        self.listener = ListenService(
            config, reactor, site, certificate, self.cache.plain_site, role=role
        )
        self.listener.setServiceParent(self)
        # A worker's counters are summed and served by its supervisor (proxy.workers).
        self.metrics_listener = MetricsListenService(
            () if role is not None else config.metrics.listen, reactor,
            exporter_site(self.cache.metrics.registry, self.readiness),
        )
        self.metrics_listener.setServiceParent(self)
        # Each worker writes its own uses (one transaction adds them to what is stored).
        timer = TimerService(config.cache.usage_flush_interval, self.cache.flush_usage)
        timer.clock = reactor
        timer.setServiceParent(self)
        # The jobs on the whole cache run in one worker at a time (proxy.leader).
        jobs: MultiService = self
        if role is not None:
            jobs = self.leadership = Leadership(config.cache.dir, reactor)
            self.leadership.setServiceParent(self)
        # Expiry and the size cap: hourly is plenty for rules counted in days and bytes; a
        # commit makes room for itself at once.
        gc = TimerService(GC_INTERVAL_SECONDS, self.cache.gc)
        gc.clock = reactor
        gc.setServiceParent(jobs)
        # Parsed catalogues are frozen out of the cyclic collector's scans; once an hour one
        # full collection reclaims the cycles frozen with them (see collect_frozen).
        collect = TimerService(GC_INTERVAL_SECONDS, collect_frozen)
        collect.clock = reactor
        collect.setServiceParent(self)
        self.cache.prefetcher.setServiceParent(jobs)


    def readiness(self) -> Readiness:
        """Ready once the index is open and the HTTPS port listens (see L{proxy.probes})."""
        return self.cache.readiness(bool(self.listener.ports))


def build_service(config: Config, reactor: Any, role: WorkerRole | None = None) -> ProxyService:
    """The whole proxy in this process; with C{role}, as one worker of several (L{proxy.workers})."""
    return ProxyService(config, reactor, role)
