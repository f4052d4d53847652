# -*- test-case-name: tests.test_process,tests.test_cli -*-
"""The cache's working parts, wired once: for the server and for the admin command.

L{build_core} makes, from a configuration, an open index and a blob store, everything that
fetches into and looks after the cache: the upstream client, the health of each upstream, the
one download engine, the catalogues, the lifecycle and the prefetcher. It starts nothing:
no state lock, no listener, no timer, no start-up reconcile. L{proxy.service.CacheService}
adds those for the server; C{lxd-image-proxy prefetch} uses a core as it is, beside a server
that may be running on the same cache (so it must never reconcile: that would delete the
server's temp files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList

from proxy.agents import ClientAgents
from proxy.blobs import BlobStore
from proxy.busy import InUse
from proxy.catalogue import Family
from proxy.config import LXD, Config
from proxy.coalesce import DownloadLocks
from proxy.download_slots import DownloadSlots
from proxy.downloads import Fetcher
from proxy.health import UpstreamHealth
from proxy.index import CacheIndex
from proxy.lifecycle import CacheLifecycle
from proxy.lxd_remote import LxdRemote
from proxy.metadata import SimplestreamsMetadata, UpstreamMetadata
from proxy.metrics import NO_METRICS, Metrics
from proxy.outbound import proxy_routes
from proxy.mirrors import Mirrors
from proxy.peers import PEER_WAIT_SECONDS, Peers, new_node_id
from proxy.prefetch import PinnedPartsLearner, Prefetcher
from proxy.tls import upstream_tls_policy
from proxy.upstream import UpstreamClient, origin_of
from proxy.via import instance_pseudonym
from proxy.work import Workers

CLOSE_TIMEOUT_SECONDS = 2.0
FAMILIES: tuple[Family, ...] = ("lxd", "incus")


@define
class CacheCore:
    """
    The cache's working parts (see the module docstring); made by L{build_core}.

    @ivar health: by upstream; empty when the core watches no upstream's health.
    @ivar metadata: every upstream's catalogue as an LXD client sees it: what the prefetcher
        and the admin command read.
    @ivar families: a simplestreams upstream's catalogue per client family.
    @ivar remotes: the LXD-server upstreams.
    """

    config: Config
    reactor: Any
    index: CacheIndex
    store: BlobStore
    client: UpstreamClient
    health: dict[str, UpstreamHealth]
    in_use: InUse
    lifecycle: CacheLifecycle
    fetcher: Fetcher
    agents: ClientAgents
    metadata: dict[str, SimplestreamsMetadata]
    families: dict[str, dict[Family, UpstreamMetadata]]
    remotes: dict[str, LxdRemote]
    prefetcher: Prefetcher
    metrics: Metrics
    # The upstreams with several base URLs (C{urls = [...]}).
    mirrors: dict[str, Mirrors] = field(factory=dict)
    # What this proxy's Via entries name (proxy.via); one per state directory.
    pseudonym: str = ""
    # This process's id among the pool's nodes, and its peers' client ([cluster] peers).
    node_id: str = field(factory=new_node_id)
    peer_client: UpstreamClient | None = None

    def busy(self) -> set[str]:
        """Files that may not be evicted now: being served or being downloaded."""
        return self.in_use.current() | self.fetcher.busy()

    def close(self) -> "Deferred[None]":
        """
        Close the idle upstream connections; fires when done, or after
        C{CLOSE_TIMEOUT_SECONDS}, and never fails.
        """
        # Closing waits for the peers' TLS goodbye; a peer that never answers must not hold
        # up a shutdown.
        closing = [self.client.close()]
        if self.peer_client is not None:
            closing.append(self.peer_client.close())
        d = DeferredList(closing).addTimeout(CLOSE_TIMEOUT_SECONDS, self.reactor)
        return d.addBoth(lambda _: None)


def build_core(
    config: Config,
    reactor: Any,
    index: CacheIndex,
    store: BlobStore,
    workers: Workers,
    *,
    watch_health: bool = True,
    metrics: Metrics = NO_METRICS,
    environ: Mapping[str, str] | None = None,
    locks: DownloadLocks | None = None,
) -> CacheCore:
    """
    Wire the cache's parts for C{config}, over C{index} and C{store}.

    @param workers: where blocking work runs (the server's threads, or L{proxy.work.INLINE}).
    @param metrics: what the parts count into (the server's, when its metrics are on).
    @param watch_health: mark an upstream offline after a failure and fail its requests fast
        until a probe finds it back (the server). Without, every request is tried (the admin
        command: one run, whose every failure is reported as it comes).
    @param environ: where C{HTTPS_PROXY} and the like are read (default: the process's).
    @raise ConfigError: the environment names a proxy that is not an http:// URL, or
        upstreams on one host and port would use different proxies.
    """
    # Every mirror of an upstream is one of its origins, with the upstream's TLS policy.
    policies = {
        u.name: (u.base_urls, upstream_tls_policy(u.ca_file or None)) for u in config.upstreams
    }
    # Per origin: an upstream with several URLs gives one entry per URL.
    proxies = proxy_routes(
        ((u.name, url, origin_of(url), u.proxy) for u in config.upstreams for url in u.base_urls),
        config.server.upstream_proxy, os.environ if environ is None else environ,
    )
    client = UpstreamClient.for_upstreams(
        reactor, policies, upstream_tls_policy(None),
        connect_timeout=config.cache.connect_timeout,
        header_timeout=config.cache.download_idle_timeout, proxies=proxies,
    )
    pseudonym = instance_pseudonym(config.cache.dir)
    client.use_pseudonym(pseudonym)
    health = {
        u.name: UpstreamHealth(u.name, reactor, forced_offline=u.offline) for u in config.upstreams
    } if watch_health else {}
    disk = workers.disk
    in_use = InUse()
    mirrors = {
        u.name: Mirrors(u.name, u.base_urls, reactor) for u in config.upstreams if len(u.base_urls) > 1
    }

    def busy() -> set[str]:
        return in_use.current() | fetcher.busy()

    # The pool's other nodes: a client of their own, allowed to reach them and nothing else.
    node_id = new_node_id()
    peers: Peers | None = None
    peer_client: UpstreamClient | None = None
    if config.cluster.peers:
        peer_client = UpstreamClient.for_upstreams(
            reactor, {"peers": (config.cluster.peers, upstream_tls_policy(config.cluster.ca_file or None))},
            upstream_tls_policy(None), connect_timeout=PEER_WAIT_SECONDS,
            header_timeout=PEER_WAIT_SECONDS,
        )
        peers = Peers(config.cluster.peers, peer_client.get, reactor, node_id)

    lifecycle = CacheLifecycle(
        index, store, config.cache, reactor, busy, work=disk, in_use=in_use,
        reactor=reactor if workers.threaded else None, metrics=metrics,
    )
    # One engine for every upstream: files of simplestreams upstreams, exports of LXD ones.
    fetcher = Fetcher(
        client, store, index, reactor, config.upstreams, config.cache.download_idle_timeout,
        make_room=lifecycle.make_room_later, room_to_receive=lifecycle.room_to_receive_later,
        health=health, disk=disk, settled=in_use.settled,
        writeback=workers.writeback, metrics=metrics, mirrors=mirrors,
        slots=DownloadSlots({u.name: config.upstream_concurrency(u.name) for u in config.upstreams}),
        peers=peers, locks=locks,
    )
    agents = ClientAgents()
    metadata: dict[str, SimplestreamsMetadata] = {}
    families: dict[str, dict[Family, UpstreamMetadata]] = {}
    remotes: dict[str, LxdRemote] = {}
    for u in config.upstreams:
        if u.protocol == LXD:
            remote = LxdRemote(
                u.name, u.url, client, store, index, reactor,
                ttl=config.cache.metadata_ttl, idle_timeout=config.cache.download_idle_timeout,
                health=health.get(u.name), families=FAMILIES, disk=disk, metrics=metrics,
            )
            remotes[u.name] = remote
            metadata[u.name] = remote
        else:
            # One catalogue per client family (an upstream may answer them differently);
            # the LXD one is also what the prefetcher and the admin command read.
            by_family = {
                family: UpstreamMetadata(
                    u.name, u.url, client, store, index, reactor,
                    ttl=config.cache.metadata_ttl,
                    idle_timeout=config.cache.download_idle_timeout,
                    health=health.get(u.name), family=family, agents=agents, disk=disk,
                    metrics=metrics, mirrors=mirrors.get(u.name),
                )
                for family in FAMILIES
            }
            families[u.name] = by_family
            metadata[u.name] = by_family["lxd"]
    learner = PinnedPartsLearner(remotes, fetcher)
    prefetcher = Prefetcher(
        config, metadata, fetcher, index, reactor, discover=learner.learn, disk=disk,
        metrics=metrics,
    )
    return CacheCore(
        config=config, reactor=reactor, index=index, store=store, client=client, health=health,
        in_use=in_use, lifecycle=lifecycle, fetcher=fetcher, agents=agents, metadata=metadata,
        families=families, remotes=remotes, prefetcher=prefetcher, metrics=metrics,
        mirrors=mirrors, pseudonym=pseudonym, node_id=node_id, peer_client=peer_client,
    )


__all__ = ["CLOSE_TIMEOUT_SECONDS", "FAMILIES", "CacheCore", "build_core"]
