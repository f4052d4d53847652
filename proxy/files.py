"""The upstreams' files as the faces open them for one response: stored, or downloading.

A face names an item of an upstream; it gets a L{FileSource} to stream, the stored file (a hit)
or the one download of it, joined or started (a miss). What a response means to the cache is
done here and nowhere else: the files are held against eviction while they are read, a hit is
recorded, and the response's bytes and its use are counted once it is out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import Protocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from proxy.blobs import BlobStore
from proxy.busy import InUse
from proxy.coalesce import FollowedDownload
from proxy.catalogue import Item
from proxy.downloads import ItemFetcher
from proxy.health import UpstreamHealth
from proxy.index import CacheIndex, FileRecord
from proxy.lxd_fetch import ItemDownload
from proxy.metrics import NO_METRICS, Metrics
from proxy.peers import NODE_HEADER, NotCachedHere
from proxy.streaming import CompleteFile, FileSource

# How long a miss may wait for the upstream's response headers before the client gets its own
# 200 and headers anyway: long enough to turn the usual quick failures (404, 5xx, refused) into
# a precise status, far below the LXD client's 30 s header timeout.
UPSTREAM_START_GRACE_SECONDS = 5.0


@frozen
class Opened:
    """
    A file opened for a response.

    @ivar source: what to stream.
    @ivar hit: the file is stored (else it is downloading, or absent for a HEAD).
    @ivar last_modified: when it was stored, for a hit; now, otherwise.
    @ivar joined: a miss that follows a download already in flight (another client's).
    """

    source: FileSource
    hit: bool
    last_modified: float
    joined: bool = False


class Starting(Protocol):
    """A download that says when the upstream accepted it (a file's or an export's)."""

    @property
    def failure(self) -> Failure | None: ...

    @property
    def queued(self) -> bool:
        """Waiting for its upstream's turn: nothing asked of the upstream yet."""

    def when_streaming(self) -> "Deferred[None]": ...


class CacheFiles:
    """The stored and downloading files of every upstream, opened response by response."""

    def __init__(
        self,
        store: BlobStore,
        index: CacheIndex,
        fetcher: ItemFetcher,
        clock: IReactorTime,
        in_use: InUse | None = None,
        *,
        health: Mapping[str, UpstreamHealth] | None = None,
        metrics: Metrics = NO_METRICS,
        node_id: str = "",
    ) -> None:
        self._metrics = metrics
        # This process's id, on the answers to peers (proxy.peers).
        self.node_id = node_id
        # By upstream, the responses streaming a download now (read by the metrics at scrape).
        self.following: dict[str, int] = {}
        self._store = store
        self._index = index
        self._fetcher = fetcher
        self._clock = clock
        self._in_use = in_use if in_use is not None else InUse()
        self._health = dict(health or {})

    def stored(self, items: Iterable[Item]) -> bool:
        """Whether every one of C{items} is stored."""
        return all(self._store.exists(item.sha256) for item in items)

    def records(self, items: Iterable[Item]) -> list[FileRecord | None]:
        """The index record of each of C{items}; None for one not stored or without a hash."""
        return [self._index.get(item.sha256) if item.sha256 else None for item in items]

    def stored_file(self, item: Item) -> CompleteFile:
        """The stored file of C{item} (or where it would be: only its size is read for a HEAD)."""
        return CompleteFile(self._store.path_for(item.sha256), item.size)

    def stored_item(self, upstream: str, path: str) -> Item | None:
        """
        The file served at C{upstream}/C{path} as the index alone knows it (no catalogue is
        read, so nothing is asked of the upstream), or None when it is not stored.
        """
        record = self._index.find_path(upstream, path)
        if record is None or not self._store.exists(record.sha256):
            return None
        return Item(path, record.sha256, record.size, "", record.product, record.version)

    def not_here(self, upstream: str, path: str) -> NotCachedHere:
        """The answer to a peer's cached-only request for a file not stored (counted)."""
        self._metrics.peer_request(False)
        return NotCachedHere(
            f"{upstream}/{path} is not stored on this node (only-if-cached)",
            headers={NODE_HEADER: self.node_id.encode("ascii")},
        )

    @asynccontextmanager
    async def open(
        self, upstream: str, path: str, item: Item, *, sent: Callable[[], int], head: bool = False,
        cached_only: bool = False,
    ) -> AsyncIterator[Opened]:
        """
        Open the file of C{item}, served as C{upstream}/C{path}, for one response.

        A miss joins or starts its download, waiting for the upstream to accept it at most
        C{UPSTREAM_START_GRACE_SECONDS}; with C{head}, a miss starts none (a monitoring check
        must not cost gigabytes). Once the body is out, C{sent()} bytes are counted. With
        C{cached_only} (a peer's request, see L{proxy.peers}) a miss raises L{NotCachedHere}:
        it neither starts nor joins a download.

        @raise Unavailable: a miss while the upstream is offline.
        @raise ProxyError: the upstream refused the download at once (404, 5xx ...).
        """
        # A file being expired or evicted is gone once that is over: a miss.
        await self._in_use.settled([item.sha256])
        with self._in_use.holding(item.sha256):
            if cached_only and not self._store.exists(item.sha256):
                raise self.not_here(upstream, path)
            if self._store.exists(item.sha256):
                if cached_only:
                    self._metrics.peer_request(True)
                record = await self._record_hit(upstream, path, item)
                yield Opened(self.stored_file(item), hit=True, last_modified=record.stored_at)
                self._served(upstream, True, sent())
                return
            if head:
                health = self._health.get(upstream)
                if health is not None:
                    # Only whether a GET would be let through: a HEAD fetches nothing, so it
                    # must not take the probe and leave it unreported.
                    health.check(item.path, probe=False)
                yield Opened(self.stored_file(item), hit=False, last_modified=self._clock.seconds())
                return
            running = self._running()
            download = await self._join(upstream, item)
            with self._following(upstream):
                yield Opened(
                    download, hit=False, last_modified=self._clock.seconds(),
                    # A download another worker owns is joined too (proxy.coalesce).
                    joined=isinstance(download, FollowedDownload)
                    or any(job is _job_of(download) for job in running),
                )
            self._served(upstream, False, sent())
            # Counted once the body is out: the record exists only after the download committed.
            self._index.note_use(item.sha256)

    @asynccontextmanager
    async def open_image(
        self, upstream: str, files: Sequence[Item], *, sent: Callable[[], int]
    ) -> AsyncIterator[list[CompleteFile] | None]:
        """
        Hold the files of an image for one response: yield their stored files when every one
        is stored (a hit), else None (the caller streams the image's download). The response
        is counted once it is out.
        """
        # A placeholder file (an LXD upstream's image not exported yet) has no hash to hold.
        items = [item for item in files if item.sha256]
        await self._in_use.settled(item.sha256 for item in items)
        with ExitStack() as holds:
            for item in items:
                holds.enter_context(self._in_use.holding(item.sha256))
            hit = len(items) == len(files) and self.stored(items)
            if hit:
                for item in items:
                    await self._record_hit(upstream, item.path, item)
                yield [self.stored_file(item) for item in items]
            else:
                with self._following(upstream):
                    yield None
        self._served(upstream, hit, sent())
        if not hit:
            # Counted once the body is out: the records exist only after the commit.
            for item in items:
                self._index.note_use(item.sha256)

    def _served(self, upstream: str, hit: bool, nbytes: int) -> None:
        self._index.note_served(hit, nbytes)
        self._metrics.served(upstream, hit, nbytes)

    @contextmanager
    def _following(self, upstream: str) -> Iterator[None]:
        following = self.following
        following[upstream] = following.get(upstream, 0) + 1
        try:
            yield
        finally:
            following[upstream] -= 1

    async def source(self, upstream: str, item: Item) -> FileSource:
        """
        The stored file of C{item}, or its download joined or started once the upstream has
        accepted it (or the grace for that ran out): a part of an export being assembled.
        """
        if self._store.exists(item.sha256):
            return self.stored_file(item)
        return await self._join(upstream, item)

    def _running(self) -> list[object]:
        """The downloads in flight now, to tell a joined one from one a request starts."""
        return list(self._fetcher.in_flight().values())

    async def _join(self, upstream: str, item: Item) -> FileSource:
        download = self._fetcher.get(upstream, item)
        await await_start(download, self._clock)
        return download

    async def _record_hit(self, upstream: str, path: str, item: Item) -> FileRecord:
        """
        Count a use of the stored file of C{item}, reached as C{upstream}/C{path}.

        The use is counted in memory (written in batches by the usage flush); only a file
        reached by a new path, or stored without a record (as metadata), is written at once.
        """
        index = self._index
        record = index.get(item.sha256)
        if record is None or f"{upstream}/{path}" not in record.paths:
            now = self._clock.seconds()
            # One transaction looks again and writes: a record written meanwhile keeps its
            # paths and flags.
            record = await index.write(index.record_path, FileRecord(
                sha256=item.sha256, size=item.size, upstream=upstream,
                paths=(f"{upstream}/{path}",), product=item.product, version=item.version,
                stored_at=now, last_used_at=now, use_count=0, cached=True, auto_update=False,
            ), upstream, path)
        index.note_use(item.sha256)
        return record


def _job_of(download: FileSource) -> object:
    # A file of an LXD upstream follows its image's export, which is what is in flight.
    return download.export if isinstance(download, ItemDownload) else download


async def await_start(download: Starting, clock: IReactorTime) -> None:
    """
    Wait until the upstream accepted the download, at most C{UPSTREAM_START_GRACE_SECONDS}:
    a quick failure (404, 5xx, refused) is raised for a precise status; after the grace the
    client gets its headers anyway and follows the download.

    A download waiting for its upstream's turn is not waited for at all: its turn may be
    minutes away, and the client must have its headers long before its own timeout.
    """
    if download.queued:
        return
    started = download.when_streaming()
    timer = clock.callLater(UPSTREAM_START_GRACE_SECONDS, started.cancel)
    try:
        await started
    except Exception:
        if download.failure is not None:
            download.failure.raiseException()
        # The grace ran out: stream anyway, the download goes on.
    finally:
        if timer.active():
            timer.cancel()


__all__ = ["CacheFiles", "Opened", "Starting", "UPSTREAM_START_GRACE_SECONDS", "await_start"]
