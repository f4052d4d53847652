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
  - one retry rule: a download of one file whose body breaks off (reset, early close, a stall
    past the idle timeout) continues from the bytes on disk with C{Range} and C{If-Range}
    (L{Fetcher._transfer}), as long as its attempts make progress; its followers see a pause;
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
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from proxy.blobs import (
    MAX_RESUMABLE,
    RESUME_SUFFIX,
    TEMP_SUFFIX,
    BlobStore,
    PartialBlob,
    Resumable,
)
from proxy.coalesce import DownloadLocks, FollowedDownload
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
from proxy.mirrors import Mirrors, base_of
from proxy.peers import Peers
from proxy.upstream import (
    BodyBroken,
    BodyReceiver,
    BodyStalled,
    UpstreamClient,
    UpstreamServerError,
    as_proxy_error,
)
from proxy.work import Run, inline

J = TypeVar("J", Download, ExportDownload)

# A download that breaks off is resumed this many times in a row without a byte of progress
# before it fails; any progress starts the count again.
RESUME_ATTEMPTS = 5
# The wait before the Nth attempt in a row without progress: short, since its followers wait
# (an attempt that made progress is retried at once).
RESUME_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0)
# However much progress each makes, a download is given up after this many attempts.
MAX_ATTEMPTS = 100
# Nor are its followers kept waiting longer than this many idle timeouts without a byte: a
# stall and one resume that gets no answer, rather than five attempts of an idle timeout each
# (LXD clients have no body timeout: an admin watches a launch that does not move).
IDLE_TIMEOUTS_WITHOUT_PROGRESS = 2


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
        mirrors: Mapping[str, Mirrors] | None = None,
        slots: DownloadSlots | None = None,
        peers: Peers | None = None,
        locks: DownloadLocks | None = None,
    ) -> None:
        self._client = client
        # With several worker processes: one download of a file between them (proxy.coalesce).
        self._locks = locks
        self._followed: dict[str, FollowedDownload] = {}
        self._held: dict[str, int] = {}
        # The other nodes of a pool: a file one of them holds is copied from it (proxy.peers).
        self._peers = peers
        # The upstreams with several base URLs: a download moves to the next when one fails.
        self._mirrors = dict(mirrors or {})
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
        # The bodies being received, so that stop() can end them.
        self._receivers: set[BodyReceiver] = set()
        self._stopping = False
        # The requests waiting for their answer's headers, so that stop() can cancel them.
        self._asking: set[Deferred[IResponse]] = set()
        # The slot of each download in flight, running or queued.
        self._places: dict[tuple[type[Job], str], Slot] = {}

    def stop(self) -> None:
        """
        The service stops: end every transfer; a download of one file keeps its bytes and
        sidecar, so that the next run continues it. Nothing starts after this.
        """
        self._stopping = True
        for receiver in list(self._receivers):
            receiver.abort(UpstreamFailed("the proxy is stopping"))
        # A request still waiting for its answer would start a body after this; a queued
        # download would wait for a slot that the ends above hand to it.
        for asking in list(self._asking):
            asking.cancel()
        for slot in list(self._places.values()):
            self._slots.cancel(slot, UpstreamFailed("the proxy is stopping"))
        for followed in list(self._followed.values()):
            followed.stop()

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
        if self._locks is not None and (Download, item.sha256) not in self._inflight:
            return self._shared(upstream, item, background)
        return self._download(upstream, item, background)

    def _download(self, upstream: str, item: Item, background: bool) -> Download:
        config = self._upstreams[upstream]
        return self._start(
            Download, upstream, item.sha256, item.path, background,
            lambda: Download(
                upstream, f"{config.url}/{item.path}", item, self._partial_for(item.sha256),
                persist=self._persist,
            ),
        )

    # -- one download across worker processes (proxy.coalesce) ----------------------------

    def _shared(self, upstream: str, item: Item, background: bool) -> FetchedItem:
        """C{item}'s download, owned here if the lock is free, else followed."""
        assert self._locks is not None
        followed = self._followed.get(item.sha256)
        if followed is not None and followed.local is None:
            self._metrics.download_joined(upstream)
            return followed
        fd = self._locks.take(item.sha256)
        if fd is None:
            followed = FollowedDownload(
                upstream, item, self._store, self._locks, self._clock, self._disk,
                lambda sha256: self._index.get(sha256) is not None, self._continue,
            )
            self._followed[item.sha256] = followed
            followed.when_done().addBoth(lambda _: self._followed.pop(item.sha256, None))
            followed.start()
            self._metrics.download_joined(upstream)
            return followed
        return self._own(upstream, item, background, fd)

    def _own(self, upstream: str, item: Item, background: bool, fd: int) -> Download:
        assert self._locks is not None
        try:
            download = self._download(upstream, item, background)
            self._locks.publish(fd, download.partial.path, upstream, item.path, item.size)
        except BaseException:
            self._locks.release(item.sha256, fd)
            raise
        self._held[item.sha256] = fd
        return download

    def _continue(self, followed: FollowedDownload, fd: int) -> Download:
        """The owner of C{followed}'s download is gone: continue it here, from its partial."""
        item = followed.item
        partial = followed.continues()
        if partial is not None:
            sidecar = partial.path.removesuffix(TEMP_SUFFIX) + RESUME_SUFFIX
            found = Resumable.read(partial, sidecar) or Resumable(
                partial, "", "", item.sha256, item.size,
            )
            self._keep(found)
        else:
            followed.cannot_continue()
        self._followed.pop(item.sha256, None)
        download = self._own(followed.upstream, item, followed.background, fd)
        if download.partial.path != partial:
            followed.cannot_continue()
        return download

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

    def _partial_for(self, sha256: str) -> PartialBlob:
        """The partial left for C{sha256} by an earlier run (see L{BlobStore.resume}), or a new one."""
        partial = self._store.resume(sha256)
        if partial is None:
            return self._new_partial()
        partial.writeback = self._writeback
        return partial

    def _persist(self, download: Download) -> None:
        """Write the sidecar of C{download}'s partial, on the disk worker, not waited for."""
        item = download.item
        self._disk(
            download.partial.write_sidecar, download.url, download.validator, item.sha256, item.size,
        ).addErrback(
            lambda f: self.log.warn(
                "cannot record {url} for a resume after a restart: {reason}",
                url=download.url, reason=f.getErrorMessage(),
            )
        )

    async def _take_over(self, download: Download) -> None:
        """Count the bytes of a partial an earlier run left (on the disk worker) before asking."""
        partial = download.partial
        if partial.resumed is None:
            return
        size = await self._disk(partial.rehash)
        download.took_over()
        self.log.info(
            "resuming {url} from the {size} bytes an earlier run left", url=download.url, size=size,
        )

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
            if self._stopping:
                raise UpstreamFailed("the proxy is stopping")
            if self._room_to_receive is not None and job.size > 0:
                if not await self._room_to_receive(job.size):
                    health = self._health.get(job.upstream)
                    if health is not None:
                        health.end_probe(f"no room to receive {job.subject}")
                    raise InsufficientStorage(
                        f"no room on the cache's file system to receive {job.subject} "
                        f"({job.size} bytes), even after evicting what may go"
                    )
            if isinstance(job, Download):
                await self._take_over(job)
            answered = await self._transfer(job)
        except Exception as caught:
            e = caught
            if isinstance(caught, _Failed):
                e, answered = caught.error, caught.answered
            error = as_proxy_error(Failure(e), job.transfer_subject)
            # Before an answer, a connection, TLS or timeout failure is the upstream's (its
            # health has it); anything after, or a refused redirect, is this file's alone.
            if answered or (isinstance(e, ProxyError) and not isinstance(e, InsufficientStorage)):
                self._file_failures.failed((kind, job.key), error, job.url)
            self.log.warn(
                "download of {url} failed, nothing cached: {reason}", url=job.url, reason=error.message,
            )
            mirrors = self._mirrors.get(job.upstream)
            health = self._health.get(job.upstream)
            if mirrors is not None and health is not None:
                # As without mirrors: only a failure to reach them (the last mirror asked)
                # is the upstream's; a 5xx or wrong bytes for one file on every mirror is
                # that file's failure, the upstream answered.
                if mirrors.all_down() and not isinstance(e, ProxyError):
                    health.record_failure(f"every mirror failed, the last: {error.message}", True)
                else:
                    health.end_probe(f"the download of {job.subject} failed")
            if not job.finished:
                if isinstance(job, Download) and self._keep_for_later(job, e):
                    job.keep_partial = True
                job.fail(Failure(error))
            self._metrics.download_failed(job.upstream, isinstance(e, VerificationFailed))
        else:
            self._file_failures.succeeded((kind, job.key))
        finally:
            self._places.pop((kind, job.key), None)
            self._inflight.pop((kind, job.key), None)
            held = self._held.pop(job.key, None) if kind is Download else None
            if held is not None and self._locks is not None:
                # After the commit and the record: a follower that finds the lock free finds
                # the blob, or continues from the partial.
                self._locks.release(job.key, held)
            fetched = job.fetched if isinstance(job, Download) else job.received
            self._index.note_fetched(fetched)
            self._metrics.upstream_received(job.upstream, "file", fetched)
            # Last: the next download may start (and run some way) within this call.
            self._slots.release(slot)

    async def _turn(self, job: Job, slot: Slot) -> None:
        """Wait for C{job}'s turn among its upstream's downloads; its clients have headers meanwhile."""
        if not slot.queued:
            return
        job.queued = True
        health = self._health.get(job.upstream)
        if health is not None and health.probing:
            # Let through as the probe of its offline upstream (get() has just taken it), but
            # it may wait minutes here: the next request probes instead of getting 503s.
            health.end_probe(f"{job.subject} waits for a download slot")
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

    async def _transfer(self, job: Job) -> bool:
        """
        Ask for C{job} and take its body, again from the bytes on disk each time a resumable
        body breaks off (L{RESUME_ATTEMPTS}, L{RESUME_BACKOFF_SECONDS}); returns whether any
        attempt was answered, or raises L{_Failed} with the last attempt's error.
        """
        answered = False
        without_progress = 0
        attempts = 0
        if isinstance(job, Download) and self._peers is not None and job.received == 0:
            if await self._from_peer(job, self._peers):
                return True
        mirrors = self._mirrors.get(job.upstream) if isinstance(job, Download) else None
        tried: list[str] = []
        base = mirrors.order()[0] if mirrors is not None else ""
        # When the last byte arrived, about (or the transfer started).
        progress_at = self._clock.seconds()
        while True:
            attempts += 1
            if isinstance(job, Download) and mirrors is not None:
                job.url = f"{base}/{job.item.path}"
            before = job.received
            fetched_before = _fetched(job)
            headers = job.resume_headers(job.url) if isinstance(job, Download) else {}
            answered_now = False
            try:
                response = await self._ask(job, headers)
                answered = answered_now = True
                await self._take(job, response)
                return answered
            except Exception as e:
                if _fetched(job) > fetched_before:
                    # A stall is told an idle timeout after its last byte.
                    stalled = self._idle_timeout if isinstance(e, BodyStalled) else 0.0
                    progress_at = self._clock.seconds() - stalled
                if (isinstance(job, Download) and isinstance(e, VerificationFailed) and job.spliced
                        and attempts < MAX_ATTEMPTS):
                    # Pieces that do not make the file (a power cut that lost a partial's
                    # tail, a server that ignored If-Range): once more, whole, from here.
                    self.log.warn(
                        "{path} from {url} did not verify after a resume ({reason}); fetching "
                        "it whole", path=job.item.path, url=job.url, reason=str(e),
                    )
                    job.restart()
                    continue
                if mirrors is not None and isinstance(job, Download) and attempts < MAX_ATTEMPTS:
                    following = self._next_mirror(mirrors, job, base, e, answered_now, tried)
                    if following is not None:
                        base = following
                        continue
                    if isinstance(e, (VerificationFailed, NotFound)):
                        raise _Failed(e, answered)
                if not (self._resumable(job, e, answered, answered_now) and attempts < MAX_ATTEMPTS):
                    raise _Failed(e, answered)
                without_progress = 0 if job.received > before else without_progress + 1
                idle_for = self._clock.seconds() - progress_at
                if (without_progress >= RESUME_ATTEMPTS
                        or idle_for >= IDLE_TIMEOUTS_WITHOUT_PROGRESS * self._idle_timeout):
                    raise _Failed(e, answered)
                delay = 0.0 if without_progress == 0 else RESUME_BACKOFF_SECONDS[
                    min(without_progress, len(RESUME_BACKOFF_SECONDS)) - 1
                ]
                self.log.info(
                    "download of {url} broke off at {received} of {size} bytes ({reason}); "
                    "resuming in {delay:g} s", url=job.url, received=job.received,
                    size=job.size, reason=as_proxy_error(Failure(e), job.subject).message,
                    delay=delay,
                )
                await deferLater(self._clock, delay, lambda: None)
                if self._stopping:
                    raise _Failed(e, answered)
                if mirrors is not None:
                    # A new round: every mirror whose backoff has run out may be asked again.
                    tried = []
                    base = (mirrors.order() or [base])[0]

    async def _from_peer(self, job: Download, peers: Peers) -> bool:
        """
        Copy C{job}'s file from a peer that holds it, verified as any download; False when
        none does, or the copy failed before its commit (the upstream is asked next, for the
        rest of the bytes with C{Range} when some arrived and nothing was wrong with them).
        """
        found = await peers.find(job.upstream, job.item.path)
        self._metrics.peer_fill(job.upstream, found is not None)
        if found is None:
            return False
        peer, response = found
        upstream_url, job.url = job.url, f"{peer}/{job.upstream}/{job.item.path}"
        before = job.fetched
        try:
            await job.receive(response, self._receive)
            verified = job.verified()
        except Exception as e:
            if self._stopping:
                raise
            self.log.warn(
                "copying {path} from peer {peer} failed ({reason}); asking the upstream",
                path=job.item.path, peer=peer, reason=as_proxy_error(Failure(e), job.subject).message,
            )
            if isinstance(e, VerificationFailed):
                job.restart()
            return False
        finally:
            # The bytes of a peer are no upstream's (the metrics and stats count WAN traffic).
            job.fetched = before
            job.url = upstream_url
        await self._commit(job, verified)
        self.log.info("{path} of upstream {upstream} came from peer {peer}", path=job.item.path,
                      upstream=job.upstream, peer=peer)
        health = self._health.get(job.upstream)
        if health is not None:
            # The upstream was not asked: a probe this download held says nothing either way.
            health.end_probe(f"{job.subject} came from peer {peer}")
        return True

    def _next_mirror(
        self, mirrors: Mirrors, job: Download, base: str, error: Exception, answered_now: bool,
        tried: list[str],
    ) -> str | None:
        """
        After C{error} from the mirror at C{base}: the mirror to ask at once for the rest of
        C{job} (marking C{base} down when the fault is the mirror's), or None when no other
        is left this round. A body that did not verify starts over: which of its bytes were
        wrong is not known.
        """
        fault = isinstance(error, (BodyBroken, BodyStalled, UpstreamServerError, VerificationFailed))
        fault = fault or (not answered_now and not isinstance(error, ProxyError))
        if not fault and not isinstance(error, NotFound):
            return None
        reason = as_proxy_error(Failure(error), job.subject).message
        if fault:
            mirrors.failed(base, reason)
        tried.append(base)
        others = mirrors.order(tried=tried)
        if not others or self._stopping:
            return None
        if isinstance(error, VerificationFailed):
            job.restart()
        self.log.info(
            "download of {path} of upstream {upstream} moves from {old} to {new} at byte "
            "{received} ({reason})", path=job.item.path, upstream=job.upstream, old=base,
            new=others[0], received=job.received, reason=reason,
        )
        return others[0]

    def _resumable(self, job: Job, error: Exception, answered: bool, answered_now: bool) -> bool:
        """
        Whether C{job} may go on after C{error}: a body of one file that broke off or stalled,
        or, once its upstream has answered, a failure to reach it again (it may be back soon).
        """
        if not getattr(job, "resumable", False) or self._stopping:
            return False
        if isinstance(error, (BodyBroken, BodyStalled)):
            return True
        return answered and not answered_now and not isinstance(error, ProxyError)

    def _keep_for_later(self, job: Download, error: Exception) -> bool:
        """
        Whether the bytes of C{job}, failing with C{error}, are kept for the next download of
        the file to continue (L{BlobStore.resumable}): bytes of the right file cut short.
        """
        if isinstance(error, (VerificationFailed, InsufficientStorage)):
            return False
        if job.received == 0 and job.partial.resumed is not None and job.partial.size == 0:
            # An earlier run's partial, taken by a download that ended before its turn (the
            # service stopped while it was queued): its bytes and sidecar stay as they were.
            self._keep(job.partial.resumed)
            return True
        if job.received == 0:
            return False
        if not (self._stopping or isinstance(error, (BodyBroken, BodyStalled))
                or not isinstance(error, ProxyError)):
            return False
        item = job.item
        self._keep(Resumable(
            job.partial.path, job.validator_url, job.validator, item.sha256, item.size,
        ))
        return True

    def _keep(self, found: Resumable) -> None:
        for dropped in self._store.keep_resumable(found):
            self.log.info(
                "dropping the partial download of sha256:{sha256} ({url}): more than {count} "
                "are kept", sha256=dropped.sha256, url=dropped.url, count=MAX_RESUMABLE,
            )
            self._disk(BlobStore.remove_resumable, dropped).addErrback(
                self._temp_left, dropped.path.path
            )

    async def _ask(self, job: Job, headers: Mapping[bytes, bytes] | None = None) -> IResponse:
        """Send the request for C{job}; whether the upstream answered is its health's to know."""
        health = self._health.get(job.upstream)
        if headers:
            self.log.info(
                "asking {url} for bytes {start} to {size}", url=job.url, start=job.received,
                size=job.size,
            )
        else:
            self.log.info("fetching {url} ({size} bytes)", url=job.url, size=job.size)
        asking = self._client.get(job.url, headers)
        self._asking.add(asking)
        try:
            response: IResponse = await asking
        except Exception as e:
            self._metrics.upstream_answer(job.upstream, "file", None)
            # With mirrors, the upstream is down only once every mirror is (see _run).
            if health is not None and job.upstream not in self._mirrors and not self._stopping:
                health.record_error(e, job.url)
            raise
        finally:
            self._asking.discard(asking)
        self._metrics.upstream_answer(job.upstream, "file", response.code)
        if health is not None:
            health.record_file_answer(response.code, job.url)
        mirrors = self._mirrors.get(job.upstream)
        if mirrors is not None and response.code < 500:
            base = base_of(job.url, mirrors.urls)
            if base is not None:
                mirrors.answered(base)
        return response

    async def _take(self, job: Job, response: IResponse) -> None:
        """Receive the body of C{job}'s answer and commit it, or fail with the reason."""
        expected = (200, 206) if getattr(job, "resumable", False) else (200,)
        if response.code not in expected:
            reason = await job.error_text(response, self._receive)
            said = f": {reason}" if reason else ""
            if response.code == 404:
                raise NotFound(f"upstream has no {job.subject} (404{said})")
            if response.code >= 500:
                raise UpstreamServerError(f"upstream answered {response.code} for {job.subject}{said}")
            raise UpstreamFailed(f"upstream answered {response.code} for {job.subject}{said}")
        await job.receive(response, self._receive)
        await self._commit(job, job.verified())

    def _receive(
        self, response: IResponse, sink: Callable[[bytes], None], limit: int,
    ) -> "Deferred[int]":
        finished: Deferred[int] = Deferred()
        receiver = BodyReceiver(sink, limit, self._clock, self._idle_timeout, finished)
        self._receivers.add(receiver)

        def done(result: object) -> object:
            self._receivers.discard(receiver)
            return result

        response.deliverBody(receiver)
        return finished.addBoth(done)

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


def _fetched(job: Job) -> int:
    """The body bytes C{job} has received over all its attempts (restarts included)."""
    return job.fetched if isinstance(job, Download) else job.received


class _Failed(Exception):
    """A transfer that failed for good: its last error, and whether any attempt was answered."""

    def __init__(self, error: Exception, answered: bool) -> None:
        super().__init__(error)
        self.error = error
        self.answered = answered


class ItemFetcher(Protocol):
    """Starts or joins the one download of a catalogue file (L{Fetcher}, or a test's double)."""

    def get(self, upstream: str, item: Item, *, background: bool = False) -> FetchedItem: ...

    def client_downloads(self) -> int: ...

    def in_flight(self) -> Mapping[str, Any]: ...


__all__ = ["Fetcher", "ItemFetcher"]
