"""
The fault suite's upstream: one small catalogue on disk, served by a L{TreeResource} in memory
(L{TreeHarness}) or over loopback TLS in front of a real proxy service (L{Loopback}).

The catalogue (L{tree_files}) has two products of one version each, a metadata file and a
160 kB rootfs apiece. The tree on disk also holds L{UNLISTED}, a file no catalogue names: the
proxy must never ask for it, whatever a client sends.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrs import define
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.resource import Resource

from proxy.blobs import BlobStore
from proxy.index import CacheIndex
from tests.helpers.certs import make_ca
from tests.helpers.invariants import Received, receive
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.upstream import RunningUpstream, TreeResource, start_https_upstream
from tests.helpers.wired import Harness, catalogue_tree, rootfs_path

PRODUCTS = "streams/v1/images.json"
OS1 = "testos:1.0:amd64:default"
OS2 = "otheros:2.0:amd64:default"
V1 = "20240101_0000"
# The file the cases break, and one they leave alone.
BROKEN = rootfs_path(OS1, V1)
OTHER = rootfs_path(OS2, V1)
# On disk upstream, named by no catalogue.
UNLISTED = "images/unlisted/secret.bin"
KiB = 1024
ROOTFS_BYTES = 160_000
# What the proxy's upstream is called on loopback: its URLs are /cache/PATH.
NAME = "cache"
# Bounds every wait on loopback; none is expected to come near it.
NET_TIMEOUT_SECONDS = 30.0


def tree_files() -> dict[str, bytes]:
    """The catalogue: the index, the products file and the four files it lists."""
    return catalogue_tree({PRODUCTS: {
        OS1: {V1: (b"m1" * 1000, bytes(range(256)) * (ROOTFS_BYTES // 256))},
        OS2: {V1: (b"m2" * 1000, b"r2" * (ROOTFS_BYTES // 2))},
    }})


def write_tree(root: Path, files: Mapping[str, bytes]) -> Path:
    """The files under C{root}, with L{UNLISTED} beside them."""
    for path, data in {**files, UNLISTED: b"not for anyone\n"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


class TreeHarness(Harness):
    """The wired proxy (L{Harness}) in front of a L{TreeResource} serving C{files} from disk."""

    def __init__(self, tmp_path: Path, files: dict[str, bytes]) -> None:
        self.tree = TreeResource(write_tree(tmp_path / "tree", files))
        super().__init__(tmp_path / "cache", files)
        # The clock exists once the harness does; the tree needs it only for rates.
        self.tree.clock = self.clock

    def origin(self) -> Resource:
        # The upstream's base URL is BASE_URL: its tree is served under /base/.
        root = Resource()
        root.putChild(b"base", self.tree)
        return root

    def receive(self, path: str) -> "Deferred[Received]":
        return Deferred.fromCoroutine(receive(self.get(path)))

    def drive(self, seconds: float, step: float) -> None:
        """Let C{seconds} of fake time pass in steps, the connections flushed at each."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.settle(5)


@define
class Loopback:
    """A proxy service listening on 127.0.0.1 in front of a loopback TLS L{TreeResource}."""

    reactor: Any
    files: dict[str, bytes]
    upstream: RunningUpstream
    proxy: RunningProxy
    client: HTTPClient
    pool: HTTPConnectionPool

    @property
    def tree(self) -> TreeResource:
        return self.upstream.resource

    @property
    def port(self) -> int:
        return self.proxy.port

    def url(self, path: str) -> str:
        return f"{self.proxy.url(NAME)}/{path}"

    async def get(self, path: str) -> Received:
        """One GET of C{/cache/PATH} on a connection of its own, read whole."""
        response = self.client.get(self.url(path), unbuffered=True)
        received: Deferred[Received] = Deferred.fromCoroutine(receive(response))
        return await received.addTimeout(NET_TIMEOUT_SECONDS, self.reactor)

    async def stop_proxy(self) -> None:
        """Stop the proxy (the index is closed); the upstream keeps running."""
        await self.pool.closeCachedConnections()
        await self.proxy.stop()

    async def stop(self) -> None:
        await self.pool.closeCachedConnections()
        if self.proxy.service.running:
            await self.proxy.stop()
        await self.upstream.stop()

    def open_cache(self) -> tuple[CacheIndex, BlobStore]:
        """The stopped proxy's index and blob store, for the invariants; close the index."""
        state = self.proxy.state_dir
        return CacheIndex(str(state / "index"), self.reactor), BlobStore(FilePath(str(state)))


async def start_loopback(
    reactor: Any, tmp_path: Path, *, cache: Mapping[str, Any] | None = None,
    state_dir: Path | None = None,
) -> Loopback:
    """
    Serve L{tree_files} over TLS on 127.0.0.1 and start a proxy in front of it, as upstream
    L{NAME}, with the extra C{[cache]} keys C{cache}. The caller must C{stop()} it.
    """
    files = tree_files()
    ca = make_ca()
    upstream = start_https_upstream(reactor, write_tree(tmp_path / "tree", files), ca)
    try:
        proxy = await start_proxy(
            reactor, state_dir or tmp_path / "state", {NAME: (upstream.url, ca.cert_pem)}, cache,
        )
    except BaseException:
        await upstream.stop()
        raise
    trust = trustRootFromCertificates([Certificate.loadPEM(proxy.cert_pem)])
    # One connection per request: a fault on one cannot leave another half-read.
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool))
    return Loopback(reactor, files, upstream, proxy, client, pool)
