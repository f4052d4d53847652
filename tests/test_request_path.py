"""
The request path end to end, in memory and deterministic.

The client is C{StubTreq} over the proxy's real resource tree; the upstream is a
L{ScriptedUpstream} reached through C{RequestTraversalAgent}, wrapped in the proxy's own
L{UpstreamClient}. Time is a L{Clock}. L{Harness.settle} (of L{tests.helpers.harness}) pumps
both in-memory connections and the clock in a bounded loop.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.internet.interfaces import IPushProducer
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.client import Agent
from twisted.web.server import NOT_DONE_YET

from proxy.config import UpstreamConfig
from proxy.downloads import RESUME_ATTEMPTS, RESUME_BACKOFF_SECONDS, Fetcher
from proxy.metadata import RETRY_AFTER_FAILURE_SECONDS, STALE_WAIT_SECONDS, UpstreamMetadata
from proxy.files import CacheFiles
from proxy.simplestreams import RootResource, UpstreamResource
from proxy.upstream import AllowlistAgent, origin_of
from tests.helpers.harness import CacheHarness, Closing
from tests.helpers.wired import hang_up as hang_up_at_once
from tests.helpers.logs import Logged
from tests.helpers.scripted import (
    BASE_URL,
    META_PATH,
    ROOTFS_PATH,
    ScriptedUpstream,
    sha,
    simple_tree,
)

TTL = 300.0
IDLE = 60.0


class Harness(CacheHarness):
    def __init__(self, tmp_path: Any, files: dict[str, bytes] | None = None) -> None:
        self.files = files if files is not None else simple_tree()
        self.upstream = ScriptedUpstream(self.files)
        super().__init__(tmp_path, self.upstream, BASE_URL)
        self.fetcher = Fetcher(
            self.client, self.store, self.index, self.clock, [UpstreamConfig("up", BASE_URL)], IDLE
        )
        self.metadata = UpstreamMetadata(
            "up", BASE_URL, self.client, self.store, self.index, self.clock, ttl=TTL, idle_timeout=IDLE
        )
        cache_files = CacheFiles(self.store, self.index, self.fetcher, self.clock)
        resource = UpstreamResource(self.metadata, cache_files, self.store, self.clock)
        self.proxy = StubTreq(RootResource({"up": resource}, "banner\n"))


@pytest.fixture
def h(tmp_path: Any, closing: Closing) -> Harness:
    return closing(Harness(tmp_path))


def upstream_gets(h: Harness, path: str) -> int:
    return h.upstream.paths_requested(path)


# Metadata


def test_index_and_products_pass_through_byte_for_byte(h: Harness) -> None:
    code, body, response = h.fetch("streams/v1/index.json")
    assert (code, body) == (200, h.files["streams/v1/index.json"])
    assert response.headers.getRawHeaders(b"Content-Type") == [b"application/json"]
    code, body, _ = h.fetch("streams/v1/images.json")
    assert (code, body) == (200, h.files["streams/v1/images.json"])


def test_metadata_is_fetched_once_within_ttl(h: Harness) -> None:
    for _ in range(3):
        h.fetch("streams/v1/images.json")
    assert upstream_gets(h, "streams/v1/index.json") == 1
    assert upstream_gets(h, "streams/v1/images.json") == 1


def test_stale_metadata_is_revalidated_with_etag(h: Harness) -> None:
    h.upstream.etags["streams/v1/index.json"] = b'"v1"'
    h.fetch("streams/v1/index.json")
    h.clock.advance(TTL + 1)
    code, body, _ = h.fetch("streams/v1/index.json")
    assert (code, body) == (200, h.files["streams/v1/index.json"])
    # The stale copy is answered from memory before the background refresh's turn comes.
    h.settle()
    conditional = [r for r in h.upstream.requests if r[1] == "streams/v1/index.json"]
    assert len(conditional) == 2
    assert conditional[1][2].get(b"if-none-match") == b'"v1"'


def test_changed_metadata_replaces_the_copy(h: Harness) -> None:
    h.fetch("streams/v1/index.json")
    h.files["streams/v1/index.json"] = h.files["streams/v1/index.json"].replace(b"index:1.0", b"index:1.1")
    h.clock.advance(TTL + 1)
    # stale while revalidate: the expired copy at once, the new one to the next request
    _, body, _ = h.fetch("streams/v1/index.json")
    assert b"index:1.0" in body
    h.settle()
    _, body, _ = h.fetch("streams/v1/index.json")
    assert b"index:1.1" in body
    assert upstream_gets(h, "streams/v1/index.json") == 2


def test_stale_if_error_serves_last_good_copy_and_logs_once(h: Harness, logged: Logged) -> None:
    h.fetch("streams/v1/index.json")
    h.upstream.statuses["streams/v1/index.json"] = 500
    h.clock.advance(TTL + 1)
    for _ in range(3):
        code, body, _ = h.fetch("streams/v1/index.json")
        assert (code, body) == (200, h.files["streams/v1/index.json"])
        h.clock.advance(TTL + 1)
    warnings = logged.matching("refreshing")
    assert len(warnings) == 1


def _never_answer(request: Any) -> Any:
    return NOT_DONE_YET


def test_hanging_upstream_gets_the_stale_copy_served(h: Harness, logged: Logged) -> None:
    h.fetch("streams/v1/index.json")
    h.upstream.override["streams/v1/index.json"] = _never_answer
    h.clock.advance(TTL + 1)
    d = h.get("streams/v1/index.json")
    h.settle()
    h.clock.advance(STALE_WAIT_SECONDS)
    response = h.run(d)
    assert (response.code, h.run(treq.content(response))) == (200, h.files["streams/v1/index.json"])
    # Until the refresh ends, further clients get the copy without waiting or asking again.
    h.clock.advance(1)
    code, body, _ = h.fetch("streams/v1/index.json")
    assert (code, body) == (200, h.files["streams/v1/index.json"])
    assert upstream_gets(h, "streams/v1/index.json") == 2
    # The refresh times out; the copy is then served for the retry interval without asking.
    h.clock.advance(IDLE)
    h.settle()
    code, body, _ = h.fetch("streams/v1/index.json")
    assert (code, body) == (200, h.files["streams/v1/index.json"])
    assert upstream_gets(h, "streams/v1/index.json") == 2
    warnings = logged.matching("refreshing")
    assert len(warnings) == 1 and "did not answer in time" in warnings[0]["reason"]


def test_hanging_upstream_without_copy_is_504(h: Harness) -> None:
    h.upstream.override["streams/v1/index.json"] = _never_answer
    d = h.get("streams/v1/index.json")
    h.settle()
    h.clock.advance(IDLE + 1)
    response = h.run(d)
    assert response.code == 504


def test_failed_refresh_is_retried_after_the_retry_interval(h: Harness) -> None:
    h.fetch("streams/v1/index.json")
    h.upstream.statuses["streams/v1/index.json"] = 500
    h.clock.advance(TTL + 1)
    h.fetch("streams/v1/index.json")
    h.settle()
    assert upstream_gets(h, "streams/v1/index.json") == 2
    h.fetch("streams/v1/index.json")
    h.settle()
    assert upstream_gets(h, "streams/v1/index.json") == 2
    del h.upstream.statuses["streams/v1/index.json"]
    h.clock.advance(RETRY_AFTER_FAILURE_SECONDS + 1)
    h.fetch("streams/v1/index.json")
    h.settle()
    assert upstream_gets(h, "streams/v1/index.json") == 3


def test_item_lookup_uses_the_copy_and_asks_the_upstream_nothing(h: Harness) -> None:
    h.fetch("streams/v1/images.json")
    h.clock.advance(TTL + 1)
    code, _, _ = h.fetch("images/not/listed.squashfs")
    assert code == 404
    assert len(h.upstream.requests) == 2


def test_upstream_connection_failure_on_a_miss_is_502(h: Harness, logged: Logged) -> None:
    h.fetch("streams/v1/images.json")

    def hang_up(request: Any) -> Any:
        request.channel.transport.abortConnection()
        return NOT_DONE_YET

    h.upstream.override[ROOTFS_PATH] = hang_up
    code, body, _ = h.fetch(ROOTFS_PATH)
    assert code == 502
    assert ROOTFS_PATH.encode() in body
    assert not logged.at(LogLevel.critical)


def test_range_on_a_miss_is_ignored(h: Harness) -> None:
    code, body, response = h.fetch(ROOTFS_PATH, headers={b"Range": [b"bytes=0-99"]})
    assert (code, body) == (200, h.files[ROOTFS_PATH])
    assert response.headers.getRawHeaders(b"Accept-Ranges") == [b"none"]


def test_metadata_failure_without_copy_is_502(h: Harness) -> None:
    h.upstream.statuses["streams/v1/index.json"] = 500
    code, body, _ = h.fetch("streams/v1/index.json")
    assert code == 502
    assert b"500" in body


def test_concurrent_stale_requests_share_one_refresh(h: Harness) -> None:
    h.fetch("streams/v1/index.json")
    h.clock.advance(TTL + 1)
    ds = [h.get("streams/v1/index.json") for _ in range(5)]
    for d in ds:
        response = h.run(d)
        assert h.run(treq.content(response)) == h.files["streams/v1/index.json"]
    h.settle()
    assert upstream_gets(h, "streams/v1/index.json") == 2


def test_broken_metadata_is_not_accepted(h: Harness) -> None:
    h.fetch("streams/v1/index.json")
    good = h.files["streams/v1/index.json"]
    h.files["streams/v1/index.json"] = b"{not json"
    h.clock.advance(TTL + 1)
    code, body, _ = h.fetch("streams/v1/index.json")
    assert (code, body) == (200, good)


def test_products_file_not_named_by_index_is_404_without_upstream_request(h: Harness) -> None:
    code, _, _ = h.fetch("streams/v1/other.json")
    assert code == 404
    assert upstream_gets(h, "streams/v1/other.json") == 0


# Image files


def test_miss_then_hit(h: Harness) -> None:
    code, body, response = h.fetch(ROOTFS_PATH)
    assert (code, body) == (200, h.files[ROOTFS_PATH])
    assert response.length == len(body)
    assert h.store.exists(sha(body))
    record = h.index.get(sha(body))
    assert record is not None and record.cached and not record.auto_update
    assert record.paths == (f"up/{ROOTFS_PATH}",)
    code, body2, response = h.fetch(ROOTFS_PATH)
    assert (code, body2) == (200, body)
    assert response.length == len(body)
    assert response.headers.getRawHeaders(b"ETag") == [f'"{sha(body)}"'.encode()]
    assert response.headers.getRawHeaders(b"Accept-Ranges") == [b"bytes"]
    assert upstream_gets(h, ROOTFS_PATH) == 1
    assert h.index.pending_uses.get(sha(body)) == 2
    h.index.flush_usage()
    record = h.index.get(sha(body))
    assert record is not None and record.use_count == 2


def test_hit_supports_range_and_if_none_match(h: Harness) -> None:
    h.fetch(ROOTFS_PATH)
    digest = sha(h.files[ROOTFS_PATH])
    code, body, _ = h.fetch(ROOTFS_PATH, headers={b"Range": [b"bytes=10-19"]})
    assert (code, body) == (206, h.files[ROOTFS_PATH][10:20])
    code, body, _ = h.fetch(ROOTFS_PATH, headers={b"If-None-Match": [f'"{digest}"'.encode()]})
    assert (code, body) == (304, b"")
    code, _, _ = h.fetch(ROOTFS_PATH, headers={b"Range": [b"bytes=999999999-"]})
    assert code == 416


def test_concurrent_misses_make_one_upstream_request(h: Harness) -> None:
    h.upstream.held_paths.add(ROOTFS_PATH)
    h.fetch("streams/v1/images.json")
    responses = [h.get(ROOTFS_PATH) for _ in range(8)]
    h.settle()
    assert upstream_gets(h, ROOTFS_PATH) == 1
    held = h.upstream.held[ROOTFS_PATH][0]
    body = h.files[ROOTFS_PATH]
    held.write(body[:1000])
    h.settle()
    # every client has its 200 and headers while the download is still running
    got = [h.run(d) for d in responses]
    assert [r.code for r in got] == [200] * 8
    # a client arriving mid-download joins the same download
    late = h.run(h.get(ROOTFS_PATH))
    assert upstream_gets(h, ROOTFS_PATH) == 1
    bodies = [treq.content(r) for r in got + [late]]
    held.write(body[1000:])
    held.finish()
    for d in bodies:
        assert h.run(d) == body
    assert h.store.exists(sha(body))
    h.settle()
    h.index.flush_usage()
    record = h.index.get(sha(body))
    assert record is not None and record.use_count == 9


def test_corrupt_upstream_file_is_never_committed(h: Harness, logged: Logged) -> None:
    body = h.files[ROOTFS_PATH]
    h.files[ROOTFS_PATH] = b"X" + body[1:]
    # Depending on when the mismatch is found, the client gets an error status or a broken
    # connection: never a 200 with a complete body.
    try:
        code, _, _ = h.fetch(ROOTFS_PATH)
    except Exception:
        code = None
    assert code != 200
    assert not h.store.exists(sha(body))
    assert h.index.get(sha(body)) is None
    assert list(FilePath(h.store.root.path).child("tmp").children()) == []
    assert any(BASE_URL in str(e.get("url", "")) for e in logged.matching("failed"))


def test_short_body_aborts_every_client(h: Harness) -> None:
    """A body that breaks off and cannot be resumed (every new attempt breaks too) fails them all."""
    h.upstream.held_paths.add(ROOTFS_PATH)
    h.fetch("streams/v1/images.json")
    ds = [h.get(ROOTFS_PATH) for _ in range(3)]
    h.settle()
    held = h.upstream.held[ROOTFS_PATH][0]
    held.write(h.files[ROOTFS_PATH][:5000])
    h.settle()
    responses = [h.run(d) for d in ds]
    bodies = [treq.content(r) for r in responses]
    h.upstream.held_paths.discard(ROOTFS_PATH)
    h.upstream.override[ROOTFS_PATH] = hang_up_at_once
    held.break_connection()
    for _ in range(RESUME_ATTEMPTS * 2):
        h.clock.advance(max(RESUME_BACKOFF_SECONDS))
        h.settle()
    for d in bodies:
        with pytest.raises(Exception):
            h.run(d)
    assert not h.store.exists(sha(h.files[ROOTFS_PATH]))
    # The 5000 bytes are kept for the next download of the file to continue from.
    [kept] = h.store.resumable.values()
    assert kept.path.getsize() == 5000
    del h.upstream.override[ROOTFS_PATH]
    code, body, _ = h.fetch(ROOTFS_PATH)
    assert (code, body) == (200, h.files[ROOTFS_PATH])
    assert list(FilePath(h.store.root.path).child("tmp").children()) == []


def test_stalled_upstream_times_out(h: Harness) -> None:
    h.upstream.held_paths.add(ROOTFS_PATH)
    h.fetch("streams/v1/images.json")
    d = h.get(ROOTFS_PATH)
    h.settle()
    h.upstream.held[ROOTFS_PATH][0].write(b"R" * 100)
    h.settle()
    response = h.run(d)
    body = treq.content(response)
    # Each attempt to resume stalls as well (the upstream holds every answer): given up after
    # RESUME_ATTEMPTS of them.
    for _ in range(RESUME_ATTEMPTS * 4):
        h.clock.advance(IDLE / 2 + 1)
        h.settle()
    with pytest.raises(Exception):
        h.run(body)
    assert h.fetcher.in_flight() == {}


class _HangUp(Protocol):
    """Reads the first chunk of a body, then drops the connection."""

    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


def test_client_disconnect_does_not_cancel_download(h: Harness) -> None:
    h.upstream.held_paths.add(ROOTFS_PATH)
    h.fetch("streams/v1/images.json")
    d = h.get(ROOTFS_PATH)
    h.settle()
    held = h.upstream.held[ROOTFS_PATH][0]
    held.write(h.files[ROOTFS_PATH][:100])
    h.settle()
    response = h.run(d)
    hang_up = _HangUp()
    response.deliverBody(hang_up)
    h.settle()
    assert hang_up.lost
    held.write(h.files[ROOTFS_PATH][100:])
    held.finish()
    h.settle()
    assert h.store.exists(sha(h.files[ROOTFS_PATH]))


def test_unknown_item_is_404_without_upstream_request(h: Harness) -> None:
    code, body, _ = h.fetch("images/nothing/here.squashfs")
    assert code == 404
    assert b"not in this upstream's catalogue" in body
    assert upstream_gets(h, "images/nothing/here.squashfs") == 0


@pytest.mark.parametrize("path", ["images/%2e%2e/%2e%2e/etc/passwd", "a/../../b", "x%00y"])
def test_traversal_is_400(h: Harness, path: str) -> None:
    code, _, _ = h.fetch(path)
    assert code == 400


def test_unknown_upstream_is_404(h: Harness) -> None:
    async def go() -> int:
        response = await h.proxy.get("https://proxy.test/nope/streams/v1/index.json")
        await treq.content(response)
        return int(response.code)

    assert h.run(Deferred.fromCoroutine(go())) == 404


def test_percent_encoded_colons_reach_the_same_file(tmp_path: Any) -> None:
    files = simple_tree()
    h = Harness(tmp_path, files)
    encoded = ROOTFS_PATH.replace("_", "%5F")
    code, body, _ = h.fetch(encoded)
    assert (code, body) == (200, files[ROOTFS_PATH])
    h.index.close()


def test_same_content_through_two_paths_is_stored_once(tmp_path: Any) -> None:
    files = simple_tree(rootfs=b"S" * 1000, meta=b"S" * 1000)
    h = Harness(tmp_path, files)
    h.fetch(ROOTFS_PATH)
    h.fetch(META_PATH)
    record = h.index.get(sha(b"S" * 1000))
    assert record is not None
    assert set(record.paths) == {f"up/{ROOTFS_PATH}", f"up/{META_PATH}"}
    assert sum(1 for _ in h.store.stored()) == 3  # index, products, one image blob
    h.index.close()


@pytest.mark.parametrize("path", [f"/up/{ROOTFS_PATH}", "/", "/nope/x"])
@pytest.mark.parametrize("method", ["POST", "OPTIONS", "DELETE", "PROPFIND"])
def test_methods_other_than_get_and_head_are_405(h: Harness, path: str, method: str) -> None:
    async def go() -> tuple[int, list[bytes]]:
        response = await h.proxy.request(method, f"https://proxy.test{path}", data=b"x")
        await treq.content(response)
        return int(response.code), response.headers.getRawHeaders(b"Allow")

    assert h.run(Deferred.fromCoroutine(go())) == (405, [b"GET, HEAD"])


# Not an open proxy


@pytest.mark.parametrize(
    "url",
    [b"https://elsewhere.test/x", b"http://upstream.test/base/x", b"https://upstream.test:444/base/x",
     b"https://127.0.0.1/x", b"not a url"],
)
def test_foreign_urls_are_refused_without_connecting(url: bytes) -> None:
    reactor = MemoryReactor()
    agent = AllowlistAgent(Agent(reactor), [origin_of(BASE_URL)])
    failures: list[Failure] = []
    agent.request(b"GET", url).addErrback(failures.append)
    assert failures and "not a configured upstream" in failures[0].getErrorMessage()
    assert reactor.tcpClients == [] and reactor.sslClients == []


def test_configured_origin_is_let_through() -> None:
    reactor = MemoryReactorClock()
    agent = AllowlistAgent(Agent(reactor), [origin_of("https://127.0.0.1:8443/base")])
    agent.request(b"GET", b"https://127.0.0.1:8443/base/x")
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 8443)]


def test_upstream_redirect_elsewhere_fails_the_download(h: Harness) -> None:
    h.upstream.redirects[ROOTFS_PATH] = b"https://elsewhere.test/file"
    code, body, _ = h.fetch(ROOTFS_PATH)
    assert code == 502
    assert not h.store.exists(sha(h.files[ROOTFS_PATH]))


def test_upstream_redirect_within_upstream_is_followed(h: Harness) -> None:
    h.files["moved/rootfs"] = h.files[ROOTFS_PATH]
    h.upstream.redirects[ROOTFS_PATH] = (BASE_URL + "/moved/rootfs").encode()
    code, body, _ = h.fetch(ROOTFS_PATH)
    assert (code, body) == (200, h.files[ROOTFS_PATH])


def test_upstream_404_for_a_listed_item_is_404(h: Harness) -> None:
    h.upstream.statuses[ROOTFS_PATH] = 404
    code, body, _ = h.fetch(ROOTFS_PATH)
    assert code == 404



def test_head_of_a_miss_answers_from_the_catalogue_without_a_download(h: Harness) -> None:
    h.fetch("streams/v1/index.json")
    h.fetch("streams/v1/images.json")
    code, body, response = _head(h, ROOTFS_PATH)
    assert (code, body) == (200, b"")
    assert response.headers.getRawHeaders(b"Content-Length") == [b"%d" % len(h.files[ROOTFS_PATH])]
    assert response.headers.getRawHeaders(b"ETag") == [b'"' + sha(h.files[ROOTFS_PATH]).encode() + b'"']
    assert upstream_gets(h, ROOTFS_PATH) == 0
    assert not h.store.exists(sha(h.files[ROOTFS_PATH]))


def _head(h: Harness, path: str) -> tuple[int, bytes, Any]:
    async def go() -> tuple[int, bytes, Any]:
        response = await h.proxy.head(f"https://proxy.test/up/{path}", unbuffered=True)
        body = await treq.content(response)
        return response.code, body, response

    return h.run(Deferred.fromCoroutine(go()))
