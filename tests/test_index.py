"""Tests for proxy.index: the LMDB cache index and start-up reconciliation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from zope.interface import implementer

from proxy.blobs import BlobStore
from proxy.index import (
    FORMAT_VERSION,
    CacheIndex,
    FileRecord,
    IndexFormatError,
    MetadataRecord,
    ReconcileReport,
    item_path,
    reconcile,
    split_item_path,
)


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
    monkeypatch.setattr(index, "_env", counting)

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
    monkeypatch.setattr(index, "_env", Broken())
    with pytest.raises(RuntimeError):
        index.flush_usage()
    monkeypatch.setattr(index, "_env", real)
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


@implementer(ILogObserver)
class Capture:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    capture = Capture()
    globalLogPublisher.addObserver(capture)
    yield capture.events
    globalLogPublisher.removeObserver(capture)


def test_reconcile_clean(index: CacheIndex, store: BlobStore) -> None:
    assert reconcile(index, store) == ReconcileReport(0, 0, 0)


def test_reconcile_cases(
    index: CacheIndex, store: BlobStore, tmp_path: Path, events: list[LogEvent]
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

    summary = [e for e in events if e.get("log_format", "").startswith("cache reconciled")]
    assert len(summary) == 1
    assert summary[0]["orphan_blobs_removed"] == 2
    assert summary[0]["dangling_records_removed"] == 3
    assert summary[0]["temp_removed"] == 2
    dropped = {e.get("sha256") for e in events if "dropping" in e.get("log_format", "")}
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
