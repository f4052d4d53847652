"""Cache lifecycle: expiry of unused files, the size cap and the free-space floor.

The decisions are pure functions over index records (L{plan_expiry}, L{plan_eviction}), so
that the rules can be tested with synthetic records and a number for "now"; L{CacheLifecycle}
applies them to a real index and blob store.

The rules follow LXD's own image store (PROTOCOLS.md section 4): only C{cached} files (fetched
on demand) ever go; pinned files have C{cached = False} and are kept whatever their use. A
file's age is counted from its last use, or from when it was stored if that is later (never
used, or used only before a re-download). Files being served or downloaded are C{protected}
and are neither expired nor evicted: expiry of such a file waits for the next round.

A version's deltas (C{.vcdiff} files that rebuild its root from an older version) go with it:
once no other file of their version is stored, they are removed in the same operation
(L{orphaned_deltas}), whatever their own use; alone they can rebuild nothing a client lacks.

Removal order is always: index record first, then blob. A crash in between leaves only an
unreferenced blob, which start-up reconciliation deletes; never a record without its blob.

Both operations scan the whole index and delete files, so the server runs them on a worker
thread (L{CacheLifecycle.gc_later}, L{CacheLifecycle.make_room_later}): what only the reactor
thread may read (the files busy now, the uses not yet flushed) is copied there first, and one
operation runs at a time.
"""

from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable, Iterable

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import blockingCallFromThread
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.blobs import BlobStore
from proxy.catalogue import DELTA_SUFFIX
from proxy.config import DEFAULT_EXPIRY_DAYS, CacheConfig
from proxy.busy import InUse
from proxy.index import CacheIndex, FileRecord
from proxy.jsonsteps import release
from proxy.metrics import EVICTED, EXPIRED, NO_METRICS, Metrics
from proxy.work import Run, heavy, inline

__all__ = [
    "CacheLifecycle",
    "GcReport",
    "SECONDS_PER_DAY",
    "last_activity",
    "orphaned_deltas",
    "plan_eviction",
    "plan_expiry",
]

SECONDS_PER_DAY = 24 * 60 * 60


def last_activity(record: FileRecord) -> float:
    """When C{record} was last used or stored, whichever is later (seconds since the epoch)."""
    return max(record.last_used_at, record.stored_at)


def is_delta(record: FileRecord) -> bool:
    """
    Whether C{record} is a delta. The record keeps the item's paths, not its ftype; every
    publisher names a delta C{*.vcdiff} (lxd-imagebuilder even derives the ftype from it).
    """
    return any(path.endswith(DELTA_SUFFIX) for path in record.paths)


def orphaned_deltas(records: Iterable[FileRecord], protected: set[str]) -> list[str]:
    """
    The cached deltas none of whose version's other files (same upstream, product and
    version) is among C{records}: their version is gone, so they go too. A pinned delta
    (kept with a pinned version) and a C{protected} one stay.

    @return: sha256 digests, in the order of C{records}.
    """
    full: set[tuple[str, str, str]] = set()
    deltas: list[FileRecord] = []
    for record in records:
        if is_delta(record):
            deltas.append(record)
        else:
            full.add((record.upstream, record.product, record.version))
    return [
        d.sha256 for d in deltas
        if (d.upstream, d.product, d.version) not in full and d.cached and d.sha256 not in protected
    ]


def _evictable(records: Iterable[FileRecord], protected: set[str]) -> list[FileRecord]:
    return [r for r in records if r.cached and r.sha256 not in protected]


def plan_expiry(
    records: Iterable[FileRecord], now: float, expiry_days: float, protected: set[str]
) -> list[str]:
    """The cached files unused for more than C{expiry_days} days, oldest first.

    A file used exactly C{expiry_days} ago stays (LXD deletes once last use plus the expiry
    is in the past). Pinned files (C{cached = False}) and C{protected} files never expire.
    An C{expiry_days} of zero or less means nothing expires.

    @return: sha256 digests.
    """
    if expiry_days <= 0:
        return []
    limit = now - expiry_days * SECONDS_PER_DAY
    expired = [r for r in _evictable(records, protected) if last_activity(r) < limit]
    expired.sort(key=_lru_key)
    return [r.sha256 for r in expired]


def _lru_key(record: FileRecord) -> tuple[float, float, str]:
    # The digest last, so that equal times give the same order on every run.
    return (last_activity(record), record.stored_at, record.sha256)


def plan_eviction(
    records: Iterable[FileRecord],
    need: int,
    used: int,
    max_size: int | None,
    free: int,
    min_free: int,
    protected: set[str],
) -> list[str] | None:
    """The least recently used cached files to remove so that C{need} more bytes fit.

    After removing them, C{used + need <= max_size} (when there is a cap) and C{free - need
    >= min_free}. Evicting a file lowers C{used} and raises C{free} by its size, so the files
    chosen are the fewest, oldest first, whose sizes add up to the larger shortfall.

    @param need: bytes about to be added (0: just restore the limits).
    @param used: bytes of every stored file now.
    @param max_size: the cap on stored bytes, or None for none.
    @param free: bytes free on the cache's file system now.
    @param min_free: bytes to keep free on that file system.
    @param protected: digests that must not be evicted (being served or downloaded).
    @return: sha256 digests, oldest first; C{[]} when nothing needs to go; None when even
        evicting every candidate would not make room (then nothing should be evicted).
    """
    shortfall = max(0, min_free - (free - need))
    if max_size is not None:
        shortfall = max(shortfall, used + need - max_size)
    if shortfall <= 0:
        return []
    chosen: list[str] = []
    freed = 0
    for record in sorted(_evictable(records, protected), key=_lru_key):
        chosen.append(record.sha256)
        freed += record.size
        if freed >= shortfall:
            return chosen
    return None


@frozen
class GcReport:
    """What one L{CacheLifecycle.gc} round did.

    @ivar expired: files removed for being unused longer than the expiry.
    @ivar expired_bytes: their bytes.
    @ivar evicted: files removed to get under the size cap or above the free-space floor.
    @ivar evicted_bytes: their bytes.
    @ivar bytes_freed: C{expired_bytes + evicted_bytes}.
    @ivar over_limit: the cap or the floor is still not met: not enough could be evicted
        (then nothing was evicted for it).
    @ivar files: file records left.
    @ivar size: bytes of the files left.
    """

    expired: int
    expired_bytes: int
    evicted: int
    evicted_bytes: int
    bytes_freed: int
    over_limit: bool
    files: int
    size: int


# A plan is made again only when another process pinned a planned file meanwhile; this bounds
# how often that can happen within one commit.
_MAX_EVICTION_ROUNDS = 3


@frozen
class _Now:
    """What the reactor thread knows of the files at one instant: busy ones, unflushed uses."""

    busy: frozenset[str]
    last_used: dict[str, float]


def _fits(need: int, used: int, max_size: int | None, free: int, min_free: int) -> bool:
    return (max_size is None or used + need <= max_size) and free - need >= min_free


class CacheLifecycle:
    """Applies expiry, the size cap and the free-space floor to an index and its blob store.

    @param config: C{expiry_days}, C{max_size} and C{min_free} are read from it on every
        call, with the built-in defaults for an object that lacks them.
    @param busy: returns the digests that may not be removed now: files being served or
        downloaded by this process.
    """

    log = Logger()

    def __init__(
        self,
        index: CacheIndex,
        store: BlobStore,
        config: CacheConfig,
        clock: IReactorTime,
        busy: Callable[[], set[str]],
        *,
        work: Run = inline,
        in_use: InUse | None = None,
        reactor: Any = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._metrics = metrics
        self._index = index
        self._store = store
        self._config = config
        self._clock = clock
        self._busy = busy
        self._work = work
        # Where files being removed are claimed, so that nothing serves or stores them meanwhile.
        self._in_use = in_use if in_use is not None else InUse()
        # Given when C{work} runs on other threads: the reactor, to claim files on its thread.
        self._reactor = reactor
        self._lock = DeferredLock()

    # -- configuration -----------------------------------------------------

    @property
    def expiry_days(self) -> float:
        return float(getattr(self._config, "expiry_days", DEFAULT_EXPIRY_DAYS))

    @property
    def max_size(self) -> int | None:
        value = getattr(self._config, "max_size", None)
        return None if value is None else int(value)

    @property
    def min_free(self) -> int:
        return int(getattr(self._config, "min_free", 0))

    # -- state -------------------------------------------------------------

    def free_bytes(self) -> int:
        """Bytes available to this process on the file system holding the cache."""
        st = os.statvfs(self._store.root.path)
        return st.f_bavail * st.f_frsize

    def _now(self) -> _Now:
        """Read on the reactor thread, before work that runs elsewhere."""
        return _Now(frozenset(self._busy()), self._index.pending_last_used)

    def _records(self, now: _Now) -> list[FileRecord]:
        """Every record, with the uses this process has not flushed yet applied.

        Applying them in memory spares a synced commit just to learn what is recent.
        """
        pending = now.last_used
        records = list(self._index.records())
        if not pending:
            return records
        return [
            attrs.evolve(r, last_used_at=max(r.last_used_at, pending[r.sha256]))
            if r.sha256 in pending
            else r
            for r in records
        ]

    def _protected(self, now: _Now) -> set[str]:
        # A metadata file's blob can hold the same bytes as an image file; its record must
        # not lose its body when the file goes.
        protected = set(now.busy)
        protected.update(m.sha256 for m in self._index.metadata_records())
        return protected

    def _remove(self, digests: list[str], reason: str = EVICTED) -> list[FileRecord]:
        """
        Remove records (still cached ones only), then their blobs; return the records removed.

        Only the files nobody holds when the removal starts go, and they are claimed until it
        is over (L{InUse.claim}), so that no response opens one and no download stores one
        meanwhile. On a worker, the claim is made on the reactor thread, where files are held.
        """
        if not digests:
            return []
        reactor = self._reactor
        if reactor is not None:
            claimed = blockingCallFromThread(reactor, self._claim, digests)
        else:
            claimed = self._claim(digests)
        removed: list[FileRecord] = []
        try:
            removed = self._index.remove_cached(claimed, forget_uses=reactor is None)
            for record in removed:
                self._store.remove(record.sha256)
        finally:
            self._metrics.removed(reason, (r.size for r in removed))
            if reactor is not None:
                reactor.callFromThread(self._released, claimed, removed)
            else:
                self._in_use.release(claimed)
        return removed

    def _remove_deltas_of(
        self, records: list[FileRecord], removed: list[FileRecord], protected: set[str], reason: str,
        *, sweep: bool = False,
    ) -> list[FileRecord]:
        """
        Remove the deltas whose version lost its last other file with C{removed}, judged from
        C{records} (the index before the removal) less C{removed}; with C{sweep}, those of
        every version.
        """
        if not removed and not sweep:
            return []
        gone = {r.sha256 for r in removed}
        touched = {(r.upstream, r.product, r.version) for r in removed}
        left = [r for r in records if r.sha256 not in gone]
        orphans = orphaned_deltas(left, protected)
        if not sweep:
            by_sha = {r.sha256: r for r in left}
            orphans = [
                d for d in orphans
                if (by_sha[d].upstream, by_sha[d].product, by_sha[d].version) in touched
            ]
        return self._remove(orphans, reason)

    def _released(self, claimed: list[str], removed: list[FileRecord]) -> None:
        self._index.forget_uses(r.sha256 for r in removed)
        self._in_use.release(claimed)

    def _claim(self, digests: list[str]) -> list[str]:
        # The busy files now, not when the plan was made: a response may have started since.
        busy = self._busy()
        return self._in_use.claim(d for d in digests if d not in busy)

    # -- operations --------------------------------------------------------

    def idle(self) -> "Deferred[None]":
        """Fires once no operation runs (the one under way, if any, has ended)."""
        return self._lock.run(lambda: None)

    def make_room_later(self, size: int) -> "Deferred[bool]":
        """L{make_room} on the worker, one operation at a time."""
        # The snapshot is taken once the lock is held, so that it is current and no other
        # operation is removing records (and their pending uses) while it is read.
        return self._lock.run(lambda: self._work(heavy(self.make_room), size, True, self._now()))

    def gc_later(self) -> "Deferred[GcReport]":
        """L{gc} on the worker, one operation at a time."""
        return self._lock.run(lambda: self._work(heavy(self.gc), self._now()))

    def room_to_receive_later(self, size: int) -> "Deferred[bool]":
        """
        Whether a download of C{size} bytes can be written to the cache's file system (its
        temp file needs the space whether or not it is kept), evicting least recently used
        files for it when it cannot. The free space is read on the worker; only a download that
        does not fit waits for the lock.
        """
        def fits() -> bool:
            return self.free_bytes() >= size

        def evict_for_it() -> "Deferred[bool]":
            return self._lock.run(
                lambda: self._work(heavy(self.room_to_receive), size, self._now())
            )

        return self._work(fits).addCallback(lambda ok: True if ok else evict_for_it())

    def room_to_receive(self, size: int, now: _Now | None = None) -> bool:
        """L{room_to_receive_later}'s work: evict until C{size} bytes are free, if that can be."""
        free = self.free_bytes()
        if free >= size:
            return True
        now = self._now() if now is None else now
        records = self._records(now)
        plan = plan_eviction(records, size, self._index.total_size(), None, free, 0, self._protected(now))
        if plan is None:
            release(records)
            self.log.warn(
                "no room to receive {size} bytes: the cache's file system has {free} bytes free "
                "and too few stored files may be evicted (pinned, in use or downloading)",
                size=size, free=free,
            )
            return False
        removed = self._remove(plan)
        removed += self._remove_deltas_of(records, removed, self._protected(now), EVICTED)
        release(records)
        self.log.info(
            "evicted {count} least recently used files ({freed} bytes) to receive {size} bytes",
            count=len(removed), freed=sum(r.size for r in removed), size=size,
        )
        return free + sum(r.size for r in removed) >= size

    def make_room(self, size: int, written: bool = True, now: _Now | None = None) -> bool:
        """Evict what must go before a file of C{size} bytes is stored.

        Called before a commit. With C{written} (the default) the file's bytes are already on
        the cache's file system in a temp file, so the free space they need is already taken
        and is not counted twice.

        @return: True if the file may be stored (after any eviction); False if it must be
            streamed but not stored because not enough can be evicted (then nothing is).
        """
        max_size = self.max_size
        min_free = self.min_free
        if max_size is None and min_free <= 0:
            return True
        now = self._now() if now is None else now
        used = self._index.total_size()
        # Without a floor, free space is made to meet it whatever the plan evicts.
        free = self.free_bytes() + (size if written else 0) if min_free > 0 else size
        evicted: list[FileRecord] = []
        for _attempt in range(_MAX_EVICTION_ROUNDS):
            # The cheap check first: most commits need no eviction and so no scan of the index.
            if _fits(size, used, max_size, free, min_free):
                if evicted:
                    self.log.info(
                        "evicted {count} least recently used files ({freed} bytes)"
                        " to store {size} bytes",
                        count=len(evicted), freed=sum(r.size for r in evicted), size=size,
                    )
                return True
            records = self._records(now)
            plan = plan_eviction(records, size, used, max_size, free, min_free, self._protected(now))
            if plan is None:
                release(records)
                limits = []
                if max_size is not None and used + size > max_size:
                    limits.append(f"storing it would exceed max_size ({used} of {max_size} bytes stored)")
                if free - size < min_free:
                    limits.append(f"it would leave {free - size} bytes free, less than min_free ({min_free})")
                self.log.warn(
                    "no room to store a file of {size} bytes: {limits}, and too few stored files"
                    " may be evicted (pinned, in use or downloading)",
                    size=size, limits=" and ".join(limits), used=used, max_size=max_size,
                    free=free, min_free=min_free,
                )
                return False
            removed = self._remove(plan)
            removed += self._remove_deltas_of(records, removed, self._protected(now), EVICTED)
            release(records)
            evicted += removed
            # Counted rather than measured again: a file system may free blocks later.
            free += sum(r.size for r in removed)
            # Read again: another process may have stored or removed files meanwhile. A file
            # planned but pinned since by another process is kept, and the next round plans
            # without it.
            used = self._index.total_size()
        return _fits(size, used, max_size, free, min_free)

    def gc(self, now: _Now | None = None) -> GcReport:
        """Remove expired files, then evict until the size cap and the free-space floor hold."""
        state = self._now() if now is None else now
        records = self._records(state)
        protected = self._protected(state)
        free_before = self.free_bytes() if self.min_free > 0 else 0

        expired = self._remove(
            plan_expiry(records, self._clock.seconds(), self.expiry_days, protected), EXPIRED
        )
        # Also the deltas a version left behind however it went (by another process, or a
        # delta busy when its version went): a sweep of every version, not only these.
        expired += self._remove_deltas_of(records, expired, protected, EXPIRED, sweep=True)
        expired_bytes = sum(r.size for r in expired)
        gone = {r.sha256 for r in expired}
        remaining = [r for r in records if r.sha256 not in gone]

        max_size = self.max_size
        min_free = self.min_free
        used = self._index.total_size()
        # Counted rather than measured after the removals: a file system may free blocks later.
        free = free_before + expired_bytes if min_free > 0 else 0
        plan = plan_eviction(remaining, 0, used, max_size, free, min_free, protected)
        evicted = self._remove(plan) if plan else []
        evicted += self._remove_deltas_of(remaining, evicted, protected, EVICTED)
        evicted_bytes = sum(r.size for r in evicted)
        release(records)
        release(remaining)

        report = GcReport(
            expired=len(expired),
            expired_bytes=expired_bytes,
            evicted=len(evicted),
            evicted_bytes=evicted_bytes,
            bytes_freed=expired_bytes + evicted_bytes,
            over_limit=plan is None,
            files=self._index.file_count(),
            size=self._index.total_size(),
        )
        if plan is None:
            self.log.warn(
                "cache over its limits: {used} bytes stored (cap {max_size}), {free} bytes free"
                " (floor {min_free}), and not enough may be evicted",
                used=used, max_size=max_size, free=free, min_free=min_free,
            )
        self.log.info(
            "cache gc: {expired} expired ({expired_bytes} bytes), {evicted} evicted"
            " ({evicted_bytes} bytes); {files} files, {size} bytes left",
            expired=report.expired, expired_bytes=report.expired_bytes,
            evicted=report.evicted, evicted_bytes=report.evicted_bytes,
            files=report.files, size=report.size,
        )
        return report
