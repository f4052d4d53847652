"""The cache index: which blobs we hold, where they came from, how they are used.

An LMDB environment (a directory) with named databases:

``files``     sha256 hex -> L{FileRecord} as JSON
``paths``     "upstream\\0item/path" -> sha256 hex (a second key for L{CacheIndex.find_path})
``metadata``  "upstream\\0path" -> L{MetadataRecord} as JSON
``info``      ``format`` -> the index format version

Every record carries its format version (``"v"``), so a newer index is refused
rather than misread. Transactions are short, synchronous and run on the caller's
(the reactor's) thread; none ever spans an C{await}. Blobs are written and
renamed into the store before their record is committed, and records are
removed before their blobs, so after a crash at any instant L{reconcile} only
ever has orphans and stale temp files to clean up, never a half-written blob
behind a record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
import lmdb
from attrs import field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.blobs import BlobStore, check_sha256

__all__ = [
    "CacheIndex",
    "FileRecord",
    "FORMAT_VERSION",
    "IndexFormatError",
    "MetadataRecord",
    "ReconcileReport",
    "item_path",
    "reconcile",
    "split_item_path",
]

FORMAT_VERSION = 1
# Sparse on Linux: only pages actually used take disk space. A FileRecord is a
# few hundred bytes, so this holds millions of them with room to spare.
DEFAULT_MAP_SIZE_BYTES = 4 * 1024 * 1024 * 1024
_MAX_DBS = 8
# Records read per read transaction while iterating, so that a long iteration
# (millions of records) never pins one old snapshot for its whole duration.
_SCAN_BATCH = 1024

_DB_FILES = b"files"
_DB_PATHS = b"paths"
_DB_METADATA = b"metadata"
_DB_INFO = b"info"
_FORMAT_KEY = b"format"

_log = Logger()


class IndexFormatError(Exception):
    """The index holds data this version cannot read."""


def _check_upstream(upstream: str) -> str:
    if not upstream or "/" in upstream or "\0" in upstream:
        raise ValueError(f"invalid upstream name: {upstream!r}")
    return upstream


def _check_relative_path(path: str) -> str:
    if not path or path.startswith("/") or "\0" in path:
        raise ValueError(f"invalid relative path: {path!r}")
    return path


def item_path(upstream: str, path: str) -> str:
    """The C{"NAME/relative/path"} form kept in L{FileRecord.paths}."""
    return f"{_check_upstream(upstream)}/{_check_relative_path(path)}"


def split_item_path(value: str) -> tuple[str, str]:
    """Split C{"NAME/relative/path"} into C{(NAME, relative/path)}; ValueError if malformed."""
    upstream, sep, path = value.partition("/")
    if not sep:
        raise ValueError(f"item path without an upstream name: {value!r}")
    return _check_upstream(upstream), _check_relative_path(path)


def _validate_sha256(_instance: object, _attribute: object, value: str) -> None:
    check_sha256(value)


def _validate_size(_instance: object, _attribute: object, value: int) -> None:
    if value < 0:
        raise ValueError(f"negative size: {value}")


def _to_paths(value: Iterable[str]) -> tuple[str, ...]:
    paths = tuple(value)
    for p in paths:
        split_item_path(p)
    return paths


@frozen
class FileRecord:
    """A verified file in the blob store and every place it is served from.

    @ivar paths: each C{"NAME/relative/item/path"}; the same content reached
        through another upstream or path adds a path, never a second record.
    @ivar cached: fetched on demand (C{True} for everything fetched so far).
    @ivar auto_update: kept fresh by a background refresh (C{False} for files
        fetched on demand).
    """

    sha256: str = field(validator=_validate_sha256)
    size: int = field(validator=_validate_size)
    upstream: str = field(validator=lambda _i, _a, v: _check_upstream(v))
    paths: tuple[str, ...] = field(converter=_to_paths)
    product: str
    version: str
    stored_at: float
    last_used_at: float
    use_count: int
    cached: bool = True
    auto_update: bool = False


@frozen
class MetadataRecord:
    """Validators for a cached simplestreams metadata file whose body is a blob."""

    upstream: str = field(validator=lambda _i, _a, v: _check_upstream(v))
    path: str = field(validator=lambda _i, _a, v: _check_relative_path(v))
    sha256: str = field(validator=_validate_sha256)
    etag: str | None
    last_modified: str | None
    fetched_at: float
    checked_at: float


@frozen
class ReconcileReport:
    temp_removed: int
    orphan_blobs_removed: int
    dangling_records_removed: int


@attrs.define
class _PendingUse:
    count: int
    last_used_at: float


def _encode(kind: str, record: FileRecord | MetadataRecord) -> bytes:
    data: dict[str, Any] = attrs.asdict(record)
    data["v"] = FORMAT_VERSION
    data["kind"] = kind
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _decode_fields(kind: str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise IndexFormatError(f"unreadable {kind} record: {e}") from e
    if not isinstance(data, dict):
        raise IndexFormatError(f"{kind} record is not a JSON object")
    version = data.pop("v", None)
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{kind} record has format version {version!r}; this version reads {FORMAT_VERSION}"
        )
    if data.pop("kind", None) != kind:
        raise IndexFormatError(f"record in the {kind} database is not a {kind} record")
    return data


def _decode_file(raw: bytes) -> FileRecord:
    data = _decode_fields("file", raw)
    try:
        return FileRecord(
            sha256=data["sha256"],
            size=int(data["size"]),
            upstream=data["upstream"],
            paths=tuple(data["paths"]),
            product=data["product"],
            version=data["version"],
            stored_at=float(data["stored_at"]),
            last_used_at=float(data["last_used_at"]),
            use_count=int(data["use_count"]),
            cached=bool(data["cached"]),
            auto_update=bool(data["auto_update"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"malformed file record: {e!r}") from e


def _decode_metadata(raw: bytes) -> MetadataRecord:
    data = _decode_fields("metadata", raw)
    try:
        return MetadataRecord(
            upstream=data["upstream"],
            path=data["path"],
            sha256=data["sha256"],
            etag=data["etag"],
            last_modified=data["last_modified"],
            fetched_at=float(data["fetched_at"]),
            checked_at=float(data["checked_at"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"malformed metadata record: {e!r}") from e


class CacheIndex:
    """The LMDB cache index. One instance per environment per process.

    LMDB refuses to open the same environment twice in one process: L{close}
    one instance before opening another on the same path.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        map_size: int = DEFAULT_MAP_SIZE_BYTES,
    ) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._clock = clock
        # sync=True (LMDB's default): a committed record survives a power cut,
        # which is what lets a blob's record be trusted after a crash.
        self._env = lmdb.open(
            path,
            subdir=True,
            create=True,
            map_size=map_size,
            max_dbs=_MAX_DBS,
            sync=True,
            metasync=True,
            readahead=False,
        )
        # A process killed mid-read leaves its reader slot taken; free it now
        # so old pages can be reused.
        stale = self._env.reader_check()
        if stale:
            self.log.info("freed {count} stale LMDB reader slots in {path}", count=stale, path=path)
        self._files = self._env.open_db(_DB_FILES)
        self._paths = self._env.open_db(_DB_PATHS)
        self._metadata = self._env.open_db(_DB_METADATA)
        self._info = self._env.open_db(_DB_INFO)
        self._check_format()
        self._max_key_size: int = self._env.max_key_size()
        self._pending: dict[str, _PendingUse] = {}
        self._closed = False

    def _check_format(self) -> None:
        expected = str(FORMAT_VERSION).encode("ascii")
        with self._env.begin(write=True, db=self._info) as txn:
            found = txn.get(_FORMAT_KEY)
            if found is None:
                txn.put(_FORMAT_KEY, expected)
            elif found != expected:
                raise IndexFormatError(
                    f"index at {self.path} has format {found.decode('ascii', 'replace')!r};"
                    f" this version reads {FORMAT_VERSION}"
                )

    # -- keys --------------------------------------------------------------

    def _location_key(self, upstream: str, path: str) -> bytes:
        raw = f"{_check_upstream(upstream)}\0{_check_relative_path(path)}".encode("utf-8")
        if len(raw) <= self._max_key_size:
            return raw
        # Too long for an LMDB key. A valid key never starts with NUL (the
        # upstream name is not empty), so hashed keys cannot collide with
        # plain ones; readers check the record's own paths before trusting it.
        return b"\0" + hashlib.sha256(raw).digest()

    @staticmethod
    def _sha_key(sha256: str) -> bytes:
        return check_sha256(sha256).encode("ascii")

    # -- files -------------------------------------------------------------

    def _get_in(self, txn: Any, sha256: str) -> FileRecord | None:
        raw = txn.get(self._sha_key(sha256), db=self._files)
        return None if raw is None else _decode_file(raw)

    def _write_file_in(self, txn: Any, record: FileRecord) -> None:
        txn.put(self._sha_key(record.sha256), _encode("file", record), db=self._files)

    def _claim_location_in(self, txn: Any, sha256: str, item: str) -> None:
        """Point location C{item} at C{sha256}, taking it from any other record."""
        key = self._location_key(*split_item_path(item))
        value = sha256.encode("ascii")
        current = txn.get(key, db=self._paths)
        if current is not None and current != value:
            previous = self._get_in(txn, current.decode("ascii"))
            if previous is not None and item in previous.paths:
                # The upstream now serves other content at this path; the old
                # record keeps its blob and its other paths.
                remaining = tuple(p for p in previous.paths if p != item)
                self._write_file_in(txn, attrs.evolve(previous, paths=remaining))
        txn.put(key, value, db=self._paths)

    def _release_location_in(self, txn: Any, sha256: str, item: str) -> None:
        key = self._location_key(*split_item_path(item))
        if txn.get(key, db=self._paths) == sha256.encode("ascii"):
            txn.delete(key, db=self._paths)

    def _remove_in(self, txn: Any, sha256: str) -> bool:
        record = self._get_in(txn, sha256)
        if record is None:
            return False
        for item in record.paths:
            self._release_location_in(txn, sha256, item)
        txn.delete(self._sha_key(sha256), db=self._files)
        return True

    def put(self, record: FileRecord) -> None:
        """Store C{record}, replacing any record for the same sha256, and index its paths."""
        with self._env.begin(write=True) as txn:
            previous = self._get_in(txn, record.sha256)
            if previous is not None:
                for item in set(previous.paths) - set(record.paths):
                    self._release_location_in(txn, record.sha256, item)
            for item in record.paths:
                self._claim_location_in(txn, record.sha256, item)
            self._write_file_in(txn, record)

    def get(self, sha256: str) -> FileRecord | None:
        with self._env.begin() as txn:
            return self._get_in(txn, sha256)

    def find_path(self, upstream: str, path: str) -> FileRecord | None:
        """The record served at C{path} of upstream C{upstream}, or None."""
        key = self._location_key(upstream, path)
        with self._env.begin() as txn:
            value = txn.get(key, db=self._paths)
            if value is None:
                return None
            record = self._get_in(txn, value.decode("ascii"))
        if record is None or item_path(upstream, path) not in record.paths:
            return None
        return record

    def add_path(self, sha256: str, upstream: str, path: str) -> FileRecord:
        """Record that blob C{sha256} is also served at C{upstream}/C{path}.

        @return: the updated record.
        @raise KeyError: there is no record for C{sha256}.
        """
        item = item_path(upstream, path)
        with self._env.begin(write=True) as txn:
            record = self._get_in(txn, sha256)
            if record is None:
                raise KeyError(sha256)
            self._claim_location_in(txn, sha256, item)
            if item not in record.paths:
                record = attrs.evolve(record, paths=record.paths + (item,))
                self._write_file_in(txn, record)
        return record

    def remove(self, sha256: str) -> bool:
        """Delete the record for C{sha256} and its path entries; True if it existed.

        Call this before deleting the blob (see L{BlobStore.remove}).
        """
        self._pending.pop(sha256, None)
        with self._env.begin(write=True) as txn:
            return self._remove_in(txn, sha256)

    def remove_many(self, sha256s: Iterable[str]) -> int:
        """Delete several records in one transaction; return how many existed."""
        digests = list(sha256s)
        if not digests:
            return 0
        removed = 0
        with self._env.begin(write=True) as txn:
            for sha256 in digests:
                self._pending.pop(sha256, None)
                removed += self._remove_in(txn, sha256)
        return removed

    def _scan(self, db: Any) -> Iterator[bytes]:
        """Yield every value of C{db}, a batch per short read transaction."""
        last: bytes | None = None
        while True:
            batch: list[tuple[bytes, bytes]] = []
            with self._env.begin(db=db) as txn:
                cursor = txn.cursor()
                if last is None:
                    found = cursor.first()
                else:
                    found = cursor.set_range(last)
                    if found and cursor.key() == last:
                        found = cursor.next()
                while found and len(batch) < _SCAN_BATCH:
                    batch.append((cursor.key(), cursor.value()))
                    found = cursor.next()
            for _key, value in batch:
                yield value
            if len(batch) < _SCAN_BATCH:
                return
            last = batch[-1][0]

    def records(self) -> Iterator[FileRecord]:
        """Every file record, in sha256 order (records written meanwhile may or may not appear)."""
        for raw in self._scan(self._files):
            yield _decode_file(raw)

    # -- usage -------------------------------------------------------------

    def note_use(self, sha256: str) -> None:
        """Count a hit on C{sha256} in memory; L{flush_usage} writes it later.

        A cache hit must not cost a synced LMDB commit.
        """
        now = self._clock.seconds()
        pending = self._pending.get(sha256)
        if pending is None:
            self._pending[sha256] = _PendingUse(1, now)
        else:
            pending.count += 1
            pending.last_used_at = max(pending.last_used_at, now)

    @property
    def pending_uses(self) -> dict[str, int]:
        """Hits counted by L{note_use} and not yet flushed, by sha256."""
        return {sha256: p.count for sha256, p in self._pending.items()}

    def flush_usage(self) -> int:
        """Write every pending use in one transaction; return the records updated.

        Uses of records that no longer exist are dropped. If the write fails,
        the uses stay pending for the next flush.
        """
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        updated = 0
        try:
            with self._env.begin(write=True) as txn:
                for sha256, use in pending.items():
                    record = self._get_in(txn, sha256)
                    if record is None:
                        continue
                    self._write_file_in(
                        txn,
                        attrs.evolve(
                            record,
                            use_count=record.use_count + use.count,
                            last_used_at=max(record.last_used_at, use.last_used_at),
                        ),
                    )
                    updated += 1
        except BaseException:
            for sha256, use in pending.items():
                later = self._pending.get(sha256)
                if later is not None:
                    use.count += later.count
                    use.last_used_at = max(use.last_used_at, later.last_used_at)
                self._pending[sha256] = use
            raise
        return updated

    # -- metadata ----------------------------------------------------------

    def put_metadata(self, record: MetadataRecord) -> None:
        key = self._location_key(record.upstream, record.path)
        with self._env.begin(write=True, db=self._metadata) as txn:
            txn.put(key, _encode("metadata", record))

    def get_metadata(self, upstream: str, path: str) -> MetadataRecord | None:
        key = self._location_key(upstream, path)
        with self._env.begin(db=self._metadata) as txn:
            raw = txn.get(key)
        if raw is None:
            return None
        record = _decode_metadata(raw)
        if record.upstream != upstream or record.path != path:
            return None
        return record

    def remove_metadata(self, upstream: str, path: str) -> bool:
        """Delete the metadata record; True if it existed. The body blob stays."""
        key = self._location_key(upstream, path)
        with self._env.begin(write=True, db=self._metadata) as txn:
            return bool(txn.delete(key))

    def metadata_records(self) -> Iterator[MetadataRecord]:
        for raw in self._scan(self._metadata):
            yield _decode_metadata(raw)

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Flush pending uses and close the environment. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush_usage()
        except Exception:
            self.log.failure("could not write pending uses to {path}", path=self.path)
        self._env.close()


def reconcile(index: CacheIndex, store: BlobStore) -> ReconcileReport:
    """Make the index and the blob store agree; run at start-up, before serving.

    Deletes every temp file; drops every record (file or metadata) whose blob
    is missing or, for file records, has the wrong size; then deletes every
    blob no remaining record references.
    """
    temp_removed = store.clear_temp()

    # Digests as bytes: half the memory of hex strings for a large cache.
    referenced: set[bytes] = set()
    dangling: list[str] = []
    for record in index.records():
        try:
            on_disk: int | None = store.size_of(record.sha256)
        except FileNotFoundError:
            on_disk = None
        if on_disk == record.size:
            referenced.add(bytes.fromhex(record.sha256))
            continue
        _log.warn(
            "dropping index record {sha256}: blob size {on_disk} but record says {size}",
            sha256=record.sha256,
            on_disk=on_disk,
            size=record.size,
        )
        dangling.append(record.sha256)
    dangling_removed = index.remove_many(dangling)

    for metadata in list(index.metadata_records()):
        if store.exists(metadata.sha256):
            referenced.add(bytes.fromhex(metadata.sha256))
            continue
        _log.warn(
            "dropping metadata record {upstream}/{path}: blob {sha256} is missing",
            upstream=metadata.upstream,
            path=metadata.path,
            sha256=metadata.sha256,
        )
        dangling_removed += index.remove_metadata(metadata.upstream, metadata.path)

    orphans = 0
    for sha256 in list(store.stored()):
        if bytes.fromhex(sha256) in referenced:
            continue
        _log.debug("removing unreferenced blob {sha256}", sha256=sha256)
        orphans += store.remove(sha256)

    report = ReconcileReport(
        temp_removed=temp_removed,
        orphan_blobs_removed=orphans,
        dangling_records_removed=dangling_removed,
    )
    # The service logs the summary at info level, with the cache's size.
    _log.debug(
        "cache reconciled: {temp_removed} temp files, {orphan_blobs_removed} unreferenced blobs"
        " and {dangling_records_removed} dangling records removed",
        temp_removed=report.temp_removed,
        orphan_blobs_removed=report.orphan_blobs_removed,
        dangling_records_removed=report.dangling_records_removed,
    )
    return report
