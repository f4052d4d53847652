"""Tests for proxy.index: the LMDB cache index and start-up reconciliation."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.index import (
    IndexBusy,
    FORMAT_VERSION,
    CacheIndex,
    FileRecord,
    ImageParts,
    IndexFormatError,
    MetadataRecord,
    PinRecord,
    ReconcileReport,
    Stats,
    item_path,
    reconcile,
    split_item_path,
)
from tests.helpers.logs import Logged


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record(data: bytes, *paths: str, upstream: str = "ubuntu", **changes: Any) -> FileRecord:
    rec = FileRecord(
        sha256=sha(data),
        size=len(data),
        upstream=upstream,
        paths=paths or (f"{upstream}/images/{sha(data)[:8]}/rootfs.squashfs",),
        product="ubuntu:noble:amd64:default",
        version="20240622",
        stored_at=100.0,
        last_used_at=100.0,
        use_count=0,
    )
    return attrs.evolve(rec, **changes)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(1000)
    return c


@pytest.fixture
def index(tmp_path: Path, clock: Clock) -> Iterator[CacheIndex]:
    idx = CacheIndex(str(tmp_path / "index"), clock)
    yield idx
    idx.close()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(FilePath(str(tmp_path / "cache")))


class CountingEnv:
    """Wraps an lmdb Environment and counts the write transactions begun."""

    def __init__(self, env: Any) -> None:
        self._env = env
        self.write_txns = 0

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("write"):
            self.write_txns += 1
        return self._env.begin(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


def commit_blob(store: BlobStore, data: bytes) -> str:
    partial = store.new_partial()
    partial.write(data)
    partial.commit(sha(data))
    return sha(data)


# -- records ------------------------------------------------------------------


def test_defaults_for_on_demand_files() -> None:
    rec = record(b"x")
    assert rec.cached is True
    assert rec.auto_update is False


def test_record_validation() -> None:
    with pytest.raises(ValueError):
        record(b"x", sha256="../x")
    with pytest.raises(ValueError):
        record(b"x", size=-1)
    with pytest.raises(ValueError):
        record(b"x", "no-upstream-name")
    with pytest.raises(ValueError):
        record(b"x", "ubuntu/")
    with pytest.raises(ValueError):
        record(b"x", upstream="a/b")
    with pytest.raises(ValueError):
        MetadataRecord("ubuntu", "/abs", sha(b""), None, None, 0.0, 0.0)


def test_item_path_helpers() -> None:
    assert item_path("ubuntu", "a/b.squashfs") == "ubuntu/a/b.squashfs"
    assert split_item_path("ubuntu/a/b.squashfs") == ("ubuntu", "a/b.squashfs")
    for bad in ("", "ubuntu", "/a", "ubuntu/", "u\0/a"):
        with pytest.raises(ValueError):
            split_item_path(bad)


def test_put_get_round_trip(index: CacheIndex) -> None:
    rec = record(b"one", "ubuntu/server/a.squashfs", auto_update=True, use_count=3)
    index.put(rec)
    assert index.get(rec.sha256) == rec
    assert index.get(sha(b"missing")) is None
    assert index.find_path("ubuntu", "server/a.squashfs") == rec
    assert index.find_path("ubuntu", "server/b.squashfs") is None
    assert index.find_path("other", "server/a.squashfs") is None


def test_get_refuses_invalid_digest(index: CacheIndex) -> None:
    with pytest.raises(ValueError):
        index.get("../x")
    with pytest.raises(ValueError):
        index.get("A" * 64)


def test_persists_across_reopen(tmp_path: Path, clock: Clock) -> None:
    rec = record(b"durable")
    meta = MetadataRecord("ubuntu", "streams/v1/index.json", sha(b"{}"), '"e1"', None, 5.0, 6.0)
    first = CacheIndex(str(tmp_path / "idx"), clock)
    first.put(rec)
    first.put_metadata(meta)
    first.close()
    second = CacheIndex(str(tmp_path / "idx"), clock)
    try:
        assert list(second.records()) == [rec]
        assert second.get_metadata("ubuntu", "streams/v1/index.json") == meta
    finally:
        second.close()


def test_records_are_versioned_json(index: CacheIndex) -> None:
    rec = record(b"json")
    index.put(rec)
    with index._env.begin(db=index._files) as txn:
        raw = txn.get(rec.sha256.encode())
    assert raw is not None
    data = json.loads(raw)
    assert data["v"] == FORMAT_VERSION
    assert data["paths"] == list(rec.paths)


def test_unknown_format_version_refused(index: CacheIndex) -> None:
    rec = record(b"future")
    with index._env.begin(write=True, db=index._files) as txn:
        txn.put(rec.sha256.encode(), json.dumps({"v": 99, "kind": "file"}).encode())
    with pytest.raises(IndexFormatError):
        index.get(rec.sha256)


def test_unknown_index_format_refused(tmp_path: Path, clock: Clock) -> None:
    idx = CacheIndex(str(tmp_path / "idx"), clock)
    with idx._env.begin(write=True, db=idx._info) as txn:
        txn.put(b"format", b"99")
    idx.close()
    with pytest.raises(IndexFormatError):
        CacheIndex(str(tmp_path / "idx"), clock)


def test_add_path_dedups(index: CacheIndex) -> None:
    rec = record(b"shared", "ubuntu/a/rootfs.squashfs")
    index.put(rec)

    updated = index.add_path(rec.sha256, "mirror", "x/rootfs.squashfs")
    assert updated.paths == ("ubuntu/a/rootfs.squashfs", "mirror/x/rootfs.squashfs")
    again = index.add_path(rec.sha256, "mirror", "x/rootfs.squashfs")
    assert again == updated
    index.add_path(rec.sha256, "ubuntu", "a/rootfs.squashfs")

    assert list(index.records()) == [updated]
    assert index.find_path("mirror", "x/rootfs.squashfs") == updated
    assert index.find_path("ubuntu", "a/rootfs.squashfs") == updated


def test_add_path_unknown_record(index: CacheIndex) -> None:
    with pytest.raises(KeyError):
        index.add_path(sha(b"nothing"), "ubuntu", "a")


def test_path_moves_to_new_content(index: CacheIndex) -> None:
    old = record(b"old build", "ubuntu/latest/rootfs", "ubuntu/v1/rootfs")
    index.put(old)
    new = record(b"new build", "ubuntu/latest/rootfs")
    index.put(new)
    assert index.find_path("ubuntu", "latest/rootfs") == new
    old_now = index.get(old.sha256)
    assert old_now is not None
    assert old_now.paths == ("ubuntu/v1/rootfs",)
    assert index.find_path("ubuntu", "v1/rootfs") == old_now


def test_put_replacing_record_drops_old_paths(index: CacheIndex) -> None:
    rec = record(b"r", "ubuntu/a", "ubuntu/b")
    index.put(rec)
    index.put(attrs.evolve(rec, paths=("ubuntu/b",)))
    assert index.find_path("ubuntu", "a") is None
    assert index.find_path("ubuntu", "b") is not None


def test_remove_drops_paths(index: CacheIndex) -> None:
    rec = record(b"bye", "ubuntu/a")
    index.put(rec)
    index.add_path(rec.sha256, "mirror", "b")
    assert index.remove(rec.sha256) is True
    assert index.remove(rec.sha256) is False
    assert index.get(rec.sha256) is None
    assert index.find_path("ubuntu", "a") is None
    assert index.find_path("mirror", "b") is None
    with index._env.begin(db=index._paths) as txn:
        assert list(txn.cursor().iternext()) == []


def test_long_paths_are_hashed_keys(index: CacheIndex) -> None:
    long_path = "d/" * 400 + "rootfs.squashfs"
    rec = record(b"long", item_path("ubuntu", long_path))
    index.put(rec)
    assert index.find_path("ubuntu", long_path) == rec
    assert index.find_path("ubuntu", long_path + "x") is None
    meta = MetadataRecord("ubuntu", long_path, sha(b"m"), None, None, 1.0, 1.0)
    index.put_metadata(meta)
    assert index.get_metadata("ubuntu", long_path) == meta
    assert index.remove(rec.sha256)
    assert index.find_path("ubuntu", long_path) is None


def test_records_iterates_across_batches(index: CacheIndex) -> None:
    recs = [record(b"%d" % i) for i in range(2500)]
    env = index._env
    with env.begin(write=True) as txn:
        for rec in recs:
            index._write_file_in(txn, rec)
    assert sorted(r.sha256 for r in index.records()) == sorted(r.sha256 for r in recs)
    assert len(list(index.records())) == 2500


# -- usage --------------------------------------------------------------------


def test_note_use_is_memory_only_then_one_flush(
    index: CacheIndex, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = record(b"a")
    b = record(b"b")
    index.put(a)
    index.put(b)
    counting = CountingEnv(index._env)
    monkeypatch.setattr(index, "_lmdb", counting)

    index.note_use(a.sha256)
    clock.advance(5)
    index.note_use(a.sha256)
    index.note_use(b.sha256)
    index.note_use(sha(b"not in the index"))
    assert counting.write_txns == 0
    assert index.pending_uses == {a.sha256: 2, b.sha256: 1, sha(b"not in the index"): 1}
    assert index.get(a.sha256) == a

    assert index.flush_usage() == 2
    assert counting.write_txns == 1
    assert index.pending_uses == {}
    a_now = index.get(a.sha256)
    b_now = index.get(b.sha256)
    assert a_now is not None and b_now is not None
    assert (a_now.use_count, a_now.last_used_at) == (2, 1005.0)
    assert (b_now.use_count, b_now.last_used_at) == (1, 1005.0)

    assert index.flush_usage() == 0
    assert counting.write_txns == 1


def test_flush_keeps_pending_on_failure(index: CacheIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    a = record(b"a")
    index.put(a)
    index.note_use(a.sha256)

    class Broken:
        def begin(self, **kwargs: Any) -> Any:
            raise RuntimeError("disk full")

    real = index._env
    monkeypatch.setattr(index, "_lmdb", Broken())
    with pytest.raises(RuntimeError):
        index.flush_usage()
    monkeypatch.setattr(index, "_lmdb", real)
    assert index.pending_uses == {a.sha256: 1}
    assert index.flush_usage() == 1


def test_remove_drops_pending_use(index: CacheIndex) -> None:
    a = record(b"a")
    index.put(a)
    index.note_use(a.sha256)
    index.remove(a.sha256)
    assert index.pending_uses == {}


def test_close_flushes_usage(tmp_path: Path, clock: Clock) -> None:
    idx = CacheIndex(str(tmp_path / "idx"), clock)
    a = record(b"a")
    idx.put(a)
    idx.note_use(a.sha256)
    idx.close()
    idx.close()
    again = CacheIndex(str(tmp_path / "idx"), clock)
    try:
        got = again.get(a.sha256)
        assert got is not None and got.use_count == 1
    finally:
        again.close()


# -- metadata -----------------------------------------------------------------


def test_metadata_round_trip(index: CacheIndex) -> None:
    meta = MetadataRecord(
        upstream="ubuntu",
        path="streams/v1/index.json",
        sha256=sha(b"{}"),
        etag='"abc"',
        last_modified="Sat, 22 Jun 2024 07:42:00 GMT",
        fetched_at=10.0,
        checked_at=20.0,
    )
    other = attrs.evolve(meta, upstream="images", etag=None, last_modified=None)
    index.put_metadata(meta)
    index.put_metadata(other)
    assert index.get_metadata("ubuntu", "streams/v1/index.json") == meta
    assert index.get_metadata("images", "streams/v1/index.json") == other
    assert index.get_metadata("ubuntu", "streams/v1/images.json") is None
    assert sorted(m.upstream for m in index.metadata_records()) == ["images", "ubuntu"]
    newer = attrs.evolve(meta, checked_at=30.0)
    index.put_metadata(newer)
    assert index.get_metadata("ubuntu", "streams/v1/index.json") == newer
    assert index.remove_metadata("ubuntu", "streams/v1/index.json") is True
    assert index.remove_metadata("ubuntu", "streams/v1/index.json") is False
    assert list(index.metadata_records()) == [other]
    # Metadata never shows up as a file record.
    assert list(index.records()) == []


# -- reconcile ----------------------------------------------------------------


def test_reconcile_clean(index: CacheIndex, store: BlobStore) -> None:
    assert reconcile(index, store) == ReconcileReport(0, 0, 0)


def test_reconcile_cases(
    index: CacheIndex, store: BlobStore, tmp_path: Path, logged: Logged
) -> None:
    good = record(b"good")
    commit_blob(store, b"good")
    index.put(good)

    missing = record(b"missing blob", "ubuntu/missing")
    index.put(missing)

    wrong_size = record(b"wrong size", "ubuntu/wrong")
    commit_blob(store, b"wrong size")
    index.put(attrs.evolve(wrong_size, size=999))

    orphan = commit_blob(store, b"orphan")

    meta_body = commit_blob(store, b'{"index": {}}')
    meta = MetadataRecord("ubuntu", "streams/v1/index.json", meta_body, None, None, 1.0, 1.0)
    index.put_metadata(meta)
    stale_meta = MetadataRecord("ubuntu", "streams/v1/gone.json", sha(b"gone"), None, None, 1.0, 1.0)
    index.put_metadata(stale_meta)

    for _ in range(2):
        partial = store.new_partial()
        partial.write(b"half")
        partial.flush()

    report = reconcile(index, store)

    assert report == ReconcileReport(
        temp_removed=2, orphan_blobs_removed=2, dangling_records_removed=3
    )
    assert [r.sha256 for r in index.records()] == [good.sha256]
    assert index.find_path("ubuntu", "missing") is None
    assert index.find_path("ubuntu", "wrong") is None
    assert list(index.metadata_records()) == [meta]
    assert sorted(store.stored()) == sorted([good.sha256, meta_body])
    assert not store.exists(orphan)
    assert not store.exists(wrong_size.sha256)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []

    summary = logged.starting("cache reconciled")
    assert len(summary) == 1
    assert summary[0]["orphan_blobs_removed"] == 2
    assert summary[0]["dangling_records_removed"] == 3
    assert summary[0]["temp_removed"] == 2
    dropped = {e.get("sha256") for e in logged.matching("dropping")}
    assert {missing.sha256, wrong_size.sha256, stale_meta.sha256} <= dropped

    assert reconcile(index, store) == ReconcileReport(0, 0, 0)


def test_reconcile_keeps_blob_shared_by_file_and_metadata(
    index: CacheIndex, store: BlobStore
) -> None:
    digest = commit_blob(store, b"both")
    index.put(record(b"both"))
    index.put_metadata(MetadataRecord("ubuntu", "streams/v1/x.json", digest, None, None, 1, 1))
    assert reconcile(index, store) == ReconcileReport(0, 0, 0)
    assert store.exists(digest)


# -- pins ---------------------------------------------------------------------


def test_pins_round_trip_replace_and_remove(index: CacheIndex) -> None:
    noble = PinRecord("ubuntu", "ubuntu/24.04", "container", "x86_64", 10.0)
    vm = attrs.evolve(noble, type="virtual-machine")
    host = PinRecord("images", "alpine/3.19", "container", "", 20.0)
    long_alias = PinRecord("images", "x" * 600, "container", "aarch64", 30.0)
    for pin in (noble, vm, host, long_alias):
        index.put_pin(pin)
    assert sorted(index.pins(), key=attrs.astuple) == sorted(
        [noble, vm, host, long_alias], key=attrs.astuple
    )

    again = attrs.evolve(noble, pinned_at=50.0)
    index.put_pin(again)
    assert len(index.pins()) == 4
    assert again in index.pins()

    assert index.remove_pin("ubuntu", "ubuntu/24.04", "container", "x86_64") is True
    assert index.remove_pin("ubuntu", "ubuntu/24.04", "container", "x86_64") is False
    assert index.remove_pin("images", "x" * 600, "container", "aarch64") is True
    assert sorted(index.pins(), key=attrs.astuple) == sorted([vm, host], key=attrs.astuple)
    # Pins are not files and not metadata.
    assert list(index.records()) == [] and list(index.metadata_records()) == []


def test_pin_validation() -> None:
    with pytest.raises(ValueError):
        PinRecord("", "ubuntu/24.04", "container", "", 1.0)
    with pytest.raises(ValueError):
        PinRecord("ubuntu", "", "container", "", 1.0)
    with pytest.raises(ValueError):
        PinRecord("ubuntu", "a\0b", "container", "", 1.0)


def test_pins_persist_across_reopen(tmp_path: Path, clock: Clock) -> None:
    pin = PinRecord("ubuntu", "ubuntu/24.04", "container", "x86_64", 10.0)
    first = CacheIndex(str(tmp_path / "index"), clock)
    first.put_pin(pin)
    first.close()
    again = CacheIndex(str(tmp_path / "index"), clock)
    try:
        assert again.pins() == [pin]
    finally:
        again.close()


# -- flags --------------------------------------------------------------------


def test_set_flags(index: CacheIndex) -> None:
    a = record(b"a")
    index.put(a)
    pinned = index.set_flags(a.sha256, cached=False, auto_update=True)
    assert pinned == attrs.evolve(a, cached=False, auto_update=True)
    assert index.get(a.sha256) == pinned
    assert index.find_path(*split_item_path(a.paths[0])) == pinned
    assert index.set_flags(a.sha256, cached=True, auto_update=False) == a
    assert index.get(a.sha256) == a
    assert index.set_flags(sha(b"unknown"), cached=False, auto_update=True) is None
    assert index.get(sha(b"unknown")) is None


def test_set_flags_keeps_pending_uses(index: CacheIndex, clock: Clock) -> None:
    a = record(b"a")
    index.put(a)
    index.note_use(a.sha256)
    index.set_flags(a.sha256, cached=False, auto_update=True)
    index.flush_usage()
    got = index.get(a.sha256)
    assert got is not None
    assert (got.cached, got.auto_update, got.use_count) == (False, True, 1)


def test_remove_cached_skips_pinned(index: CacheIndex) -> None:
    a, b = record(b"a"), record(b"b")
    index.put(a)
    index.put(attrs.evolve(b, cached=False))
    index.note_use(a.sha256)
    removed = index.remove_cached([a.sha256, b.sha256, sha(b"unknown")])
    assert removed == [a]
    assert index.get(a.sha256) is None
    assert index.get(b.sha256) is not None
    assert index.pending_uses == {}
    assert index.total_size() == b.size
    assert index.remove_cached([]) == []


# -- size and counts ----------------------------------------------------------


def test_total_size_follows_every_change(index: CacheIndex) -> None:
    a, b, c = record(b"a" * 10), record(b"b" * 20), record(b"c" * 40)
    assert (index.total_size(), index.file_count()) == (0, 0)
    index.put(a)
    index.put(b)
    index.put(c)
    assert (index.total_size(), index.file_count()) == (70, 3)
    # Replacing a record (another path, new flags) does not count it twice.
    index.put(attrs.evolve(a, paths=("ubuntu/other",), cached=False))
    index.add_path(b.sha256, "images", "b")
    index.set_flags(c.sha256, cached=False, auto_update=True)
    index.note_use(c.sha256)
    index.flush_usage()
    assert (index.total_size(), index.file_count()) == (70, 3)
    assert index.remove(a.sha256)
    assert not index.remove(a.sha256)
    assert index.total_size() == 60
    assert index.remove_many([b.sha256, c.sha256, a.sha256]) == 2
    assert (index.total_size(), index.file_count()) == (0, 0)


def test_total_size_counted_once_for_an_older_index(tmp_path: Path, clock: Clock) -> None:
    first = CacheIndex(str(tmp_path / "index"), clock)
    first.put(record(b"a" * 10))
    first.put(record(b"b" * 32))
    # As an index written before the counter existed: the records, no total.
    with first._env.begin(write=True, db=first._counters) as txn:
        txn.delete(b"stored_bytes")
    first.close()
    again = CacheIndex(str(tmp_path / "index"), clock)
    try:
        assert again.total_size() == 42
    finally:
        again.close()


def test_reconcile_repairs_the_total(index: CacheIndex, store: BlobStore) -> None:
    commit_blob(store, b"good")
    index.put(record(b"good"))
    with index._env.begin(write=True, db=index._counters) as txn:
        txn.put(b"stored_bytes", b"12345")
    assert index.total_size() == 12345
    reconcile(index, store)
    assert index.total_size() == len(b"good")


def test_damaged_record_does_not_stop_counting(tmp_path: Path, clock: Clock) -> None:
    first = CacheIndex(str(tmp_path / "index"), clock)
    first.put(record(b"a" * 10))
    with first._env.begin(write=True) as txn:
        txn.put(sha(b"bad").encode("ascii"), b"not json", db=first._files)
        txn.delete(b"stored_bytes", db=first._counters)
    first.close()
    again = CacheIndex(str(tmp_path / "index"), clock)
    try:
        assert again.total_size() == 10
        with pytest.raises(IndexFormatError):
            again.get(sha(b"bad"))
    finally:
        again.close()


# -- parts of LXD upstream images ----------------------------------------------


def parts_of(meta: bytes, rootfs: bytes | None) -> ImageParts:
    if rootfs is None:
        return ImageParts(sha(meta), "lxd", sha(meta), len(meta), "lxd_combined.tar.gz", None, 0, "")
    return ImageParts(
        sha(meta + rootfs), "lxd", sha(meta), len(meta), "lxd.tar.xz", sha(rootfs), len(rootfs), "squashfs",
    )


def test_parts_round_trip(index: CacheIndex) -> None:
    split, unified = parts_of(b"m", b"r" * 10), parts_of(b"u" * 5, None)
    assert index.get_parts(split.fingerprint) is None
    assert index.parts_count() == 0
    index.put_parts(split)
    index.put_parts(unified)
    assert index.get_parts(split.fingerprint) == split
    assert not split.unified and split.size == 11
    assert index.get_parts(unified.fingerprint) == unified
    assert unified.unified and unified.size == 5
    assert sorted(index.parts(), key=lambda p: p.fingerprint) == sorted(
        [split, unified], key=lambda p: p.fingerprint
    )
    assert index.parts_count() == 2
    index.put_parts(attrs.evolve(split, root_ftype="root.tar.xz"))
    assert index.parts_count() == 2
    got = index.get_parts(split.fingerprint)
    assert got is not None and got.root_ftype == "root.tar.xz"


def test_parts_are_validated() -> None:
    good = parts_of(b"m", b"r")
    with pytest.raises(ValueError):
        attrs.evolve(good, fingerprint="ABC")
    with pytest.raises(ValueError):
        attrs.evolve(good, root_sha256="xyz")
    with pytest.raises(ValueError):
        attrs.evolve(good, meta_size=-1)


def test_parts_records_are_versioned(index: CacheIndex) -> None:
    parts = parts_of(b"m", b"r")
    index.put_parts(parts)
    with index._env.begin(write=True, db=index._parts) as txn:
        stored = txn.get(parts.fingerprint.encode())
        assert stored is not None
        raw = json.loads(stored)
        assert (raw["v"], raw["kind"]) == (FORMAT_VERSION, "parts")
        txn.put(parts.fingerprint.encode(), json.dumps(dict(raw, v=99)).encode())
    with pytest.raises(IndexFormatError):
        index.get_parts(parts.fingerprint)


def test_an_index_from_before_the_parts_table_opens(tmp_path: Path, clock: Clock) -> None:
    import lmdb

    path = str(tmp_path / "index")
    rec = record(b"old")
    # What the version before the parts table wrote: its databases, its format, no parts.
    env = lmdb.open(path, subdir=True, create=True, max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"format", str(FORMAT_VERSION).encode(), db=env.open_db(b"info", txn=txn))
    env.close()
    first = CacheIndex(path, clock)
    first.put(rec)
    first.close()
    env = lmdb.open(path, subdir=True, max_dbs=8)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"parts", txn=txn), delete=True)
    with env.begin() as txn:
        assert txn.get(b"parts") is None
    env.close()
    again = CacheIndex(path, clock)
    try:
        assert again.get(rec.sha256) == rec
        assert again.parts_count() == 0 and list(again.parts()) == []
        again.put_parts(parts_of(b"m", b"r"))
        assert again.parts_count() == 1
    finally:
        again.close()


# -- usage counters -----------------------------------------------------------


def test_counters_in_memory_then_one_flush(
    index: CacheIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = record(b"a")
    index.put(a)
    counting = CountingEnv(index._env)
    monkeypatch.setattr(index, "_lmdb", counting)

    assert index.stats() == Stats()
    index.note_served(True, 100)
    index.note_served(True, 50)
    index.note_served(False, 1000)
    index.note_fetched(1200)
    index.note_not_stored()
    index.note_use(a.sha256)
    expected = Stats(
        hits=2, misses=1, bytes_from_cache=150, bytes_from_upstream=1200, not_stored=1,
        bytes_served=1150,
    )
    assert index.stats() == expected
    assert counting.write_txns == 0

    assert index.flush_usage() == 1
    assert counting.write_txns == 1
    assert index.stats() == expected

    # Counts alone are flushed too, still in one transaction.
    index.note_served(True, 1)
    assert index.flush_usage() == 0
    assert counting.write_txns == 2
    assert index.stats() == attrs.evolve(
        expected, hits=3, bytes_from_cache=151, bytes_served=1151
    )
    assert index.flush_usage() == 0
    assert counting.write_txns == 2


def test_counters_kept_on_failed_flush(index: CacheIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    index.note_served(False, 10)

    class Broken:
        def begin(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("write"):
                raise RuntimeError("disk full")
            return real.begin(*args, **kwargs)

    real = index._env
    monkeypatch.setattr(index, "_lmdb", Broken())
    with pytest.raises(RuntimeError):
        index.flush_usage()
    index.note_served(False, 5)
    monkeypatch.setattr(index, "_lmdb", real)
    index.flush_usage()
    assert index.stats() == Stats(misses=2, bytes_served=15)


def test_counters_persist_and_close_flushes(tmp_path: Path, clock: Clock) -> None:
    first = CacheIndex(str(tmp_path / "index"), clock)
    first.note_served(True, 7)
    first.note_fetched(9)
    first.close()
    again = CacheIndex(str(tmp_path / "index"), clock)
    try:
        assert again.stats() == Stats(hits=1, bytes_from_cache=7, bytes_from_upstream=9, bytes_served=7)
    finally:
        again.close()


_OTHER_PROCESS = textwrap.dedent(
    """
    import sys
    from twisted.internet.task import Clock
    from proxy.index import CacheIndex, FileRecord
    index = CacheIndex(sys.argv[1], Clock())
    index.put(FileRecord(
        sha256="ab" * 32, size=1000, upstream="ubuntu", paths=("ubuntu/other",),
        product="p", version="v", stored_at=1.0, last_used_at=1.0, use_count=0,
    ))
    index.note_served(True, 1000)
    index.note_fetched(1000)
    index.close()
    """
)


def test_totals_shared_with_another_process(index: CacheIndex) -> None:
    """The admin command opens the same index while the server runs: totals are in LMDB."""
    index.put(record(b"a" * 10))
    index.note_served(False, 10)
    subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, index.path],
        check=True, timeout=60, cwd=str(Path(__file__).parent.parent),
    )
    assert index.total_size() == 1010
    assert index.file_count() == 2
    # This process's pending counts plus what the other one flushed.
    assert index.stats() == Stats(
        hits=1, misses=1, bytes_from_cache=1000, bytes_from_upstream=1000, bytes_served=1010
    )
    index.flush_usage()
    assert index.stats() == Stats(
        hits=1, misses=1, bytes_from_cache=1000, bytes_from_upstream=1000, bytes_served=1010
    )


# -- opening and the reader table ---------------------------------------------


def test_an_index_opened_later_is_opened_by_its_own_process(tmp_path: Path, clock: Clock) -> None:
    idx = CacheIndex(str(tmp_path / "late"), clock, open_now=False)
    with pytest.raises(RuntimeError, match="is not open"):
        idx.get(sha(b"a"))
    idx.open()
    idx.open()  # a no-op in the process that opened it
    idx.put(record(b"a"))
    assert idx.get(sha(b"a")) is not None
    idx.close()


def test_a_full_reader_table_fails_one_read_with_503_and_recovers(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch, logged: Logged
) -> None:
    monkeypatch.setattr("proxy.index.MAX_READERS", 2)
    idx = CacheIndex(str(tmp_path / "small"), clock)
    try:
        idx.put(record(b"a"))
        held = [idx._env.begin(), idx._env.begin()]
        with pytest.raises(IndexBusy) as raised:
            idx.get(sha(b"a"))
        assert raised.value.code == 503
        assert raised.value.headers == {b"Retry-After": b"1"}
        assert logged.matching("reader table")
        for txn in held:
            txn.abort()
        # A read transaction keeps its slot until the object is gone, aborted or not.
        del txn
        held.clear()
        assert idx.get(sha(b"a")) == record(b"a")
    finally:
        idx.close()


def test_record_path_stores_a_new_record_or_adds_the_path_keeping_flags(index: CacheIndex) -> None:
    a = record(b"a", "ubuntu/images/a")
    assert index.record_path(a, "ubuntu", "images/a") == a
    assert index.total_size() == a.size
    # Pinned meanwhile: a later path keeps the flags and counts no bytes twice.
    index.set_flags(a.sha256, cached=False, auto_update=True)
    other = attrs.evolve(a, paths=("mirror/images/a",), stored_at=99.0)
    got = index.record_path(other, "mirror", "images/a")
    assert got.paths == ("ubuntu/images/a", "mirror/images/a")
    assert (got.cached, got.auto_update, got.stored_at) == (False, True, a.stored_at)
    assert index.find_path("mirror", "images/a") == got
    assert index.total_size() == a.size
    assert index.record_path(other, "mirror", "images/a") == got


def test_unpin_turns_only_still_pinned_files_into_cached_ones(index: CacheIndex) -> None:
    pinned, cached, plain = record(b"p"), record(b"c"), record(b"x")
    index.put(attrs.evolve(pinned, cached=False, auto_update=True))
    index.put(cached)
    index.put(attrs.evolve(plain, cached=False, auto_update=False))
    assert index.unpin([pinned.sha256, cached.sha256, plain.sha256, sha(b"gone")]) == 1
    got = index.get(pinned.sha256)
    assert got is not None and (got.cached, got.auto_update) == (True, False)
    assert index.get(plain.sha256) == attrs.evolve(plain, cached=False, auto_update=False)
    assert index.get(cached.sha256) == cached


def test_pinned_totals_follow_every_write(tmp_path: Path) -> None:
    index = CacheIndex(str(tmp_path / "index"), Clock())
    try:
        a = _record("a" * 64, 100, cached=False)
        b = _record("b" * 64, 10, cached=True)
        index.put(a)
        index.put(b)
        assert index.pinned_totals() == (1, 100)
        index.set_flags(b.sha256, cached=False, auto_update=True)
        assert index.pinned_totals() == (2, 110)
        assert index.unpin([a.sha256]) == 1
        assert index.pinned_totals() == (1, 10)
        index.remove(b.sha256)
        assert index.pinned_totals() == (0, 0)
        index.put(attrs.evolve(a, cached=False, size=50))
        assert index.pinned_totals() == (1, 50)
    finally:
        index.close()


def test_an_index_without_pinned_totals_counts_them_when_opened(tmp_path: Path) -> None:
    path = str(tmp_path / "index")
    index = CacheIndex(path, Clock())
    index.put(_record("a" * 64, 100, cached=False))
    index.put(_record("b" * 64, 7, cached=True))
    # As an index written by a version that kept no pinned totals.
    with index._env.begin(write=True, db=index._counters) as txn:
        txn.delete(b"pinned_files")
        txn.delete(b"pinned_bytes")
    index.close()
    reopened = CacheIndex(path, Clock())
    try:
        assert reopened.pinned_totals() == (1, 100)
        assert reopened.total_size() == 107
    finally:
        reopened.close()


def _record(sha256: str, size: int, *, cached: bool) -> FileRecord:
    return FileRecord(
        sha256=sha256, size=size, upstream="up", paths=(f"up/{sha256[:4]}",), product="",
        version="", stored_at=0, last_used_at=0, use_count=0, cached=cached,
        auto_update=not cached,
    )
