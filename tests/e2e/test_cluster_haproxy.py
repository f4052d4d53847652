"""
A sharded cluster behind a real HAProxy, on loopback (issue 13, points 2 and 3).

Three proxy processes (four for the join) behind C{haproxy -db} running the shipped
C{conf/haproxy.cfg} (rewritten to loopback addresses by L{tests.helpers.haproxy}): TLS from the
clients to HAProxy (the clients trust HAProxy's certificate only), TLS again to the nodes,
verified against the nodes' CA, health checks on each node's C{/readyz} (metrics listener),
routing by a consistent hash of the path. Every node lists every node in C{[cluster] peers}
(itself included, as one list for all is deployed), trusted through C{[cluster] ca_file}.

Each client checks what it got as a careful client does: status, Content-Length and sha256,
and retries with a new request (as LXD's refresh would) when a body is cut off; a body that
looks complete and is wrong fails the test at once.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
import treq
from attrs import define, field
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from proxy.blobs import BlobStore
from proxy.peers import PEER_WAIT_SECONDS
from tests.helpers.certs import CA, make_ca
from tests.helpers.haproxy import HAProxy, Node, free_ports, loopback_config
from tests.helpers.invariants import Received, receive
from tests.helpers.proxy_process import ProxyProcess
from tests.helpers.upstream import RunningUpstream, Throttle, start_https_upstream
from tests.helpers.wired import INDEX, catalogue_tree, meta_path, rootfs_path

reactor: Any = _reactor

PRODUCTS = "streams/v1/images.json"
NAME = "cache"
V1 = "20240101_0000"
PRODUCT_IDS = [f"os{i}:1.0:amd64:default" for i in range(8)]
ROOTFS_BYTES = 1024 * 1024
# About 1.3 s per rootfs: long enough to kill a node in the middle of its downloads.
PACE = Throttle(16 * 1024, 0.02)
CLIENTS_PER_FILE = 2
ATTEMPTS = 20
RETRY_SECONDS = 0.2
NET_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.05
POLLS = int(NET_TIMEOUT_SECONDS / POLL_SECONDS)


def tree() -> dict[str, bytes]:
    return catalogue_tree({PRODUCTS: {
        pid: {V1: (f"meta of {pid}\n".encode() * 100, bytes([i + 1]) * ROOTFS_BYTES)}
        for i, pid in enumerate(PRODUCT_IDS)
    }})


def files_of(products: Iterable[str]) -> list[str]:
    return [p for pid in products for p in (meta_path(pid, V1), rootfs_path(pid, V1))]


# The first eight files fill the pool; the other eight are fetched cold in the second phase.
FIRST = files_of(PRODUCT_IDS[:4])
SECOND = files_of(PRODUCT_IDS[4:])


async def until(condition: Any, what: str) -> None:
    for _ in range(POLLS):
        if condition():
            return
        await deferLater(reactor, POLL_SECONDS, lambda: None)
    raise AssertionError(f"timed out waiting until {what}")


@define
class ClusterNode:
    name: str
    dir: Path
    port: int
    metrics_port: int
    process: ProxyProcess

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def tls_name(self) -> str:
        return f"{self.name}.test"

    def holds(self, data: bytes) -> bool:
        return BlobStore(FilePath(str(self.dir / "state"))).exists(hashlib.sha256(data).hexdigest())

    def log(self) -> str:
        return self.process.log.read_text() if self.process.log.exists() else ""

    def fetching(self, upstream: RunningUpstream, path: str) -> bool:
        return f"fetching {upstream.url}/{path} " in self.log()

    def haproxy_node(self) -> Node:
        return Node(self.name, self.port, self.metrics_port, self.tls_name)


@define
class Cluster:
    tmp: Path
    upstream: RunningUpstream
    files: dict[str, bytes]
    nodes_ca: CA
    front_ca: CA
    nodes: list[ClusterNode] = field(factory=list)
    haproxy: HAProxy | None = None
    front_port: int = 0
    client: HTTPClient | None = None
    pool: HTTPConnectionPool | None = None
    wrong: list[str] = field(factory=list)
    # The CA of the upstream's certificate, for the nodes' [upstreams] ca_file.
    upstream_ca_pem: bytes = b""

    def configure(self, count: int, extra_peers: Iterable[str] = ()) -> None:
        """Write the configurations of C{count} nodes, each listing every node as a peer."""
        ports = free_ports(2 * count + 1)
        self.front_port = ports[-1]
        (self.tmp / "nodes-ca.pem").write_bytes(self.nodes_ca.cert_pem)
        for i in range(count):
            name = f"node{i + 1}"
            directory = self.tmp / name
            directory.mkdir(parents=True)
            node = ClusterNode(
                name, directory, ports[2 * i], ports[2 * i + 1],
                ProxyProcess(directory / "proxy.toml"),
            )
            self.nodes.append(node)
        urls = [n.url for n in self.nodes] + list(extra_peers)
        for node in self.nodes:
            cert, key = self.nodes_ca.issue(["localhost", node.tls_name])
            (node.dir / "node.crt").write_bytes(cert)
            (node.dir / "node.key").write_bytes(key)
            (node.dir / "upstream-ca.pem").write_bytes(self.upstream_ca_pem)
            peers = ", ".join(f'"{u}"' for u in urls)
            node.process.config.write_text(f"""
[server]
listen = ["127.0.0.1:{node.port}"]
tls_cert = "node.crt"
tls_key = "node.key"
port_file = "port"
workers = 1

[metrics]
listen = ["127.0.0.1:{node.metrics_port}"]

[cache]
dir = "state"
download_idle_timeout = "20s"

[upstreams.{NAME}]
url = "{self.upstream.url}"
ca_file = "upstream-ca.pem"

[cluster]
peers = [{peers}]
ca_file = "{self.tmp / 'nodes-ca.pem'}"
""")

    async def start_node(self, node: ClusterNode) -> None:
        port = await node.process.start()
        assert port == node.port

    async def start_haproxy(self, nodes: list[ClusterNode]) -> None:
        crt = self.tmp / "haproxy.pem"
        cert, key = self.front_ca.issue(["localhost"])
        crt.write_bytes(cert + key)
        self.haproxy = HAProxy(self.tmp / "haproxy")
        text = loopback_config(
            self.front_port, crt, self.tmp / "nodes-ca.pem", [n.haproxy_node() for n in nodes],
        )
        await self.haproxy.start(text, self.front_port)
        if self.client is None:
            # One connection per request, as separate LXD hosts would have.
            self.pool = HTTPConnectionPool(reactor, persistent=False)
            self.client = HTTPClient(Agent(
                reactor, contextFactory=BrowserLikePolicyForHTTPS(self.front_ca.trust_root()),
                pool=self.pool,
            ))

    def url(self, path: str) -> str:
        return f"https://localhost:{self.front_port}/{NAME}/{path}"

    async def get_once(self, path: str) -> Received:
        assert self.client is not None
        d: Deferred[Received] = Deferred.fromCoroutine(
            receive(self.client.get(self.url(path), unbuffered=True))
        )
        return await d.addTimeout(NET_TIMEOUT_SECONDS, reactor)

    async def fetch(self, path: str) -> int:
        """
        GET C{path} through HAProxy until a whole, right body came (at most L{ATTEMPTS});
        returns the attempts it took. A complete-looking wrong body is recorded at once.
        """
        expected = self.files[path]
        for attempt in range(1, ATTEMPTS + 1):
            got = await self.get_once(path)
            looks_whole = got.code == 200 and got.complete
            if looks_whole:
                if got.length != len(got.body) or got.body != expected:
                    self.wrong.append(f"{path}: {got.describe()}, sha256 {hashlib.sha256(got.body).hexdigest()}")
                    return attempt
                return attempt
            await deferLater(reactor, RETRY_SECONDS, lambda: None)
        raise AssertionError(f"{path}: no whole body in {ATTEMPTS} attempts")

    async def metadata(self) -> None:
        for path in (INDEX, PRODUCTS):
            got = await self.get_once(path)
            assert got.code == 200 and got.body == self.files[path], got.describe()

    async def clients(self, paths: list[str]) -> list[int]:
        """L{CLIENTS_PER_FILE} clients per path at once; the attempts each took."""
        await self.metadata()
        runs = [Deferred.fromCoroutine(self.fetch(p)) for p in paths for _ in range(CLIENTS_PER_FILE)]
        attempts: list[int] = await gatherResults(runs, consumeErrors=True)
        assert self.wrong == [], self.wrong
        return attempts

    def gets(self, path: str) -> int:
        return self.upstream.resource.count(path)

    def holders(self, path: str, nodes: Iterable[ClusterNode] | None = None) -> list[str]:
        data = self.files[path]
        return [n.name for n in (self.nodes if nodes is None else nodes) if n.holds(data)]

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.closeCachedConnections()
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes:
            node.process.kill()
        await self.upstream.stop()


async def cluster(tmp_path: Path, count: int, extra_peers: Iterable[str] = ()) -> Cluster:
    files = tree()
    root = tmp_path / "tree"
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    ca = make_ca()
    upstream = start_https_upstream(reactor, root, ca)
    made = Cluster(tmp_path, upstream, files, make_ca("nodes CA"), make_ca("front CA"))
    made.upstream_ca_pem = ca.cert_pem
    made.configure(count, extra_peers)
    return made


def metric(node: ClusterNode, text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"lxd_image_proxy_(\w+)_total\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == wanted:
            return float(m.group(3))
    return 0.0


async def metrics_of(node: ClusterNode) -> str:
    response = await treq.get(f"http://127.0.0.1:{node.metrics_port}/metrics")
    text: str = (await treq.content(response)).decode()
    return text


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_three_nodes_behind_haproxy_and_one_killed_mid_run(tmp_path: Path) -> None:
    site = await cluster(tmp_path, 3)
    try:
        for node in site.nodes:
            await site.start_node(node)
        await site.start_haproxy(site.nodes)

        # 16 clients, 8 files: each fetched upstream once and stored on exactly one node.
        attempts = await site.clients(FIRST)
        assert attempts == [1] * len(attempts)
        for path in FIRST:
            assert site.gets(path) == 1, path
            assert len(site.holders(path)) == 1, (path, site.holders(path))
        # Every node holds a share (the hash spreads 8 paths over 3 nodes).
        assert all(any(n.holds(site.files[p]) for p in FIRST) for n in site.nodes)

        # Eight more files, cold, paced upstream; the node fetching a rootfs is killed in
        # the middle of it while its clients stream.
        site.upstream.resource.throttle = PACE
        run: Deferred[list[int]] = Deferred.fromCoroutine(site.clients(SECOND))
        roots = [p for p in SECOND if p.endswith("rootfs.squashfs")]
        sent = site.upstream.resource.sent

        def half_way() -> list[ClusterNode]:
            return [
                n for n in site.nodes for p in roots
                if n.fetching(site.upstream, p) and ROOTFS_BYTES // 4 <= sent.get(p, 0) < ROOTFS_BYTES // 2
            ]

        await until(lambda: bool(half_way()), "a node is half way through a rootfs")
        victim = half_way()[0]
        killed_mid_way = [p for p in SECOND if victim.fetching(site.upstream, p) and not victim.holds(site.files[p])]
        victim.process.kill()
        attempts = await run
        # Its clients were cut off and retried; nobody took a wrong body for a whole one.
        assert max(attempts) > 1
        survivors = [n for n in site.nodes if n is not victim]
        assert killed_mid_way
        for path in SECOND:
            holders = site.holders(path)
            assert len(holders) == 1, (path, holders)
            if path in killed_mid_way:
                # Fetched once by the victim (cut off), once by the node that took it over.
                assert site.gets(path) == 2, path
                assert holders[0] != victim.name
            else:
                assert site.gets(path) == 1, path
        # The survivors asked their peers first: the dead one refused, the other had nothing.
        texts = [await metrics_of(n) for n in survivors]
        assert sum(metric(n, t, "peer_fills", upstream=NAME, source="peer") for n, t in zip(survivors, texts)) == 0
        assert sum(metric(n, t, "peer_requests", result="miss") for n, t in zip(survivors, texts)) > 0
    finally:
        await site.stop()


class _Silent(Protocol):
    """Accepts a connection and never says a word: a hanging peer."""


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_fourth_node_joins_and_fills_from_its_peers(tmp_path: Path) -> None:
    dead, = free_ports(1)
    hanging = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
    hanging_url = f"https://localhost:{hanging.getHost().port}"
    site = await cluster(tmp_path, 4, [f"https://localhost:{dead}", hanging_url])
    try:
        first_three, fourth = site.nodes[:3], site.nodes[3]
        for node in first_three:
            await site.start_node(node)
        await site.start_haproxy(first_three)
        await site.clients(FIRST)
        before = {p: site.gets(p) for p in FIRST}
        assert set(before.values()) == {1}

        # The fourth node joins: HAProxy's configuration is regenerated with four servers.
        await site.start_node(fourth)
        assert site.haproxy is not None
        site.haproxy.stop()
        await site.start_haproxy(site.nodes)
        await site.clients(FIRST)
        moved = [p for p in FIRST if fourth.holds(site.files[p])]
        # The hash moved some of the files to it, and each came from a peer, not upstream.
        assert moved, "no file is hashed to the fourth node"
        assert {p: site.gets(p) for p in FIRST} == before
        text = await metrics_of(fourth)
        assert metric(fourth, text, "peer_fills", upstream=NAME, source="peer") == len(moved)
        assert metric(fourth, text, "peer_fills", upstream=NAME, source="upstream") == 0

        # A file no peer holds: the dead peer refuses, the hanging one is given up on after
        # PEER_WAIT_SECONDS, and the upstream is asked.
        path = SECOND[0]
        pool = HTTPConnectionPool(reactor, persistent=False)
        direct = HTTPClient(Agent(
            reactor, contextFactory=BrowserLikePolicyForHTTPS(site.nodes_ca.trust_root()), pool=pool,
        ))
        start = time.monotonic()
        response = await direct.get(
            f"https://localhost:{fourth.port}/{NAME}/{path}", unbuffered=True,
        ).addTimeout(NET_TIMEOUT_SECONDS, reactor)
        body = await treq.content(response)
        elapsed = time.monotonic() - start
        assert (response.code, body) == (200, site.files[path])
        assert site.gets(path) == 1
        assert PEER_WAIT_SECONDS * 0.9 <= elapsed < PEER_WAIT_SECONDS + 2.0, elapsed
    finally:
        await site.stop()
        await hanging.stopListening()
