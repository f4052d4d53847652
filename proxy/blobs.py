"""Content-addressed blob store: verified files named by their sha256.

Layout under the cache directory::

    blobs/sha256/<first 2 hex>/<64 hex>   complete, verified files
    tmp/<random>.part                     files still being written
    tmp/<random>.resume                   what a download writing <random>.part is (L{Resumable})

A blob only ever appears under ``blobs/`` by an atomic link (or rename) of a fully
written, hashed and fsynced temp file, so a crash leaves either nothing or a
complete blob there. What is left in ``tmp/`` is swept at start-up, except a partial download
with a valid sidecar younger than L{RESUMABLE_MAX_AGE_SECONDS}: it is kept (L{BlobStore.resumable})
so that the next download of the same file continues from its bytes (their sha256 is computed
again from the disk first, and the whole file is verified as any other before it is stored).
Temp files live under the same root as the blobs so that the link never
crosses a filesystem.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import BinaryIO

from attrs import frozen
from twisted.python.filepath import FilePath

from proxy.work import Run

__all__ = [
    "BlobStore",
    "DigestMismatch",
    "MAX_RESUMABLE",
    "PartialBlob",
    "RESUMABLE_MAX_AGE_SECONDS",
    "Resumable",
    "check_sha256",
    "is_sha256",
]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SHARD_HEX = re.compile(r"[0-9a-f]{2}")
TEMP_SUFFIX = ".part"
# The sidecar of a partial download that may be resumed after a restart.
RESUME_SUFFIX = ".resume"
# A kept partial download older than this (since its last write) is swept at start-up: its
# upstream has long moved on, and the space is better given back.
RESUMABLE_MAX_AGE_SECONDS = 7 * 24 * 3600.0
# At most this many partial downloads are kept for a later request, the newest: each may be
# gigabytes of a file nobody asks for again, which min_free would pay for with cached files.
MAX_RESUMABLE = 16
_READ_CHUNK_BYTES = 1024 * 1024
# How much a partial with a writeback may hold unsynced: the fsync at commit, which the last
# byte of a download waits for, then takes a fraction of a second, not seconds.
WRITEBACK_BYTES = 32 * 1024 * 1024


def is_sha256(value: object) -> bool:
    """True if C{value} is exactly 64 lowercase hex characters."""
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def check_sha256(value: object) -> str:
    """Return C{value} if it is a lowercase sha256 hex digest, else raise ValueError."""
    if not is_sha256(value):
        raise ValueError(f"not a lowercase sha256 hex digest: {value!r}")
    assert isinstance(value, str)
    return value


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest the caller expected."""

    def __init__(self, expected: str, actual: str, size: int) -> None:
        super().__init__(
            f"sha256 mismatch: expected {expected!r}, got {actual} over {size} bytes"
        )
        self.expected = expected
        self.actual = actual
        self.size = size


@frozen
class Resumable:
    """
    A partial download that may be continued: its temp file, and what its sidecar says.

    @ivar url: the URL its bytes came from (a validator is only ever sent back to it).
    @ivar validator: the ETag, else the Last-Modified, of the answer that started it; C{""}.
    @ivar sha256: the catalogue's sha256 of the whole file.
    @ivar size: the catalogue's size of the whole file.
    """

    path: FilePath[str]
    url: str
    validator: str
    sha256: str
    size: int

    def document(self) -> bytes:
        return json.dumps({
            "url": self.url, "validator": self.validator, "sha256": self.sha256,
            "size": self.size,
        }, sort_keys=True).encode()

    @classmethod
    def read(cls, part: FilePath[str], sidecar: str) -> "Resumable | None":
        """The sidecar at C{sidecar} of C{part}, or None when it is not a valid one."""
        try:
            with open(sidecar, "rb") as f:
                doc = json.loads(f.read(64 * 1024))
            url, validator, sha256, size = doc["url"], doc["validator"], doc["sha256"], doc["size"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not (isinstance(url, str) and isinstance(validator, str) and is_sha256(sha256)
                and isinstance(size, int) and not isinstance(size, bool) and size > 0):
            return None
        return cls(part, url, validator, sha256, size)


def _fsync_dir(path: str) -> None:
    """Make a rename or a new entry in directory C{path} durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialBlob:
    """A temp file being written, hashed as it grows, and finally committed.

    Writes go straight to the file descriptor (no user-space buffer), so a
    follower that opens L{path} and reads it while it grows sees every byte as
    soon as L{write} returns. The descriptor, and so the inode, survive the
    link into the store in L{commit}; a reader that opened the temp path keeps a valid file.

    @ivar path: the temp file while writing; after a successful L{commit}, the
        blob's final path.
    @ivar size: bytes written so far.
    """

    def __init__(self, store: BlobStore, path: FilePath[str], fd: int) -> None:
        self._store = store
        self.path = path
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self.size = 0
        self._committed = False
        self._discarded = False
        self._target: FilePath[str] | None = None
        # Where the bytes written so far are synced while more arrive (a worker thread), so
        # that the fsync in commit has only the tail left; None: all at commit.
        self.writeback: Run | None = None
        self._unsynced = 0
        self._syncing = False
        # Set when this partial continues one left by an earlier run (see BlobStore.resume).
        self.resumed: Resumable | None = None
        self._kept = False

    @property
    def sidecar(self) -> str:
        """Where L{write_sidecar} puts what this download is, for a resume after a restart."""
        return self.path.path.removesuffix(TEMP_SUFFIX) + RESUME_SUFFIX

    def write_sidecar(self, url: str, validator: str, sha256: str, size: int) -> None:
        """
        Say durably what this partial download is, so that a restart may continue it
        (blocking: on the disk worker). A crash before the sidecar is durable costs the
        resume, never correctness: a partial without one is swept at start-up.
        """
        if self._gone():
            return
        doc = Resumable(self.path, url, validator, sha256, size).document()
        staged = self.sidecar + ".new"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, doc)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, self.sidecar)
        if self._gone():
            # Committed or discarded meanwhile (another thread): no sidecar may outlive it.
            _unlink_quietly(self.sidecar)

    def _gone(self) -> bool:
        """Committed, or discarded without being kept for a resume: its temp name is going."""
        return self._committed or (self._discarded and not self._kept)

    def truncate(self) -> None:
        """Drop every byte written: the download starts over (the upstream sent a whole body)."""
        fd = self._require_open()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        self._hash = hashlib.sha256()
        self.size = 0
        self._unsynced = 0

    def rehash(self) -> int:
        """
        Compute the sha256 and size of the bytes already in the file (a partial left by an
        earlier run) and write after them from now on; blocking, for the disk worker.
        """
        fd = self._require_open()
        digest = hashlib.sha256()
        size = 0
        with open(self.path.path, "rb") as f:
            while chunk := f.read(_READ_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
        os.lseek(fd, size, os.SEEK_SET)
        self._hash = digest
        self.size = size
        return size

    @property
    def closed(self) -> bool:
        """True once committed or discarded: no more writes are accepted."""
        return self._committed or self._discarded

    def write(self, data: bytes) -> None:
        """Append C{data} to the temp file and the running sha256."""
        fd = self._require_open()
        view = memoryview(data)
        # os.write may write less than asked (signals, odd filesystems); loop.
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._hash.update(data)
        self.size += len(data)
        self._unsynced += len(data)
        if self.writeback is not None and self._unsynced >= WRITEBACK_BYTES and not self._syncing:
            self._start_writeback(fd)

    def _start_writeback(self, fd: int) -> None:
        assert self.writeback is not None
        self._unsynced = 0
        self._syncing = True

        def done(result: object) -> None:
            self._syncing = False

        # A duplicate: the sync may outlive this descriptor (closed by commit or discard).
        self.writeback(_sync_and_close, os.dup(fd)).addBoth(done)

    def flush(self) -> None:
        """Make everything written visible to other readers of L{path}.

        Nothing is buffered in this process, so this only checks that the
        partial is still open; it exists so callers need not know that.
        """
        self._require_open()

    def digest_with(self, more: bytes) -> str:
        """The sha256 of the bytes written and C{more} after them (C{more} is not written)."""
        digest = self._hash.copy()
        digest.update(more)
        return digest.hexdigest()

    def hexdigest(self) -> str:
        """The sha256 of everything written so far."""
        return self._hash.hexdigest()

    def commit(self, expected_sha256: str, *, keep_temp: bool = False) -> FilePath[str]:
        """Verify, fsync and link the temp file into the store.

        Slow (an fsync of the whole file): the server runs it off the reactor thread, while
        followers may still open L{path}. With C{keep_temp}, the temp name stays valid (and
        L{path} unchanged) until L{release_temp}, so that a follower opening it meanwhile
        gets the same file; otherwise it is removed here and L{path} becomes the blob's.

        @return: the blob's path in the store.
        @raise DigestMismatch: the content does not hash to C{expected_sha256};
            the temp file is discarded and no blob is created.
        @raise ValueError: the partial was already committed or discarded.
        """
        fd = self._require_open()
        actual = self.hexdigest()
        if actual != expected_sha256:
            self.discard()
            raise DigestMismatch(expected_sha256, actual, self.size)
        try:
            os.fsync(fd)
            self._close_fd()
            target = self._store.path_for(actual)
            existing = _size_or_none(target.path)
            # The same content already stored (another upstream, an earlier download) keeps
            # its file; a stored file of the wrong size can only be damage: ours replaces it.
            if existing != self.size:
                shard = target.parent()
                if _ensure_dir(shard.path):
                    _fsync_dir(shard.parent().path)
                _link_into_place(self.path.path, target.path, self._store.temp_dir.path)
                _fsync_dir(shard.path)
        except BaseException:
            self.discard()
            raise
        self._committed = True
        self._target = target
        if not keep_temp:
            self.release_temp()
        return target

    def release_temp(self) -> None:
        """After L{commit}: remove the temp name; L{path} becomes the blob's. Idempotent."""
        if self._target is None or self.path == self._target:
            return
        self._unlink_temp()
        self.path = self._target

    def discard(self) -> None:
        """
        Close and delete the temp file. Idempotent. After a commit only the temp name kept by
        C{keep_temp} goes (a download failing after its commit): the verified blob stays,
        recorded by whoever reaches it next or swept at start-up if nobody does.
        """
        if self._committed:
            self.release_temp()
            return
        if self._discarded:
            return
        self._discarded = True
        self._close_fd()
        self._unlink_temp()

    def keep(self) -> None:
        """
        Stop writing but keep the temp file and its sidecar, for a later download to continue
        (L{BlobStore.resumable}); the start-up sweep removes it if nobody does.
        """
        if self.closed:
            return
        self._kept = True
        self._discarded = True
        self._close_fd()

    def _require_open(self) -> int:
        if self._fd is None or self.closed:
            raise ValueError(f"partial blob {self.path.path} is closed")
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _unlink_temp(self) -> None:
        _unlink_quietly(self.sidecar)
        _unlink_quietly(self.path.path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _link_into_place(temp: str, target: str, temp_dir: str) -> None:
    """Give the file at C{temp} the name C{target} too, replacing whatever is there."""
    try:
        os.link(temp, target)
    except FileExistsError:
        # A link cannot replace a file: link under a second temp name, then rename over.
        staged = os.path.join(temp_dir, secrets.token_hex(16) + TEMP_SUFFIX)
        os.link(temp, staged)
        os.replace(staged, target)


def _ensure_dir(path: str) -> bool:
    """Create C{path} (and parents) if missing; True if it was created."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
    return True


def _size_or_none(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


class BlobStore:
    """Verified files under C{root/blobs/sha256}, temp files under C{root/tmp}.

    Every path is built by L{path_for} from a validated digest, never from
    text that came from a client or an upstream unchecked.
    """

    def __init__(self, root: FilePath[str]) -> None:
        self.root = root
        self.blobs_dir = root.child("blobs").child("sha256")
        self.temp_dir = root.child("tmp")
        _ensure_dir(self.blobs_dir.path)
        _ensure_dir(self.temp_dir.path)
        # Partial downloads kept by the start-up sweep, by the sha256 of their file; each is
        # taken once (L{resume}).
        self.resumable: dict[str, Resumable] = {}

    def resume(self, sha256: str) -> PartialBlob | None:
        """
        The partial download of C{sha256} the start-up sweep kept, opened for writing after
        its bytes once L{PartialBlob.rehash} has counted them; None when there is none.
        """
        found = self.resumable.pop(sha256, None)
        if found is None:
            return None
        try:
            fd = os.open(found.path.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return None
        partial = PartialBlob(self, found.path, fd)
        partial.resumed = found
        return partial

    def keep_resumable(self, found: Resumable) -> list[Resumable]:
        """
        Keep C{found} for the next download of its file (L{resume}); the oldest kept beyond
        L{MAX_RESUMABLE} are given up and returned, for the caller to L{remove_resumable}
        on the disk worker.
        """
        self.resumable.pop(found.sha256, None)
        self.resumable[found.sha256] = found
        dropped: list[Resumable] = []
        while len(self.resumable) > MAX_RESUMABLE:
            dropped.append(self.resumable.pop(next(iter(self.resumable))))
        return dropped

    @staticmethod
    def remove_resumable(found: Resumable) -> None:
        """Delete a kept partial download and its sidecar (blocking: on the disk worker)."""
        _unlink_quietly(found.path.path.removesuffix(TEMP_SUFFIX) + RESUME_SUFFIX)
        _unlink_quietly(found.path.path)

    def new_partial(self) -> PartialBlob:
        """Open a new, empty, uniquely named temp file."""
        # O_EXCL: a name clash can never make two writers share a file.
        for _attempt in range(8):
            path = self.temp_dir.child(secrets.token_hex(16) + TEMP_SUFFIX)
            try:
                fd = os.open(
                    path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
                )
            except FileExistsError:
                continue
            return PartialBlob(self, path, fd)
        raise OSError(errno.EEXIST, "could not pick a unique temp file name", self.temp_dir.path)

    def path_for(self, sha256: str) -> FilePath[str]:
        """The path of blob C{sha256}, whether or not it exists.

        @raise ValueError: C{sha256} is not 64 lowercase hex characters.
        """
        digest = check_sha256(sha256)
        return self.blobs_dir.child(digest[:2]).child(digest)

    def exists(self, sha256: str) -> bool:
        return os.path.isfile(self.path_for(sha256).path)

    def size_of(self, sha256: str) -> int:
        """Size in bytes of blob C{sha256}. @raise FileNotFoundError: no such blob."""
        return os.stat(self.path_for(sha256).path).st_size

    def open(self, sha256: str) -> BinaryIO:
        """Open blob C{sha256} for reading. @raise FileNotFoundError: no such blob."""
        return open(self.path_for(sha256).path, "rb")

    def remove(self, sha256: str) -> bool:
        """Delete blob C{sha256}; True if it existed.

        Remove the index record first: a crash in between then leaves an
        unreferenced blob, which start-up reconciliation deletes, rather than
        a record pointing at nothing.
        """
        try:
            os.unlink(self.path_for(sha256).path)
        except FileNotFoundError:
            return False
        return True

    def stored(self) -> Iterator[str]:
        """Yield the digest of every blob in the store (files with other names are skipped)."""
        try:
            shards = list(os.scandir(self.blobs_dir.path))
        except FileNotFoundError:
            return
        for shard in shards:
            if not (_SHARD_HEX.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)):
                continue
            try:
                entries = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if is_sha256(name) and name[:2] == shard.name and entry.is_file(follow_symlinks=False):
                    yield name

    def clear_temp(self, *, keep_resumable: bool = False, now: float | None = None) -> int:
        """Delete every file in C{tmp/}; return how many.

        With C{keep_resumable}, a partial download with a valid sidecar whose last write is
        younger than L{RESUMABLE_MAX_AGE_SECONDS} is kept with its sidecar, in L{resumable}
        (the newest one of a file, should there be several).

        Only for start-up: it also deletes the files of partials still being
        written by this process.
        """
        removed = 0
        try:
            entries = list(os.scandir(self.temp_dir.path))
        except FileNotFoundError:
            _ensure_dir(self.temp_dir.path)
            return 0
        kept: set[str] = set()
        if keep_resumable:
            kept = self._find_resumable(entries, time.time() if now is None else now)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) or entry.name in kept:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed += 1
        return removed

    def find_resumable(self) -> None:
        """
        Fill L{resumable} as the start-up sweep does, deleting nothing: a worker process's
        start (L{proxy.workers}), whose supervisor swept already and whose fellow workers'
        partials are live. Only the worker holding a file's download lock resumes it.
        """
        try:
            entries = list(os.scandir(self.temp_dir.path))
        except FileNotFoundError:
            return
        self._find_resumable(entries, time.time())

    def _find_resumable(self, entries: list[os.DirEntry[str]], now: float) -> set[str]:
        """Fill L{resumable} from the sidecars among C{entries}; the names to keep."""
        names = {e.name for e in entries}
        newest: dict[str, tuple[float, Resumable]] = {}
        for entry in entries:
            if not entry.name.endswith(RESUME_SUFFIX):
                continue
            part_name = entry.name.removesuffix(RESUME_SUFFIX) + TEMP_SUFFIX
            if part_name not in names:
                continue
            part = self.temp_dir.child(part_name)
            try:
                st = os.stat(part.path)
            except OSError:
                continue
            if now - st.st_mtime > RESUMABLE_MAX_AGE_SECONDS or st.st_size == 0:
                continue
            found = Resumable.read(part, entry.path)
            # A file stored meanwhile (by another path, a bundle) needs no partial any more.
            if found is None or st.st_size >= found.size or self.exists(found.sha256):
                continue
            if found.sha256 not in newest or newest[found.sha256][0] < st.st_mtime:
                newest[found.sha256] = (st.st_mtime, found)
        # Oldest first, as keep_resumable orders them; only the newest MAX_RESUMABLE stay.
        ordered = sorted(newest.values(), key=lambda pair: pair[0])[-MAX_RESUMABLE:]
        self.resumable = {found.sha256: found for _, found in ordered}
        kept: set[str] = set()
        for found in self.resumable.values():
            kept.add(found.path.basename())
            kept.add(found.path.basename().removesuffix(TEMP_SUFFIX) + RESUME_SUFFIX)
        return kept

    def resumable_bytes(self) -> int:
        """The bytes of the kept partial downloads not taken yet."""
        total = 0
        for found in self.resumable.values():
            try:
                total += os.stat(found.path.path).st_size
            except OSError:
                continue
        return total
