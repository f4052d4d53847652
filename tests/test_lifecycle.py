"""Tests for proxy.lifecycle: expiry, eviction planning and applying them to a real cache."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred
import pytest
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.config import CacheConfig
from proxy.index import CacheIndex, FileRecord, MetadataRecord
from proxy.lifecycle import (
    SECONDS_PER_DAY,
    CacheLifecycle,
    GcReport,
    orphaned_deltas,
    plan_eviction,
    plan_expiry,
)
from tests.helpers.logs import Logged

DAY = SECONDS_PER_DAY
NOW = 100 * DAY


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def rec(
    name: str,
    size: int = 100,
    last_used_at: float = 0.0,
    stored_at: float = 0.0,
    cached: bool = True,
    use_count: int = 1,
) -> FileRecord:
    return FileRecord(
        sha256=sha(name),
        size=size,
        upstream="ubuntu",
        paths=(f"ubuntu/images/{name}",),
        product="ubuntu:noble:amd64:default",
        version="20240622",
        stored_at=stored_at,
        last_used_at=last_used_at,
        use_count=use_count,
        cached=cached,
        auto_update=not cached,
    )


# -- plan_expiry --------------------------------------------------------------


def test_expiry_boundary() -> None:
    exactly = rec("exactly", last_used_at=NOW - 10 * DAY)
    older = rec("older", last_used_at=NOW - 10 * DAY - 1)
    recent = rec("recent", last_used_at=NOW - DAY)
    assert plan_expiry([exactly, older, recent], NOW, 10, set()) == [older.sha256]
    assert plan_expiry([exactly, older, recent], NOW + 1, 10, set()) == [
        older.sha256,
        exactly.sha256,
    ]
    # Fractional days are days too.
    assert plan_expiry([recent], NOW, 0.5, set()) == [recent.sha256]


def test_expiry_counts_from_storing_when_later() -> None:
    # Stored (again) recently although last used long ago, or never used at all.
    restored = rec("restored", last_used_at=NOW - 50 * DAY, stored_at=NOW - DAY)
    never = rec("never", last_used_at=NOW - 20 * DAY, stored_at=NOW - 20 * DAY, use_count=0)
    assert plan_expiry([restored, never], NOW, 10, set()) == [never.sha256]


def test_pinned_and_protected_never_expire() -> None:
    pinned = rec("pinned", last_used_at=0, cached=False)
    busy = rec("busy", last_used_at=0)
    old = rec("old", last_used_at=0)
    assert plan_expiry([pinned, busy, old], NOW, 10, {busy.sha256}) == [old.sha256]


def test_expiry_oldest_first_and_disabled_by_zero() -> None:
    a = rec("a", last_used_at=3)
    b = rec("b", last_used_at=1)
    c = rec("c", last_used_at=2)
    assert plan_expiry([a, b, c], NOW, 10, set()) == [b.sha256, c.sha256, a.sha256]
    assert plan_expiry([a, b, c], NOW, 0, set()) == []


# -- plan_eviction ------------------------------------------------------------


def lru_set() -> list[FileRecord]:
    return [
        rec("newest", size=100, last_used_at=50),
        rec("oldest", size=100, last_used_at=10),
        rec("middle", size=100, last_used_at=30),
    ]


def test_nothing_to_evict_when_it_fits() -> None:
    records = lru_set()
    assert plan_eviction(records, 100, 300, 400, 10_000, 0, set()) == []
    assert plan_eviction(records, 100, 300, None, 10_000, 9_900, set()) == []
    assert plan_eviction([], 0, 0, None, 0, 0, set()) == []


def test_evicts_least_recently_used_first() -> None:
    records = lru_set()
    assert plan_eviction(records, 100, 300, 350, 10_000, 0, set()) == [sha("oldest")]
    assert plan_eviction(records, 100, 300, 200, 10_000, 0, set()) == [
        sha("oldest"),
        sha("middle"),
    ]
    assert plan_eviction(records, 100, 300, 100, 10_000, 0, set()) == [
        sha("oldest"),
        sha("middle"),
        sha("newest"),
    ]


def test_equal_times_evict_in_a_stable_order() -> None:
    records = [rec(n, last_used_at=5) for n in ("x", "y", "z")]
    plan = plan_eviction(records, 0, 300, 100, 0, 0, set())
    assert plan == plan_eviction(list(reversed(records)), 0, 300, 100, 0, 0, set())
    assert plan is not None and len(plan) == 2


def test_pinned_and_busy_never_evicted() -> None:
    records = [
        rec("pinned", last_used_at=1, cached=False),
        rec("busy", last_used_at=2),
        rec("free", last_used_at=3),
        rec("free2", last_used_at=4),
    ]
    plan = plan_eviction(records, 100, 400, 400, 10_000, 0, {sha("busy")})
    assert plan == [sha("free")]
    plan = plan_eviction(records, 100, 400, 300, 10_000, 0, {sha("busy")})
    assert plan == [sha("free"), sha("free2")]


def test_impossible_is_none() -> None:
    records = [rec("pinned", cached=False), rec("busy"), rec("free")]
    # Evicting "free" (100) is not enough for 200 more under a 300 cap.
    assert plan_eviction(records, 200, 300, 300, 10_000, 0, {sha("busy")}) is None
    # A file bigger than the cap itself never fits.
    assert plan_eviction([], 500, 0, 400, 10_000, 0, set()) is None
    # The floor cannot be met even with everything evictable gone.
    assert plan_eviction(records, 100, 300, None, 150, 300, {sha("busy")}) is None


def test_min_free_alone() -> None:
    records = lru_set()
    # 1000 free, 100 more needed, keep 950 free: 50 short, so the oldest goes.
    assert plan_eviction(records, 100, 300, None, 1000, 950, set()) == [sha("oldest")]
    # 150 short: two files.
    assert plan_eviction(records, 100, 300, None, 1000, 1050, set()) == [
        sha("oldest"),
        sha("middle"),
    ]


def test_cap_and_min_free_together_take_the_larger_shortfall() -> None:
    records = lru_set()
    # The cap wants 100 gone, the floor 200: two files satisfy both.
    assert plan_eviction(records, 100, 300, 300, 1000, 1100, set()) == [
        sha("oldest"),
        sha("middle"),
    ]
    # The cap wants 200 gone, the floor 50: two files again.
    assert plan_eviction(records, 100, 300, 200, 1000, 950, set()) == [
        sha("oldest"),
        sha("middle"),
    ]
    # The cap is met but the floor is not.
    assert plan_eviction(records, 100, 300, 1000, 1000, 950, set()) == [sha("oldest")]


def test_restoring_limits_with_no_need() -> None:
    records = lru_set()
    assert plan_eviction(records, 0, 300, 250, 0, 0, set()) == [sha("oldest")]
    assert plan_eviction(records, 0, 300, 300, 0, 0, set()) == []


# -- CacheLifecycle on a real index and store ---------------------------------


@attrs.define
class Cache:
    index: CacheIndex
    store: BlobStore
    clock: Clock
    busy: set[str] = attrs.field(factory=set)

    def add(
        self, name: str, size: int, last_used_at: float, cached: bool = True, version: str = "20240622"
    ) -> FileRecord:
        """Store a blob of C{size} bytes and its record (a delta when C{name} ends in .vcdiff)."""
        data = name.encode() * (size // len(name)) + name.encode()[: size % len(name)]
        partial = self.store.new_partial()
        partial.write(data)
        digest = hashlib.sha256(data).hexdigest()
        partial.commit(digest)
        record = attrs.evolve(
            rec(name, size=size, last_used_at=last_used_at, stored_at=last_used_at, cached=cached),
            sha256=digest, version=version,
        )
        self.index.put(record)
        return record

    def lifecycle(self, config: CacheConfig, free: int | None = None) -> CacheLifecycle:
        lifecycle = CacheLifecycle(self.index, self.store, config, self.clock, lambda: set(self.busy))
        if free is not None:
            # The free space of a real file system changes under the test; fix it.
            lifecycle.free_bytes = lambda: free  # type: ignore[method-assign]
        return lifecycle

    def stored(self) -> set[str]:
        return {r.sha256 for r in self.index.records()}


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    clock = Clock()
    clock.advance(NOW)
    index = CacheIndex(str(tmp_path / "cache" / "index"), clock)
    store = BlobStore(FilePath(str(tmp_path / "cache")))
    yield Cache(index, store, clock)
    index.close()


def config(tmp_path: Path, **changes: Any) -> CacheConfig:
    return attrs.evolve(CacheConfig(dir=str(tmp_path / "cache")), **changes)


def test_make_room_evicts_lru_blobs_on_disk(cache: Cache, tmp_path: Path, logged: Logged) -> None:
    old = cache.add("old", 1000, last_used_at=NOW - 3 * DAY)
    mid = cache.add("mid", 1000, last_used_at=NOW - 2 * DAY)
    new = cache.add("new", 1000, last_used_at=NOW - 1 * DAY)
    pinned = cache.add("pinned", 1000, last_used_at=NOW - 9 * DAY, cached=False)
    lifecycle = cache.lifecycle(config(tmp_path, max_size=4500))
    assert cache.index.total_size() == 4000

    # 400 more fit under the cap: nothing goes.
    assert lifecycle.make_room(400) is True
    assert cache.stored() == {old.sha256, mid.sha256, new.sha256, pinned.sha256}

    # 1200 more: 700 over, so the least recently used cached file goes, record and blob.
    assert lifecycle.make_room(1200) is True
    assert cache.stored() == {mid.sha256, new.sha256, pinned.sha256}
    assert not cache.store.exists(old.sha256)
    assert cache.store.exists(pinned.sha256)
    assert cache.index.total_size() == 3000
    evicted = logged.starting("evicted")
    assert [(e["count"], e["freed"], e["size"]) for e in evicted] == [(1, 1000, 1200)]


def test_make_room_refuses_and_evicts_nothing_when_impossible(
    cache: Cache, tmp_path: Path, logged: Logged
) -> None:
    busy = cache.add("busy", 1000, last_used_at=NOW - 3 * DAY)
    free = cache.add("free", 1000, last_used_at=NOW - 2 * DAY)
    pinned = cache.add("pinned", 1000, last_used_at=NOW - 9 * DAY, cached=False)
    cache.busy.add(busy.sha256)
    lifecycle = cache.lifecycle(config(tmp_path, max_size=3000))

    # Needs 1500 gone; only "free" (1000) may go.
    assert lifecycle.make_room(1500) is False
    assert cache.stored() == {busy.sha256, free.sha256, pinned.sha256}
    assert all(cache.store.exists(r.sha256) for r in (busy, free, pinned))
    assert logged.starting("no room")

    # Once the download is over, the busy file may go.
    cache.busy.clear()
    assert lifecycle.make_room(1500) is True
    assert cache.stored() == {pinned.sha256}


def test_make_room_with_min_free(cache: Cache, tmp_path: Path) -> None:
    old = cache.add("old", 1000, last_used_at=NOW - 3 * DAY)
    new = cache.add("new", 1000, last_used_at=NOW - 1 * DAY)
    cfg = config(tmp_path, min_free=10_000)
    # The new file's 500 bytes are already written (its temp file): 10_200 free now is
    # 10_700 without it, 10_200 after storing it. Enough.
    assert cache.lifecycle(cfg, free=10_200).make_room(500) is True
    assert cache.stored() == {old.sha256, new.sha256}
    # 9_600 free: 400 short of the floor, so the oldest goes.
    assert cache.lifecycle(cfg, free=9_600).make_room(500) is True
    assert cache.stored() == {new.sha256}
    # Not written yet: its 500 bytes still have to come out of the 10_200 free.
    assert cache.lifecycle(cfg, free=10_200).make_room(500, written=False) is True
    assert cache.stored() == set()


def test_make_room_names_the_limit_that_binds(cache: Cache, tmp_path: Path, logged: Logged) -> None:
    cache.add("pinned", 1000, last_used_at=NOW, cached=False)
    assert cache.lifecycle(config(tmp_path, min_free=10_000), free=9_000).make_room(500) is False
    assert cache.lifecycle(config(tmp_path, max_size=1200), free=10**9).make_room(500) is False
    lines = [e["log_format"].format(**e) for e in logged.starting("no room")]
    assert "it would leave 9000 bytes free, less than min_free (10000)" in lines[0]
    assert "max_size" not in lines[0]
    assert "would exceed max_size (1000 of 1200 bytes stored)" in lines[1]
    assert "min_free" not in lines[1]


def test_room_to_receive_needs_the_bytes_free_on_the_file_system(
    cache: Cache, tmp_path: Path, logged: Logged
) -> None:
    old = cache.add("old", 1000, last_used_at=NOW - 3 * DAY)
    new = cache.add("new", 1000, last_used_at=NOW - 1 * DAY)
    pinned = cache.add("pinned", 1000, last_used_at=NOW - 9 * DAY, cached=False)
    # No limit is configured; the file system's own free space is what counts.
    cfg = config(tmp_path)
    assert cache.lifecycle(cfg, free=800).room_to_receive(800) is True
    assert cache.stored() == {old.sha256, new.sha256, pinned.sha256}
    # 500 short: the least recently used cached file goes.
    assert cache.lifecycle(cfg, free=300).room_to_receive(800) is True
    assert cache.stored() == {new.sha256, pinned.sha256}
    # More than every evictable file frees: nothing goes, and the line says why.
    assert cache.lifecycle(cfg, free=300).room_to_receive(5000) is False
    assert cache.stored() == {new.sha256, pinned.sha256}
    assert any(
        e["log_format"].format(**e).startswith("no room to receive 5000 bytes: the cache's file system has 300")
        for e in logged.starting("no room")
    )


def test_room_to_receive_later_takes_the_lock_only_when_short(cache: Cache, tmp_path: Path) -> None:
    lifecycle = cache.lifecycle(config(tmp_path), free=1000)
    results: list[bool] = []
    lifecycle.room_to_receive_later(1000).addCallback(results.append)
    lifecycle.room_to_receive_later(1001).addCallback(results.append)
    assert results == [True, False]


def test_make_room_without_limits_does_nothing(cache: Cache, tmp_path: Path) -> None:
    cache.add("a", 1000, last_used_at=0)
    lifecycle = cache.lifecycle(config(tmp_path), free=0)
    assert lifecycle.make_room(10**12) is True
    assert len(cache.stored()) == 1


def test_make_room_uses_unflushed_uses(cache: Cache, tmp_path: Path) -> None:
    a = cache.add("a", 1000, last_used_at=NOW - 3 * DAY)
    b = cache.add("b", 1000, last_used_at=NOW - 2 * DAY)
    # "a" was just served; the use is still in memory.
    cache.index.note_use(a.sha256)
    assert cache.lifecycle(config(tmp_path, max_size=2000)).make_room(1000) is True
    assert cache.stored() == {a.sha256}
    assert not cache.store.exists(b.sha256)


def test_metadata_blobs_are_kept(cache: Cache, tmp_path: Path) -> None:
    shared = cache.add("shared", 1000, last_used_at=0)
    cache.index.put_metadata(
        MetadataRecord("ubuntu", "streams/v1/index.json", shared.sha256, None, None, 0.0, 0.0)
    )
    report = cache.lifecycle(config(tmp_path)).gc()
    assert report.expired == 0
    assert cache.store.exists(shared.sha256)


def test_gc_expires_then_applies_the_cap(cache: Cache, tmp_path: Path, logged: Logged) -> None:
    expired = cache.add("expired", 1000, last_used_at=NOW - 11 * DAY)
    edge = cache.add("edge", 1000, last_used_at=NOW - 10 * DAY)
    pinned = cache.add("pinned", 1000, last_used_at=NOW - 50 * DAY, cached=False)
    busy = cache.add("busy", 1000, last_used_at=NOW - 30 * DAY)
    lru = cache.add("lru", 1000, last_used_at=NOW - 5 * DAY)
    recent = cache.add("recent", 1000, last_used_at=NOW - 1 * DAY)
    cache.busy.add(busy.sha256)

    report = cache.lifecycle(config(tmp_path, max_size=3500)).gc()

    # Expiry takes "expired"; 5000 left against a 3500 cap: "edge" and "lru" are the least
    # recently used that may go.
    assert report == GcReport(
        expired=1, expired_bytes=1000, evicted=2, evicted_bytes=2000, bytes_freed=3000,
        over_limit=False, files=3, size=3000,
    )
    assert cache.stored() == {pinned.sha256, busy.sha256, recent.sha256}
    for gone in (expired, edge, lru):
        assert not cache.store.exists(gone.sha256)
    summary = logged.starting("cache gc")
    assert len(summary) == 1 and summary[0]["evicted"] == 2

    # A day later "edge" would have expired anyway; nothing else is due.
    cache.clock.advance(DAY)
    assert cache.lifecycle(config(tmp_path, max_size=3500)).gc() == GcReport(
        expired=0, expired_bytes=0, evicted=0, evicted_bytes=0, bytes_freed=0,
        over_limit=False, files=3, size=3000,
    )


def test_gc_with_min_free_and_over_limit(cache: Cache, tmp_path: Path) -> None:
    a = cache.add("a", 1000, last_used_at=NOW - 2 * DAY)
    b = cache.add("b", 1000, last_used_at=NOW - 1 * DAY)
    pinned = cache.add("pinned", 1000, last_used_at=0, cached=False)
    # 500 short of the floor: one file goes.
    report = cache.lifecycle(config(tmp_path, min_free=2000), free=1500).gc()
    assert (report.evicted, report.evicted_bytes, report.over_limit) == (1, 1000, False)
    assert cache.stored() == {b.sha256, pinned.sha256}
    assert not cache.store.exists(a.sha256)
    # 5000 short: impossible, so nothing goes and the report says so.
    report = cache.lifecycle(config(tmp_path, min_free=6000), free=1000).gc()
    assert (report.evicted, report.over_limit) == (0, True)
    assert cache.stored() == {b.sha256, pinned.sha256}


def test_gc_keeps_a_file_pinned_after_planning(cache: Cache, tmp_path: Path) -> None:
    a = cache.add("a", 1000, last_used_at=0)
    lifecycle = cache.lifecycle(config(tmp_path))
    real_records = lifecycle._records

    def pin_meanwhile(now: Any) -> list[FileRecord]:
        records = real_records(now)
        # Another process pins the file between the plan and its removal.
        cache.index.set_flags(a.sha256, cached=False, auto_update=True)
        return records

    lifecycle._records = pin_meanwhile  # type: ignore[method-assign]
    report = lifecycle.gc()
    assert report.expired == 0
    assert cache.store.exists(a.sha256)


def test_config_without_lifecycle_keys_uses_defaults(cache: Cache, tmp_path: Path) -> None:
    old = cache.add("old", 1000, last_used_at=NOW - 11 * DAY)
    young = cache.add("young", 1000, last_used_at=NOW - 9 * DAY)
    lifecycle = cache.lifecycle(cast(CacheConfig, SimpleNamespace(dir=str(tmp_path / "cache"))))
    assert (lifecycle.expiry_days, lifecycle.max_size, lifecycle.min_free) == (10.0, None, 0)
    assert lifecycle.make_room(10**9) is True
    assert lifecycle.gc().expired == 1
    assert cache.stored() == {young.sha256}
    assert not cache.store.exists(old.sha256)


def test_free_bytes_reads_the_cache_file_system(cache: Cache, tmp_path: Path) -> None:
    free = cache.lifecycle(config(tmp_path)).free_bytes()
    assert free > 0


def test_operations_on_the_worker_run_one_at_a_time_each_with_a_fresh_snapshot(
    cache: Cache, tmp_path: Path
) -> None:
    """
    gc and make_room run on a worker one after the other; what the reactor knows of busy
    files is read when an operation starts, not when it was asked for.
    """

    cache.add("a", 1000, last_used_at=NOW - 1 * DAY)
    jobs: list[tuple[Any, Deferred[Any]]] = []

    def held(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        jobs.append((lambda: fn(*args, **kwargs), d))
        return d

    asked: list[int] = []

    def busy() -> set[str]:
        asked.append(1)
        return set()

    lifecycle = CacheLifecycle(cache.index, cache.store, config(tmp_path), cache.clock, busy, work=held)
    gc_done = lifecycle.gc_later()
    room = lifecycle.make_room_later(10)
    assert (len(jobs), len(asked)) == (1, 1)
    run, d = jobs.pop()
    d.callback(run())
    assert gc_done.called
    # Only now does the second operation start, with its own snapshot.
    assert (len(jobs), len(asked)) == (1, 2)
    run, d = jobs.pop()
    d.callback(run())
    assert room.result is True


def test_gc_keeps_a_file_a_response_started_reading_after_planning(cache: Cache, tmp_path: Path) -> None:
    """The files held are read again when the removal starts, not only when it was planned."""
    a = cache.add("a", 1000, last_used_at=0)
    lifecycle = cache.lifecycle(config(tmp_path))
    real_records = lifecycle._records

    def held_meanwhile(now: Any) -> list[FileRecord]:
        records = real_records(now)
        cache.busy.add(a.sha256)
        return records

    lifecycle._records = held_meanwhile  # type: ignore[method-assign]
    assert lifecycle.gc().expired == 0
    assert cache.store.exists(a.sha256) and cache.index.get(a.sha256) is not None


def test_a_file_being_removed_is_claimed_until_the_removal_is_over() -> None:
    from proxy.busy import InUse

    in_use = InUse()
    with in_use.holding("held"):
        assert in_use.claim(["held", "free"]) == ["free"]
    assert in_use.removing("free") and not in_use.removing("held")
    results: list[object] = []
    Deferred.fromCoroutine(in_use.settled(["free", "other"])).addBoth(results.append)
    assert results == []
    in_use.release(["free"])
    assert results == [None]
    assert not in_use.removing("free")


# -- deltas go with their version -------------------------------------------------------------


def test_orphaned_deltas_are_the_cached_deltas_of_versions_with_nothing_else_left() -> None:
    def at(record: FileRecord, version: str) -> FileRecord:
        return attrs.evolve(record, version=version)

    v2_meta, v2_delta = at(rec("v2/lxd.tar.xz"), "v2"), at(rec("v2/delta-v1.vcdiff"), "v2")
    v3_delta = at(rec("v3/delta-v2.vcdiff"), "v3")
    v4_pinned_delta = at(rec("v4/delta-v3.vcdiff", cached=False), "v4")
    v5_busy_delta = at(rec("v5/delta-v4.vcdiff"), "v5")
    records = [v2_meta, v2_delta, v3_delta, v4_pinned_delta, v5_busy_delta]
    assert orphaned_deltas(records, {v5_busy_delta.sha256}) == [v3_delta.sha256]
    # Another upstream's file of the same product and version does not keep it.
    assert orphaned_deltas([attrs.evolve(v2_meta, upstream="other"), v2_delta], set()) == [v2_delta.sha256]


def test_gc_expires_a_version_with_its_deltas_even_used_ones(cache: Cache, tmp_path: Path) -> None:
    meta = cache.add("v2/lxd.tar.xz", 100, last_used_at=NOW - 11 * DAY, version="v2")
    root = cache.add("v2/rootfs.squashfs", 1000, last_used_at=NOW - 11 * DAY, version="v2")
    # Used by a refreshing host more recently than the version's own files.
    delta = cache.add("v2/delta-v1.vcdiff", 50, last_used_at=NOW - 1 * DAY, version="v2")
    kept_meta = cache.add("v3/lxd.tar.xz", 100, last_used_at=NOW - 1 * DAY, version="v3")
    kept_delta = cache.add("v3/delta-v2.vcdiff", 50, last_used_at=NOW - 20 * DAY, version="v3")
    report = cache.lifecycle(config(tmp_path, expiry_days=10)).gc()
    assert (report.expired, report.expired_bytes) == (4, 1200)
    # kept_delta is older than the expiry itself, but only for its own age: it expires as any file.
    assert cache.stored() == {kept_meta.sha256}
    for gone in (meta, root, delta, kept_delta):
        assert not cache.store.exists(gone.sha256)


def test_eviction_takes_a_version_s_deltas_with_it(cache: Cache, tmp_path: Path) -> None:
    old_meta = cache.add("v1/lxd.tar.xz", 100, last_used_at=NOW - 6 * DAY, version="v1")
    old_root = cache.add("v1/rootfs.squashfs", 1000, last_used_at=NOW - 5 * DAY, version="v1")
    old_delta = cache.add("v1/delta-v0.vcdiff", 200, last_used_at=NOW - 1 * DAY, version="v1")
    new = cache.add("v2/rootfs.squashfs", 1000, last_used_at=NOW - 2 * DAY, version="v2")
    pinned = cache.add("v2/delta-v1.vcdiff", 200, last_used_at=NOW - 9 * DAY, cached=False, version="v2")
    lifecycle = cache.lifecycle(config(tmp_path, max_size=2600))
    # 2500 stored; 1000 more need 900 gone: v1's two files, the least recently used, and with
    # them v1's delta (used later, but useless alone).
    assert lifecycle.make_room(1000) is True
    assert cache.stored() == {new.sha256, pinned.sha256}
    assert cache.index.total_size() == 1200
    assert not any(cache.store.exists(r.sha256) for r in (old_meta, old_root, old_delta))
    # A busy delta stays until the next gc, which sweeps it.
    lone = cache.add("v9/delta-v8.vcdiff", 10, last_used_at=NOW, version="v9")
    cache.busy.add(lone.sha256)
    assert cache.lifecycle(config(tmp_path)).gc().expired == 0
    cache.busy.clear()
    assert cache.lifecycle(config(tmp_path)).gc().expired == 1
    assert cache.stored() == {new.sha256, pinned.sha256}
