# -*- test-case-name: tests.test_metadata_store -*-
"""The bodies of metadata files and their records: the one place that puts, reads and forgets them.

A metadata file (an upstream's index or products file, an LXD upstream's image list and the
catalogue synthesised from it, a bundle's merged catalogue) is a blob in the L{BlobStore},
named by its sha256, and a L{MetadataRecord} in the L{CacheIndex} under (upstream, path)
holding its validators. Records may share a body (the same file kept for two client families),
and an image file may happen to have the same content, so a body is removed only when no
record of either kind refers to it any more.

A put commits the blob before it writes the record, and forgets the body it replaced after:
a crash at any instant leaves the old record and body or the new ones, and at worst a blob
nothing refers to, which start-up reconciliation removes.

The server runs each blocking step where L{proxy.work} says (commits and reads on C{disk},
record writes through L{CacheIndex.write}); the admin command, which has no reactor thread to
keep free, calls the blocking methods directly.
"""

from __future__ import annotations

from typing import Callable
from weakref import WeakKeyDictionary

from attrs import field, frozen
from twisted.internet.defer import DeferredLock

from proxy.blobs import BlobStore, PartialBlob
from proxy.index import CacheIndex, MetadataRecord
from proxy.work import Run, inline

# What a put checks a body with, on the worker that committed it: it returns what it parsed,
# or raises to refuse the body (which is then not kept).
Check = Callable[[bytes], object]


def _accept(body: bytes) -> None:
    return None


# Records remembered by stored() (a catalogue has a few files per upstream and family).
_RECORDS_REMEMBERED = 1024


# The metadata bodies of a blob store are put one at a time in a process (see put): one lock
# per blob store, whichever MetadataStore (family, upstream) puts them.
_PUTS: "WeakKeyDictionary[BlobStore, DeferredLock]" = WeakKeyDictionary()


def _puts_of(store: BlobStore) -> DeferredLock:
    lock = _PUTS.get(store)
    if lock is None:
        lock = _PUTS[store] = DeferredLock()
    return lock


@frozen
class MetadataStore:
    """
    Metadata bodies in C{store}, their records in C{index}; C{disk} runs the blocking work of
    the asynchronous methods (inline by default, as the deterministic tests want).
    """

    store: BlobStore
    index: CacheIndex
    disk: Run = inline
    # (upstream, path) -> (index generation, record): every request of a catalogue asks for
    # its record, which changes only with a write to the index (by any worker).
    _records: dict[tuple[str, str], tuple[int, MetadataRecord]] = field(
        factory=dict, init=False, eq=False, repr=False
    )

    def stored(self, upstream: str, path: str) -> MetadataRecord | None:
        """The record of C{path} of C{upstream} whose body is stored, or None."""
        generation = self.index.generation()
        known = self._records.get((upstream, path))
        if known is not None and known[0] == generation:
            return known[1]
        record = self.index.get_metadata(upstream, path)
        if record is not None and self.store.exists(record.sha256):
            if len(self._records) >= _RECORDS_REMEMBERED:
                self._records.clear()
            self._records[(upstream, path)] = (generation, record)
            return record
        return None

    def read(self, sha256: str) -> bytes:
        """
        The body C{sha256} (blocking: the server reads it inside its C{disk} work).

        @raise FileNotFoundError: no such body is stored.
        """
        with self.store.open(sha256) as f:
            return f.read()

    def load(self, upstream: str, path: str) -> tuple[MetadataRecord, bytes] | None:
        """The record of C{path} of C{upstream} and its body, or None when either is missing (blocking)."""
        record = self.index.get_metadata(upstream, path)
        if record is None:
            return None
        try:
            return record, self.read(record.sha256)
        except FileNotFoundError:
            return None

    async def put(
        self,
        upstream: str,
        path: str,
        body: bytes | PartialBlob,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        fetched_at: float,
        checked_at: float,
        check: Check = _accept,
    ) -> tuple[MetadataRecord, object]:
        """
        Keep C{body} (bytes, or a finished partial, which this commits) as the file C{path} of
        C{upstream}, with these validators, replacing the record held; the body it replaced
        is forgotten. The commit and C{check} run on C{disk}, the record write on the index's
        writer.

        @return: the new record, and what C{check} returned.
        @raise Exception: whatever C{check} raised; the body is not kept and no record changes.
        """
        # One put at a time in the process: another catalogue (family, upstream) may hold the
        # same bytes, and a body this commit keeps because it exists must not be forgotten by
        # that one's put before this record names it.
        lock = _puts_of(self.store)
        await lock.acquire()
        try:
            digest, parsed = await self.disk(self._commit, body, check)
            record = MetadataRecord(
                upstream=upstream, path=path, sha256=digest, etag=etag,
                last_modified=last_modified, fetched_at=fetched_at, checked_at=checked_at,
            )
            replaced = await self.index.write(self._replace, record)
            if replaced is not None:
                await self.disk(self.forget, replaced)
        finally:
            lock.release()
        return record, parsed

    def put_now(
        self, upstream: str, path: str, body: bytes, *, etag: str | None = None,
        last_modified: str | None = None, fetched_at: float, checked_at: float,
    ) -> MetadataRecord:
        """L{put}, blocking, on the calling thread: for the admin command."""
        digest, _ = self._commit(body, _accept)
        record = MetadataRecord(
            upstream=upstream, path=path, sha256=digest, etag=etag, last_modified=last_modified,
            fetched_at=fetched_at, checked_at=checked_at,
        )
        replaced = self._replace(record)
        if replaced is not None:
            self.forget(replaced)
        return record

    async def put_record(self, record: MetadataRecord) -> None:
        """Write C{record}, whose body is the one already stored (new validators, say)."""
        await self.index.write(self.index.put_metadata, record)

    def forget(self, sha256: str) -> bool:
        """
        Remove the body C{sha256} unless a record (of a file or of a metadata file) still
        refers to it; True if it was removed. Blocking: it scans every metadata record.
        """
        if self.index.get(sha256) is not None:
            return False
        if any(r.sha256 == sha256 for r in self.index.metadata_records()):
            return False
        return self.store.remove(sha256)

    def _commit(self, body: bytes | PartialBlob, check: Check) -> tuple[str, object]:
        """
        Commit C{body} as a blob (fsync, rename) and check it (blocking).

        @return: its sha256 and what C{check} returned.
        """
        partial = body if isinstance(body, PartialBlob) else self.store.new_partial()
        try:
            if isinstance(body, bytes):
                partial.write(body)
            digest = partial.hexdigest()
            committed = partial.commit(digest)
        finally:
            # A no-op once committed; otherwise the temp file goes.
            partial.discard()
        try:
            # A streamed body is read back whole from its file only here, off the reactor.
            return digest, check(body if isinstance(body, bytes) else committed.getContent())
        except Exception:
            self.forget(digest)
            raise

    def _replace(self, record: MetadataRecord) -> str | None:
        """Write C{record} (on the index's writer); the sha256 of the body it replaced, if other."""
        previous = self.index.get_metadata(record.upstream, record.path)
        self.index.put_metadata(record)
        if previous is not None and previous.sha256 != record.sha256:
            return previous.sha256
        return None


__all__ = ["Check", "MetadataStore"]
