"""
The mirrors of one upstream (L{proxy.mirrors}): which to ask, backoff and recovery, and the
engine and the catalogue moving to the next mirror, in memory on a L{Clock}.

The two mirrors are two L{TreeResource}s over the same files, at C{/base/} and C{/mirror/} of
one in-memory origin (the allow-list and the TLS policy per origin are covered on loopback in
C{tests/faults/test_mirrors.py} and by C{tests/test_request_path.py}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from zope.interface import implementer

from proxy.config import UpstreamConfig
from proxy.downloads import Fetcher
from proxy.health import DEFAULT_BASE_BACKOFF_SECONDS, UpstreamHealth
from proxy.metadata import UpstreamMetadata
from proxy.mirrors import Mirrors, base_of
from proxy.outbound import OutboundProxyError
from proxy.streaming import FileProducer
from tests.faults.upstreams import BROKEN, PRODUCTS, ROOTFS_BYTES, tree_files, write_tree
from tests.helpers.harness import CacheHarness, Closing, collect
from tests.helpers.invariants import assert_store_verified
from tests.helpers.scripted import BASE_URL
from tests.helpers.upstream import TreeResource
from tests.helpers.wired import IDLE, INDEX, TTL

MIRROR_URL = "https://upstream.test/mirror"
A, B = BASE_URL, MIRROR_URL


# -- which mirror ---------------------------------------------------------------------------


def test_the_first_mirror_up_is_asked_and_a_failed_one_again_after_its_backoff() -> None:
    clock = Clock()
    mirrors = Mirrors("up", (A, B), clock)
    assert mirrors.order() == [A, B] and mirrors.current() == A
    mirrors.failed(A, "connection refused")
    assert mirrors.order() == [B] and mirrors.current() == B
    assert mirrors.order(tried=[B]) == []
    assert not mirrors.all_down()
    assert [(s.url, s.down, s.reason) for s in mirrors.states()] == [
        (A, True, "connection refused"), (B, False, ""),
    ]
    clock.advance(DEFAULT_BASE_BACKOFF_SECONDS)
    # Its backoff ran out: tried again, in its place.
    assert mirrors.order() == [A, B]
    mirrors.failed(A, "connection refused")
    clock.advance(DEFAULT_BASE_BACKOFF_SECONDS)
    assert mirrors.order() == [B]
    clock.advance(DEFAULT_BASE_BACKOFF_SECONDS)
    assert mirrors.order() == [A, B]
    mirrors.answered(A)
    assert [s.down for s in mirrors.states()] == [False, False]


def test_when_every_mirror_is_down_all_are_asked() -> None:
    clock = Clock()
    mirrors = Mirrors("up", (A, B), clock)
    mirrors.failed(A, "reset")
    mirrors.failed(B, "reset")
    assert mirrors.all_down()
    # The upstream's own health lets a probe through: it asks every mirror, in order.
    assert mirrors.order() == [A, B]
    assert mirrors.order(tried=[A]) == []


def test_base_of() -> None:
    assert base_of(f"{B}/images/x", (A, B)) == B
    assert base_of("https://elsewhere.test/x", (A, B)) is None


# -- the engine and the catalogue -------------------------------------------------------------


class MirrorHarness(CacheHarness):
    """A fetcher and a catalogue over two mirrors of L{tree_files}, without the faces."""

    def __init__(self, tmp_path: Path) -> None:
        self.files = tree_files()
        tree = write_tree(tmp_path / "tree", self.files)
        self.trees = {A: TreeResource(tree), B: TreeResource(tree)}
        origin = Resource()
        origin.putChild(b"base", self.trees[A])
        origin.putChild(b"mirror", self.trees[B])
        super().__init__(tmp_path / "cache", origin, BASE_URL, start=1_000_000)
        self.health = UpstreamHealth("up", self.clock)
        self.mirrors = Mirrors("up", (A, B), self.clock)
        config = UpstreamConfig("up", A, urls=(A, B))
        self.fetcher = Fetcher(
            self.client, self.store, self.index, self.clock, [config], IDLE,
            health={"up": self.health}, mirrors={"up": self.mirrors},
        )
        self.metadata = UpstreamMetadata(
            "up", A, self.client, self.store, self.index, self.clock, ttl=TTL, idle_timeout=IDLE,
            health=self.health, mirrors=self.mirrors,
        )

    def item(self, path: str) -> Any:
        item = self.run(Deferred.fromCoroutine(self.metadata.item(path)))
        assert item is not None
        return item

    def download(self, path: str) -> Any:
        download = self.fetcher.get("up", self.item(path))
        self.settle()
        return self.run(download.when_done())

    def gets(self, base: str, path: str) -> list[Any]:
        return [r for r in self.trees[base].requests if r.path == path and r.method == "GET"]


@pytest.fixture
def m(tmp_path: Path, closing: Closing) -> MirrorHarness:
    return closing(MirrorHarness(tmp_path))


@pytest.mark.parametrize("fault", ["wrong bytes", "500", "reset"])
def test_a_download_moves_to_the_next_mirror(m: MirrorHarness, fault: str) -> None:
    if fault == "wrong bytes":
        m.trees[A].corrupt(BROKEN)
    elif fault == "500":
        m.trees[A].status(BROKEN, 500)
    else:
        m.trees[A].reset(BROKEN, ROOTFS_BYTES // 2)
    path = m.download(BROKEN)
    assert path.getContent() == m.files[BROKEN]
    assert_store_verified(m.store, m.index)
    [moved] = m.gets(B, BROKEN)
    # Bytes that did not verify are not kept; those cut short are, and go on from there.
    expected_range = f"bytes={ROOTFS_BYTES // 2}-" if fault == "reset" else None
    assert moved.header("Range") == expected_range
    assert moved.header("If-Range") is None
    assert [s.down for s in m.mirrors.states()] == [True, False]
    assert not m.health.offline


def test_a_404_from_one_mirror_is_asked_of_the_next_without_marking_it_down(m: MirrorHarness) -> None:
    m.trees[A].status(BROKEN, 404)
    assert m.download(BROKEN).getContent() == m.files[BROKEN]
    assert [s.down for s in m.mirrors.states()] == [False, False]


def test_the_upstream_is_offline_only_when_every_mirror_is(
    m: MirrorHarness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    item = m.item(BROKEN)
    asked = m.client.get

    def unreachable(url: str, headers: Any = None) -> Any:
        if url.endswith(BROKEN):
            return fail(ConnectionRefusedError())
        return asked(url, headers)

    monkeypatch.setattr(m.client, "get", unreachable)
    download = m.fetcher.get("up", item)
    m.settle()
    with pytest.raises(Exception):
        m.run(download.when_done())
    assert m.mirrors.all_down()
    assert m.health.offline


@pytest.mark.parametrize("fault", ["503", "wrong bytes"])
def test_one_file_failing_on_every_mirror_is_that_files_failure(
    m: MirrorHarness, fault: str,
) -> None:
    """As without mirrors: every mirror answers, so the upstream is reachable; a 5xx or wrong
    bytes for one file (a catalogue ahead of the mirrors' files) is that file's failure and
    must not take the whole upstream offline."""
    item = m.item(BROKEN)
    for base in (A, B):
        if fault == "503":
            m.trees[base].status(BROKEN, 503)
        else:
            m.trees[base].corrupt(BROKEN)
    download = m.fetcher.get("up", item)
    m.settle()
    with pytest.raises(Exception):
        m.run(download.when_done())
    assert not m.health.offline
    assert len(m.fetcher._file_failures) == 1


def test_the_catalogue_comes_from_the_first_healthy_mirror(m: MirrorHarness) -> None:
    m.trees[A].status(INDEX, 500)
    m.run(Deferred.fromCoroutine(m.metadata.get(INDEX)))
    assert (len(m.gets(A, INDEX)), len(m.gets(B, INDEX))) == (1, 1)
    assert not m.health.offline
    assert [s.down for s in m.mirrors.states()] == [True, False]
    m.run(Deferred.fromCoroutine(m.metadata.get(PRODUCTS)))
    assert (len(m.gets(A, PRODUCTS)), len(m.gets(B, PRODUCTS))) == (0, 1)
    # Once its backoff has run out, the first mirror is asked first again.
    m.trees[A].clear()
    m.clock.advance(max(TTL, DEFAULT_BASE_BACKOFF_SECONDS) + 1)
    m.run(Deferred.fromCoroutine(m.metadata.get(INDEX)))
    # The expired copy was served at once; its refresh runs behind it.
    m.settle()
    assert (len(m.gets(A, INDEX)), len(m.gets(B, INDEX))) == (2, 1)
    assert [s.down for s in m.mirrors.states()] == [False, False]


def test_the_catalogue_fails_when_every_mirror_fails(m: MirrorHarness) -> None:
    m.trees[A].status(INDEX, 500)
    m.trees[B].status(INDEX, 502)
    with pytest.raises(Exception):
        m.run(Deferred.fromCoroutine(m.metadata.get(INDEX)))
    assert m.health.offline


@implementer(IConsumer)
class _Follower:
    """A client following a download through L{FileProducer}: what it was sent, whether cut."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.cut = False
        self.disconnecting = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data

    def abortConnection(self) -> None:
        self.cut = True


def test_a_follower_of_wrong_bytes_from_one_mirror_never_gets_a_complete_wrong_body(
    m: MirrorHarness,
) -> None:
    """Mirror A sends wrong bytes of the right length; a client streams them (all but the
    last) while they arrive; B then sends the right file, which verifies. The client must
    not end up with A's bytes and B's last byte: its body is either the file or cut."""
    m.trees[A].corrupt(BROKEN)
    # A's bytes arrive in two goes, B answers once the client has had what A sent
    m.trees[A].hold(BROKEN)
    m.trees[B].stall(BROKEN, 0)
    item = m.item(BROKEN)
    download = m.fetcher.get("up", item)
    follower = _Follower()
    producer = FileProducer(download, follower, m.clock)
    done = collect(producer.done)
    m.run(m.trees[A].when_held(BROKEN))
    m.settle()
    assert follower.data
    m.trees[A].release(BROKEN)
    m.run(m.trees[B].when_held(BROKEN))
    m.settle()
    m.trees[B].release(BROKEN)
    for _ in range(200):
        m.settle(1)
        if done:
            break
    assert m.run(download.when_done()).getContent() == m.files[BROKEN]
    assert m.gets(B, BROKEN)
    assert done
    assert follower.cut or bytes(follower.data) == m.files[BROKEN], (
        f"a complete body of {len(follower.data)} bytes that is not the file"
    )


def test_the_first_request_after_every_mirror_recovers_gets_a_fresh_catalogue(
    m: MirrorHarness,
) -> None:
    """Issue 9's probe rule with mirrors and stale-while-revalidate: while the upstream is
    offline the expired copy is served at once, but the request that finds a mirror back waits
    for the refresh instead of being served the old copy once more."""
    first = m.run(Deferred.fromCoroutine(m.metadata.get(INDEX)))
    m.clock.advance(TTL + 1)
    for base in (A, B):
        m.trees[base].status(INDEX, 503)
    stale = m.run(Deferred.fromCoroutine(m.metadata.get(INDEX)))
    assert stale.checked_at == first.checked_at
    m.settle()
    assert m.health.offline and m.mirrors.all_down()
    for base in (A, B):
        m.trees[base].clear()
    m.clock.advance(DEFAULT_BASE_BACKOFF_SECONDS + 1)
    fresh = m.run(Deferred.fromCoroutine(m.metadata.get(INDEX)))
    assert fresh.checked_at == m.clock.seconds()
    assert not m.health.offline


def test_a_mirror_whose_outbound_proxy_refuses_connect_moves_to_the_next(
    m: MirrorHarness, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outbound proxy refuses the CONNECT to the first mirror (a squid ACL): as a
    connection failure of that mirror, the catalogue and the file come from the next one and
    the upstream stays online."""
    asked = m.client.get

    def refusing(url: str, headers: Any = None) -> Any:
        if url.startswith(A + "/"):
            return fail(OutboundProxyError(
                "the outbound proxy http://proxy.test:3128 refused CONNECT to upstream.test:443: "
                "403 Forbidden"
            ))
        return asked(url, headers)

    monkeypatch.setattr(m.client, "get", refusing)
    assert m.download(BROKEN).getContent() == m.files[BROKEN]
    assert m.gets(B, INDEX) and m.gets(B, BROKEN)
    assert [s.down for s in m.mirrors.states()] == [True, False]
    assert not m.health.offline
