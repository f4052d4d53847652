"""What every case of the fault suite (C{tests/faults/}) asserts, whatever fault it injected.

(a) L{assert_not_wrong}: no client takes a wrong body for a whole one. What it got is the exact
    bytes, or an error status, or a body that ended short of its Content-Length or on a cut
    connection.
(b) L{assert_store_verified}: every blob hashes to its name and every record's blob exists
    with the record's size; nothing the proxy did not verify is stored.
(c) L{assert_index_reopens}: the index opens again on its own, and start-up reconciliation
    finds nothing to repair: no temp file, unreferenced blob or dangling record.
(d) L{assert_whole}: the next request, once the fault is gone, gets the whole file.
(e) L{assert_only_catalogue}: the upstream was asked for nothing outside its catalogue.

L{receive} reads a response the way a careful client does, keeping how its body ended, so that
(a) can tell a complete-looking body from a cut one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from proxy.blobs import BlobStore
from proxy.index import CacheIndex, ReconcileReport, reconcile
from tests.helpers.logs import Logged

HASH_CHUNK_BYTES = 1024 * 1024


@frozen
class Received:
    """
    What one client got.

    @ivar code: the status, or None when no response came at all.
    @ivar length: the Content-Length promised, or None.
    @ivar body: the bytes that came.
    @ivar ended: how the body ended (a L{Failure} of L{ResponseDone} when whole), or None
        when there was no response.
    """

    code: int | None
    length: int | None
    body: bytes
    ended: Failure | None

    @property
    def complete(self) -> bool:
        """Whether a client would take the body for a whole one."""
        # Without a Content-Length, a close is the only end: a client cannot tell it from a cut.
        return self.ended is not None and self.ended.check(ResponseDone, PotentialDataLoss) is not None

    def describe(self) -> str:
        reason = self.ended.getErrorMessage() if self.ended is not None else "no response"
        return f"{self.code} with {len(self.body)} of {self.length} bytes ({reason})"


class _Body(Protocol):
    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self.progress = progress
        self.chunks: list[bytes] = []
        self.ended: Failure | None = None
        # Fired with None: a Deferred given a Failure would raise it in the awaiting coroutine.
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.progress is not None:
            self.progress(len(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = reason
        self.done.callback(None)


async def receive(
    response: "Deferred[Any]", progress: Callable[[int], None] | None = None
) -> Received:
    """
    The whole of what a request (its response Deferred) brought, failures included.

    @param progress: told the size of each piece of the body as it arrives.
    """
    try:
        answered: IResponse = await response
    except Exception:
        return Received(code=None, length=None, body=b"", ended=None)
    body = _Body(progress)
    answered.deliverBody(body)
    await body.done
    length = answered.length
    return Received(
        code=answered.code,
        length=None if length is UNKNOWN_LENGTH else int(length),
        body=b"".join(body.chunks),
        ended=body.ended,
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_not_wrong(received: Received, expected: bytes) -> None:
    """(a): a whole-looking answer of success carries exactly C{expected}."""
    if received.code is None or received.code >= 300 or not received.complete:
        return
    assert received.code == 200, received.describe()
    assert sha256(received.body) == sha256(expected), (
        f"a client took a wrong body for a whole one: {received.describe()}"
    )


def assert_whole(received: Received, expected: bytes) -> None:
    """(d): a 200 with exactly C{expected}, ended cleanly."""
    assert (received.code, received.complete) == (200, True), received.describe()
    assert sha256(received.body) == sha256(expected)


def _hash_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def assert_store_verified(store: BlobStore, index: CacheIndex) -> None:
    """(b): every blob is what its name says, and every record's blob is there and whole."""
    sizes: dict[str, int] = {}
    for name in store.stored():
        found, size = _hash_file(store.path_for(name).path)
        assert found == name, f"blob {name} hashes to {found}"
        sizes[name] = size
    for record in index.records():
        assert record.sha256 in sizes, f"record {record.sha256} ({record.paths}) has no blob"
        assert sizes[record.sha256] == record.size, f"record {record.sha256}: size differs"
    for metadata in index.metadata_records():
        assert metadata.sha256 in sizes, f"metadata {metadata.upstream}/{metadata.path} has no blob"


def assert_index_reopens(index: CacheIndex, store: BlobStore) -> None:
    """
    (c): close C{index}, open its environment afresh and reconcile it with C{store}: nothing to
    repair, and (b) still holds. The caller's index is closed for good (LMDB allows one
    environment per path in a process).
    """
    index.close()
    fresh = CacheIndex(index.path, Clock())
    try:
        assert reconcile(fresh, store) == ReconcileReport(0, 0, 0)
        assert_store_verified(store, fresh)
    finally:
        fresh.close()


def assert_only_catalogue(requested: Iterable[str], catalogue: Collection[str]) -> None:
    """(e): every path the upstream was asked for is one its catalogue names."""
    unlisted = sorted({path for path in requested if path not in catalogue})
    assert unlisted == [], f"the upstream was asked for unlisted paths: {unlisted}"


def assert_no_traceback(logged: Logged) -> None:
    """Nothing was logged with a failure attached, and no line reads as a traceback."""
    failures = [e.get("log_format", "") for e in logged.failures()]
    assert failures == [], failures
    tracebacks = [t for t in logged.texts() if "Traceback" in t or "Unhandled" in t]
    assert tracebacks == [], tracebacks
