# -*- test-case-name: tests.test_coalesce -*-
"""
One download per file across worker processes (C{[server] workers}, L{proxy.workers}).

Within a process the L{proxy.downloads.Fetcher}'s table of downloads in flight makes a second
client join the first's download. Across processes the file system does: the download of
a file is owned by whoever holds an flock on C{tmp/<sha256>.lock} (L{DownloadLocks}); the
owner writes into the lock file the name of the partial it writes to. A worker that cannot
take the lock follows that partial (L{FollowedDownload}: a L{proxy.streaming.FileSource}
polled every L{POLL_SECONDS}, the C{stat} on the disk worker), the last byte held back until
the blob exists: the owner links it only once it is verified, and writes its record next.

When the lock is free and there is no blob, the owner failed or died: the follower takes the
lock and continues the download itself, from the same partial file (its sidecar, or from
its bytes alone: the sha256 is recomputed from the disk and checked at the end, so a dying
owner costs a pause, never a wrong file). A follower that offered bytes of a file it cannot
continue counts a restart, so that a response that sent any of them is cut rather than
completed with other bytes (L{proxy.streaming.SourceRestarted}).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from proxy.blobs import TEMP_SUFFIX, BlobStore
from proxy.catalogue import Item
from proxy.work import Run

LOCK_SUFFIX = ".lock"
# A lock file says little (the partial's name, the upstream, the path, the size).
MAX_LOCK_BYTES = 8192
# The status page lists at most so many entries of tmp/ (they are bounded by the partials).
MAX_LISTED = 10000
# How often a follower looks at the owner's partial: a follower's client sees the bytes this
# much later than the owner's (a stat per follower and poll, on the disk worker).
POLL_SECONDS = 0.05


class DownloadLocks:
    """The flocks on C{<temp dir>/<sha256>.lock} that say which process downloads a file."""

    def __init__(self, temp_dir: str) -> None:
        self.temp_dir = temp_dir

    def path(self, sha256: str) -> str:
        return os.path.join(self.temp_dir, sha256 + LOCK_SUFFIX)

    def take(self, sha256: str) -> int | None:
        """
        The descriptor holding the lock of C{sha256}, or None while another process holds it.

        The owner unlinks the file as it lets go (L{release}); a lock taken on a name that was
        unlinked meanwhile is nobody's, so it is taken again on the new file.
        """
        path = self.path(sha256)
        for _attempt in range(8):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        return None

    def publish(
        self, fd: int, partial: FilePath[str], upstream: str = "", subject: str = "", size: int = 0,
    ) -> None:
        """
        Say, in the held lock file, which partial the download writes to (for followers),
        and what it is (for every worker's status page).
        """
        document = json.dumps({
            "partial": partial.basename(), "upstream": upstream, "subject": subject, "size": size,
        }).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, document, 0)

    def _published(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as f:
                document = json.loads(f.read(MAX_LOCK_BYTES))
        except (OSError, ValueError):
            return None
        if not isinstance(document, dict):
            return None
        name = document.get("partial")
        if not (isinstance(name, str) and name.endswith(TEMP_SUFFIX) and "/" not in name
                and not name.startswith(".")):
            return None
        return document

    def partial(self, sha256: str) -> FilePath[str] | None:
        """The partial the owner of C{sha256} writes to, as it published it."""
        document = self._published(self.path(sha256))
        return None if document is None else FilePath(self.temp_dir).child(document["partial"])

    def listing(self) -> list[SharedDownload]:
        """
        Every download some worker owns now, as its lock file says, with the bytes its
        partial holds (blocking: on the disk worker).
        """
        found = []
        try:
            entries = list(os.scandir(self.temp_dir))
        except OSError:
            return []
        for entry in entries[:MAX_LISTED]:
            if not entry.name.endswith(LOCK_SUFFIX):
                continue
            document = self._published(entry.path)
            if document is None:
                continue
            try:
                received = os.stat(os.path.join(self.temp_dir, document["partial"])).st_size
            except OSError:
                continue
            size = document.get("size")
            found.append(SharedDownload(
                sha256=entry.name.removesuffix(LOCK_SUFFIX),
                upstream=str(document.get("upstream", "")),
                subject=str(document.get("subject", "")),
                size=size if isinstance(size, int) else 0, received=received,
            ))
        return found

    def release(self, sha256: str, fd: int) -> None:
        """Let go of the lock of C{sha256}: the name goes first, then the lock."""
        try:
            os.unlink(self.path(sha256))
        except FileNotFoundError:
            pass
        os.close(fd)


@frozen
class SharedDownload:
    """A download owned by some worker, as L{DownloadLocks.listing} finds it."""

    sha256: str
    upstream: str
    subject: str
    size: int
    received: int


class FollowedDownload:
    """
    The download of C{item} that another worker owns, followed through its partial file; a
    L{proxy.fetch.FetchedItem} and L{proxy.streaming.FileSource}. If the owner lets go of
    the lock without a blob, C{take_over(self, fd)} continues the download here and returns
    the local download, which this one then stands for.
    """

    log = Logger()

    def __init__(
        self,
        upstream: str,
        item: Item,
        store: BlobStore,
        locks: DownloadLocks,
        clock: IReactorTime,
        disk: Run,
        recorded: Callable[[str], bool],
        take_over: Callable[["FollowedDownload", int], Any],
    ) -> None:
        self.upstream = upstream
        self.item = item
        self.key = item.sha256
        self.subject = item.path
        self.background = False
        self._store = store
        self._locks = locks
        self._clock = clock
        self._disk = disk
        self._recorded = recorded
        self._take_over = take_over
        self._partial: FilePath[str] | None = None
        self._offered = 0
        self._done = False
        self._own_restarts = 0
        self._waiters: list[Deferred[None]] = []
        self._started: list[Deferred[None]] = []
        self._finished: list[Deferred[Any]] = []
        self._call: IDelayedCall | None = None
        self._looking = False
        self._stopped = False
        # Once the owner is gone and this process continues the download.
        self.local: Any = None

    # -- FetchedItem ---------------------------------------------------------------------

    @property
    def path(self) -> FilePath[Any]:
        if self.local is not None:
            return self.local.path
        if self._done or self._partial is None:
            return self._store.path_for(self.item.sha256)
        return self._partial

    @property
    def size(self) -> int:
        return self.item.size

    @property
    def failure(self) -> Failure | None:
        return self.local.failure if self.local is not None else None

    @property
    def received(self) -> int:
        return self.local.received if self.local is not None else self._offered

    @property
    def stored(self) -> bool:
        return self.local.stored if self.local is not None else True

    @property
    def queued(self) -> bool:
        return False

    @property
    def restarts(self) -> int:
        local = getattr(self.local, "restarts", 0) if self.local is not None else 0
        return self._own_restarts + local

    def available(self) -> int:
        if self.local is not None:
            return self.local.available()
        if self._done:
            return self.item.size
        return self._offered

    def wait(self) -> "Deferred[None]":
        if self.local is not None:
            return self.local.wait()
        if self._done:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def when_streaming(self) -> "Deferred[None]":
        if self.local is not None:
            return self.local.when_streaming()
        if self._done or self._partial is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._started.append(d)
        return d

    def when_done(self) -> "Deferred[Any]":
        if self.local is not None:
            return self.local.when_done()
        if self._done:
            return succeed(self.path)
        d: Deferred[Any] = Deferred()
        self._finished.append(d)
        return d

    def busy(self) -> tuple[str, ...]:
        return (self.item.sha256,)

    # -- following ------------------------------------------------------------------------

    def start(self) -> None:
        self._schedule(0)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay: float = POLL_SECONDS) -> None:
        if not self._stopped and self.local is None and not self._done:
            self._call = self._clock.callLater(delay, self._poll)

    def _poll(self) -> None:
        self._call = None
        if self._looking:
            return
        self._looking = True
        self._disk(self._look).addCallbacks(self._looked, self._look_failed)

    def _look(self) -> tuple[str, Any, int]:
        """On the disk worker: done, orphaned (with the lock, now ours) or growing."""
        sha256 = self.item.sha256
        fd = self._locks.take(sha256)
        if self._store.exists(sha256):
            if fd is None:
                # Linked; its record may not be written yet (the index is read on the reactor).
                return "blob", None, self.item.size
            self._locks.release(sha256, fd)
            return "done", None, self.item.size
        if fd is not None:
            return "orphaned", fd, 0
        partial = self._locks.partial(sha256) or self._partial
        size = 0
        if partial is not None:
            try:
                size = os.stat(partial.path).st_size
            except OSError:
                # Committed and its temp name removed since: the blob shows next time.
                partial, size = self._partial, self._offered
        return "growing", partial, size

    def _look_failed(self, failure: Failure) -> None:
        self._looking = False
        self.log.failure("following the download of {sha256}", failure, sha256=self.item.sha256)
        self._schedule()

    def _looked(self, result: tuple[str, Any, int]) -> None:
        self._looking = False
        state, value, size = result
        if self._stopped:
            if state == "orphaned":
                self._locks.release(self.item.sha256, value)
            return
        if state == "blob" and self._recorded(self.item.sha256):
            state = "done"
        if state == "blob":
            self._schedule()
            return
        if state == "done":
            self._done = True
            self._offered = self.item.size
            self._fire(self._started, None)
            self._fire(self._waiters, None)
            self._fire(self._finished, self._store.path_for(self.item.sha256))
            return
        if state == "orphaned":
            self._orphaned(value)
            return
        if value is not None and self._partial is None:
            self._partial = value
            self._fire(self._started, None)
        if value is not None and value != self._partial:
            # The owner writes another file than the one this follower offered bytes of.
            if self._offered:
                self._own_restarts += 1
            self._partial = value
            self._offered = 0
        # The last byte is the blob's to give.
        offered = min(size, self.item.size - 1)
        if offered > self._offered:
            self._offered = offered
            self._fire(self._waiters, None)
        self._schedule()

    def _orphaned(self, fd: int) -> None:
        self.log.info(
            "the download of sha256:{sha256} lost its owner at {offered} bytes; this worker "
            "continues it", sha256=self.item.sha256, offered=self._offered,
        )
        try:
            local = self._take_over(self, fd)
        except Exception:
            self._locks.release(self.item.sha256, fd)
            self.log.failure("taking over the download of {sha256}", sha256=self.item.sha256)
            self._schedule()
            return
        self.local = local
        # Everyone waiting learns the news from the local download from now on.
        for d in self._started:
            local.when_streaming().chainDeferred(d)
        for d in self._finished:
            local.when_done().chainDeferred(d)
        self._started, self._finished = [], []
        self._fire(self._waiters, None)

    def continues(self) -> FilePath[str] | None:
        """The partial this follower offered bytes of, if it still exists (for a take-over)."""
        if self._partial is None or not self._partial.exists():
            return None
        return self._partial

    def cannot_continue(self) -> None:
        """The take-over starts another file: responses that sent bytes of this one are cut."""
        if self._offered:
            self._own_restarts += 1
        self._offered = 0

    @staticmethod
    def _fire(waiters: list[Deferred[Any]], value: Any) -> None:
        pending = list(waiters)
        waiters.clear()
        for d in pending:
            d.callback(value)


__all__ = ["DownloadLocks", "FollowedDownload", "LOCK_SUFFIX", "POLL_SECONDS", "SharedDownload"]
