"""
Peer fill ([cluster] peers, issue 13 point 3), in memory under a Clock: two wired nodes, the
second's peer get going to the first's resource tree through its own C{StubTreq}.

A peer answers a cached-only request from its store or with a 504, never going upstream; a
miss is copied from the peer that holds it, verified as any download; a peer that is down or
hangs costs at most L{PEER_WAIT_SECONDS} before the upstream is asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET, Request

from proxy.config import ConfigError, parse_config
from proxy.metrics import Metrics
from proxy.peers import NODE_HEADER, PEER_WAIT_SECONDS, PeerGet, Peers
from tests.faults.upstreams import BROKEN, OTHER, PRODUCTS, tree_files
from tests.helpers.harness import Closing, collect
from tests.helpers.scripted import sha
from tests.helpers.wired import INDEX, Harness

CACHED_ONLY = {b"Cache-Control": [b"only-if-cached"]}


class Node(Harness):
    """A wired node whose settling also drives the nodes it asks (their own clocks)."""

    def __init__(self, tmp_path: Path, files: dict[str, bytes], node_id: str) -> None:
        super().__init__(tmp_path, files, metrics=Metrics())
        self.files_of_cache.node_id = node_id
        self.others: list[Harness] = []

    def join(self, get: PeerGet, urls: Iterable[str], *, others: Iterable[Harness] = ()) -> Peers:
        peers = Peers(urls, get, self.clock, self.files_of_cache.node_id)
        self.fetcher._peers = peers
        self.others.extend(others)
        return peers

    def settle(self, rounds: int | None = None) -> None:
        for _ in range(self.settle_rounds if rounds is None else rounds):
            for node in (self, *self.others):
                node.clock.advance(0)
                for connection in node.connections():
                    connection.flush()

    def catalogue(self) -> None:
        for path in (INDEX, PRODUCTS):
            assert self.fetch(path)[0] == 200


def via(node: Harness) -> PeerGet:
    """A peer get answered by C{node}'s resource tree."""

    def get(url: str, headers: Mapping[bytes, bytes]) -> "Deferred[IResponse]":
        d: Deferred[IResponse] = node.proxy.get(
            url, headers={k: [v] for k, v in headers.items()}, unbuffered=True,
        )
        return d

    return get


def ask_each(routes: Mapping[str, PeerGet]) -> PeerGet:
    def get(url: str, headers: Mapping[bytes, bytes]) -> "Deferred[IResponse]":
        for base, route in routes.items():
            if url.startswith(base + "/"):
                return route(url, headers)
        raise AssertionError(f"no route to {url}")

    return get


def down(url: str, headers: Mapping[bytes, bytes]) -> "Deferred[IResponse]":
    return fail(ConnectionRefusedError("peer down"))


class Hanging:
    def __init__(self) -> None:
        self.asked: list[Deferred[IResponse]] = []

    def __call__(self, url: str, headers: Mapping[bytes, bytes]) -> "Deferred[IResponse]":
        d: Deferred[IResponse] = Deferred()
        self.asked.append(d)
        return d


@pytest.fixture
def files() -> dict[str, bytes]:
    return tree_files()


@pytest.fixture
def holder(tmp_path: Path, files: dict[str, bytes], closing: Closing) -> Node:
    return closing(Node(tmp_path / "holder", files, "holder"))


@pytest.fixture
def joiner(tmp_path: Path, files: dict[str, bytes], closing: Closing) -> Node:
    return closing(Node(tmp_path / "joiner", files, "joiner"))


def count(node: Node, name: str, **labels: str) -> float:
    value = node.metrics.registry.get_sample_value(f"lxd_image_proxy_{name}_total", labels)
    return value or 0.0


# -- the peer's side -----------------------------------------------------------------------


def test_a_cached_only_miss_is_a_504_that_fetches_nothing(holder: Node, files: dict[str, bytes]) -> None:
    holder.catalogue()
    before = holder.upstream_gets()
    code, _, response = holder.fetch(BROKEN, headers=CACHED_ONLY)
    assert code == 504
    assert response.headers.getRawHeaders(NODE_HEADER) == [b"holder"]
    assert holder.upstream_gets() == before
    assert holder.fetcher.in_flight() == {}
    assert count(holder, "peer_requests", result="miss") == 1


def test_a_cached_only_request_never_joins_a_download_in_flight(holder: Node, files: dict[str, bytes]) -> None:
    holder.catalogue()
    held: list[Request] = []

    def hold(request: Request) -> Any:
        held.append(request)
        return NOT_DONE_YET

    holder.upstream.override[BROKEN] = hold
    client = collect(holder.get(BROKEN))
    holder.settle(5)
    assert len(held) == 1 and holder.fetcher.in_flight()
    code, _, _ = holder.fetch(BROKEN, headers=CACHED_ONLY)
    assert code == 504
    assert count(holder, "download_joins", upstream="up") == 0
    # The client's download goes on as before.
    data = files[BROKEN]
    held[0].setHeader(b"Content-Length", b"%d" % len(data))
    held[0].write(data)
    held[0].finish()
    holder.settle()
    assert client and client[0].code == 200
    assert holder.upstream_gets(BROKEN) == 1


def test_a_cached_only_hit_is_served_from_the_store_without_a_catalogue(
    holder: Node, files: dict[str, bytes],
) -> None:
    holder.seed_file(BROKEN)
    code, body, response = holder.fetch(BROKEN, headers=CACHED_ONLY)
    assert (code, body) == (200, files[BROKEN])
    assert response.headers.getRawHeaders(NODE_HEADER) == [b"holder"]
    # Not even the catalogue was asked for.
    assert holder.upstream_gets() == 0
    assert count(holder, "peer_requests", result="hit") == 1


# -- the asking node's side ----------------------------------------------------------------


def test_a_miss_is_copied_from_the_peer_that_holds_it(
    holder: Node, joiner: Node, files: dict[str, bytes],
) -> None:
    holder.seed_file(BROKEN)
    # One list for every node: this one's own URL is in it too.
    peers = joiner.join(ask_each({"https://holder.lan": via(holder), "https://joiner.lan": via(joiner)}),
                        ["https://holder.lan", "https://joiner.lan"], others=[holder])
    joiner.catalogue()
    # Two clients at once: one copy.
    first, second = collect(joiner.get(BROKEN)), collect(joiner.get(BROKEN))
    code, body, _ = joiner.fetch(BROKEN)
    assert (code, body) == (200, files[BROKEN])
    assert first and second
    assert joiner.upstream_gets(BROKEN) == 0
    assert holder.upstream_gets() == 0
    assert joiner.store.exists(sha(files[BROKEN]))
    assert count(joiner, "peer_fills", upstream="up", source="peer") == 1
    assert count(holder, "peer_requests", result="hit") == 1
    # A file no peer holds goes upstream, once.
    code, body, _ = joiner.fetch(OTHER)
    assert (code, body) == (200, files[OTHER])
    assert joiner.upstream_gets(OTHER) == 1
    assert count(joiner, "peer_fills", upstream="up", source="upstream") == 1
    assert peers.asked() == ("https://holder.lan",)
    assert count(holder, "peer_requests", result="miss") == 1


def test_a_peer_with_wrong_bytes_is_not_believed(
    holder: Node, joiner: Node, files: dict[str, bytes],
) -> None:
    # The holder's blob under the right name has the wrong bytes (a disk that lied).
    good = files[BROKEN]
    holder.seed_file(BROKEN)
    holder.store.path_for(sha(good)).setContent(b"x" * len(good))
    joiner.join(via(holder), ["https://holder.lan"], others=[holder])
    joiner.catalogue()
    code, body, _ = joiner.fetch(BROKEN)
    assert (code, body) == (200, good)
    assert joiner.upstream_gets(BROKEN) == 1
    assert joiner.store.path_for(sha(good)).getContent() == good
    assert count(joiner, "peer_fills", upstream="up", source="peer") == 1
    assert count(joiner, "verification_failures", upstream="up") == 0


def test_a_down_and_a_hanging_peer_cost_one_second_before_the_upstream(
    joiner: Node, files: dict[str, bytes],
) -> None:
    hanging = Hanging()
    joiner.join(ask_each({"https://down.lan": down, "https://hangs.lan": hanging}),
                ["https://down.lan", "https://hangs.lan"])
    joiner.catalogue()
    start = joiner.clock.seconds()
    client = collect(joiner.get(BROKEN))
    joiner.settle()
    assert joiner.upstream_gets(BROKEN) == 0 and len(hanging.asked) == 1
    joiner.clock.advance(PEER_WAIT_SECONDS - 0.001)
    joiner.settle()
    assert joiner.upstream_gets(BROKEN) == 0
    joiner.clock.advance(0.001)
    joiner.settle()
    assert joiner.upstream_gets(BROKEN) == 1
    assert joiner.clock.seconds() - start <= PEER_WAIT_SECONDS
    joiner.settle()
    assert client and client[0].code == 200
    # The hanging question was given up, not left open.
    assert hanging.asked[0].called


def test_find_gives_up_after_the_wait_and_drops_nothing_open() -> None:
    clock = Clock()
    hanging = Hanging()
    peers = Peers(["https://a.lan", "https://b.lan"], ask_each(
        {"https://a.lan": down, "https://b.lan": hanging}), clock, "me")
    result = collect(peers.find("up", "x/y"))
    assert not result
    clock.advance(PEER_WAIT_SECONDS)
    assert result == [None]
    assert hanging.asked[0].called


def test_this_nodes_own_url_is_recognised_and_left_out(joiner: Node, files: dict[str, bytes]) -> None:
    peers = joiner.join(via(joiner), ["https://self.lan"])
    joiner.catalogue()
    code, body, _ = joiner.fetch(BROKEN)
    assert (code, body) == (200, files[BROKEN])
    assert peers.own == {"https://self.lan"}
    assert peers.asked() == ()
    assert count(joiner, "peer_requests", result="miss") == 1
    code, _, _ = joiner.fetch(OTHER)
    assert code == 200
    assert count(joiner, "peer_requests", result="miss") == 1


# -- configuration -------------------------------------------------------------------------


def config(cluster: Any, tmp_path: Path) -> Any:
    return parse_config({"cache": {"dir": str(tmp_path)}, "cluster": cluster}, str(tmp_path))


def test_cluster_keys(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    from tests.helpers.certs import make_ca
    ca.write_bytes(make_ca().cert_pem)
    parsed = config({"peers": ["https://node2.lan:8443/", "https://node3.lan:8443"],
                     "ca_file": "ca.pem"}, tmp_path).cluster
    assert parsed.peers == ("https://node2.lan:8443", "https://node3.lan:8443")
    assert parsed.ca_file == str(ca)
    assert config({}, tmp_path).cluster.peers == ()


@pytest.mark.parametrize("cluster, message", [
    ({"peers": ["http://node2.lan"]}, "cluster.peers: expected an https:// URL"),
    ({"peers": ["https://node2.lan/base"]}, "has a path"),
    ({"peers": ["https://a.lan", "https://a.lan/"]}, "listed twice"),
    ({"peers": "https://a.lan"}, "cluster.peers"),
    ({"ca_file": "missing.pem"}, "cluster.ca_file"),
    ({"peer": []}, "cluster.peer: unknown key"),
])
def test_cluster_key_errors(tmp_path: Path, cluster: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config(cluster, tmp_path)


def test_a_probe_answered_by_a_peer_lets_the_next_miss_probe(
    holder: Node, joiner: Node, files: dict[str, bytes],
) -> None:
    holder.seed_file(BROKEN)
    holder.seed_file(OTHER)
    joiner.join(via(holder), ["https://holder.lan"], others=[holder])
    joiner.catalogue()
    joiner.health.record_failure("connection refused", True)
    joiner.clock.advance(joiner.health.retry_after() + 1)
    for path in (BROKEN, OTHER):
        code, body, _ = joiner.fetch(path)
        assert (code, body) == (200, files[path]), path
    assert joiner.upstream_gets(BROKEN) + joiner.upstream_gets(OTHER) == 0
