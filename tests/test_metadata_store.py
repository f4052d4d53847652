"""The metadata store (proxy.metadata_store): bodies as blobs, records as validators, and when a
body may go. Pure: a store and an index on C{tmp_path}, with the work inline."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.index import CacheIndex, FileRecord, MetadataRecord
from proxy.metadata_store import MetadataStore
from tests.helpers.harness import collect, outcome

UPSTREAM = "images"
PATH = "streams/v1/index.json"

T = TypeVar("T")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def bodies(tmp_path: Path) -> Iterator[MetadataStore]:
    index = CacheIndex(str(tmp_path / "index"), Clock())
    yield MetadataStore(BlobStore(FilePath(str(tmp_path / "cache"))), index)
    index.close()


def now(d: "Deferred[T]") -> T:
    """The result of work that ran inline."""
    results = collect(d)
    assert results, "the work did not finish inline"
    result: T = outcome(results)
    return result


def test_put_keeps_the_body_and_its_validators(bodies: MetadataStore) -> None:
    record = bodies.put_now(UPSTREAM, PATH, b"one", etag='"e"', fetched_at=5.0, checked_at=6.0)
    assert record == MetadataRecord(
        upstream=UPSTREAM, path=PATH, sha256=sha(b"one"), etag='"e"', last_modified=None,
        fetched_at=5.0, checked_at=6.0,
    )
    assert bodies.stored(UPSTREAM, PATH) == record
    assert bodies.read(record.sha256) == b"one"
    assert bodies.load(UPSTREAM, PATH) == (record, b"one")


def test_a_put_from_a_partial_commits_it_and_returns_what_the_check_parsed(bodies: MetadataStore) -> None:
    partial = bodies.store.new_partial()
    partial.write(b"streamed")
    record, parsed = now(Deferred.fromCoroutine(bodies.put(
        UPSTREAM, PATH, partial, fetched_at=1.0, checked_at=1.0, check=len,
    )))
    assert parsed == len(b"streamed")
    assert partial.closed and bodies.read(record.sha256) == b"streamed"


def test_a_refused_body_is_not_kept_and_the_record_stays(bodies: MetadataStore) -> None:
    kept = bodies.put_now(UPSTREAM, PATH, b"good", fetched_at=1.0, checked_at=1.0)

    def refuse(body: bytes) -> object:
        raise ValueError("not a catalogue")

    d = Deferred.fromCoroutine(bodies.put(UPSTREAM, PATH, b"bad", fetched_at=2.0, checked_at=2.0, check=refuse))
    with pytest.raises(ValueError):
        now(d)
    assert not bodies.store.exists(sha(b"bad"))
    assert bodies.stored(UPSTREAM, PATH) == kept


def test_a_replaced_body_is_forgotten_unless_another_record_has_it(bodies: MetadataStore) -> None:
    first = bodies.put_now(UPSTREAM, PATH, b"v1", fetched_at=1.0, checked_at=1.0)
    bodies.put_now(UPSTREAM, "@incus/" + PATH, b"v1", fetched_at=1.0, checked_at=1.0)
    bodies.put_now(UPSTREAM, PATH, b"v2", fetched_at=2.0, checked_at=2.0)
    # Still the other family's copy.
    assert bodies.store.exists(first.sha256)
    bodies.put_now(UPSTREAM, "@incus/" + PATH, b"v2", fetched_at=2.0, checked_at=2.0)
    assert not bodies.store.exists(first.sha256)


def test_a_body_that_is_also_an_image_file_is_never_forgotten(bodies: MetadataStore) -> None:
    record = bodies.put_now(UPSTREAM, PATH, b"same bytes", fetched_at=1.0, checked_at=1.0)
    bodies.index.put(FileRecord(
        sha256=record.sha256, size=10, upstream=UPSTREAM, paths=(f"{UPSTREAM}/f",), product="p",
        version="v", stored_at=1.0, last_used_at=1.0, use_count=0,
    ))
    bodies.index.remove_metadata(UPSTREAM, PATH)
    assert not bodies.forget(record.sha256)
    assert bodies.store.exists(record.sha256)


def test_a_record_without_its_body_is_not_held(bodies: MetadataStore) -> None:
    record = bodies.put_now(UPSTREAM, PATH, b"gone", fetched_at=1.0, checked_at=1.0)
    bodies.store.remove(record.sha256)
    assert bodies.stored(UPSTREAM, PATH) is None
    assert bodies.load(UPSTREAM, PATH) is None
    with pytest.raises(FileNotFoundError):
        bodies.read(record.sha256)


def test_two_stores_over_one_blob_store_put_one_at_a_time(bodies: MetadataStore) -> None:
    """
    Another catalogue (family, upstream) may put the same bytes: one put's commit keeps the
    existing body, and the other's forget must not remove it before the record names it.
    """
    from typing import Any

    jobs: list[tuple[Any, Deferred[Any]]] = []

    def held(fn: Any, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        jobs.append((lambda: fn(*args, **kwargs), d))
        return d

    first = MetadataStore(bodies.store, bodies.index, held)
    second = MetadataStore(bodies.store, bodies.index, held)
    one = Deferred.fromCoroutine(first.put(UPSTREAM, PATH, b"same", fetched_at=1.0, checked_at=1.0))
    two = Deferred.fromCoroutine(second.put("other", PATH, b"same", fetched_at=1.0, checked_at=1.0))
    assert len(jobs) == 1  # the second put waits for the first
    while jobs:
        run, d = jobs.pop(0)
        d.callback(run())
    assert now(one)[0].sha256 == now(two)[0].sha256 == sha(b"same")
    assert bodies.stored(UPSTREAM, PATH) is not None and bodies.stored("other", PATH) is not None
