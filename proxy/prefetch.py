"""Auto-update: new releases of the images the LAN uses are on the LAN before anyone asks.

Every C{auto_update_interval} (and once shortly after start) the L{Prefetcher} resolves every
pinned alias, and with C{auto_update_cached} every image whose cached files were used within the
expiry window, to the newest version the upstream publishes, exactly as the LXD client would,
and downloads the files that are missing through the same L{Fetcher} as a client miss (one
download per file, verified before it is stored). At most C{prefetch_concurrency} of these run at
once, and none starts while a client waits for a download.

A run is made of three steps, which C{lxd-image-proxy prefetch} also uses (with its own
references, in the foreground, and with a L{FetchWatch} that draws its progress): L{Prefetcher.plan}
resolves references to images, L{Prefetcher.bring} downloads files, L{Prefetcher.keep} pins the
versions of a pinned alias that stay.

Pinned images' files are C{cached = False, auto_update = True}; older versions of a pinned alias
stay pinned until C{keep_versions} newer versions are stored, then turn C{cached} and age out.

With a new version come its deltas: the C{.vcdiff} items the catalogue lists in it whose
C{delta_base} is a version whose files are stored (L{Prefetcher.deltas}). A host refreshing from
that older version asks for its delta before the full root file (LXD's C{GetImageFile}), so
with the delta stored its refresh never reaches the WAN. A delta is an optimisation: its
failure is logged and fails nothing. Deltas are kept (pinned) with their version.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable, Iterable, Mapping, Protocol, Sequence

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from proxy.catalogue import Image, Item
from proxy.config import Config
from proxy.downloads import Fetcher, ItemFetcher
from proxy.fetch import FetchedItem
from proxy.index import CacheIndex
from proxy.lxd_remote import LxdRemote
from proxy.metadata import SimplestreamsMetadata
from proxy.metrics import NO_METRICS, Metrics
from proxy.resolve import host_architecture, lxd_arch, resolve_alias, versions_for
from proxy.work import Run, heavy, inline

# The first run waits a little after start, so that start-up is not slowed and the listeners
# are up before the WAN is busy.
STARTUP_DELAY_SECONDS = 30.0
# While a client waits for a download, background downloads wait this long before looking again.
YIELD_TO_CLIENTS_SECONDS = 1.0
DAY_SECONDS = 86400.0
# A pin names an image by fingerprint with at least this many hex digits (as LXD's short form).
MIN_FINGERPRINT_PREFIX = 12
_HEX = re.compile(r"[0-9a-f]+")


@frozen
class PinRef:
    upstream: str
    alias: str
    arch: str
    type: str


@frozen
class Planned:
    """
    What L{Prefetcher.plan} found for one reference.

    @ivar image: the newest image C{ref} names, or None.
    @ivar images: the catalogue it was looked up in (as far as it could be read): the versions
        L{Prefetcher.keep} chooses from.
    @ivar unreadable: why the catalogue, or a part of it, could not be read; None when it was
        read in full. C{image} may still be found in the part that was read.
    """

    ref: PinRef
    image: Image | None
    images: Sequence[Image] = ()
    unreadable: str | None = None


@frozen
class Brought:
    """
    How one file of L{Prefetcher.bring} ended.

    @ivar downloaded: a download of it ran to its end (False: it failed, or the file was stored
        by someone else before its turn came).
    @ivar stored: the file is in the cache now.
    @ivar problem: why its download failed; None when it did not.
    """

    upstream: str
    item: Item
    downloaded: bool
    stored: bool
    problem: str | None = None


class FetchWatch(Protocol):
    """Told how the downloads of one L{Prefetcher.bring} go (the admin command draws them)."""

    def started(self, upstream: str, item: Item, download: FetchedItem) -> None:
        """The download of C{item} started (or was joined); C{download.received} grows as it goes."""

    def finished(self, upstream: str, item: Item, problem: str | None) -> None:
        """
        C{item} is settled: its download ended (C{problem} is None, and C{download.stored} says
        whether the cache kept it), or failed (C{problem} says why), or it was found stored
        when its turn came (then without C{started}).
        """


@define
class TickReport:
    """What one auto-update run did."""

    images: int = 0
    downloaded: list[str] = field(factory=list)
    failed: list[str] = field(factory=list)
    unresolved: list[str] = field(factory=list)
    unpinned: int = 0
    # Deltas downloaded, and those whose download failed (which fails nothing).
    deltas: list[str] = field(factory=list)
    deltas_failed: list[str] = field(factory=list)


class PinnedPartsLearner:
    """
    Learns the files of the pinned images of LXD-server upstreams, so that their pins resolve.

    Such an upstream's catalogue lists a split image only once its parts are known, and only an
    export download tells them (and whether the image is split at all): L{learn} makes one,
    as a background download, for each pinned image whose files are not known yet. It is the
    L{Prefetcher}'s C{discover}.
    """

    def __init__(self, remotes: Mapping[str, LxdRemote], fetcher: Fetcher) -> None:
        self._remotes = remotes
        self._fetcher = fetcher

    async def learn(self, upstream: str, names: set[str]) -> int:
        """
        Fetch the images of C{upstream} that C{names} (aliases or fingerprints) pin and whose
        files are not known yet; return how many. An upstream that is not an LXD server has
        nothing to learn.
        """
        remote = self._remotes.get(upstream)
        if remote is None:
            return 0
        learnt = 0
        # Not the expired list a client would be served while it is revalidated.
        await remote.revalidate()
        for image in await remote.unknown_files():
            by_fingerprint = any(
                len(n) >= MIN_FINGERPRINT_PREFIX and _HEX.fullmatch(n) and image.fingerprint.startswith(n)
                for n in names
            )
            if not by_fingerprint and not names & set(image.aliases):
                continue
            download = self._fetcher.get_image(upstream, image, background=True)
            await download.when_done()
            learnt += 1
        return learnt


class Prefetcher(Service):
    """
    Runs the auto-update ticks. C{lxd-image-proxy prefetch} uses the steps of a tick
    (L{plan}, L{bring}, L{keep}) rather than L{tick}: it reports each reference and each file,
    and pins nothing that is not pinned.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        metadata: Mapping[str, SimplestreamsMetadata],
        fetcher: ItemFetcher,
        index: CacheIndex,
        clock: IReactorTime,
        *,
        host_arch: str | None = None,
        discover: Callable[[str, set[str]], Awaitable[object]] | None = None,
        disk: Run = inline,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._metrics = metrics
        # Scans of the whole index run here, never on the reactor thread.
        self._disk = disk
        # Learns the files of an upstream's images that its catalogue cannot list yet (the split
        # images of an LXD server, named by alias or fingerprint), so that pins can resolve.
        self._discover = discover
        self._config = config
        self._metadata = dict(metadata)
        self._fetcher = fetcher
        self._index = index
        self._clock = clock
        self._host_arch = host_arch or host_architecture()
        self._slots = DeferredSemaphore(max(1, config.cache.prefetch_concurrency))
        self._loop: LoopingCall | None = None
        self._first: IDelayedCall | None = None
        self._running: Deferred[TickReport] | None = None

    # -- schedule ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        interval = self._config.cache.auto_update_interval
        if interval <= 0:
            return
        loop = LoopingCall(self.run)
        loop.clock = self._clock
        self._loop = loop
        # The loop itself starts after the delay: however short the interval, the first run
        # waits for it, and every later run comes a whole interval after the one before.
        self._first = self._clock.callLater(STARTUP_DELAY_SECONDS, loop.start, interval)

    def stopService(self) -> None:
        super().stopService()
        if self._first is not None and self._first.active():
            self._first.cancel()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def run(self) -> "Deferred[TickReport]":
        """
        Start a tick unless one is running, and return a Deferred of its report that never
        fails (the loop must survive errors). Every caller gets its own Deferred, so that
        cancelling one (or the loop's use of its result) leaves the run and the others alone.
        """
        running = self._running
        if running is None:
            running = Deferred.fromCoroutine(self.tick())

            def failed(failure: Any) -> TickReport:
                self.log.failure("auto-update run failed", failure)
                self._metrics.auto_update_ran(True, self._clock.seconds())
                return TickReport()

            def counted(report: TickReport) -> TickReport:
                problems = bool(report.failed or report.unresolved)
                self._metrics.auto_update_ran(problems, self._clock.seconds())
                return report

            def done(report: TickReport) -> TickReport:
                self._running = None
                return report

            running.addCallbacks(counted, failed).addCallback(done)
            if not running.called:
                self._running = running
        observer: Deferred[TickReport] = Deferred()

        def tell(report: TickReport) -> TickReport:
            # A cancelled observer has had its answer.
            if not observer.called:
                observer.callback(report)
            return report

        running.addCallback(tell)
        return observer

    # -- one run ----------------------------------------------------------------------------

    def pin_refs(self) -> list[PinRef]:
        refs = [PinRef(p.upstream, p.alias, p.arch or self._host_arch, p.type) for p in self._config.pins]
        refs += [PinRef(r.upstream, r.alias, r.arch or self._host_arch, r.type) for r in self._index.pins()]
        unique: dict[PinRef, None] = {}
        for ref in refs:
            try:
                arch = lxd_arch(ref.arch)
            except ValueError:
                # Reported as unresolved by the run; one bad pin must not stop the others.
                arch = ref.arch
            unique[PinRef(ref.upstream, ref.alias, arch, ref.type)] = None
        return list(unique)

    async def tick(self, refs: Iterable[PinRef] | None = None, *, follow_cached: bool | None = None) -> TickReport:
        """
        Bring the newest versions of the pinned aliases (or of C{refs}) and, unless told
        otherwise, of recently used cached images into the cache.
        """
        report = TickReport()
        pins = self.pin_refs() if refs is None else list(refs)
        if follow_cached is None:
            follow_cached = refs is None and self._config.cache.auto_update_cached
        targets: dict[str, tuple[str, Image, bool]] = {}
        catalogues: dict[str, _Catalogue] = {}
        resolved: list[Planned] = []
        for planned in await self._plan(pins, catalogues):
            ref, image = planned.ref, planned.image
            if image is None:
                if ref.upstream in self._metadata:
                    self.log.warn(
                        "auto-update: {upstream}:{alias} ({type}, {arch}) is not in the catalogue",
                        upstream=ref.upstream, alias=ref.alias, type=ref.type, arch=ref.arch,
                    )
                report.unresolved.append(f"{ref.upstream}:{ref.alias}")
                continue
            targets[image.fingerprint] = (ref.upstream, image, True)
            resolved.append(planned)
        if follow_cached:
            for upstream, image in await self._recently_used(catalogues):
                targets.setdefault(image.fingerprint, (upstream, image, False))
        report.images = len(targets)
        downloads = [
            self._bring_image(upstream, image, report, catalogues[upstream].images)
            for upstream, image, _ in targets.values()
        ]
        await gatherResults([Deferred.fromCoroutine(d) for d in downloads])
        kept: set[str] = set()
        for planned in resolved:
            assert planned.image is not None
            kept |= await self.keep(planned.images, planned.image)
        if refs is None and not report.unresolved:
            # Only with every pin resolved is it known which pinned files no pin needs any more.
            released = await self._disk(heavy(self._released), kept)
            report.unpinned = await self._index.write(self._index.unpin, released)
        self.log.info(
            "auto-update: {images} images checked, {downloaded} files downloaded, {failed} failed,"
            " {deltas} deltas downloaded",
            images=report.images, downloaded=len(report.downloaded), failed=len(report.failed),
            deltas=len(report.deltas),
        )
        return report

    # -- the steps of a run -----------------------------------------------------------------

    async def plan(self, refs: Iterable[PinRef]) -> list[Planned]:
        """
        Resolve each of C{refs} to the newest image it names, from catalogues refreshed as for
        a client (the TTL applies); one L{Planned} per reference, in order. Never fails: what
        cannot be resolved says so in its L{Planned}.
        """
        return await self._plan(list(refs), {})

    async def _plan(self, refs: list[PinRef], catalogues: dict[str, _Catalogue]) -> list[Planned]:
        if self._discover is not None:
            wanted: dict[str, set[str]] = {}
            for ref in refs:
                wanted.setdefault(ref.upstream, set()).add(ref.alias)
            for upstream, names in wanted.items():
                try:
                    await self._discover(upstream, names)
                except Exception as e:
                    self.log.warn(
                        "auto-update: learning the images of {upstream} failed: {reason}",
                        upstream=upstream, reason=getattr(e, "message", str(e)),
                    )
        planned: list[Planned] = []
        for ref in refs:
            meta = self._metadata.get(ref.upstream)
            if meta is None:
                planned.append(Planned(ref, None))
                continue
            catalogue = await self._images(meta, catalogues)
            images = catalogue.images
            image = resolve_alias(images, ref.alias, ref.arch, ref.type) if images else None
            planned.append(Planned(ref, image, images, catalogue.unreadable))
        return planned

    async def bring(
        self, files: Iterable[tuple[str, Item]], *, watch: FetchWatch | None = None,
        background: bool = True,
    ) -> list[Brought]:
        """
        Download the files C{(upstream, item)} that are not stored, at most
        C{prefetch_concurrency} at a time; one L{Brought} per file, in order. Never fails: a
        failed download says so in its L{Brought}.

        @param watch: told as each download starts and ends.
        @param background: the downloads wait while a client waits for one, and a client
            asking for the same file takes it over (the server's runs); False for the admin
            command, whose own downloads are what it waits for.
        """
        return list(await gatherResults([
            Deferred.fromCoroutine(self._bring_one(upstream, item, watch, background))
            for upstream, item in files
        ]))

    async def keep(self, images: Sequence[Image], newest: Image) -> set[str]:
        """
        Pin (C{cached = False, auto_update = True}) the files of the versions of C{newest}
        that stay: the newest C{keep_versions} stored in full, of those in C{images}. Return
        their sha256. Only for an alias that is pinned: it is the pin that keeps them.
        """
        kept = self._kept_versions(list(images), newest)
        index = self._index
        for sha256 in kept:
            record = index.get(sha256)
            if record is not None and (record.cached or not record.auto_update):
                await index.write(index.set_flags, sha256, cached=False, auto_update=True)
        return kept

    def deltas(self, images: Sequence[Image], image: Image) -> list[Item]:
        """
        The deltas of C{image} worth storing: those whose C{delta_base} is a version of the
        same image (product, architecture, type, root file type) whose files are all stored.
        A host refreshing from that version asks for exactly these first; a delta from a
        version nobody got through the cache would only cost WAN bytes.
        """
        if not image.deltas:
            return []
        stored = {
            older.version for older in versions_for(list(images), image)
            if older.version != image.version
            and all(self._index.get(item.sha256) is not None for item in older.files)
        }
        return [delta for delta in image.deltas if delta.delta_base in stored]

    def _kept_versions(self, images: list[Image], newest: Image) -> set[str]:
        """
        Files of the versions of a pinned alias that stay pinned: the newest stored ones, with
        their deltas (stored or not: only stored files are pinned).
        """
        keep = max(1, self._config.cache.keep_versions)
        stored = [
            image for image in versions_for(images, newest)
            if all(self._index.get(item.sha256) is not None for item in image.files)
        ]
        return {item.sha256 for image in stored[:keep] for item in (*image.files, *image.deltas)}

    def _released(self, kept: set[str]) -> list[str]:
        """The auto-updated files no pin keeps (a scan of the index: off the reactor)."""
        # Record by record, each freed as it goes: a list of them all would be freed at once.
        return [
            record.sha256 for record in self._index.records()
            if not record.cached and record.auto_update and record.sha256 not in kept
        ]

    async def _recently_used(self, catalogues: dict[str, _Catalogue]) -> list[tuple[str, Image]]:
        """The newest version of every image whose root (or unified) file was used lately."""
        window = self._config.cache.expiry_days * DAY_SECONDS
        used = await self._disk(heavy(self._used_since), self._clock.seconds() - window)
        found: list[tuple[str, Image]] = []
        for upstream, shas in used.items():
            meta = self._metadata.get(upstream)
            if meta is None:
                continue
            images = (await self._images(meta, catalogues)).images
            for image in images:
                key = image.root if image.root is not None else image.meta
                if key.sha256 in shas:
                    newest = versions_for(images, image)[0]
                    found.append((upstream, newest))
        return found

    def _used_since(self, since: float) -> dict[str, set[str]]:
        """The cached files used after C{since}, by upstream (a scan of the index)."""
        used: dict[str, set[str]] = {}
        for record in self._index.records():
            if record.cached and record.last_used_at > since and record.use_count > 0:
                used.setdefault(record.upstream, set()).add(record.sha256)
        return used

    async def _images(self, meta: SimplestreamsMetadata, catalogues: dict[str, _Catalogue]) -> _Catalogue:
        """The upstream's images, from a catalogue refreshed as for a client (TTL applies)."""
        if meta.name in catalogues:
            return catalogues[meta.name]
        images: list[Image] = []
        unreadable: str | None = None
        try:
            # An expired catalogue is served to clients while it is revalidated; a run plans
            # on the revalidated one.
            await meta.revalidate()
            # File by file: what the files read before one that fails still counts.
            for products_path in await meta.products_paths():
                images.extend(await meta.products_images(products_path))
        except Exception as e:
            unreadable = getattr(e, "message", None) or str(e)
            self.log.warn("auto-update: no catalogue for {upstream}: {reason}", upstream=meta.name, reason=e)
        catalogues[meta.name] = found = _Catalogue(images, unreadable)
        return found

    async def _bring_image(
        self, upstream: str, image: Image, report: TickReport, images: Sequence[Image]
    ) -> None:
        # Chosen before the image's own files are stored: its deltas start from older versions.
        deltas = self.deltas(images, image)
        # File after file, and no further once one failed: the upstream is failing this image.
        for item in image.files:
            [brought] = await self.bring([(upstream, item)])
            # Two images sharing a file wait for the one download of it.
            if brought.downloaded and item.path not in report.downloaded:
                report.downloaded.append(item.path)
            if brought.problem is not None:
                if item.path not in report.failed:
                    report.failed.append(item.path)
                self.log.warn(
                    "auto-update: fetching {upstream}/{path} failed: {reason}",
                    upstream=upstream, path=item.path, reason=brought.problem,
                )
                return
        for delta in deltas:
            [brought] = await self.bring([(upstream, delta)])
            if brought.downloaded and delta.path not in report.deltas:
                report.deltas.append(delta.path)
            if brought.problem is not None:
                if delta.path not in report.deltas_failed:
                    report.deltas_failed.append(delta.path)
                # Hosts refreshing from its base still get it, as a miss: LXD lists it to them.
                self.log.warn(
                    "auto-update: fetching the delta {upstream}/{path} from version {base} failed"
                    " ({reason}); the image itself is stored",
                    upstream=upstream, path=delta.path, base=delta.delta_base, reason=brought.problem,
                )

    async def _bring_one(
        self, upstream: str, item: Item, watch: FetchWatch | None, background: bool
    ) -> Brought:
        if self._index.get(item.sha256) is None:
            await self._slots.acquire()
            try:
                while background and self._fetcher.client_downloads() > 0:
                    await deferLater(self._clock, YIELD_TO_CLIENTS_SECONDS, lambda: None)
                # Stored while this waited: by the client download it gave way to, or for
                # another image with the same file (a container and a VM share the metadata).
                if self._index.get(item.sha256) is None:
                    return await self._download(upstream, item, watch, background)
            finally:
                self._slots.release()
        if watch is not None:
            watch.finished(upstream, item, None)
        return Brought(upstream, item, downloaded=False, stored=True)

    async def _download(
        self, upstream: str, item: Item, watch: FetchWatch | None, background: bool
    ) -> Brought:
        try:
            download = self._fetcher.get(upstream, item, background=background)
            if watch is not None:
                watch.started(upstream, item, download)
            await download.when_done()
        except Exception as e:
            problem = getattr(e, "message", None) or str(e)
            if watch is not None:
                watch.finished(upstream, item, problem)
            return Brought(upstream, item, downloaded=False, stored=False, problem=problem)
        if watch is not None:
            watch.finished(upstream, item, None)
        return Brought(upstream, item, downloaded=True, stored=download.stored)


@frozen
class _Catalogue:
    """An upstream's images as one run read them, and why not all of them, if so."""

    images: list[Image]
    unreadable: str | None = None
