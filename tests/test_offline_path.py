"""
The request path while an upstream is down, in memory and deterministic.

The proxy is wired as the service wires it (L{tests.helpers.wired.Harness}): one
L{UpstreamHealth} shared by the fetcher and the metadata. The upstream's catalogue has two
products files: C{images.json} with two versions of one product, C{other.json} with one version
of another. A failure to reach the upstream, or a 5xx for its catalogue, marks it offline: the
catalogue is cut down to what is stored, one request at a time probes the upstream (the others
fail fast with a 503), and the first request after it is back finds it back. A failure of one
file is that file's alone.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import treq
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from proxy.downloads import RESUME_ATTEMPTS, RESUME_BACKOFF_SECONDS
from proxy.errors import Unavailable
from proxy.health import DEFAULT_BASE_BACKOFF_SECONDS, FORCED_RETRY_AFTER_SECONDS
from tests.helpers.harness import Closing, collect, outcome
from tests.helpers.scripted import BASE_URL, sha
from tests.helpers.wired import (
    INDEX,
    TTL,
    Harness,
    catalogue_tree,
    hang_up,
    meta_path,
    rootfs_path,
)

IMAGES = "streams/v1/images.json"
OTHER = "streams/v1/other.json"
OS1 = "testos:1.0:amd64:default"
OS2 = "otheros:2.0:amd64:default"
V1 = "20240101_0000"
V2 = "20240102_0000"
DAY = 24 * 60 * 60.0
BACKOFF = int(DEFAULT_BASE_BACKOFF_SECONDS)


def tree(*, other_first: bool = False) -> dict[str, bytes]:
    images = {OS1: {V1: (b"m1" * 200, b"r1" * 5000), V2: (b"m2" * 200, b"r2" * 5000)}}
    other = {OS2: {V1: (b"m3" * 200, b"r3" * 5000)}}
    if other_first:
        return catalogue_tree({OTHER: other, IMAGES: images})
    return catalogue_tree({IMAGES: images, OTHER: other})


MakeHarness = Callable[..., Harness]


@pytest.fixture
def make(tmp_path: Any, closing: Closing) -> MakeHarness:
    def make_harness(*, other_first: bool = False, forced_offline: bool = False) -> Harness:
        return closing(Harness(tmp_path, tree(other_first=other_first), forced_offline=forced_offline))

    return make_harness


@pytest.fixture
def h(make: MakeHarness) -> Harness:
    return make()


def fetch_catalogue(h: Harness) -> None:
    """What a client does first: the index and every products file it names."""
    for path in (INDEX, IMAGES, OTHER):
        code, body, _ = h.fetch(path)
        assert (code, body) == (200, h.files[path])


def store_v1(h: Harness) -> None:
    for path in (meta_path(OS1, V1), rootfs_path(OS1, V1)):
        code, body, _ = h.fetch(path)
        assert (code, body) == (200, h.files[path])


def break_upstream(h: Harness, fault: str) -> None:
    if fault == "connection":
        h.upstream_down()
    else:
        for path in h.files:
            h.upstream.statuses[path] = int(fault)


def offline(h: Harness) -> bool:
    return h.health.offline


def retry_after(response: Any) -> list[bytes]:
    values: list[bytes] = response.headers.getRawHeaders(b"Retry-After") or []
    return values


def assert_fails_fast(h: Harness, path: str, retry: int, *, names_path: bool = True) -> bytes:
    """A miss while offline: 503, Retry-After, one line of reason, and no upstream request."""
    before = h.upstream_gets()
    code, body, response = h.fetch(path)
    assert code == 503
    assert retry_after(response) == [str(retry).encode()]
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    assert b"upstream up is offline" in body
    assert (path.encode() in body) is names_path
    assert h.upstream_gets() == before
    return body


def upstream_doc(h: Harness, path: str) -> Any:
    return json.loads(h.files[path])


# Going offline


@pytest.mark.parametrize("fault", ["connection", "500", "503"])
def test_a_failing_metadata_refresh_marks_the_upstream_offline(h: Harness, fault: str) -> None:
    fetch_catalogue(h)
    store_v1(h)
    break_upstream(h, fault)
    h.clock.advance(TTL + 1)
    # The client that ran into the outage gets the expired copy at once (stale while
    # revalidate); the refresh behind it fails and marks the upstream offline, so the next
    # client gets the copy cut down to what is stored.
    assert h.json(INDEX) == json.loads(h.files[INDEX])
    h.settle()
    index = h.json(INDEX)
    assert offline(h)
    assert list(index["index"]) == ["images"]
    if fault != "connection":
        assert f"{fault} for {BASE_URL}/{INDEX}" in h.health.describe()
    # A miss meanwhile is the next probe: the upstream is still down, so it fails.
    before = h.upstream_gets(rootfs_path(OS1, V2))
    assert h.fetch(rootfs_path(OS1, V2))[0] == 502
    assert h.upstream_gets(rootfs_path(OS1, V2)) == before + 1
    assert offline(h)


def test_a_miss_that_cannot_reach_the_upstream_marks_it_offline(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream_down()
    code, _, _ = h.fetch(rootfs_path(OS1, V1))
    assert code == 502
    assert offline(h)
    assert list(h.json(IMAGES)["products"]) == []


@pytest.mark.parametrize("status", [500, 502, 503, 403])
def test_an_error_for_one_file_is_that_files_failure(h: Harness, status: int) -> None:
    fetch_catalogue(h)
    broken = rootfs_path(OS1, V1)
    h.upstream.statuses[broken] = status
    assert h.fetch(broken)[0] == 502
    assert not offline(h)
    # Every other file, and the whole catalogue when it is revalidated, is unaffected.
    for path in (meta_path(OS1, V1), meta_path(OS1, V2), rootfs_path(OS1, V2)):
        code, body, _ = h.fetch(path)
        assert (code, body) == (200, h.files[path])
    h.clock.advance(TTL + 1)
    for path in (INDEX, IMAGES, OTHER):
        code, body, _ = h.fetch(path)
        assert (code, body) == (200, h.files[path])
    # The next request for it tries again at once; a second failure in a row backs it off.
    assert h.fetch(broken)[0] == 502
    assert h.upstream_gets(broken) == 2
    code, body, response = h.fetch(broken)
    assert code == 502
    assert retry_after(response) == [str(BACKOFF).encode()]
    assert b"failed 2 times in a row" in body
    assert h.upstream_gets(broken) == 2
    assert not offline(h)
    # Fixed upstream: once the backoff has run out the file comes, and is forgotten as failing.
    del h.upstream.statuses[broken]
    h.clock.advance(BACKOFF)
    code, body, _ = h.fetch(broken)
    assert (code, body) == (200, h.files[broken])
    assert h.upstream_gets(broken) == 3


def test_a_body_that_breaks_off_is_that_files_failure(h: Harness) -> None:
    fetch_catalogue(h)
    broken = rootfs_path(OS1, V1)

    def half_then_hang_up(request: Request) -> Any:
        data = h.files[broken]
        request.setHeader(b"Content-Length", str(len(data)).encode())
        request.write(data[: len(data) // 2])
        return hang_up(request)

    h.upstream.override[broken] = half_then_hang_up
    # Resumed (from the start: this upstream ignores Range) until RESUME_ATTEMPTS in a row
    # made no progress.
    async def ask() -> tuple[int, bytes]:
        response = await h.get(broken)
        try:
            return response.code, await treq.content(response)
        except Exception:
            return response.code, b""

    got = collect(Deferred.fromCoroutine(ask()))
    for _ in range(RESUME_ATTEMPTS * 2):
        h.clock.advance(max(RESUME_BACKOFF_SECONDS))
        h.settle()
    code, body = outcome(got)
    assert code != 200 or len(body) < len(h.files[broken])
    assert not offline(h)
    assert h.json(IMAGES) == upstream_doc(h, IMAGES)
    del h.upstream.override[broken]
    code, body, _ = h.fetch(broken)
    assert (code, body) == (200, h.files[broken])


def test_an_upstream_404_does_not_mark_it_offline(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream.statuses[rootfs_path(OS1, V1)] = 404
    code, _, _ = h.fetch(rootfs_path(OS1, V1))
    assert code == 404
    assert not offline(h)
    code, _, _ = h.fetch(meta_path(OS1, V1))
    assert code == 200


# The offline catalogue


def test_offline_catalogue_lists_only_versions_whose_files_are_all_stored(h: Harness) -> None:
    fetch_catalogue(h)
    store_v1(h)
    # Half of V2: its metadata is stored, its squashfs is not; nothing of other.json is.
    h.fetch(meta_path(OS1, V2))
    h.upstream_down()
    code, _, _ = h.fetch(rootfs_path(OS1, V2))
    assert (code, offline(h)) == (502, True)
    before = h.upstream_gets()

    code, body, response = h.fetch(INDEX)
    assert code == 200
    assert response.headers.getRawHeaders(b"Content-Type") == [b"application/json"]
    index = json.loads(body)
    expected_index = upstream_doc(h, INDEX)
    # other.json has nothing left: its entry is dropped, so no client asks for it.
    del expected_index["index"]["other"]
    assert index == expected_index

    products = h.json(IMAGES)
    expected = upstream_doc(h, IMAGES)
    del expected["products"][OS1]["versions"][V2]
    assert products == expected
    assert h.json(OTHER)["products"] == {}

    # Every stored file is still a hit, V2's metadata too although no listed image needs it.
    for path in (meta_path(OS1, V1), rootfs_path(OS1, V1), meta_path(OS1, V2)):
        code, body, response = h.fetch(path)
        assert (code, body) == (200, h.files[path])
        assert response.headers.getRawHeaders(b"Accept-Ranges") == [b"bytes"]
    # The catalogue requests probed the upstream; no hit asked it for anything.
    assert {path for _, path, _ in h.upstream.requests[before:]} <= {INDEX, IMAGES, OTHER}


def test_offline_catalogue_has_its_own_validators(h: Harness) -> None:
    fetch_catalogue(h)
    store_v1(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V2))
    code, body, response = h.fetch(IMAGES)
    assert code == 200 and body != h.files[IMAGES]
    etag = response.headers.getRawHeaders(b"ETag")
    assert etag and etag != [f'"{sha(h.files[IMAGES])}"'.encode()]
    code, body, _ = h.fetch(IMAGES, headers={b"If-None-Match": etag})
    assert (code, body) == (304, b"")


def test_offline_with_nothing_stored_lists_nothing(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V1))
    index = h.json(INDEX)
    assert index["index"] == {}
    assert h.json(IMAGES)["products"] == {}


def test_offline_catalogue_follows_what_is_stored(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V2))
    assert offline(h)
    assert h.json(IMAGES)["products"] == {}
    # Back: the next request stores V1 (metadata first: the squashfs completes it).
    h.upstream_up()
    h.fetch(meta_path(OS1, V1))
    assert not offline(h)
    h.fetch(rootfs_path(OS1, V1))
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V2))
    assert offline(h)
    # Seconds later: the view built in the first outage would now leave V1 out.
    assert list(h.json(IMAGES)["products"][OS1]["versions"]) == [V1]
    assert list(h.json(INDEX)["index"]) == ["images"]


# Coming back


def test_while_down_each_miss_probes_and_the_first_after_recovery_succeeds(h: Harness) -> None:
    fetch_catalogue(h)
    store_v1(h)
    h.upstream_down()
    assert h.fetch(rootfs_path(OS1, V2))[0] == 502
    # Still down: the next miss tries at once, and fails like the first.
    before = h.upstream_gets()
    assert h.fetch(meta_path(OS1, V2))[0] == 502
    assert h.upstream_gets(meta_path(OS1, V2)) == 1
    assert list(h.json(IMAGES)["products"][OS1]["versions"]) == [V1]
    assert h.upstream_gets() > before

    # A moment after the upstream is back, the first request gets what it asked for.
    h.upstream_up()
    h.clock.advance(0.1)
    code, body, _ = h.fetch(rootfs_path(OS1, V2))
    assert (code, body) == (200, h.files[rootfs_path(OS1, V2)])
    assert not offline(h)
    # The whole catalogue again, byte for byte, and misses download again.
    for path in (INDEX, IMAGES, OTHER):
        code, body, _ = h.fetch(path)
        assert (code, body) == (200, h.files[path])
    code, body, _ = h.fetch(meta_path(OS2, V1))
    assert (code, body) == (200, h.files[meta_path(OS2, V1)])
    assert h.upstream_gets(meta_path(OS2, V1)) == 1


def test_a_catalogue_request_after_recovery_gets_the_whole_catalogue(h: Harness) -> None:
    fetch_catalogue(h)
    store_v1(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V2))
    assert list(h.json(IMAGES)["products"][OS1]["versions"]) == [V1]
    # The copies are fresh, but the first request after recovery asks the upstream all the same.
    h.upstream_up()
    for path in (INDEX, IMAGES, OTHER):
        code, body, _ = h.fetch(path)
        assert (code, body) == (200, h.files[path])
    assert not offline(h)


def test_a_metadata_refresh_after_the_backoff_probes_and_brings_the_catalogue_back(
    h: Harness,
) -> None:
    fetch_catalogue(h)
    store_v1(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V2))
    assert list(h.json(IMAGES)["products"][OS1]["versions"]) == [V1]
    h.upstream_up()
    h.clock.advance(TTL + 1)
    before = h.upstream_gets(INDEX)
    code, body, _ = h.fetch(INDEX)
    assert (code, body) == (200, h.files[INDEX])
    assert h.upstream_gets(INDEX) == before + 1
    assert not offline(h)
    code, body, _ = h.fetch(IMAGES)
    assert (code, body) == (200, h.files[IMAGES])
    code, body, _ = h.fetch(rootfs_path(OS1, V2))
    assert (code, body) == (200, h.files[rootfs_path(OS1, V2)])
    assert h.upstream_gets(rootfs_path(OS1, V2)) == 2


def test_only_one_request_probes_at_a_time(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V1))
    h.upstream_up()
    waiting: list[Request] = []

    def answer_later(request: Request) -> Any:
        waiting.append(request)
        return NOT_DONE_YET

    h.upstream.override[rootfs_path(OS1, V1)] = answer_later
    h.clock.advance(BACKOFF)
    probe = h.get(rootfs_path(OS1, V1))
    h.settle()
    assert len(waiting) == 1
    # While the probe has no answer, everything else still fails fast.
    body = assert_fails_fast(h, meta_path(OS1, V1), retry=1)
    assert b"an attempt is in progress" in body

    data = h.files[rootfs_path(OS1, V1)]
    waiting[0].setHeader(b"Content-Length", str(len(data)).encode())
    waiting[0].write(data)
    waiting[0].finish()
    response = h.run(probe)
    assert response.code == 200
    assert h.run(treq.content(response)) == data
    assert not offline(h)
    code, body, _ = h.fetch(meta_path(OS1, V1))
    assert (code, body) == (200, h.files[meta_path(OS1, V1)])


# Offline by configuration


def seed(h: Harness, *, metadata: tuple[str, ...] = (INDEX, IMAGES, OTHER)) -> None:
    """What a bundle import leaves: the catalogue and V1 of testos."""
    for path in metadata:
        h.seed_metadata(path)
    for path in (meta_path(OS1, V1), rootfs_path(OS1, V1)):
        h.seed_file(path)


def test_forced_offline_serves_what_is_stored_and_never_contacts_the_upstream(
    make: MakeHarness,
) -> None:
    h = make(forced_offline=True)
    seed(h)
    for _round in range(2):
        index = h.json(INDEX)
        assert list(index["index"]) == ["images"]
        assert list(h.json(IMAGES)["products"][OS1]["versions"]) == [V1]
        for path in (meta_path(OS1, V1), rootfs_path(OS1, V1)):
            code, body, _ = h.fetch(path)
            assert (code, body) == (200, h.files[path])
        body = assert_fails_fast(h, rootfs_path(OS1, V2), retry=FORCED_RETRY_AFTER_SECONDS)
        assert b"offline by configuration" in body
        assert_fails_fast(h, meta_path(OS2, V1), retry=FORCED_RETRY_AFTER_SECONDS)
        # Long after every backoff and TTL, still nothing is tried.
        h.clock.advance(TTL + DAY)
    assert h.upstream.requests == []


def test_forced_offline_without_a_catalogue_is_503(make: MakeHarness) -> None:
    h = make(forced_offline=True)
    for path in (INDEX, IMAGES, rootfs_path(OS1, V1)):
        code, body, response = h.fetch(path)
        assert code == 503
        assert retry_after(response) == [str(FORCED_RETRY_AFTER_SECONDS).encode()]
        assert b"offline by configuration" in body
    assert h.upstream.requests == []


def test_offline_catalogue_without_a_copy_of_one_products_file(make: MakeHarness) -> None:
    # The index names other.json first, but only images.json was ever stored.
    h = make(other_first=True, forced_offline=True)
    seed(h, metadata=(INDEX, IMAGES))
    index = h.json(INDEX)
    assert list(index["index"]) == ["images"]
    assert list(h.json(IMAGES)["products"][OS1]["versions"]) == [V1]
    code, body, _ = h.fetch(rootfs_path(OS1, V1))
    assert (code, body) == (200, h.files[rootfs_path(OS1, V1)])
    # A file listed only by the products file that is not here: offline, not a 404.
    assert_fails_fast(h, rootfs_path(OS2, V1), retry=FORCED_RETRY_AFTER_SECONDS, names_path=False)
    assert h.upstream.requests == []


def test_a_probe_answered_with_a_refused_redirect_ends_the_probe(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream_down()
    assert h.fetch(rootfs_path(OS1, V2))[0] == 502
    assert offline(h)
    h.upstream_up()
    h.clock.advance(BACKOFF)
    # The probe: the upstream answers, with a redirect the proxy refuses to follow.
    h.upstream.redirects[meta_path(OS1, V2)] = b"https://elsewhere.test/file"
    assert h.fetch(meta_path(OS1, V2))[0] == 502
    # It is reachable: the next miss goes to it rather than waiting out a probe that
    # never ends.
    assert not offline(h)
    code, body, _ = h.fetch(rootfs_path(OS1, V2))
    assert (code, body) == (200, h.files[rootfs_path(OS1, V2)])


# What takes the probe


def test_a_head_miss_while_offline_takes_no_probe(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V1))
    assert offline(h)
    response = h.run(h.proxy.head(f"https://proxy.test/up/{meta_path(OS1, V1)}"))
    assert response.code == 200
    # It fetched nothing, so it must not have left a probe outstanding: a GET still probes.
    assert not h.health.probing
    before = h.upstream_gets(meta_path(OS1, V1))
    h.fetch(meta_path(OS1, V1))
    assert h.upstream_gets(meta_path(OS1, V1)) == before + 1


def test_background_downloads_probe_only_after_the_backoff(h: Harness) -> None:
    fetch_catalogue(h)
    h.upstream_down()
    h.fetch(rootfs_path(OS1, V1))
    item = h.run(Deferred.fromCoroutine(h.metadata.item(meta_path(OS1, V1))))
    assert item is not None
    with pytest.raises(Unavailable):
        h.fetcher.get("up", item, background=True)
    h.clock.advance(BACKOFF)
    h.upstream_up()
    download = h.fetcher.get("up", item, background=True)
    h.run(download.when_done())
    assert not offline(h)
