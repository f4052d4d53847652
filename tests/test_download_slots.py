"""
Bounded upstream concurrency: at most C{upstream_concurrency} downloads per upstream run at
once, the others queue (clients' before background work, first come first served), and a
client whose download is queued has its headers at once and its bytes when it starts.

The queue alone (L{DownloadSlots}), then the request path wired as the service wires it
(L{tests.helpers.wired.Harness}: a held scripted upstream, a Clock, StubTreq).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from proxy.catalogue import Item, parse_products
from proxy.download_slots import DownloadSlots, Slot
from proxy.files import await_start
from proxy.lxd_remote import parse_remote_images
from proxy.metrics import StateCollector
from tests.faults.upstreams import BROKEN, NET_TIMEOUT_SECONDS, OTHER, PRODUCTS, start_loopback
from tests.helpers.harness import Closing, collect
from tests.helpers.invariants import receive
from tests.helpers.lxd_server import UPSTREAM, FakeImage, LxdHarness, envelope
from tests.helpers.scripted import sha
from tests.helpers.wired import INDEX, Harness, catalogue_tree, rootfs_path

reactor: Any = _reactor

# -- the queue alone ---------------------------------------------------------------------


def test_slots_up_to_the_limit_then_a_queue() -> None:
    slots = DownloadSlots({"up": 2})
    a, b, c = (slots.take("up") for _ in range(3))
    assert (a.queued, b.queued, c.queued) == (False, False, True)
    assert slots.queued() == {"up": 1} and slots.running("up") == 2
    slots.release(a)
    assert not c.queued and slots.queued() == {} and slots.running("up") == 2
    # each upstream has its own slots; one not limited never queues
    assert not slots.take("other").queued
    assert not DownloadSlots().take("up").queued


def test_clients_before_background_first_come_first_served() -> None:
    slots = DownloadSlots({"up": 1})
    running = slots.take("up")
    order: list[str] = []
    taken: dict[str, Slot] = {}

    def note(_: None, name: str) -> None:
        order.append(name)

    for name, background in (("bg1", True), ("c1", False), ("bg2", True), ("c2", False)):
        slot = taken[name] = slots.take("up", background=background)
        slot.granted.addCallback(note, name)
    slots.release(running)
    assert order == ["c1"]
    # the one that runs ends, the next starts
    for _ in range(3):
        slots.release(taken[order[-1]])
    assert order == ["c1", "c2", "bg1", "bg2"]
    slots.release(taken["bg2"])
    assert slots.running("up") == 0


def test_a_promoted_background_download_goes_with_the_clients() -> None:
    slots = DownloadSlots({"up": 1})
    running = slots.take("up")
    first_bg = slots.take("up", background=True)
    second_bg = slots.take("up", background=True)
    client = slots.take("up")
    slots.promote(second_bg)
    slots.release(running)
    assert [s.queued for s in (client, second_bg, first_bg)] == [False, True, True]
    slots.release(client)
    assert [s.queued for s in (second_bg, first_bg)] == [False, True]


def test_releasing_a_queued_slot_only_leaves_the_queue_and_twice_is_once() -> None:
    slots = DownloadSlots({"up": 1})
    running = slots.take("up")
    queued = slots.take("up")
    slots.release(queued)
    assert slots.queued() == {}
    slots.release(running)
    slots.release(running)
    assert slots.running("up") == 0


# -- through the request path --------------------------------------------------------------

FILES = 5


def _tree() -> dict[str, bytes]:
    products = {
        f"testos:{n}.0:amd64:default": {
            "20240101_0000": (b"M%d" % n * 100, bytes([65 + n]) * (20_000 + n))
        }
        for n in range(FILES)
    }
    return catalogue_tree({"streams/v1/images.json": products})


def _rootfs(n: int) -> str:
    return rootfs_path(f"testos:{n}.0:amd64:default", "20240101_0000")


def _harness(tmp_path: Any, closing: Closing, concurrency: int) -> Harness:
    h = closing(Harness(tmp_path, _tree(), upstream_concurrency=concurrency))
    code, _, _ = h.fetch("streams/v1/images.json")
    assert code == 200
    for n in range(FILES):
        h.upstream.held_paths.add(_rootfs(n))
    return h


def _item(h: Harness, path: str) -> Item:
    return parse_products(h.files["streams/v1/images.json"])[path]


def _asked(h: Harness) -> list[str]:
    return [p for _, p, _ in h.upstream.requests if "rootfs" in p]


def _finish(h: Harness, path: str) -> None:
    [held] = h.upstream.held.pop(path)
    held.write(h.files[path])
    held.finish()
    h.settle()


def test_two_at_a_time_the_others_have_their_headers_at_once(
    tmp_path: Any, closing: Closing
) -> None:
    h = _harness(tmp_path, closing, 2)
    paths = [_rootfs(n) for n in range(FILES)]
    responses = [collect(h.get(p)) for p in paths]
    h.settle()
    assert _asked(h) == paths[:2]
    # every client has its 200 and the catalogue's length, without waiting for any grace
    assert all(r for r in responses)
    assert [r[0].code for r in responses] == [200] * FILES
    assert [r[0].length for r in responses] == [len(h.files[p]) for p in paths]
    assert h.fetcher.queued() == {"up": 3}
    assert sum(job.queued for job in h.fetcher.in_flight().values()) == 3
    # as the service's metrics read them at scrape time
    collector = StateCollector(
        h.clock, h.index, {"up": h.health}, {"up": "streams/v1/index.json"},
        lambda: [job.upstream for job in h.fetcher.in_flight().values() if not job.queued],
        lambda: h.files_of_cache.following, None, queued=h.fetcher.queued,
    )
    gauges = {s.name: s.value for f in collector.collect() for s in f.samples}
    assert gauges["lxd_image_proxy_downloads_in_flight"] == 2
    assert gauges["lxd_image_proxy_downloads_queued"] == 3
    bodies = [collect(treq.content(r[0])) for r in responses]
    h.settle()
    for done in range(FILES):
        # never more than two asked and not finished
        assert len(_asked(h)) == min(FILES, done + 2)
        _finish(h, paths[done])
    assert _asked(h) == paths
    for path, body in zip(paths, bodies):
        assert body == [h.files[path]]
        assert h.store.exists(sha(h.files[path]))
    assert h.fetcher.in_flight() == {} and h.fetcher.queued() == {}


def test_client_misses_overtake_queued_background_downloads(
    tmp_path: Any, closing: Closing
) -> None:
    h = _harness(tmp_path, closing, 1)
    first = collect(h.get(_rootfs(0)))
    h.settle()
    background = [
        h.fetcher.get("up", _item(h, _rootfs(n)), background=True) for n in (1, 2)
    ]
    client = collect(h.get(_rootfs(3)))
    h.settle()
    assert client and client[0].code == 200
    assert [job.queued for job in background] == [True, True]
    assert _asked(h) == [_rootfs(0)]
    _finish(h, _rootfs(0))
    assert _asked(h) == [_rootfs(0), _rootfs(3)]
    _finish(h, _rootfs(3))
    _finish(h, _rootfs(1))
    _finish(h, _rootfs(2))
    assert _asked(h) == [_rootfs(n) for n in (0, 3, 1, 2)]
    assert first and first[0].code == 200
    assert all(h.store.exists(sha(h.files[_rootfs(n)])) for n in range(4))


def test_a_background_download_a_client_joins_is_promoted(
    tmp_path: Any, closing: Closing
) -> None:
    h = _harness(tmp_path, closing, 1)
    h.get(_rootfs(0))
    h.settle()
    h.fetcher.get("up", _item(h, _rootfs(1)), background=True)
    h.fetcher.get("up", _item(h, _rootfs(2)), background=True)
    response = collect(h.get(_rootfs(2)))
    h.settle()
    assert response and response[0].code == 200
    assert not h.fetcher.in_flight()[sha(h.files[_rootfs(2)])].background
    body = collect(treq.content(response[0]))
    _finish(h, _rootfs(0))
    # the joined one before the background one queued earlier
    assert _asked(h) == [_rootfs(0), _rootfs(2)]
    _finish(h, _rootfs(2))
    assert body == [h.files[_rootfs(2)]]
    _finish(h, _rootfs(1))
    # a joined download took no slot of its own
    assert h.fetcher.in_flight() == {}


class _GoAway(Protocol):
    """Drops the connection as soon as the body starts to be delivered."""

    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost.append(reason)


def test_a_client_that_goes_away_while_queued_leaks_no_slot(
    tmp_path: Any, closing: Closing
) -> None:
    h = _harness(tmp_path, closing, 1)
    h.get(_rootfs(0))
    queued = collect(h.get(_rootfs(1)))
    h.settle()
    gone = _GoAway()
    queued[0].deliverBody(gone)
    h.settle()
    assert gone.lost
    # its response is over: only the running download's client follows one
    assert h.files_of_cache.following == {"up": 1}
    _finish(h, _rootfs(0))
    # the download still runs (the next client wants its bytes), then frees its slot
    assert _asked(h) == [_rootfs(0), _rootfs(1)]
    _finish(h, _rootfs(1))
    assert h.store.exists(sha(h.files[_rootfs(1)]))
    assert h.files_of_cache.following == {"up": 0}
    h.get(_rootfs(2))
    h.settle()
    assert _asked(h)[-1] == _rootfs(2)
    _finish(h, _rootfs(2))
    assert h.fetcher.in_flight() == {}


def test_a_failing_download_frees_its_slot(tmp_path: Any, closing: Closing) -> None:
    h = _harness(tmp_path, closing, 1)
    h.get(_rootfs(0))
    h.upstream.held_paths.discard(_rootfs(1))
    h.upstream.statuses[_rootfs(1)] = 500
    failing = collect(h.get(_rootfs(1)))
    after = collect(h.get(_rootfs(2)))
    h.settle()
    assert failing[0].code == 200
    body = collect(treq.content(failing[0]))
    _finish(h, _rootfs(0))
    # it was queued: its client had its headers, so it sees a cut body, never a whole one
    assert body and isinstance(body[0], Failure)
    assert _asked(h) == [_rootfs(0), _rootfs(1), _rootfs(2)]
    _finish(h, _rootfs(2))
    assert after[0].code == 200
    assert h.fetcher.in_flight() == {} and h.fetcher.queued() == {}


def test_a_running_download_still_reports_a_quick_error(tmp_path: Any, closing: Closing) -> None:
    h = _harness(tmp_path, closing, 1)
    h.upstream.held_paths.discard(_rootfs(0))
    h.upstream.statuses[_rootfs(0)] = 404
    code, _, _ = h.fetch(_rootfs(0))
    assert code == 404


def test_head_of_a_queued_miss_answers_at_once(tmp_path: Any, closing: Closing) -> None:
    h = _harness(tmp_path, closing, 1)
    h.get(_rootfs(0))
    h.get(_rootfs(1))
    h.settle()
    response = h.run(h.proxy.head(f"https://proxy.test/up/{_rootfs(1)}"))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"Content-Length") == [b"%d" % len(h.files[_rootfs(1)])]
    assert _asked(h) == [_rootfs(0)]


def test_an_lxd_upstream_exports_one_image_at_a_time(tmp_path: Any, closing: Closing) -> None:
    images = [
        FakeImage(meta=b"meta %d " % n * 100, rootfs=b"rootfs %d " % n * 5000,
                  properties={"os": "ubuntu", "release": f"r{n}", "type": "squashfs"})
        for n in range(2)
    ]
    h = closing(LxdHarness(tmp_path, images))
    # As core.build_core gives it: one export of this upstream at a time.
    h.fetcher._slots = DownloadSlots({UPSTREAM: 1})
    h.server.hold_exports = True
    first, second = (
        h.fetcher.get_image(UPSTREAM, parse_remote_images(envelope([i.api_json()]))[0])
        for i in images
    )
    h.settle()
    assert (first.queued, second.queued) == (False, True)
    assert [h.server.exports_requested(i.fingerprint) for i in images] == [1, 0]
    # a queued export's client is not held up by the start grace: its headers go at once
    started = collect(Deferred.fromCoroutine(await_start(second, h.clock)))
    assert started == [None]
    held = h.server.held[images[0].fingerprint][0]
    held.write_until(len(held.body))
    held.finish()
    h.run(first.when_done())
    h.settle()
    assert not second.queued
    assert h.server.exports_requested(images[1].fingerprint) == 1
    held = h.server.held[images[1].fingerprint][0]
    held.write_until(len(held.body))
    held.finish()
    assert h.run(second.when_done()).fingerprint == images[1].fingerprint
    assert h.fetcher.in_flight() == {}


# -- on loopback -----------------------------------------------------------------------------


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_on_loopback_a_queued_client_has_its_headers_while_the_other_download_runs(
    tmp_path: Path,
) -> None:
    site = await start_loopback(reactor, tmp_path, cache={"upstream_concurrency": 1})
    try:
        for path in (INDEX, PRODUCTS):
            assert (await site.get(path)).code == 200
        site.tree.hold(BROKEN)
        first = Deferred.fromCoroutine(site.get(BROKEN))
        await site.tree.when_held(BROKEN).addTimeout(NET_TIMEOUT_SECONDS, reactor)
        # The one slot is taken: the other file's client has its headers, nothing is asked.
        response = await site.client.get(site.url(OTHER), unbuffered=True).addTimeout(
            NET_TIMEOUT_SECONDS, reactor
        )
        assert response.code == 200 and response.length == len(site.files[OTHER])
        assert site.tree.count(OTHER) == 0
        body = Deferred.fromCoroutine(receive(succeed(response)))
        site.tree.release(BROKEN)
        assert (await first).body == site.files[BROKEN]
        assert (await body.addTimeout(NET_TIMEOUT_SECONDS, reactor)).body == site.files[OTHER]
        assert site.tree.count(OTHER) == 1
    finally:
        await site.stop()


def test_a_download_queued_when_the_service_stops_fails_and_never_starts(
    tmp_path: Any, closing: Closing
) -> None:
    h = _harness(tmp_path, closing, 1)
    running = collect(h.get(_rootfs(0)))
    queued = collect(h.get(_rootfs(1)))
    h.settle()
    assert queued[0].code == 200
    body = collect(treq.content(queued[0]))
    assert _asked(h) == [_rootfs(0)]
    h.fetcher.stop()
    h.settle()
    # its client is told at once (a cut body), not left waiting for a slot that never comes,
    # and the download waiting for its answer ends as well: nothing starts after stop
    assert body and isinstance(body[0], Failure)
    assert running and (isinstance(running[0], Failure) or running[0].code == 200)
    assert h.fetcher.in_flight() == {} and h.fetcher.queued() == {}
    assert h.fetcher._slots.running("up") == 0
    h.clock.advance(120)
    h.settle()
    assert _asked(h) == [_rootfs(0)]
    assert not h.store.exists(sha(h.files[_rootfs(1)]))


def test_a_queued_download_does_not_hold_the_probe_of_an_offline_upstream(
    tmp_path: Any, closing: Closing
) -> None:
    """The upstream was marked offline while a download runs; the next miss is let through as
    the probe but waits in the queue (maybe for minutes): meanwhile it must not keep every
    other request out with a 503 (up to the 5-minute probe timeout)."""
    h = _harness(tmp_path, closing, 1)
    h.get(_rootfs(0))
    h.settle()
    h.health.record_failure("a catalogue refresh timed out", True)
    health: Any = h.health
    assert health.offline
    first = collect(h.get(_rootfs(1)))
    h.settle()
    assert first[0].code == 200
    assert h.fetcher.queued() == {"up": 1}
    assert not health.probing
    second = collect(h.get(_rootfs(2)))
    h.settle()
    assert second and not isinstance(second[0], Failure) and second[0].code == 200
    _finish(h, _rootfs(0))
    # the first queued one runs now and is the probe: its answer brings the upstream back
    _finish(h, _rootfs(1))
    assert not health.offline
    _finish(h, _rootfs(2))
    assert h.fetcher.in_flight() == {}
