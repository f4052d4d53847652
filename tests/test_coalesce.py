"""
One download per file across worker processes (L{proxy.coalesce}): the lock that says who
owns a download, and a follower that streams the owner's partial and takes over from it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.catalogue import Item
from proxy.coalesce import POLL_SECONDS, DownloadLocks, FollowedDownload, SharedDownload
from proxy.work import inline

BODY = b"x" * 1000
SHA256 = hashlib.sha256(BODY).hexdigest()
ITEM = Item("images/a/rootfs.squashfs", SHA256, len(BODY), "squashfs", "a", "1")


def test_one_owner_per_file(tmp_path: Path) -> None:
    locks = DownloadLocks(str(tmp_path))
    fd = locks.take(SHA256)
    assert fd is not None
    # Another open of the file (another process, or this one) cannot have it.
    assert locks.take(SHA256) is None
    partial = FilePath(str(tmp_path)).child("abc.part")
    locks.publish(fd, partial)
    assert locks.partial(SHA256) == partial
    locks.release(SHA256, fd)
    assert not os.path.exists(locks.path(SHA256))
    again = locks.take(SHA256)
    assert again is not None
    locks.release(SHA256, again)


def test_a_lock_on_an_unlinked_name_is_taken_again(tmp_path: Path) -> None:
    locks = DownloadLocks(str(tmp_path))
    # A name opened just before its owner let go: the lock on it is nobody's.
    stale = os.open(locks.path(SHA256), os.O_RDWR | os.O_CREAT)
    os.unlink(locks.path(SHA256))
    fd = locks.take(SHA256)
    assert fd is not None and os.fstat(fd).st_ino == os.stat(locks.path(SHA256)).st_ino
    os.close(stale)
    locks.release(SHA256, fd)


class _Local:
    """The download this process starts when the owner is gone (a stand-in)."""

    def __init__(self, path: FilePath[str]) -> None:
        self.path = path
        self.failure = None
        self.received = 600
        self.stored = True
        self.restarts = 0

    def available(self) -> int:
        return 600

    def wait(self) -> "Deferred[None]":
        return succeed(None)

    def when_streaming(self) -> "Deferred[None]":
        return succeed(None)

    def when_done(self) -> "Deferred[Any]":
        return Deferred()


def _follower(tmp_path: Path, recorded: set[str], taken: list[int]) -> tuple[FollowedDownload, BlobStore, DownloadLocks, Clock]:
    store = BlobStore(FilePath(str(tmp_path)))
    locks = DownloadLocks(store.temp_dir.path)
    clock = Clock()

    def take_over(followed: FollowedDownload, fd: int) -> _Local:
        taken.append(fd)
        partial = followed.continues()
        assert partial is not None
        return _Local(partial)

    followed = FollowedDownload(
        "up", ITEM, store, locks, clock, inline, lambda sha: sha in recorded, take_over,
    )
    return followed, store, locks, clock


def test_a_follower_streams_the_growing_partial_and_ends_with_the_blob(tmp_path: Path) -> None:
    recorded: set[str] = set()
    followed, store, locks, clock = _follower(tmp_path, recorded, [])
    owner = locks.take(SHA256)
    assert owner is not None
    partial = store.temp_dir.child("owner.part")
    partial.setContent(BODY[:300])
    locks.publish(owner, partial)
    started = followed.when_streaming()
    finished: list[object] = []
    followed.when_done().addCallback(finished.append)
    followed.start()
    clock.advance(0)
    assert started.called and followed.path == partial and followed.available() == 300
    woken: list[object] = []
    followed.wait().addCallback(woken.append)
    assert woken == []
    partial.setContent(BODY)
    clock.advance(POLL_SECONDS)
    # The whole file is there, but the last byte is the blob's to give.
    assert woken == [None] and followed.available() == len(BODY) - 1
    # Linked, not recorded yet: still held.
    blob = store.path_for(SHA256)
    blob.parent().makedirs(ignoreExistingDirectory=True)
    os.link(partial.path, blob.path)
    clock.advance(POLL_SECONDS)
    assert followed.available() == len(BODY) - 1 and finished == []
    recorded.add(SHA256)
    clock.advance(POLL_SECONDS)
    assert followed.available() == len(BODY) and finished == [blob]
    assert followed.restarts == 0 and clock.getDelayedCalls() == []
    locks.release(SHA256, owner)


def test_a_follower_takes_over_when_the_owner_is_gone(tmp_path: Path) -> None:
    taken: list[int] = []
    followed, store, locks, clock = _follower(tmp_path, set(), taken)
    owner = locks.take(SHA256)
    assert owner is not None
    partial = store.temp_dir.child("owner.part")
    partial.setContent(BODY[:500])
    locks.publish(owner, partial)
    followed.start()
    clock.advance(0)
    assert followed.available() == 500
    woken: list[object] = []
    followed.wait().addCallback(woken.append)
    # The owner dies: the kernel lets go of its lock (the name stays).
    os.close(owner)
    clock.advance(POLL_SECONDS)
    assert len(taken) == 1 and woken == [None]
    # From now on the local download, on the same file, is the source.
    assert followed.local is not None and followed.path == partial
    assert followed.available() == 600 and followed.restarts == 0
    assert clock.getDelayedCalls() == []
    locks.release(SHA256, taken[0])


def test_bytes_offered_of_a_file_that_cannot_be_continued_count_a_restart(tmp_path: Path) -> None:
    followed, store, locks, clock = _follower(tmp_path, set(), [])
    owner = locks.take(SHA256)
    assert owner is not None
    partial = store.temp_dir.child("owner.part")
    partial.setContent(BODY[:500])
    locks.publish(owner, partial)
    followed.start()
    clock.advance(0)
    followed.stop()
    followed.cannot_continue()
    # A response that sent any of those bytes is cut (proxy.streaming.SourceRestarted).
    assert followed.restarts == 1 and followed.available() == 0
    locks.release(SHA256, owner)


def test_every_workers_downloads_are_listed_from_the_lock_files(tmp_path: Path) -> None:
    locks = DownloadLocks(str(tmp_path))
    fd = locks.take(SHA256)
    assert fd is not None
    partial = FilePath(str(tmp_path)).child("abc.part")
    partial.setContent(BODY[:300])
    locks.publish(fd, partial, "up", ITEM.path, ITEM.size)
    (tmp_path / "other.part").write_bytes(b"")
    assert locks.listing() == [SharedDownload(SHA256, "up", ITEM.path, ITEM.size, 300)]
    assert locks.partial(SHA256) == partial
    locks.release(SHA256, fd)
    assert locks.listing() == []
