"""
Stale while revalidate: an expired catalogue file is served at once while one refresh runs in
the background, and the requests after it get the new copy. Background work that must plan on
the newest catalogue (auto-update) still waits for the revalidation, and so does a request that
probes an upstream found offline.

Deterministic: the request path wired as the service wires it (L{Harness}), and an LXD
upstream's list (L{LxdHarness}), under a Clock that the tests advance only where they say so.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET

from proxy.metadata import RETRY_AFTER_FAILURE_SECONDS, STALE_WAIT_SECONDS
from tests.helpers.harness import Closing, collect
from tests.helpers.lxd_server import LxdHarness, FakeImage
from tests.helpers.logs import Logged
from tests.helpers.scripted import simple_tree
from tests.helpers.wired import TTL, Harness

INDEX = "streams/v1/index.json"
IMAGES = "streams/v1/images.json"


def _harness(tmp_path: Any, closing: Closing) -> Harness:
    h = closing(Harness(tmp_path, simple_tree()))
    assert h.fetch(IMAGES)[0] == 200
    return h


def test_an_expired_copy_is_served_at_once_and_refreshed_once(
    tmp_path: Any, closing: Closing
) -> None:
    h = _harness(tmp_path, closing)
    old = h.files[IMAGES]
    # as long as the old one: the held answer's headers went out with the old length
    new = old.replace(b'"release_title": "1.0"', b'"release_title": "1.x"')
    assert new != old
    h.upstream.held_paths.add(IMAGES)
    h.clock.advance(TTL + 1)
    now = h.clock.seconds()
    # Five clients while the upstream has not answered the refresh: each gets the expired
    # copy without the clock moving (nobody waits on the upstream).
    for _ in range(5):
        code, body, _ = h.fetch(IMAGES)
        assert (code, body) == (200, old)
    # The refresh starts on the turn after the first answer (served from memory at once).
    h.settle()
    assert h.clock.seconds() == now
    assert h.upstream_gets(IMAGES) == 2
    # The refresh ends: the next request gets the new copy.
    [held] = h.upstream.held.pop(IMAGES)
    h.files[IMAGES] = new
    held.write(new)
    held.finish()
    h.settle()
    assert h.fetch(IMAGES)[1] == new
    assert h.upstream_gets(IMAGES) == 2


def test_a_failing_refresh_keeps_the_copy_and_is_retried_after_the_interval(
    tmp_path: Any, closing: Closing, logged: Logged
) -> None:
    h = _harness(tmp_path, closing)
    good = h.files[IMAGES]
    h.upstream.statuses[IMAGES] = 500
    h.clock.advance(TTL + 1)
    assert h.fetch(IMAGES)[1] == good
    h.settle()
    assert h.upstream_gets(IMAGES) == 2
    # Within the retry interval the copy is served without asking again.
    h.clock.advance(RETRY_AFTER_FAILURE_SECONDS - 1)
    assert h.fetch(IMAGES)[1] == good
    h.settle()
    assert h.upstream_gets(IMAGES) == 2
    h.clock.advance(2)
    del h.upstream.statuses[IMAGES]
    assert h.fetch(IMAGES)[1] == good
    h.settle()
    assert h.upstream_gets(IMAGES) == 3
    assert len(logged.matching("refreshing")) == 1


def _never_answer(request: Any) -> Any:
    return NOT_DONE_YET


def test_without_a_copy_the_client_waits(tmp_path: Any, closing: Closing) -> None:
    h = closing(Harness(tmp_path, simple_tree()))
    h.upstream.override[INDEX] = _never_answer
    response = collect(h.get(INDEX))
    h.settle()
    assert response == []
    h.clock.advance(STALE_WAIT_SECONDS + 1)
    h.settle()
    assert response == []


def test_background_work_waits_for_the_revalidated_catalogue(
    tmp_path: Any, closing: Closing
) -> None:
    h = _harness(tmp_path, closing)
    h.upstream.held_paths.add(IMAGES)
    h.clock.advance(TTL + 1)
    revalidated = collect(Deferred.fromCoroutine(h.metadata.revalidate()))
    h.settle()
    assert revalidated == []
    [held] = h.upstream.held.pop(IMAGES)
    held.write(h.files[IMAGES])
    held.finish()
    h.settle()
    assert revalidated == [None]
    assert h.upstream_gets(IMAGES) == 2


def test_an_lxd_upstreams_expired_list_is_served_at_once(tmp_path: Any, closing: Closing) -> None:
    h = closing(LxdHarness(tmp_path, [FakeImage(meta=b"unified " * 100, properties={"os": "alpine"})]))
    images = h.call(h.remote.images())
    h.server.override["/1.0/images?recursion=1"] = _never_answer
    h.clock.advance(TTL + 1)
    assert [i.fingerprint for i in h.call(h.remote.images())] == [i.fingerprint for i in images]
    h.settle()
    assert len(h.server.list_requests()) == 2
    # still refreshing: a second client neither waits nor asks again
    h.call(h.remote.images())
    h.settle()
    assert len(h.server.list_requests()) == 2
