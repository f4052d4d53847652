"""
Per-upstream allow-lists (C{[upstreams.NAME] allow}): a client outside an upstream's networks
gets 403 on its simplestreams face and URL import, and the LXD face lists, names and exports
none of its images to it (another upstream's image is simply not found); no such request
reaches the upstream.

Deterministic: the resource tree over in-memory connections whose peer address the test picks
(L{get}), and the faces wired as the service wires them (L{FaceHarness}, whose clients come
from 127.0.0.1) with the access the test gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address

from proxy.catalogue import Family, Image
from proxy.client_networks import ClientNetworks, UpstreamAccess
from proxy.config import ConfigError, load_config
from proxy.export import ExportPart
from proxy.images import FaceCatalogue, ImageSource, SimplestreamsImages
from proxy.lxd_face import LxdApiResource
from proxy.metrics import Metrics, face_of
from proxy.simplestreams import RootResource
from proxy.status import StatusSource
from proxy.urlimport import ImportResource
from tests.helpers.certs import make_ca
from tests.helpers.faces import (
    HOST_ARCH,
    SPLIT_ALIAS,
    SPLIT_OS,
    UNIFIED_ALIAS,
    V2,
    FaceHarness,
    assert_error,
)
from tests.helpers.root_requests import Upstream, get

LAN = "192.168.0.0/16"
V6_LAN = "fd00::/8"


# -- the configuration -----------------------------------------------------------------------


def test_config_takes_each_upstreams_networks(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        '[upstreams.a]\nurl = "https://a.example"\nallow = ["10.1.2.3/8", "fd00::/8", "192.0.2.1"]\n'
        '[upstreams.b]\nurl = "https://b.example"\n'
    )
    a, b = load_config(str(path)).upstreams
    assert a.allow == ("10.0.0.0/8", "fd00::/8", "192.0.2.1/32")
    assert b.allow == ()


def test_config_refuses_what_is_no_network(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[upstreams.a]\nurl = "https://a.example"\nallow = ["lan"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith('upstreams.a.allow: expected a network like "192.168.0.0/16"')


def test_access_by_upstream() -> None:
    access = UpstreamAccess.of({"lan": [LAN, V6_LAN], "open": []})
    assert access.permits("lan", "192.168.3.4") and access.permits("lan", "fd00::9")
    assert access.permits("lan", "::ffff:192.168.3.4")
    assert not access.permits("lan", "10.0.0.1") and not access.permits("lan", "2001:db8::1")
    # an upstream without networks of its own, or not named, serves everyone
    assert access.permits("open", "10.0.0.1") and access.permits("other", "10.0.0.1")
    assert access.usable("10.0.0.1", ["lan", "open"]) == {"open"}
    assert access.refusal("lan", "10.0.0.1") == (
        "10.0.0.1 is not in a network that may use upstream 'lan' (upstreams.lan.allow)"
    )


# -- the simplestreams face -------------------------------------------------------------------


def test_a_client_outside_an_upstreams_networks_gets_403_there_only() -> None:
    lan, public = Upstream(), Upstream()
    root = RootResource(
        {"lan": lan, "public": public}, "banner\n",
        clients=ClientNetworks.of(["0.0.0.0/0", "::/0"]),
        access=UpstreamAccess.of({"lan": [LAN, V6_LAN]}),
    )
    for peer in (IPv4Address("TCP", "10.0.0.7", 5000), IPv6Address("TCP", "2001:db8::7", 5000)):
        answer = get(root, b"/lan/streams/v1/index.json", peer)
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert f"{peer.host} is not in a network that may use upstream 'lan'".encode() in answer
        assert b"upstreams.lan.allow" in answer
        assert get(root, b"/public/streams/v1/index.json", peer).startswith(b"HTTP/1.1 200 ")
    assert (lan.reached, public.reached) == (0, 2)
    for peer in (IPv4Address("TCP", "192.168.1.20", 5000), IPv6Address("TCP", "fd00::20", 5000)):
        assert get(root, b"/lan/streams/v1/index.json", peer).startswith(b"HTTP/1.1 200 ")
    assert lan.reached == 2


def test_server_allow_still_decides_first() -> None:
    lan = Upstream()
    root = RootResource(
        {"lan": lan}, "banner\n", clients=ClientNetworks.of(["10.0.0.0/8"]),
        access=UpstreamAccess.of({"lan": [LAN]}),
    )
    # In the upstream's networks but not in the proxy's: the proxy's refusal.
    answer = get(root, b"/lan/x", IPv4Address("TCP", "192.168.1.20", 5000))
    assert answer.startswith(b"HTTP/1.1 403 ") and b"(server.allow)" in answer
    assert lan.reached == 0


# -- the LXD face and URL import --------------------------------------------------------------


class Renamed:
    """The images of another source under another upstream's name (a second listed upstream)."""

    def __init__(self, inner: ImageSource, name: str) -> None:
        self._inner = inner
        self.name = name
        self.asked = 0

    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def protocol(self) -> str:
        return self._inner.protocol

    async def images(self, family: Family) -> tuple[object, list[Image]]:
        self.asked += 1
        return await self._inner.images(family)

    async def missing_parts(self, image: Image) -> list[ExportPart]:
        return await self._inner.missing_parts(image)


def wire(h: FaceHarness, access: UpstreamAccess, *, mirror: bool = False) -> Renamed | None:
    """The faces of C{h} again, as CacheService.site wires them with C{access}."""
    up = SimplestreamsImages(h.metadata, h.files_of_cache, families=h.families)
    sources: list[Any] = [up]
    second = None
    if mirror:
        second = Renamed(up, "mirror")
        sources.append(second)
    others = {
        "1.0": LxdApiResource(
            FaceCatalogue(sources), h.files_of_cache, h.clock, h.certificate,
            host_arch=HOST_ARCH, agents=h.agents, access=access,
        ),
        "import": ImportResource({"up": up}, h.clock, host_arch=HOST_ARCH, access=access),
    }
    h.proxy = StubTreq(RootResource({"up": h.resource}, "banner\n", others, access=access))
    return second


@pytest.fixture
def h(tmp_path: Any) -> Any:
    harness = FaceHarness(tmp_path)
    yield harness
    harness.close()


def test_the_lxd_face_shows_a_client_nothing_of_an_upstream_it_may_not_use(h: FaceHarness) -> None:
    # The clients of these tests come from 127.0.0.1.
    wire(h, UpstreamAccess.of({"up": [LAN]}))
    before = len(h.upstream.requests)
    assert h.metadata_of("/1.0/images") == []
    assert h.metadata_of("/1.0/images?recursion=1") == []
    assert h.metadata_of("/1.0/images/aliases") == []
    image = h.image(SPLIT_OS, "amd64", V2)
    for path in (
        f"/1.0/images/{image.fingerprint}",
        f"/1.0/images/{image.fingerprint}/export",
        f"/1.0/images/aliases/{SPLIT_ALIAS.replace('/', '%2F')}",
    ):
        code, envelope, _ = h.lxd(path)
        assert_error(code, envelope, 404)
    # not even its catalogue was asked for
    assert len(h.upstream.requests) == before
    # The server itself still answers: an LXD client adding the remote must not fail.
    assert h.metadata_of("/1.0")["public"] is True


def test_the_lxd_face_lists_the_upstreams_a_client_may_use(h: FaceHarness) -> None:
    wire(h, UpstreamAccess.of({"up": ["127.0.0.0/8"]}))
    assert len(h.metadata_of("/1.0/images")) == len(h.listed())


def test_an_image_of_two_upstreams_comes_from_the_one_the_client_may_use(h: FaceHarness) -> None:
    mirror = wire(h, UpstreamAccess.of({"up": [LAN]}), mirror=True)
    assert mirror is not None
    assert len(h.metadata_of("/1.0/images")) == len(h.listed())
    names = {a["name"] for a in h.metadata_of("/1.0/images/aliases?recursion=1")}
    assert SPLIT_ALIAS in names and f"mirror/{SPLIT_ALIAS}" in names
    assert not any(name.startswith("up/") for name in names)
    asked = mirror.asked
    # A client that may use both gets the first listed upstream's names too.
    wire(h, UpstreamAccess(), mirror=True)
    names = {a["name"] for a in h.metadata_of("/1.0/images/aliases?recursion=1")}
    assert f"up/{SPLIT_ALIAS}" in names
    assert asked >= 1


def test_url_import_from_an_upstream_a_client_may_not_use_is_403(h: FaceHarness) -> None:
    wire(h, UpstreamAccess.of({"up": [V6_LAN]}))
    before = len(h.upstream.requests)
    code, body, _ = h.call("HEAD", f"/import/up/{UNIFIED_ALIAS}")
    assert code == 403
    code, body, _ = h.call("GET", f"/import/up/{UNIFIED_ALIAS}")
    assert code == 403 and b"upstreams.up.allow" in body
    code, body, _ = h.call("GET", "/up/streams/v1/index.json")
    assert code == 403
    assert len(h.upstream.requests) == before


# -- the set-up script -------------------------------------------------------------------------


def test_the_setup_script_offers_only_the_remotes_a_client_may_use(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f'[cache]\ndir = "{tmp_path}"\n'
        '[upstreams.lan]\nurl = "https://a.example"\nallow = ["192.168.0.0/16"]\n'
        '[upstreams.public]\nurl = "https://b.example"\n'
    )
    config = load_config(str(path))
    source = StatusSource(
        config, None, None, {}, None, None, None, None,  # type: ignore[arg-type]
        lambda: (make_ca().cert_pem.decode("ascii"), "ab" * 32),
    )
    for client, remotes in (("10.0.0.1", ("public",)), ("192.168.0.9", ("lan", "public")),
                            ("", ("lan", "public"))):
        setup = source.setup("proxy.lan", 8443, client)
        assert setup is not None and setup.remotes == remotes, client


def test_refusals_are_counted_as_the_faces_403s() -> None:
    metrics = Metrics()
    lan = Upstream()
    root = RootResource(
        {"lan": lan}, "banner\n", access=UpstreamAccess.of({"lan": [LAN]}),
        observe=lambda segment, request: metrics.observe_request(face_of(segment, {"lan"}), request),
    )
    get(root, b"/lan/streams/v1/index.json", IPv4Address("TCP", "10.0.0.7", 5000))
    assert metrics.registry.get_sample_value(
        "lxd_image_proxy_requests_total", {"face": "simplestreams", "method": "GET", "status": "403"}
    ) == 1
