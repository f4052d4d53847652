"""
Client families through the simplestreams face: an upstream that answers LXD and Incus clients
with different catalogues (as images.linuxcontainers.org does, by User-Agent) has each family's
catalogue fetched with a User-Agent of that family, kept apart, and served to that family.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.web.server import Request

from proxy.agents import DEFAULT_AGENTS, ClientAgents
from proxy.catalogue import Family
from proxy.config import UpstreamConfig
from proxy.downloads import Fetcher
from proxy.metadata import UpstreamMetadata
from proxy.files import CacheFiles
from proxy.simplestreams import RootResource, UpstreamResource
from tests.helpers.harness import CacheHarness, Closing
from tests.helpers.scripted import BASE_URL, META_PATH, ROOTFS_PATH, ScriptedUpstream, sha, simple_tree

TTL = 300.0
LXD_AGENT = b"LXD 5.0.2 (Linux; x86_64; 6.1.0; Debian; 12) (cookiejar)"
INCUS_AGENT = b"Incus 6.0.0 (Linux; x86_64; 6.1.0; Debian; 12)"
PRODUCTS = "streams/v1/images.json"
INCUS_ONLY = "images/incusos/1/amd64/default/20240101_0000/incus.tar.xz"


def incus_products(files: dict[str, bytes]) -> bytes:
    """The Incus catalogue: the LXD one plus a product only Incus clients are shown."""
    doc = json.loads(files[PRODUCTS])
    data = files[INCUS_ONLY]
    doc["products"]["incusos:1:amd64:default"] = {
        "aliases": "incusos/1", "arch": "amd64", "os": "incusos", "release": "1",
        "release_title": "1",
        "versions": {"20240101_0000": {"items": {
            "incus.tar.xz": {"ftype": "incus_combined.tar.gz", "path": INCUS_ONLY,
                             "size": len(data), "sha256": sha(data)},
        }}},
    }
    return json.dumps(doc).encode()


class Harness(CacheHarness):
    def __init__(self, tmp_path: Any) -> None:
        self.files = simple_tree()
        self.files[INCUS_ONLY] = b"I" * 1000
        self.upstream = ScriptedUpstream(self.files)
        self.agents_seen: list[tuple[str, bytes]] = []
        self.upstream.override[PRODUCTS] = self._products
        super().__init__(tmp_path, self.upstream, BASE_URL)
        self.fetcher = Fetcher(
            self.client, self.store, self.index, self.clock, [UpstreamConfig("up", BASE_URL)], 60
        )
        self.agents = ClientAgents()
        families: dict[Family, UpstreamMetadata] = {
            family: UpstreamMetadata(
                "up", BASE_URL, self.client, self.store, self.index, self.clock,
                ttl=TTL, idle_timeout=60, family=family, agents=self.agents,
            )
            for family in ("lxd", "incus")
        }
        self.families = families
        resource = UpstreamResource(
            families["lxd"], CacheFiles(self.store, self.index, self.fetcher, self.clock),
            self.store, self.clock, families=families, agents=self.agents,
        )
        self.proxy = StubTreq(RootResource({"up": resource}, "banner\n"))

    def _products(self, request: Request) -> bytes:
        agent = request.getHeader(b"User-Agent") or b""
        self.agents_seen.append((PRODUCTS, agent))
        request.setHeader(b"Content-Type", b"application/json")
        if agent.startswith(b"Incus"):
            return incus_products(self.files)
        return self.files[PRODUCTS]

    def fetch_as(self, path: str, agent: bytes) -> tuple[int, bytes]:
        """GET through the proxy as a client sending C{agent}: status and body."""
        code, body, _ = self.fetch(path, headers={b"User-Agent": [agent]})
        return code, body


@pytest.fixture
def h(tmp_path: Any, closing: Closing) -> Harness:
    return closing(Harness(tmp_path))


def test_each_family_gets_its_own_catalogue_fetched_with_its_own_agent(h: Harness) -> None:
    code, lxd_body = h.fetch_as(PRODUCTS, LXD_AGENT)
    assert code == 200 and lxd_body == h.files[PRODUCTS]
    code, incus_body = h.fetch_as(PRODUCTS, INCUS_AGENT)
    assert code == 200 and incus_body == incus_products(h.files)
    # Each refresh went out with the User-Agent of a client of that family.
    assert h.agents_seen == [(PRODUCTS, LXD_AGENT), (PRODUCTS, INCUS_AGENT)]
    # Within the TTL each family is served its own copy, without asking again.
    assert h.fetch_as(PRODUCTS, LXD_AGENT)[1] == lxd_body
    assert h.fetch_as(PRODUCTS, INCUS_AGENT)[1] == incus_body
    assert len(h.agents_seen) == 2


def test_a_family_no_client_came_from_is_refreshed_with_a_stand_in(h: Harness) -> None:
    h.fetch_as("streams/v1/index.json", INCUS_AGENT)
    # The LXD catalogue, read before any LXD client came (as the prefetcher does).
    meta = h.families["lxd"]
    h.run(Deferred.fromCoroutine(meta.get(PRODUCTS)), rounds=100)
    assert h.agents_seen == [(PRODUCTS, DEFAULT_AGENTS["lxd"])]


def test_files_are_shared_whichever_catalogue_lists_them(h: Harness) -> None:
    h.fetch_as(PRODUCTS, LXD_AGENT)
    h.fetch_as(PRODUCTS, INCUS_AGENT)
    # Listed in both: fetched once, a hit for the other family.
    assert h.fetch_as(ROOTFS_PATH, INCUS_AGENT) == (200, h.files[ROOTFS_PATH])
    assert h.fetch_as(ROOTFS_PATH, LXD_AGENT) == (200, h.files[ROOTFS_PATH])
    assert h.upstream.paths_requested(ROOTFS_PATH) == 1
    # Listed in the Incus catalogue only: found there for any client once that copy is held.
    assert h.fetch_as(INCUS_ONLY, LXD_AGENT) == (200, h.files[INCUS_ONLY])
    assert h.fetch_as(META_PATH, INCUS_AGENT)[0] == 200


def test_an_unknown_client_is_served_the_lxd_catalogue(h: Harness) -> None:
    assert h.fetch_as(PRODUCTS, b"curl/8.0")[1] == h.files[PRODUCTS]
    # A client that is neither is not forwarded as the LXD family's agent.
    assert h.agents_seen == [(PRODUCTS, DEFAULT_AGENTS["lxd"])]
