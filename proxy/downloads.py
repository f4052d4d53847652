"""The download engine: one upstream download per file or image, however many clients wait for it.

L{Fetcher} serves every upstream: a file of a simplestreams upstream (a L{Download}) and the
export of an LXD upstream's image (an L{ExportDownload}, also behind each of its listed files)
are two kinds of one job (L{proxy.fetch.Job}), which differ in how their body is received and
what it must turn out to be. The rest is done here, once, for both:

  - one table of the downloads in flight, by the sha256 of a file or the fingerprint of an
    image, so that a second client joins the first's download;
  - one verdict on the upstream's health per answer (a failure before the answer is the
    upstream's, one after it the file's, see L{proxy.health}), and one count of the bytes
    fetched;
  - one commit path: verified bytes, then room, then the fsync and link on the disk worker,
    then the index records, then the followers told; a file is in the index only once its bytes
    and its directory entry are durable;
  - one rule when there is no room: the clients get their bytes, the cache does not keep them;
    and one when there is not even room to receive them: the clients get a 507 before any
    header, and the upstream is not asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from proxy.blobs import BlobStore, PartialBlob
from proxy.catalogue import Item
from proxy.config import LXD, UpstreamConfig
from proxy.download_slots import DownloadSlots, Slot
from proxy.errors import (
    InsufficientStorage,
    NotFound,
    ProxyError,
    UpstreamFailed,
    VerificationFailed,
)
from proxy.fetch import DEFAULT_IDLE_TIMEOUT_SECONDS, Download, FetchedItem, Job, Verified
from proxy.health import FileFailures, UpstreamHealth
from proxy.index import CacheIndex, FileRecord
from proxy.lxd_fetch import ExportDownload, ItemDownload, listed_file
from proxy.lxd_remote import RemoteImage
from proxy.metrics import NO_METRICS, Metrics
from proxy.upstream import UpstreamClient, as_proxy_error, receive_body
from proxy.work import Run, inline

J = TypeVar("J", Download, ExportDownload)


class Fetcher:
    """
    Starts at most one download per file or image and commits verified files into the cache.

    It knows every upstream's URL and protocol from the configuration: C{get} of an item of an
    LXD upstream joins the export of the item's image. A download runs to its end even when
    every client that asked for it has gone: the bytes are wanted by the next client, and the
    idle timeout bounds a stalled upstream.
    """

    log = Logger()

    def __init__(
        self,
        client: UpstreamClient,
        store: BlobStore,
        index: CacheIndex,
        clock: IReactorTime,
        upstreams: Iterable[UpstreamConfig],
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
        *,
        make_room: Callable[[int], "bool | Deferred[bool]"] | None = None,
        room_to_receive: Callable[[int], "Deferred[bool]"] | None = None,
        health: Mapping[str, UpstreamHealth] | None = None,
        disk: Run = inline,
        settled: Callable[[Iterable[str]], Awaitable[None]] | None = None,
        writeback: Run | None = None,
        metrics: Metrics = NO_METRICS,
        slots: DownloadSlots | None = None,
    ) -> None:
        self._client = client
        # At most so many downloads per upstream run at once (none: no limit).
        self._slots = slots if slots is not None else DownloadSlots()
        self._metrics = metrics
        # Where a download's bytes are synced while they arrive (see PartialBlob.writeback).
        self._writeback = writeback if writeback is not None else disk
        # Waits while files are being expired or evicted: one is not stored again until it is gone.
        self._settled = settled
        self._disk = disk
        self._store = store
        self._index = index
        self._clock = clock
        self._upstreams = {u.name: u for u in upstreams}
        self._idle_timeout = idle_timeout
        self._make_room = make_room
        self._room_to_receive = room_to_receive
        self._health = dict(health or {})
        self._file_failures = FileFailures(clock)
        # By kind as well as key: a unified image's fingerprint is the sha256 of its one file,
        # which a simplestreams upstream may list too; each kind has its own followers.
        self._inflight: dict[tuple[type[Job], str], Job] = {}
        # The slot of each download in flight, running or queued.
        self._places: dict[tuple[type[Job], str], Slot] = {}

    def in_flight(self) -> dict[str, Job]:
        """The downloads running, by the sha256 of a file or the fingerprint of an image."""
        return {key: job for (_, key), job in self._inflight.items()}

    def busy(self) -> set[str]:
        """The sha256 of every file a running download will store, where known."""
        found: set[str] = set()
        for job in self._inflight.values():
            found.update(job.busy())
        return found

    def client_downloads(self) -> int:
        """How many downloads in flight some client is waiting for (prefetches go after these)."""
        return sum(1 for job in self._inflight.values() if not job.background)

    def get(self, upstream: str, item: Item, *, background: bool = False) -> FetchedItem:
        """
        Return the running download of C{item} of C{upstream}, or start one: the file itself
        from a simplestreams upstream, the export of its image from an LXD upstream.

        @raise NotFound: an item of an LXD upstream that is not a file of one of its images,
            or whose image is split and its files are not known (they are listed only once
            they are).
        @raise Unavailable: the upstream is offline and another request is probing it.
        @raise ProxyError: the file keeps failing and is backed off (its last error, with
            C{Retry-After}).
        """
        config = self._upstreams[upstream]
        if config.protocol == LXD:
            image, role = listed_file(self._index, upstream, item)
            export = self._export(
                upstream, image, background, product=item.product, version=item.version
            )
            return ItemDownload(export, item, role)
        return self._start(
            Download, upstream, item.sha256, item.path, background,
            lambda: Download(upstream, f"{config.url}/{item.path}", item, self._new_partial()),
        )

    def get_image(
        self, upstream: str, image: RemoteImage, *, background: bool = False,
    ) -> ExportDownload:
        """
        Return the running export download of C{image} from the LXD upstream C{upstream}, or
        start one.

        @raise Unavailable: as L{get}.
        """
        return self._export(upstream, image, background)

    def _export(
        self, upstream: str, image: RemoteImage, background: bool, *, product: str = "",
        version: str = "",
    ) -> ExportDownload:
        config = self._upstreams[upstream]
        if config.protocol != LXD:
            raise NotFound(f"{upstream}: not an LXD server, it exports no image")
        return self._start(
            ExportDownload, upstream, image.fingerprint, f"image {image.fingerprint}", background,
            lambda: ExportDownload.new(
                upstream, config.url, image, self._index.get_parts(image.fingerprint),
                self._new_partial, product=product, version=version,
            ),
        )

    def _new_partial(self) -> PartialBlob:
        partial = self._store.new_partial()
        partial.writeback = self._writeback
        return partial

    def _start(
        self, kind: type[J], upstream: str, key: str, subject: str, background: bool,
        make: Callable[[], J],
    ) -> J:
        running = self._inflight.get((kind, key))
        if running is not None:
            assert isinstance(running, kind)
            if not background:
                running.background = False
                place = self._places.get((kind, key))
                if place is not None:
                    self._slots.promote(place)
            self._metrics.download_joined(upstream)
            return running
        self._file_failures.check((kind, key))
        health = self._health.get(upstream)
        if health is not None:
            health.check(subject, background=background)
        try:
            job = make()
        except BaseException:
            if health is not None:
                health.end_probe(f"the download of {subject} could not start")
            raise
        job.background = background
        self._inflight[(kind, key)] = job
        self._metrics.download_started(upstream, background)
        Deferred.fromCoroutine(self._run(kind, job))
        return job

    # -- one download, start to end -------------------------------------------------------------

    async def _run(self, kind: type[Job], job: Job) -> None:
        # Held from before the first request to the end, retries included.
        slot = self._places[(kind, job.key)] = self._slots.take(
            job.upstream, background=job.background
        )
        answered = False
        try:
            await self._turn(job, slot)
            if self._room_to_receive is not None and job.size > 0:
                if not await self._room_to_receive(job.size):
                    health = self._health.get(job.upstream)
                    if health is not None:
                        health.end_probe(f"no room to receive {job.subject}")
                    raise InsufficientStorage(
                        f"no room on the cache's file system to receive {job.subject} "
                        f"({job.size} bytes), even after evicting what may go"
                    )
            response = await self._ask(job)
            answered = True
            await self._take(job, response)
        except Exception as e:
            error = as_proxy_error(Failure(e), job.transfer_subject)
            # Before an answer, a connection, TLS or timeout failure is the upstream's (its
            # health has it); anything after, or a refused redirect, is this file's alone.
            if answered or (isinstance(e, ProxyError) and not isinstance(e, InsufficientStorage)):
                self._file_failures.failed((kind, job.key), error, job.url)
            self.log.warn(
                "download of {url} failed, nothing cached: {reason}", url=job.url, reason=error.message,
            )
            if not job.finished:
                job.fail(Failure(error))
            self._metrics.download_failed(job.upstream, isinstance(e, VerificationFailed))
        else:
            self._file_failures.succeeded((kind, job.key))
        finally:
            self._places.pop((kind, job.key), None)
            self._inflight.pop((kind, job.key), None)
            self._index.note_fetched(job.received)
            self._metrics.upstream_received(job.upstream, "file", job.received)
            # Last: the next download may start (and run some way) within this call.
            self._slots.release(slot)

    async def _turn(self, job: Job, slot: Slot) -> None:
        """Wait for C{job}'s turn among its upstream's downloads; its clients have headers meanwhile."""
        if not slot.queued:
            return
        job.queued = True
        self.log.info(
            "{url} waits for one of the {upstream} downloads running to end", url=job.url,
            upstream=job.upstream,
        )
        try:
            await slot.granted
        finally:
            job.queued = False

    def queued(self) -> dict[str, int]:
        """By upstream, the downloads in flight waiting for their turn."""
        return self._slots.queued()

    async def _ask(self, job: Job) -> IResponse:
        """Send the request for C{job}; whether the upstream answered is its health's to know."""
        health = self._health.get(job.upstream)
        self.log.info("fetching {url} ({size} bytes)", url=job.url, size=job.size)
        try:
            response: IResponse = await self._client.get(job.url)
        except Exception as e:
            self._metrics.upstream_answer(job.upstream, "file", None)
            if health is not None:
                health.record_error(e, job.url)
            raise
        self._metrics.upstream_answer(job.upstream, "file", response.code)
        if health is not None:
            health.record_file_answer(response.code, job.url)
        return response

    async def _take(self, job: Job, response: IResponse) -> None:
        """Receive the body of C{job}'s answer and commit it, or fail with the reason."""
        if response.code != 200:
            reason = await job.error_text(response, self._receive)
            said = f": {reason}" if reason else ""
            if response.code == 404:
                raise NotFound(f"upstream has no {job.subject} (404{said})")
            raise UpstreamFailed(f"upstream answered {response.code} for {job.subject}{said}")
        await job.receive(response, self._receive)
        await self._commit(job, job.verified())

    def _receive(
        self, response: IResponse, sink: Callable[[bytes], None], limit: int,
    ) -> "Deferred[int]":
        return receive_body(
            response, sink, limit=limit, clock=self._clock, idle_timeout=self._idle_timeout
        )

    async def _commit(self, job: Job, verified: Verified) -> None:
        index = self._index
        if self._settled is not None:
            await self._settled(f.sha256 for f in verified.files)
        # A record already counts the bytes of a file stored meanwhile (another upstream, another
        # process): committing it adds nothing, so nothing need be evicted for it.
        new = {f.sha256: f.size for f in verified.files if index.get(f.sha256) is None}
        needed = sum(new.values())
        if verified.parts is not None:
            # Learnt whether or not the files are kept: the image can be listed from now on.
            await index.write(index.put_parts, verified.parts)
        if needed and self._make_room is not None and not await maybeDeferred(self._make_room, needed):
            # No room even after evicting what may go: the clients have their bytes (each
            # follower holds its file open), the cache does not keep them.
            index.note_not_stored()
            self._metrics.download_not_stored(job.upstream, needed)
            self.log.warn(
                "not storing {url} ({size} bytes): no room within the cache's limits (the line "
                "before says which); its clients get it all the same", url=job.url, size=needed,
            )
            job.committed(verified, [f.partial.path for f in verified.files], stored=False)
            # Deleted on the next turn rather than now: get() may have handed this download to
            # a client that has not opened its file yet (when the upstream answered within
            # get() itself), and every client opens it before the reactor runs again.
            for partial in job.partials:
                self._clock.callLater(0, self._disk, partial.discard)
            return
        # The fsyncs run on a worker; meanwhile a follower may still open the temp names, which
        # stay until the followers are told the blobs'.
        committed = [
            await self._disk(f.partial.commit, f.sha256, keep_temp=True) for f in verified.files
        ]
        now = self._clock.seconds()
        for f in verified.files:
            # One transaction looks and writes: the files are durable only now, and a record
            # made meanwhile (another path, another process, a pin) keeps its paths and flags.
            await index.write(index.record_path, FileRecord(
                sha256=f.sha256, size=f.size, upstream=job.upstream,
                paths=(f"{job.upstream}/{f.path}",), product=f.product, version=f.version,
                stored_at=now, last_used_at=now, use_count=0, cached=True, auto_update=False,
            ), job.upstream, f.path)
        self.log.info(
            "cached {url} as {files}", url=job.url,
            files=" and ".join(f"sha256:{f.sha256}" for f in verified.files),
        )
        job.committed(verified, committed, stored=True)
        for path, f in zip(committed, verified.files):
            self._disk(f.partial.release_temp).addErrback(self._temp_left, path.path)

    def _temp_left(self, failure: Failure, path: str) -> None:
        self.log.failure("removing the temp name of {path}", failure, path=path)


class ItemFetcher(Protocol):
    """Starts or joins the one download of a catalogue file (L{Fetcher}, or a test's double)."""

    def get(self, upstream: str, item: Item, *, background: bool = False) -> FetchedItem: ...

    def client_downloads(self) -> int: ...

    def in_flight(self) -> Mapping[str, Any]: ...


__all__ = ["Fetcher", "ItemFetcher"]
