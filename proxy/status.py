# -*- test-case-name: tests.test_status -*-
"""What the status page and C{/status.json} show: one L{Status} snapshot of the running proxy.

L{StatusSource.snapshot} gathers it. What lives in memory (upstream health, downloads in
flight, usage counters) is read on the reactor; what needs the disk (free space, the catalogue
records, the stored images, which the admin command's L{proxy.inventory} finds by parsing the
stored catalogues) runs on the disk worker. The image list is the costly part, so it is kept for
C{IMAGES_MAX_AGE_SECONDS} and refreshed in the background while the last one is shown; every
list is bounded, so a snapshot stays small however large the cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy import __version__
from proxy.blobs import BlobStore
from proxy.busy import InUse
from proxy.client_networks import UpstreamAccess
from proxy.client_setup import base_url, pinned_pubkey, setup_line
from proxy.coalesce import DownloadLocks, SharedDownload
from proxy.config import Config
from proxy.downloads import ItemFetcher
from proxy.health import UpstreamHealth
from proxy.index import CacheIndex
from proxy.inventory import Cache, inventory
from proxy.mirrors import MirrorState, Mirrors
from proxy.work import Run, heavy

log = Logger()

# Enough for a page a person reads; C{lxd-image-proxy list} shows them all.
MAX_IMAGES_LISTED = 200
MAX_DOWNLOADS_LISTED = 100
# The stored images change when a download ends or an image expires: a list this old is
# shown while a fresh one is made on the disk worker.
IMAGES_MAX_AGE_SECONDS = 30.0


@frozen
class UpstreamState:
    """
    One upstream as the proxy sees it.

    @ivar offline_since: when its current outage began; None while online (or forced).
    @ivar reason: what failed, while offline.
    @ivar forced: offline by configuration.
    @ivar catalogue_checked_at: when its catalogue was last fetched or confirmed unchanged;
        None before the first time.
    @ivar via: the outbound proxy it is reached through (C{http://HOST:PORT}, never the
        credentials); C{""}: directly.
    @ivar mirrors: with C{urls = [...]}, each mirror and whether it is down; else empty.
    """

    name: str
    url: str
    protocol: str
    online: bool
    forced: bool
    offline_since: float | None
    reason: str
    catalogue_checked_at: float | None
    via: str = ""
    mirrors: tuple[MirrorState, ...] = ()


@frozen
class CacheUse:
    """
    The stored files against the limits: C{max_size} (None: no cap) on their bytes and
    C{min_free} on the file system's free bytes (C{free_bytes}, None when unknown).
    """

    used_bytes: int
    files: int
    pinned_files: int | None
    max_size: int | None
    min_free: int
    free_bytes: int | None
    disk_bytes: int | None


@frozen
class Usage:
    """Response counts since the cache was created; C{hit_ratio} None before the first."""

    hits: int
    misses: int
    hit_ratio: float | None
    bytes_from_cache: int
    bytes_from_upstream: int
    not_stored: int


@frozen
class DownloadState:
    """
    A download in flight: C{received} of C{size} bytes, C{followers} responses reading it
    now (0 for a prefetch nobody asked for yet); C{queued} while it waits for its upstream's
    turn (C{cache.upstream_concurrency}).
    """

    upstream: str
    subject: str
    received: int
    size: int
    followers: int
    background: bool
    queued: bool = False


@frozen
class ImageState:
    """A stored (or pinned) image, as C{lxd-image-proxy list} shows it."""

    upstream: str
    aliases: tuple[str, ...]
    fingerprint: str
    type: str
    architecture: str
    version: str
    size: int
    status: str
    uses: int
    last_used_at: float | None


@frozen
class ClientSetup:
    """
    How a host joins: C{line} to run on it, which fetches C{script_url} checking the
    certificate's key (C{pinned_pubkey}); C{fingerprint} is the certificate's sha256.
    """

    line: str
    proxy_url: str
    script_url: str
    fingerprint: str
    pinned_pubkey: str
    remotes: tuple[str, ...]


@frozen
class Status:
    """
    One snapshot of the proxy.

    @ivar images: at most C{MAX_IMAGES_LISTED}, pinned first, then the most recently used;
        C{images_total} counts them all, as found at C{images_as_of} (None: not yet looked).
    """

    version: str
    generated_at: float
    setup: ClientSetup | None
    upstreams: tuple[UpstreamState, ...]
    cache: CacheUse
    usage: Usage
    downloads: tuple[DownloadState, ...]
    downloads_total: int
    images: tuple[ImageState, ...]
    images_total: int
    images_as_of: float | None


def status_json(status: Status) -> dict[str, Any]:
    """C{status} as plain JSON-ready values (what C{/status.json} serves)."""
    return attrs.asdict(status)


@frozen
class _DiskFacts:
    free_bytes: int | None
    disk_bytes: int | None
    checked_at: dict[str, float]


@frozen
class _Images:
    listed: tuple[ImageState, ...]
    total: int
    pinned_files: int
    as_of: float


class StatusSource:
    """
    Makes L{Status} snapshots of one running proxy's parts.

    @param certificate: the PEM and sha256 fingerprint of the served certificate, read when a
        snapshot is made (the listener fills them in once it has loaded it); an empty PEM
        means no set-up line yet.
    """

    def __init__(
        self,
        config: Config,
        index: CacheIndex,
        store: BlobStore,
        health: Mapping[str, UpstreamHealth],
        fetcher: ItemFetcher,
        in_use: InUse,
        clock: IReactorTime,
        disk: Run,
        certificate: Callable[[], tuple[str, str]],
        via: Callable[[str], str] = lambda url: "",
        mirrors: Mapping[str, Mirrors] | None = None,
        shared: DownloadLocks | None = None,
    ) -> None:
        self._config = config
        # With several workers: the downloads the others own, from their lock files.
        self._shared = shared
        self._mirrors = dict(mirrors or {})
        self._index = index
        self._store = store
        self._health = dict(health)
        self._fetcher = fetcher
        self._in_use = in_use
        self._clock = clock
        self._disk = disk
        self._certificate = certificate
        self._via = via
        self._images: _Images | None = None
        self._refreshing: Deferred[Any] | None = None

    def certificate_pem(self) -> str:
        """The served certificate (the leaf), PEM; empty until the listener has loaded it."""
        return self._certificate()[0]

    def setup(self, host: str, port: int, client: str = "") -> ClientSetup | None:
        """
        The client set-up for hosts that reach the proxy as C{host}:C{port}; with C{client}
        (its address), only the remotes that client may use (C{[upstreams.NAME] allow}).
        """
        pem, fingerprint = self._certificate()
        if not pem:
            return None
        url = base_url(host, port)
        pin = pinned_pubkey(pem)
        access = UpstreamAccess.of({u.name: u.allow for u in self._config.upstreams})
        remotes = tuple(
            u.name for u in self._config.upstreams if not client or access.permits(u.name, client)
        )
        return ClientSetup(
            line=setup_line(url, pin, remotes), proxy_url=url, script_url=f"{url}/setup.sh",
            fingerprint=fingerprint, pinned_pubkey=pin, remotes=remotes,
        )

    async def snapshot(self, host: str, port: int, client: str = "") -> Status:
        """The proxy now, with the set-up line for C{host}:C{port} (and C{client}, as L{setup})."""
        facts = await self._disk(_disk_facts, self._index, self._config.cache.dir)
        images = await self._current_images()
        now = self._clock.seconds()
        stats = self._index.stats()
        answered = stats.hits + stats.misses
        cache = self._config.cache
        others = await self._disk(self._shared.listing) if self._shared is not None else []
        downloads = self._downloads(others)
        return Status(
            version=__version__,
            generated_at=now,
            setup=self.setup(host, port, client),
            upstreams=tuple(self._upstream(u.name, u.url, u.protocol, facts) for u in self._config.upstreams),
            cache=CacheUse(
                used_bytes=self._index.total_size(), files=self._index.file_count(),
                pinned_files=images.pinned_files if images is not None else None,
                max_size=cache.max_size, min_free=cache.min_free,
                free_bytes=facts.free_bytes, disk_bytes=facts.disk_bytes,
            ),
            usage=Usage(
                hits=stats.hits, misses=stats.misses,
                hit_ratio=stats.hits / answered if answered else None,
                bytes_from_cache=stats.bytes_from_cache,
                bytes_from_upstream=stats.bytes_from_upstream, not_stored=stats.not_stored,
            ),
            downloads=tuple(downloads[:MAX_DOWNLOADS_LISTED]),
            downloads_total=len(downloads),
            images=images.listed if images is not None else (),
            images_total=images.total if images is not None else 0,
            images_as_of=images.as_of if images is not None else None,
        )

    def _upstream(self, name: str, url: str, protocol: str, facts: _DiskFacts) -> UpstreamState:
        health = self._health.get(name)
        return UpstreamState(
            name=name, url=url, protocol=protocol,
            online=health is None or not health.offline,
            forced=health is not None and health.forced,
            offline_since=health.since if health is not None else None,
            reason=health.reason if health is not None else "",
            catalogue_checked_at=facts.checked_at.get(name), via=self._via(url),
            mirrors=self._mirrors[name].states() if name in self._mirrors else (),
        )

    def _downloads(self, others: Sequence[SharedDownload] = ()) -> list[DownloadState]:
        found = []
        jobs = self._fetcher.in_flight()
        for job in jobs.values():
            followers = max((self._in_use.holders(s) for s in job.busy()), default=0)
            found.append(DownloadState(
                upstream=job.upstream, subject=job.subject, received=job.received,
                size=job.size, followers=followers, background=job.background,
                queued=job.queued,
            ))
        for other in others:
            if other.sha256 in jobs:
                continue
            # Another worker's: its followers there are not known here; this one's are.
            found.append(DownloadState(
                upstream=other.upstream, subject=other.subject, received=other.received,
                size=other.size, followers=self._in_use.holders(other.sha256), background=False,
            ))
        # Those clients wait for first, then the biggest still to come.
        found.sort(key=lambda d: (d.background, -(d.size - d.received)))
        return found

    async def _current_images(self) -> _Images | None:
        images = self._images
        if images is not None and self._clock.seconds() - images.as_of < IMAGES_MAX_AGE_SECONDS:
            return images
        refreshing = self._refreshing
        if refreshing is None:
            refreshing = self._disk(heavy(_list_images), self._cache(), self._clock.seconds())
            self._refreshing = refreshing
            refreshing.addCallbacks(self._refreshed, self._refresh_failed)
        if images is not None:
            return images
        # The first snapshot waits for the list: there is none to show meanwhile. A waiter of
        # its own, so that a client going away cancels only its own wait.
        waiting: Deferred[None] = Deferred()
        refreshing.addBoth(lambda _: None if waiting.called else waiting.callback(None))
        await waiting
        return self._images

    def _refreshed(self, images: _Images) -> None:
        self._images = images
        self._refreshing = None

    def _refresh_failed(self, failure: Any) -> None:
        self._refreshing = None
        log.failure("listing the stored images for the status page failed", failure)

    def _cache(self) -> Cache:
        return Cache(self._config, self._index, self._store, self._clock)


def _disk_facts(index: CacheIndex, directory: str) -> _DiskFacts:
    try:
        fs = os.statvfs(directory)
        free: int | None = fs.f_bavail * fs.f_frsize
        total: int | None = fs.f_blocks * fs.f_frsize
    except OSError:
        free = total = None
    checked: dict[str, float] = {}
    for record in index.metadata_records():
        # Another family's copies ("@incus/...") say nothing more about the upstream.
        if record.path.startswith("@"):
            continue
        checked[record.upstream] = max(checked.get(record.upstream, 0.0), record.checked_at)
    return _DiskFacts(free, total, checked)


def _list_images(cache: Cache, now: float) -> _Images:
    entries = [e for e in inventory(cache).entries if e.kind == "image"]
    # Pinned first (what the admin chose to keep), then by last use.
    entries.sort(key=lambda e: (not e.pins and e.status != "pinned", -(e.last_used_at or 0.0)))
    pinned_files = sum(1 for r in cache.index.records() if not r.cached)
    listed = tuple(
        ImageState(
            upstream=e.upstream, aliases=e.aliases, fingerprint=e.fingerprint, type=e.type,
            architecture=e.architecture, version=e.version, size=e.size, status=e.status,
            uses=e.uses, last_used_at=e.last_used_at,
        )
        for e in entries[:MAX_IMAGES_LISTED]
    )
    return _Images(listed, len(entries), pinned_files, now)


__all__ = [
    "ClientSetup",
    "CacheUse",
    "DownloadState",
    "ImageState",
    "IMAGES_MAX_AGE_SECONDS",
    "MAX_DOWNLOADS_LISTED",
    "MAX_IMAGES_LISTED",
    "Status",
    "StatusSource",
    "UpstreamState",
    "Usage",
    "status_json",
]
