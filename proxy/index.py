"""The cache index: which blobs we hold, where they came from, how they are used.

An LMDB environment (a directory) with named databases:

``files``     sha256 hex -> L{FileRecord} as JSON
``paths``     "upstream\\0item/path" -> sha256 hex (a second key for L{CacheIndex.find_path})
``metadata``  "upstream\\0path" -> L{MetadataRecord} as JSON
``pins``      "upstream\\0alias\\0type\\0arch" -> L{PinRecord} as JSON
``parts``     image fingerprint -> L{ImageParts} as JSON: how an image of an LXD upstream splits
              into its stored files, learnt from its first export download
``counters``  counter name -> decimal ASCII integer: the usage totals of L{Stats} and
              ``stored_bytes``, the sum of every L{FileRecord}'s size
``info``      ``format`` -> the index format version

``pins``, ``counters`` and ``parts`` were added without a format change: an index written
before them simply has none of them, and gains them (the stored size counted once) when first
opened; a version that does not know a database never opens it.

Several processes may open the environment at once (the server and the admin command), so
every total is kept in LMDB and changed in the same transaction as the records it sums,
never only in one process's memory.

Every record carries its format version (``"v"``), so a newer index is refused
rather than misread. Transactions are short and synchronous; none ever spans an
C{await}. Reads are cheap (a memory map) and may run on the reactor thread; a
write waits for the disk (every commit is synced), so the server runs writes on
its one index thread through L{CacheIndex.write}, and scans on a worker thread. Blobs are written and
linked into the store before their record is committed, and records are
removed before their blobs, so after a crash at any instant L{reconcile} only
ever has orphans and stale temp files to clean up, never a half-written blob
behind a record.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, Callable, TypeVar

import attrs
import lmdb
from attrs import field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.blobs import BlobStore, check_sha256
from proxy.errors import Unavailable
from proxy.work import Run, inline

__all__ = [
    "CacheIndex",
    "FileRecord",
    "FORMAT_VERSION",
    "IndexBusy",
    "ImageParts",
    "IndexFormatError",
    "MetadataRecord",
    "PinRecord",
    "ReconcileReport",
    "Stats",
    "item_path",
    "reconcile",
    "split_item_path",
]

FORMAT_VERSION = 1
# Sparse on Linux: only pages actually used take disk space. A FileRecord is a
# few hundred bytes, so this holds millions of them with room to spare.
DEFAULT_MAP_SIZE_BYTES = 4 * 1024 * 1024 * 1024
_MAX_DBS = 8
# Readers at once (each open read transaction holds a slot, whichever thread it is on): the
# server's reactor and its worker threads, plus admin commands, with room to spare.
MAX_READERS = 1024
# Records read per read transaction while iterating, so that a long iteration
# (millions of records) never pins one old snapshot for its whole duration.
_SCAN_BATCH = 1024

_DB_FILES = b"files"
_DB_PATHS = b"paths"
_DB_METADATA = b"metadata"
_DB_INFO = b"info"
_DB_PINS = b"pins"
_DB_COUNTERS = b"counters"
_DB_PARTS = b"parts"
_FORMAT_KEY = b"format"
# The sum of every file record's size, kept by every transaction that adds or removes one.
_STORED_BYTES_KEY = b"stored_bytes"
# The files with C{cached = False} (pinned), and their bytes: kept like the stored bytes.
_PINNED_FILES_KEY = b"pinned_files"
_PINNED_BYTES_KEY = b"pinned_bytes"
_TOTAL_KEYS = (_STORED_BYTES_KEY, _PINNED_FILES_KEY, _PINNED_BYTES_KEY)

_log = Logger()
T = TypeVar("T")


class IndexFormatError(Exception):
    """The index holds data this version cannot read."""


class IndexBusy(Unavailable):
    """LMDB's reader table is full: this read cannot be done now."""

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={b"Retry-After": b"1"})


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


def _check_pin_part(name: str) -> Any:
    def check(_instance: object, _attribute: object, value: str) -> None:
        if "\0" in value:
            raise ValueError(f"invalid pin {name}: {value!r}")

    return check


def _check_alias(_instance: object, _attribute: object, value: str) -> None:
    if not value or "\0" in value:
        raise ValueError(f"invalid pin alias: {value!r}")


@frozen
class PinRecord:
    """An image kept and auto-updated whatever its use, named as a client would name it.

    @ivar alias: the alias (or fingerprint) on C{upstream}, e.g. C{ubuntu/24.04}.
    @ivar type: C{"container"} or C{"virtual-machine"}.
    @ivar arch: the LXD architecture name; C{""} for the architecture of the proxy's host.
    @ivar pinned_at: when the pin was made (seconds since the epoch).
    """

    upstream: str = field(validator=lambda _i, _a, v: _check_upstream(v))
    alias: str = field(validator=_check_alias)
    type: str = field(validator=_check_pin_part("type"))
    arch: str = field(validator=_check_pin_part("arch"))
    pinned_at: float


def _validate_optional_sha256(_instance: object, _attribute: object, value: str | None) -> None:
    if value is not None:
        check_sha256(value)


@frozen
class ImageParts:
    """
    The files an image of an LXD upstream is stored as, learnt from its export.

    The LXD API names an image only by its fingerprint, the sha256 of all its files together;
    the sha256 and size of each file are known once an export has been downloaded and verified.

    @ivar fingerprint: the image's fingerprint.
    @ivar upstream: the upstream whose export taught it.
    @ivar meta_sha256: the metadata file of a split image, or the single file of a unified
        one (then equal to C{fingerprint}).
    @ivar meta_ftype: the simplestreams ftype it is listed as (C{lxd.tar.xz}, or
        C{lxd_combined.tar.gz} for a unified image).
    @ivar root_sha256: the root file of a split image; None for a unified image.
    @ivar root_size: 0 for a unified image.
    @ivar root_ftype: C{squashfs}, C{root.tar.xz}, C{disk-kvm.img} ...; C{""} for a unified image.
    """

    fingerprint: str = field(validator=_validate_sha256)
    upstream: str = field(validator=lambda _i, _a, v: _check_upstream(v))
    meta_sha256: str = field(validator=_validate_sha256)
    meta_size: int = field(validator=_validate_size)
    meta_ftype: str
    root_sha256: str | None = field(validator=_validate_optional_sha256)
    root_size: int = field(validator=_validate_size)
    root_ftype: str

    @property
    def unified(self) -> bool:
        return self.root_sha256 is None

    @property
    def size(self) -> int:
        return self.meta_size + self.root_size


# The usage totals, in the order of L{Stats}' fields; each is a key of the counters database.
_COUNTER_NAMES = (
    "hits",
    "misses",
    "bytes_from_cache",
    "bytes_from_upstream",
    "not_stored",
    "bytes_served",
)


@frozen
class Stats:
    """Usage totals since the index was created.

    @ivar hits: response bodies served from a stored file.
    @ivar misses: response bodies streamed from a download (the client's own or a shared one).
    @ivar bytes_from_cache: body bytes of the hits.
    @ivar bytes_from_upstream: bytes downloaded from upstreams for files (stored or not).
    @ivar not_stored: downloads streamed to their clients but not stored, for lack of room.
    @ivar bytes_served: body bytes of every response counted, hits and misses.
    """

    hits: int = 0
    misses: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    not_stored: int = 0
    bytes_served: int = 0


@frozen
class ReconcileReport:
    temp_removed: int
    orphan_blobs_removed: int
    dangling_records_removed: int


@attrs.define
class _PendingUse:
    count: int
    last_used_at: float


def _encode(kind: str, record: FileRecord | MetadataRecord | PinRecord | ImageParts) -> bytes:
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


def _decode_pin(raw: bytes) -> PinRecord:
    data = _decode_fields("pin", raw)
    try:
        return PinRecord(
            upstream=data["upstream"],
            alias=data["alias"],
            type=data["type"],
            arch=data["arch"],
            pinned_at=float(data["pinned_at"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"malformed pin record: {e!r}") from e


def _decode_parts(raw: bytes) -> ImageParts:
    data = _decode_fields("parts", raw)
    try:
        return ImageParts(
            fingerprint=data["fingerprint"],
            upstream=data["upstream"],
            meta_sha256=data["meta_sha256"],
            meta_size=int(data["meta_size"]),
            meta_ftype=data["meta_ftype"],
            root_sha256=data["root_sha256"],
            root_size=int(data["root_size"]),
            root_ftype=data["root_ftype"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"malformed parts record: {e!r}") from e


def _size_in(raw: bytes) -> int:
    """The size field of an encoded file record, 0 if it has none that can be read.

    Lenient on purpose: counting the stored bytes must not make an index with one damaged
    record impossible to open; reading that record still fails loudly.
    """
    try:
        size = json.loads(raw).get("size", 0)
    except (ValueError, AttributeError):
        return 0
    return size if isinstance(size, int) and size >= 0 else 0


def _pinned_in(raw: bytes) -> bool:
    """Whether an encoded file record is pinned (C{cached} false); as lenient as L{_size_in}."""
    try:
        return json.loads(raw).get("cached", True) is False
    except (ValueError, AttributeError):
        return False


def _pinned_share(record: FileRecord) -> tuple[int, int]:
    """What C{record} adds to the pinned totals: (files, bytes)."""
    return (0, 0) if record.cached else (1, record.size)


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
        *,
        open_now: bool = True,
    ) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._clock = clock
        self._map_size = map_size
        self._lmdb: lmdb.Environment | None = None
        self._opened_by = 0
        self._pending: dict[str, _PendingUse] = {}
        self._pending_counts: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)
        self._closed = False
        # Where L{write} runs writes: the server's index thread; inline for the admin command.
        self.writer: Run = inline
        if open_now:
            self.open()

    def open(self) -> None:
        """
        Open the LMDB environment in this process; a no-op when this process opened it.

        LMDB forbids using an environment across C{fork()} (its reader slots are bound to the
        process that opened it): a daemon opens the index after twistd has forked, never before.

        @raise RuntimeError: the environment was opened by another process (before a fork).
        """
        if self._lmdb is not None:
            if self._opened_by == os.getpid():
                return
            raise RuntimeError(f"the cache index {self.path} was opened before a fork")
        # sync=True (LMDB's default): a committed record survives a power cut,
        # which is what lets a blob's record be trusted after a crash.
        self._lmdb = lmdb.open(
            self.path,
            subdir=True,
            create=True,
            map_size=self._map_size,
            max_dbs=_MAX_DBS,
            max_readers=MAX_READERS,
            sync=True,
            metasync=True,
            readahead=False,
        )
        self._opened_by = os.getpid()
        self._closed = False
        # A process killed mid-read leaves its reader slot taken; free it now
        # so old pages can be reused.
        stale = self._env.reader_check()
        if stale:
            self.log.info("freed {count} stale LMDB reader slots in {path}", count=stale, path=self.path)
        self._files = self._env.open_db(_DB_FILES)
        self._paths = self._env.open_db(_DB_PATHS)
        self._metadata = self._env.open_db(_DB_METADATA)
        self._info = self._env.open_db(_DB_INFO)
        self._check_format()
        self._pins = self._env.open_db(_DB_PINS)
        self._counters = self._env.open_db(_DB_COUNTERS)
        self._parts = self._env.open_db(_DB_PARTS)
        self._count_stored_bytes(only_if_missing=True)
        self._max_key_size: int = self._env.max_key_size()

    @property
    def _env(self) -> lmdb.Environment:
        if self._lmdb is None:
            raise RuntimeError(f"the cache index {self.path} is not open")
        return self._lmdb

    def _read(self, db: Any = None) -> Any:
        """
        Begin a read transaction.

        Every reader takes a slot in LMDB's reader table until its transaction object is
        freed. When the table is full, slots left by dead processes and by transactions kept
        alive only by reference cycles are freed and the read tried once more;
        if it is still full, this read fails with L{IndexBusy} (a 503 for that request) and
        the next one tries again: a full table never becomes a lasting outage.
        """
        try:
            return self._env.begin(db=db)
        except lmdb.ReadersFullError:
            freed = self._env.reader_check()
            # A transaction object holds its slot until it is freed, even once it has ended:
            # one kept alive by a cycle (a failure's traceback, say) is freed by a collection.
            gc.collect()
            try:
                return self._env.begin(db=db)
            except lmdb.ReadersFullError:
                self.log.error(
                    "the LMDB reader table of {path} is full ({readers} readers, {freed} stale "
                    "slots freed): this request gets 503",
                    path=self.path, readers=self._env.max_readers(), freed=freed,
                )
                raise IndexBusy("the cache index is busy; try again") from None

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

    def _count_stored_bytes(self, *, only_if_missing: bool) -> int:
        """
        Count the stored bytes and the pinned files and bytes from every record (when one of
        the totals is missing, with C{only_if_missing}); return the stored bytes.
        """
        if only_if_missing:
            with self._read(self._counters) as txn:
                found = [txn.get(key) for key in _TOTAL_KEYS]
            if None not in found:
                return int(found[0])
        # One write transaction for the scan and the result: no other writer can add or
        # remove a record in between, so the totals are exact.
        with self._env.begin(write=True) as txn:
            if only_if_missing:
                found = [txn.get(key, db=self._counters) for key in _TOTAL_KEYS]
                if None not in found:
                    return int(found[0])
            total = pinned_files = pinned_bytes = 0
            cursor = txn.cursor(db=self._files)
            for value in cursor.iternext(keys=False, values=True):
                size, pinned = _size_in(value), _pinned_in(value)
                total += size
                if pinned:
                    pinned_files += 1
                    pinned_bytes += size
            for key, count in zip(_TOTAL_KEYS, (total, pinned_files, pinned_bytes)):
                txn.put(key, str(count).encode("ascii"), db=self._counters)
        return total

    # -- counters ----------------------------------------------------------

    def _counter_in(self, txn: Any, key: bytes) -> int:
        raw = txn.get(key, db=self._counters)
        if raw is None:
            return 0
        try:
            return int(raw)
        except ValueError as e:
            raise IndexFormatError(f"counter {key.decode('ascii', 'replace')} is not a number") from e

    def _add_counter_in(self, txn: Any, key: bytes, delta: int) -> None:
        if delta:
            value = self._counter_in(txn, key) + delta
            txn.put(key, str(value).encode("ascii"), db=self._counters)

    # -- keys --------------------------------------------------------------

    def _location_key(self, upstream: str, path: str) -> bytes:
        return self._bounded_key(
            f"{_check_upstream(upstream)}\0{_check_relative_path(path)}".encode("utf-8")
        )

    def _bounded_key(self, raw: bytes) -> bytes:
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
        key = self._sha_key(record.sha256)
        raw = txn.get(key, db=self._files)
        # Read leniently: a damaged record may still be overwritten.
        before = (1, _size_in(raw)) if raw is not None and _pinned_in(raw) else (0, 0)
        self._count_pinned_in(txn, before, _pinned_share(record))
        txn.put(key, _encode("file", record), db=self._files)

    def _count_pinned_in(self, txn: Any, before: tuple[int, int], after: tuple[int, int]) -> None:
        """Keep the pinned totals as a record's share goes from C{before} to C{after}."""
        if before != after:
            self._add_counter_in(txn, _PINNED_FILES_KEY, after[0] - before[0])
            self._add_counter_in(txn, _PINNED_BYTES_KEY, after[1] - before[1])

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
        self._add_counter_in(txn, _STORED_BYTES_KEY, -record.size)
        self._count_pinned_in(txn, _pinned_share(record), (0, 0))
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
            self._add_counter_in(
                txn, _STORED_BYTES_KEY, record.size - (0 if previous is None else previous.size)
            )

    def get(self, sha256: str) -> FileRecord | None:
        with self._read() as txn:
            return self._get_in(txn, sha256)

    def find_path(self, upstream: str, path: str) -> FileRecord | None:
        """The record served at C{path} of upstream C{upstream}, or None."""
        key = self._location_key(upstream, path)
        with self._read() as txn:
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

    def record_path(self, new: FileRecord, upstream: str, path: str) -> FileRecord:
        """
        Record that blob C{new.sha256} is served at C{upstream}/C{path}: add the path to its
        record, or store C{new} if it has none. One transaction, so that a record written
        since the caller looked (by another path, a pin) keeps its paths and flags.

        @return: the record as it now is.
        """
        item = item_path(upstream, path)
        with self._env.begin(write=True) as txn:
            record = self._get_in(txn, new.sha256)
            if record is None:
                record = new if item in new.paths else attrs.evolve(new, paths=new.paths + (item,))
                for location in record.paths:
                    self._claim_location_in(txn, record.sha256, location)
                self._add_counter_in(txn, _STORED_BYTES_KEY, record.size)
            elif item in record.paths:
                return record
            else:
                self._claim_location_in(txn, record.sha256, item)
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

    def remove_cached(self, sha256s: Iterable[str], *, forget_uses: bool = True) -> list[FileRecord]:
        """Delete, in one transaction, the records among C{sha256s} that are still C{cached}.

        For expiry and eviction: a file pinned (by another process, say) since the caller
        chose it is kept. Call this before deleting the blobs. From a worker thread, pass
        C{forget_uses=False} and call L{forget_uses} on the reactor thread, which owns them.

        @return: the records removed.
        """
        digests = list(sha256s)
        if not digests:
            return []
        removed: list[FileRecord] = []
        with self._env.begin(write=True) as txn:
            for sha256 in digests:
                record = self._get_in(txn, sha256)
                if record is None or not record.cached:
                    continue
                self._remove_in(txn, sha256)
                removed.append(record)
        if forget_uses:
            self.forget_uses(r.sha256 for r in removed)
        return removed

    def forget_uses(self, sha256s: Iterable[str]) -> None:
        """Drop the pending uses of C{sha256s} (their records are gone). On the reactor thread."""
        for sha256 in sha256s:
            self._pending.pop(sha256, None)

    def set_flags(self, sha256: str, *, cached: bool, auto_update: bool) -> FileRecord | None:
        """Set the C{cached} and C{auto_update} flags of a record.

        @return: the updated record, or None if there is no record for C{sha256}.
        """
        with self._env.begin(write=True) as txn:
            record = self._get_in(txn, sha256)
            if record is None:
                return None
            if (record.cached, record.auto_update) != (cached, auto_update):
                record = attrs.evolve(record, cached=cached, auto_update=auto_update)
                self._write_file_in(txn, record)
        return record

    def unpin(self, sha256s: Iterable[str]) -> int:
        """
        Make the pinned (auto-updated, not cached) files among C{sha256s} plain cached ones,
        in one transaction; a file no longer pinned is left as it is. Return how many changed.
        """
        changed = 0
        with self._env.begin(write=True) as txn:
            for sha256 in sha256s:
                record = self._get_in(txn, sha256)
                if record is None or record.cached or not record.auto_update:
                    continue
                self._write_file_in(txn, attrs.evolve(record, cached=True, auto_update=False))
                changed += 1
        return changed

    def total_size(self) -> int:
        """The sum of the sizes of every file record, read from the index (cheap)."""
        with self._read(self._counters) as txn:
            return self._counter_in(txn, _STORED_BYTES_KEY)

    def pinned_totals(self) -> tuple[int, int]:
        """How many file records are pinned (not C{cached}), and their bytes (cheap)."""
        with self._read(self._counters) as txn:
            return self._counter_in(txn, _PINNED_FILES_KEY), self._counter_in(txn, _PINNED_BYTES_KEY)

    @property
    def is_open(self) -> bool:
        """Whether the index is open in this process (from start-up until it is closed)."""
        return self._lmdb is not None and self._opened_by == os.getpid()

    def catalogue_checked_at(self, upstream: str, path: str) -> float | None:
        """When the copy of C{path} of C{upstream} was last fetched or revalidated, or None."""
        record = self.get_metadata(upstream, path)
        return None if record is None else record.checked_at

    def file_count(self) -> int:
        """How many file records there are (cheap: LMDB keeps the count)."""
        with self._read() as txn:
            return int(txn.stat(self._files)["entries"])

    def recount_size(self) -> int:
        """Recompute the stored-bytes total from every record; return it.

        The total is kept exact by every write of this version; this repairs it after an
        older version, which did not keep it, has written to the index.
        """
        return self._count_stored_bytes(only_if_missing=False)

    def _scan(self, db: Any) -> Iterator[bytes]:
        """Yield every value of C{db}, a batch per short read transaction."""
        last: bytes | None = None
        while True:
            batch: list[tuple[bytes, bytes]] = []
            with self._read(db) as txn:
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

    @property
    def pending_last_used(self) -> dict[str, float]:
        """When each file with pending uses was last used, by sha256 (this process only)."""
        return {sha256: p.last_used_at for sha256, p in self._pending.items()}

    def note_served(self, hit: bool, nbytes: int) -> None:
        """Count a response body of C{nbytes}: from a stored file (C{hit}) or a download."""
        counts = self._pending_counts
        if hit:
            counts["hits"] += 1
            counts["bytes_from_cache"] += nbytes
        else:
            counts["misses"] += 1
        counts["bytes_served"] += nbytes

    def note_fetched(self, nbytes: int) -> None:
        """Count C{nbytes} downloaded from an upstream for a file."""
        self._pending_counts["bytes_from_upstream"] += nbytes

    def note_not_stored(self) -> None:
        """Count a download that was streamed to its clients but not stored for lack of room."""
        self._pending_counts["not_stored"] += 1

    def stats(self) -> Stats:
        """The usage totals: those written by every process plus this one's pending counts.

        Another process's counts appear once it has flushed them.
        """
        with self._read(self._counters) as txn:
            stored = {name: self._counter_in(txn, name.encode("ascii")) for name in _COUNTER_NAMES}
        return Stats(**{name: stored[name] + self._pending_counts[name] for name in _COUNTER_NAMES})

    def flush_usage(self) -> int:
        """Write every pending use and usage count in one transaction; return the records updated.

        Uses of records that no longer exist are dropped. If the write fails,
        the uses and counts stay pending for the next flush.
        """
        taken = self._take_usage()
        if taken is None:
            return 0
        try:
            return self._write_usage(*taken)
        except BaseException:
            self._restore_usage(*taken)
            raise

    def flush_usage_later(self) -> "Deferred[int]":
        """L{flush_usage} with the write on the index's writer (see L{write})."""
        taken = self._take_usage()
        if taken is None:
            return succeed(0)

        def restore(failure: Failure) -> Failure:
            assert taken is not None
            self._restore_usage(*taken)
            return failure

        return self.write(self._write_usage, *taken).addErrback(restore)

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """
        Run C{fn(*args, **kwargs)}, a method of this index that writes, on the index's writer.

        The server sets L{writer} to its one index thread: a write transaction waits for the
        disk (LMDB syncs every commit), and the reactor thread never does. Inline by default.
        """
        return self.writer(fn, *args, **kwargs)

    def _take_usage(self) -> tuple[dict[str, _PendingUse], dict[str, int]] | None:
        counts = {name: n for name, n in self._pending_counts.items() if n}
        if not self._pending and not counts:
            return None
        pending, self._pending = self._pending, {}
        self._pending_counts = dict.fromkeys(_COUNTER_NAMES, 0)
        return pending, counts

    def _restore_usage(self, pending: dict[str, _PendingUse], counts: dict[str, int]) -> None:
        for sha256, use in pending.items():
            later = self._pending.get(sha256)
            if later is not None:
                use.count += later.count
                use.last_used_at = max(use.last_used_at, later.last_used_at)
            self._pending[sha256] = use
        for name, delta in counts.items():
            self._pending_counts[name] += delta

    def _write_usage(self, pending: dict[str, _PendingUse], counts: dict[str, int]) -> int:
        updated = 0
        with self._env.begin(write=True) as txn:
            for name, delta in counts.items():
                self._add_counter_in(txn, name.encode("ascii"), delta)
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
        return updated

    # -- pins --------------------------------------------------------------

    def _pin_key(self, upstream: str, alias: str, type: str, arch: str) -> bytes:
        return self._bounded_key(f"{_check_upstream(upstream)}\0{alias}\0{type}\0{arch}".encode("utf-8"))

    def put_pin(self, record: PinRecord) -> None:
        """Store C{record}, replacing any pin of the same upstream, alias, type and arch."""
        key = self._pin_key(record.upstream, record.alias, record.type, record.arch)
        with self._env.begin(write=True, db=self._pins) as txn:
            txn.put(key, _encode("pin", record))

    def remove_pin(self, upstream: str, alias: str, type: str, arch: str) -> bool:
        """Delete a pin; True if it existed."""
        key = self._pin_key(upstream, alias, type, arch)
        with self._env.begin(write=True, db=self._pins) as txn:
            return bool(txn.delete(key))

    def pins(self) -> list[PinRecord]:
        """Every pin, in key order (upstream, then alias, type and arch)."""
        return [_decode_pin(raw) for raw in self._scan(self._pins)]

    # -- metadata ----------------------------------------------------------

    def put_metadata(self, record: MetadataRecord) -> None:
        key = self._location_key(record.upstream, record.path)
        with self._env.begin(write=True, db=self._metadata) as txn:
            txn.put(key, _encode("metadata", record))

    def generation(self) -> int:
        """
        The id of the last write committed to the index by any process (about 1 us, no
        transaction): what is read of the index is unchanged while this is.
        """
        return int(self._env.info()["last_txnid"])

    def get_metadata(self, upstream: str, path: str) -> MetadataRecord | None:
        key = self._location_key(upstream, path)
        with self._read(self._metadata) as txn:
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

    # -- parts of LXD upstream images ------------------------------------------

    def put_parts(self, parts: ImageParts) -> None:
        """Store C{parts}, replacing what was known of the same fingerprint."""
        with self._env.begin(write=True, db=self._parts) as txn:
            txn.put(self._sha_key(parts.fingerprint), _encode("parts", parts))

    def get_parts(self, fingerprint: str) -> ImageParts | None:
        """What is known of the files of image C{fingerprint}, or None."""
        with self._read(self._parts) as txn:
            raw = txn.get(self._sha_key(fingerprint))
        return None if raw is None else _decode_parts(raw)

    def parts(self) -> Iterator[ImageParts]:
        """Every parts record, in fingerprint order."""
        for raw in self._scan(self._parts):
            yield _decode_parts(raw)

    def parts_count(self) -> int:
        """How many parts records there are (cheap): a change says something new was learnt."""
        with self._read() as txn:
            return int(txn.stat(self._parts)["entries"])

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        """Flush pending uses and close the environment. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._lmdb is None:
            return
        try:
            self.flush_usage()
        except Exception:
            self.log.failure("could not write pending uses to {path}", path=self.path)
        env, self._lmdb = self._lmdb, None
        env.close()


def reconcile(index: CacheIndex, store: BlobStore) -> ReconcileReport:
    """Make the index and the blob store agree; run at start-up, before serving.

    Deletes every temp file but the partial downloads that may be resumed
    (L{BlobStore.clear_temp}); drops every record (file or metadata) whose blob
    is missing or, for file records, has the wrong size; then deletes every
    blob no remaining record references.
    """
    temp_removed = store.clear_temp(keep_resumable=True)

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
    # Cheap next to the scan above, and it repairs the total after an older version that did
    # not keep it has written to the index.
    index.recount_size()

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
