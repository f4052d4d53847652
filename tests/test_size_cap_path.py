"""
The size cap and the free-space floor at commit time, through the request path.

The proxy is wired as the service wires it (L{tests.helpers.wired.Harness}): the fetcher calls
C{CacheLifecycle.make_room} before every commit, and the files that may not be evicted are
C{InUse.current() | set(fetcher.in_flight())}. The catalogue has six versions of one image; the
tests only fetch their squashfs files, 1000 bytes each, so a cap of 2500 holds two of them.
A slow client is a response whose producer is paused, as a full transport pauses it.
"""

from __future__ import annotations

from typing import Any, Callable, cast

import attrs
import pytest
import treq
from twisted.internet.interfaces import IPushProducer
from twisted.logger import LogLevel

from proxy.index import Stats
from tests.helpers.harness import Closing
from tests.helpers.logs import Logged
from tests.helpers.scripted import sha
from tests.helpers.wired import (
    INDEX,
    Harness,
    bytes_on_disk,
    catalogue_tree,
    rootfs_path,
)

IMAGES = "streams/v1/images.json"
PRODUCT = "testos:1.0:amd64:default"
VERSIONS = [f"2024010{i}_0000" for i in range(1, 7)]
SIZE = 1000


def tree() -> dict[str, bytes]:
    versions = {
        v: (f"meta of {v}".encode(), bytes([ord("a") + i]) * SIZE) for i, v in enumerate(VERSIONS)
    }
    return catalogue_tree({IMAGES: {PRODUCT: versions}})


FILES = tree()


def rootfs(i: int) -> str:
    return rootfs_path(PRODUCT, VERSIONS[i])


def digest(i: int) -> str:
    return sha(FILES[rootfs(i)])


MakeHarness = Callable[..., Harness]


@pytest.fixture
def make(tmp_path: Any, closing: Closing) -> MakeHarness:
    def make_harness(**kwargs: Any) -> Harness:
        return closing(Harness(tmp_path / f"cache{len(closing)}", tree(), **kwargs))

    return make_harness


def stored(h: Harness) -> set[int]:
    """Which squashfs files have a record, by version number."""
    digests = h.stored()
    return {i for i in range(len(VERSIONS)) if digest(i) in digests}


def image_bytes(h: Harness) -> int:
    """Bytes of the stored image files, measured on disk."""
    return sum(h.store.size_of(r.sha256) for r in h.index.records())


def temp_bytes(h: Harness) -> int:
    """The downloads' bytes in temp files (a partial's resume sidecar is not a download's byte)."""
    return sum(c.getsize() for c in h.store.temp_dir.children() if c.basename().endswith(".part"))


def assert_within_cap(h: Harness, cap: int) -> None:
    """The cap holds for what is stored; only the downloads in flight add to it, in temp files."""
    in_flight = sum(d.size for d in h.fetcher.in_flight().values())
    assert h.index.total_size() == image_bytes(h) <= cap
    assert temp_bytes(h) <= in_flight


def miss(h: Harness, i: int) -> None:
    before = h.upstream_gets(rootfs(i))
    code, body, _ = h.fetch(rootfs(i))
    assert (code, body) == (200, FILES[rootfs(i)])
    assert h.upstream_gets(rootfs(i)) == before + 1


def hit(h: Harness, i: int) -> None:
    before = h.upstream_gets(rootfs(i))
    code, body, _ = h.fetch(rootfs(i))
    assert (code, body) == (200, FILES[rootfs(i)])
    assert h.upstream_gets(rootfs(i)) == before


def pin(h: Harness, i: int) -> None:
    assert h.index.set_flags(digest(i), cached=False, auto_update=True) is not None


class SlowClient:
    """A client that has its response headers and reads nothing until it is let go."""

    def __init__(self, h: Harness, i: int) -> None:
        self.h = h
        self.path = rootfs(i)
        self.response_d = h.get(self.path)
        request = h.resource.requests[-1]
        assert request.producer is not None, "the hit did not start streaming at once"
        self.producer = cast(IPushProducer, request.producer)
        self.producer.pauseProducing()

    def finish(self) -> bytes:
        self.producer.resumeProducing()
        response = self.h.run(self.response_d)
        assert response.code == 200
        body: bytes = self.h.run(treq.content(response))
        return body


# The cap


def test_a_commit_over_the_cap_evicts_the_least_recently_used_first(
    make: MakeHarness, logged: Logged
) -> None:
    h = make(max_size=2500)
    for i in (0, 1):
        miss(h, i)
        h.clock.advance(10)
    # 0 was stored first but used last: 1 is the least recently used.
    hit(h, 0)
    h.clock.advance(10)
    miss(h, 2)
    assert stored(h) == {0, 2}
    assert not h.store.exists(digest(1))
    assert_within_cap(h, 2500)
    h.clock.advance(10)
    miss(h, 3)
    assert stored(h) == {2, 3}
    assert not h.store.exists(digest(0))
    assert_within_cap(h, 2500)
    evictions = logged.starting("evicted")
    assert [(e["count"], e["freed"], e["size"]) for e in evictions] == [(1, SIZE, SIZE)] * 2
    # An evicted file is a miss again.
    h.clock.advance(10)
    miss(h, 1)
    assert stored(h) == {3, 1}


def test_one_commit_evicts_as_many_files_as_it_needs(make: MakeHarness) -> None:
    # Stored under a larger cap (the cap was lowered since): 3000 bytes against 2000.
    h = make(max_size=2000)
    for i in (0, 1, 2):
        h.seed_file(rootfs(i))
        h.clock.advance(10)
    miss(h, 3)
    assert stored(h) == {2, 3}
    assert_within_cap(h, 2000)


def test_the_cap_holds_while_downloads_are_in_flight(make: MakeHarness) -> None:
    h = make(max_size=2500)
    miss(h, 0)
    h.clock.advance(10)
    for i in (1, 2):
        h.upstream.held_paths.add(rootfs(i))
    clients = [h.get(rootfs(1)), h.get(rootfs(2))]
    h.settle()
    held = {i: h.upstream.held[rootfs(i)][0] for i in (1, 2)}
    for i in (1, 2):
        held[i].write(FILES[rootfs(i)][:SIZE - 1])
    h.settle()
    assert set(h.fetcher.in_flight()) == {digest(1), digest(2)}
    assert temp_bytes(h) == 2 * (SIZE - 1)
    assert_within_cap(h, 2500)
    bodies = [treq.content(h.run(d)) for d in clients]

    held[1].write(FILES[rootfs(1)][SIZE - 1:])
    held[1].finish()
    h.settle()
    # 0 and 1 fit; 2 is still downloading.
    assert stored(h) == {0, 1}
    assert_within_cap(h, 2500)
    held[2].write(FILES[rootfs(2)][SIZE - 1:])
    held[2].finish()
    assert [h.run(d) for d in bodies] == [FILES[rootfs(1)], FILES[rootfs(2)]]
    # 2 needed room: 0 was the least recently used.
    assert stored(h) == {1, 2}
    assert_within_cap(h, 2500)
    assert h.temp_files() == []


# What is never evicted


def test_pinned_files_are_never_evicted(make: MakeHarness, logged: Logged) -> None:
    h = make(max_size=2500)
    miss(h, 0)
    pin(h, 0)
    h.clock.advance(10)
    miss(h, 1)
    h.clock.advance(10)
    # 0 is the least recently used, but pinned: 1 goes.
    miss(h, 2)
    assert stored(h) == {0, 2}
    pin(h, 2)
    h.clock.advance(10)
    # Nothing left that may go: streamed, not stored, and nothing evicted for it.
    miss(h, 3)
    assert stored(h) == {0, 2}
    assert h.store.exists(digest(0)) and h.store.exists(digest(2))
    assert len(logged.starting("not storing", level=LogLevel.warn)) == 1
    assert_within_cap(h, 2500)


def test_files_being_served_are_never_evicted(make: MakeHarness) -> None:
    h = make(max_size=2500)
    miss(h, 0)
    h.clock.advance(10)
    miss(h, 1)
    h.clock.advance(10)
    slow = SlowClient(h, 0)
    h.settle()
    assert h.in_use.current() == {digest(0)}
    h.clock.advance(10)
    hit(h, 1)
    h.clock.advance(10)
    # 0 is the least recently used (its use began first), but a client is still reading it.
    miss(h, 2)
    assert stored(h) == {0, 2}
    assert h.store.exists(digest(0))
    assert slow.finish() == FILES[rootfs(0)]
    assert h.in_use.current() == set()
    # Once nobody reads it, it goes like any other.
    h.clock.advance(10)
    miss(h, 3)
    assert stored(h) == {2, 3}
    assert_within_cap(h, 2500)


def test_a_slow_client_keeps_its_file_even_if_nothing_else_can_go(make: MakeHarness) -> None:
    h = make(max_size=1500)
    miss(h, 0)
    h.clock.advance(10)
    slow = SlowClient(h, 0)
    h.settle()
    miss(h, 1)
    assert stored(h) == {0}
    assert (h.index.stats().not_stored, h.temp_files()) == (1, [])
    assert slow.finish() == FILES[rootfs(0)]
    h.clock.advance(10)
    miss(h, 1)
    assert stored(h) == {1}


def test_a_download_in_flight_is_never_evicted(make: MakeHarness) -> None:
    h = make(max_size=2500)
    h.upstream.held_paths.add(rootfs(0))
    client = h.get(rootfs(0))
    h.settle()
    held = h.upstream.held[rootfs(0)][0]
    held.write(FILES[rootfs(0)][:10])
    h.settle()
    # Meanwhile another process (the admin command) stores the same file, used long ago.
    record = h.seed_file(rootfs(0))
    h.index.put(attrs.evolve(record, stored_at=record.stored_at - 1000, last_used_at=0.0))
    h.clock.advance(10)
    miss(h, 1)
    h.clock.advance(10)
    # 0 is the least recently used record, but it is being downloaded: 1 goes.
    miss(h, 2)
    assert stored(h) == {0, 2}
    held.write(FILES[rootfs(0)][10:])
    held.finish()
    body = h.run(treq.content(h.run(client)))
    assert body == FILES[rootfs(0)]
    # Storing what was already stored needs no room and evicts nothing.
    assert stored(h) == {0, 2}
    assert h.temp_files() == []
    assert_within_cap(h, 2500)


# When nothing can be evicted


def test_a_file_that_cannot_be_stored_is_still_served_whole(
    make: MakeHarness, logged: Logged
) -> None:
    h = make(max_size=SIZE - 1)
    # The in-memory upstream answers within Fetcher.get() itself: the download has ended, and
    # its file was found no room for, before the client opens that file.
    code, body, response = h.fetch(rootfs(0))
    assert (code, body) == (200, FILES[rootfs(0)])
    assert response.length == SIZE
    assert stored(h) == set()
    assert not h.store.exists(digest(0))
    assert h.index.get(digest(0)) is None
    assert h.temp_files() == []
    assert h.fetcher.in_flight() == {}
    stats = h.index.stats()
    assert (stats.not_stored, stats.misses, stats.bytes_from_upstream) == (1, 1, SIZE)
    assert len(logged.starting("not storing", level=LogLevel.warn)) == 1
    assert len(logged.starting("no room", level=LogLevel.warn)) == 1
    # The next client is a miss again.
    miss(h, 0)
    assert h.index.stats().not_stored == 2
    h.index.flush_usage()
    assert h.index.stats() == Stats(
        hits=0, misses=2, bytes_from_cache=0, bytes_from_upstream=2 * SIZE, not_stored=2,
        bytes_served=2 * SIZE,
    )
    assert h.index.get(digest(0)) is None


def test_every_follower_of_an_unstored_download_gets_the_whole_file(make: MakeHarness) -> None:
    h = make(max_size=SIZE - 1)
    data = FILES[rootfs(0)]
    h.upstream.held_paths.add(rootfs(0))
    # One client from the start, one mid-body, one when all but the last byte has arrived.
    early = h.get(rootfs(0))
    h.settle()
    held = h.upstream.held[rootfs(0)][0]
    held.write(data[:400])
    h.settle()
    middle = h.get(rootfs(0))
    h.settle()
    held.write(data[400:-1])
    h.settle()
    late = h.get(rootfs(0))
    h.settle()
    assert h.upstream_gets(rootfs(0)) == 1
    responses = [h.run(d) for d in (early, middle, late)]
    assert [r.code for r in responses] == [200] * 3
    bodies = [treq.content(r) for r in responses]
    held.write(data[-1:])
    held.finish()
    assert [h.run(d) for d in bodies] == [data] * 3
    assert h.index.get(digest(0)) is None
    assert h.temp_files() == []
    assert h.index.stats().not_stored == 1


# The free-space floor


def test_the_free_space_floor_evicts_and_then_refuses(make: MakeHarness) -> None:
    metadata = len(FILES[INDEX]) + len(FILES[IMAGES])
    # Room for four squashfs files; 1500 bytes of it must stay free: two stored, plus one
    # being downloaded, leave 1000 free.
    h = make(min_free=1500, capacity=metadata + 4 * SIZE)

    def free() -> int:
        return metadata + 4 * SIZE - bytes_on_disk(h.store)

    miss(h, 0)
    h.clock.advance(10)
    miss(h, 1)
    assert stored(h) == {0, 1} and free() == 2000
    h.clock.advance(10)
    miss(h, 2)
    # The download took 1000 of the 2000 free: the least recently used file made up for it.
    assert stored(h) == {1, 2} and free() == 2000
    pin(h, 1)
    pin(h, 2)
    h.clock.advance(10)
    code, body, _ = h.fetch(rootfs(3))
    assert (code, body) == (200, FILES[rootfs(3)])
    assert stored(h) == {1, 2} and free() == 2000
    assert h.temp_files() == []
    assert h.index.stats().not_stored == 1


def test_the_floor_and_the_cap_together(make: MakeHarness) -> None:
    metadata = len(FILES[INDEX]) + len(FILES[IMAGES])
    h = make(max_size=3500, min_free=2500, capacity=metadata + 5 * SIZE)
    for i in (0, 1, 2):
        miss(h, i)
        h.clock.advance(10)
    # The cap would keep three; the floor keeps two.
    assert stored(h) == {1, 2}
    assert bytes_on_disk(h.store) - metadata == 2 * SIZE


# A full file system


def test_a_miss_with_no_room_to_receive_it_is_a_507_before_any_header(
    make: MakeHarness, logged: Logged
) -> None:
    metadata = len(FILES[INDEX]) + len(FILES[IMAGES])
    # Room for two squashfs files and nothing else; both pinned, so nothing may be evicted.
    h = make(capacity=metadata + 2 * SIZE)
    miss(h, 0)
    miss(h, 1)
    pin(h, 0)
    pin(h, 1)
    code, body, _ = h.fetch(rootfs(2))
    assert code == 507
    assert body.startswith(b"no room on the cache's file system to receive")
    # The upstream was not asked, nothing was written, and the upstream is not to blame.
    assert h.upstream_gets(rootfs(2)) == 0
    assert h.temp_files() == []
    assert not h.health.offline
    assert any("no room to receive 1000 bytes" in line for line in logged.lines(LogLevel.warn))
    # Room again (an unpinned file may go): the next request for it is served and stored.
    assert h.index.set_flags(digest(0), cached=True, auto_update=False) is not None
    h.clock.advance(10)
    miss(h, 2)
    assert stored(h) == {1, 2}


def test_no_room_while_offline_leaves_no_probe_outstanding(make: MakeHarness) -> None:
    metadata = len(FILES[INDEX]) + len(FILES[IMAGES])
    h = make(capacity=metadata + SIZE)
    miss(h, 0)
    pin(h, 0)
    h.health.record_failure("connection refused", transport=True)
    assert h.fetch(rootfs(1))[0] == 507
    assert not h.health.probing
