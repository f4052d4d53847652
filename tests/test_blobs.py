"""Tests for proxy.blobs: the content-addressed blob store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore, DigestMismatch, check_sha256, is_sha256


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(FilePath(str(tmp_path)))


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def test_layout_created(tmp_path: Path) -> None:
    BlobStore(FilePath(str(tmp_path)))
    assert (tmp_path / "blobs" / "sha256").is_dir()
    assert (tmp_path / "tmp").is_dir()


def test_write_commit_round_trip(store: BlobStore, tmp_path: Path) -> None:
    partial = store.new_partial()
    assert partial.path.parent().path == str(tmp_path / "tmp")
    assert partial.path.basename().endswith(".part")
    partial.write(b"hello ")
    partial.write(b"world")
    partial.flush()
    assert partial.size == 11
    digest = sha(b"hello world")
    assert partial.hexdigest() == digest

    final = partial.commit(digest)

    assert final == store.path_for(digest)
    assert final.path == str(tmp_path / "blobs" / "sha256" / digest[:2] / digest)
    assert partial.path == final
    assert store.exists(digest)
    assert store.size_of(digest) == 11
    with store.open(digest) as f:
        assert f.read() == b"hello world"
    assert list(store.stored()) == [digest]
    assert os.listdir(tmp_path / "tmp") == []


def test_empty_blob(store: BlobStore) -> None:
    partial = store.new_partial()
    digest = sha(b"")
    partial.commit(digest)
    assert store.size_of(digest) == 0


def test_writes_visible_to_reader_while_growing(store: BlobStore) -> None:
    partial = store.new_partial()
    with open(partial.path.path, "rb") as reader:
        partial.write(b"abc")
        partial.flush()
        assert reader.read() == b"abc"
        partial.write(b"def")
        assert reader.read() == b"def"
        partial.commit(sha(b"abcdef"))
        # Same inode after the rename: the open descriptor still reads.
        reader.seek(0)
        assert reader.read() == b"abcdef"


def test_wrong_digest_never_creates_blob(store: BlobStore, tmp_path: Path) -> None:
    partial = store.new_partial()
    partial.write(b"payload")
    wrong = sha(b"something else")
    with pytest.raises(DigestMismatch) as info:
        partial.commit(wrong)
    assert info.value.expected == wrong
    assert info.value.actual == sha(b"payload")
    assert info.value.size == 7
    assert not store.exists(wrong)
    assert not store.exists(sha(b"payload"))
    assert listing(tmp_path) == []
    assert partial.closed
    with pytest.raises(ValueError):
        partial.write(b"more")


def test_invalid_expected_digest_discards(store: BlobStore, tmp_path: Path) -> None:
    partial = store.new_partial()
    partial.write(b"x")
    with pytest.raises(DigestMismatch):
        partial.commit("../../etc/passwd")
    assert listing(tmp_path) == []


def test_commit_existing_blob_keeps_it(store: BlobStore, tmp_path: Path) -> None:
    digest = sha(b"same")
    first = store.new_partial()
    first.write(b"same")
    path = first.commit(digest)
    inode = os.stat(path.path).st_ino

    second = store.new_partial()
    second.write(b"same")
    assert second.commit(digest) == path
    assert os.stat(path.path).st_ino == inode
    assert os.listdir(tmp_path / "tmp") == []
    assert list(store.stored()) == [digest]


def test_commit_replaces_damaged_blob(store: BlobStore) -> None:
    digest = sha(b"full content")
    target = store.path_for(digest)
    target.parent().makedirs(ignoreExistingDirectory=True)
    target.setContent(b"trunc")
    partial = store.new_partial()
    partial.write(b"full content")
    partial.commit(digest)
    assert target.getContent() == b"full content"


def test_discard_is_idempotent(store: BlobStore, tmp_path: Path) -> None:
    partial = store.new_partial()
    partial.write(b"data")
    partial.discard()
    partial.discard()
    assert os.listdir(tmp_path / "tmp") == []
    with pytest.raises(ValueError):
        partial.commit(sha(b"data"))


def test_discard_after_commit_keeps_blob(store: BlobStore) -> None:
    partial = store.new_partial()
    partial.write(b"kept")
    partial.commit(sha(b"kept"))
    partial.discard()
    assert store.exists(sha(b"kept"))
    with pytest.raises(ValueError):
        partial.commit(sha(b"kept"))


def test_partials_have_distinct_paths(store: BlobStore) -> None:
    partials = [store.new_partial() for _ in range(20)]
    assert len({p.path.path for p in partials}) == 20
    for p in partials:
        p.discard()


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "",
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "g" * 64,
        "a" * 64 + "\n",
        "../" + "a" * 61,
        "a" * 62 + "/x",
        " " + "a" * 63,
    ],
)
def test_path_for_refuses_invalid(store: BlobStore, bad: str) -> None:
    assert not is_sha256(bad)
    with pytest.raises(ValueError):
        store.path_for(bad)
    with pytest.raises(ValueError):
        store.exists(bad)
    with pytest.raises(ValueError):
        store.remove(bad)
    with pytest.raises(ValueError):
        store.open(bad)
    with pytest.raises(ValueError):
        check_sha256(bad)


def test_remove(store: BlobStore) -> None:
    partial = store.new_partial()
    partial.write(b"gone")
    digest = sha(b"gone")
    partial.commit(digest)
    assert store.remove(digest) is True
    assert store.remove(digest) is False
    assert not store.exists(digest)
    with pytest.raises(FileNotFoundError):
        store.size_of(digest)
    with pytest.raises(FileNotFoundError):
        store.open(digest)


def test_stored_skips_foreign_files(store: BlobStore, tmp_path: Path) -> None:
    digests = set()
    for i in range(5):
        data = b"blob %d" % i
        partial = store.new_partial()
        partial.write(data)
        partial.commit(sha(data))
        digests.add(sha(data))
    blobs = tmp_path / "blobs" / "sha256"
    (blobs / "zz").mkdir()
    (blobs / "zz" / ("z" * 64)).write_bytes(b"")
    (blobs / "README").write_bytes(b"")
    misplaced = "ab" + "0" * 62
    (blobs / "cd").mkdir(exist_ok=True)
    (blobs / "cd" / misplaced).write_bytes(b"")
    assert set(store.stored()) == digests


def test_clear_temp(store: BlobStore, tmp_path: Path) -> None:
    open_partials = [store.new_partial() for _ in range(3)]
    for p in open_partials:
        p.write(b"x")
    (tmp_path / "tmp" / "stray").write_bytes(b"")
    partial = store.new_partial()
    partial.write(b"y")
    partial.discard()
    assert store.clear_temp() == 4
    assert os.listdir(tmp_path / "tmp") == []
    assert store.clear_temp() == 0
    for p in open_partials:
        p.discard()


def test_large_write_in_chunks(store: BlobStore) -> None:
    chunk = os.urandom(64 * 1024)
    partial = store.new_partial()
    h = hashlib.sha256()
    for _ in range(32):
        partial.write(chunk)
        h.update(chunk)
    path = partial.commit(h.hexdigest())
    assert partial.size == 32 * len(chunk)
    assert os.path.getsize(path.path) == partial.size


def test_writeback_syncs_what_was_written_while_more_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.blobs
    from twisted.internet.defer import Deferred

    monkeypatch.setattr(proxy.blobs, "WRITEBACK_BYTES", 100)
    store = BlobStore(FilePath(str(tmp_path)))
    partial = store.new_partial()
    started: list[tuple[Any, Deferred[Any]]] = []

    def run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        started.append((lambda: fn(*args, **kwargs), d))
        return d

    partial.writeback = run
    partial.write(b"x" * 60)
    assert started == []
    partial.write(b"x" * 60)
    assert len(started) == 1
    # One sync at a time: more bytes while it runs start none.
    partial.write(b"x" * 200)
    assert len(started) == 1
    sync, d = started[0]
    sync()  # on a duplicate descriptor: the partial's own stays open
    d.callback(None)
    partial.write(b"x")
    assert len(started) == 2
    started[1][0]()
    data = b"x" * 321
    assert partial.commit(hashlib.sha256(data).hexdigest()).getContent() == data


def test_discard_after_a_commit_keeping_the_temp_name_removes_only_that_name(store: BlobStore) -> None:
    partial = store.new_partial()
    partial.write(b"data")
    temp = partial.path
    target = partial.commit(hashlib.sha256(b"data").hexdigest(), keep_temp=True)
    assert os.path.exists(temp.path) and os.path.exists(target.path)
    # What a download failing after its commit (its index write, say) does to its partials.
    partial.discard()
    assert not os.path.exists(temp.path)
    assert target.getContent() == b"data"
    partial.discard()
