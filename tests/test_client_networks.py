"""Tests for [server] allow: which clients may use the proxy."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.static import Data

from proxy.client_networks import ClientNetworks
from proxy.config import ConfigError, load_config
from proxy.simplestreams import RootResource
from tests.helpers.root_requests import Upstream, get


@pytest.mark.parametrize(("host", "permitted"), [
    ("192.168.7.9", True),
    ("10.1.2.3", True),
    ("10.2.0.1", False),
    ("::ffff:192.168.0.1", True),
    ("fd00::5", True),
    ("fe80::1%eth0", False),
    ("2001:db8::1", False),
    ("not an address", False),
])
def test_networks_permit_their_clients_only(host: str, permitted: bool) -> None:
    networks = ClientNetworks.of(["192.168.0.0/16", "10.1.2.3", "fd00::/8"])
    assert networks.permits(host) is permitted


def test_no_networks_permit_everyone() -> None:
    assert ClientNetworks().permits("203.0.113.9")
    assert ClientNetworks().permits("")


def test_config_takes_cidr_and_single_addresses(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[server]\nallow = ["10.1.2.3/8", "fd00::/8", "192.0.2.1"]\n')
    assert load_config(str(path)).server.allow == ("10.0.0.0/8", "fd00::/8", "192.0.2.1/32")
    assert load_config(None).server.allow == ()


@pytest.mark.parametrize("value", ['["lan"]', '["10.0.0.0/33"]', '"10.0.0.0/8"'])
def test_config_refuses_what_is_no_network(tmp_path: Path, value: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(f"[server]\nallow = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith("server.allow: expected ")


def test_a_client_outside_the_networks_gets_403_and_reaches_nothing() -> None:
    upstream = Upstream()
    root = RootResource(
        {"images": upstream}, "banner\n", {"healthz": Data(b"ok", "text/plain")},
        clients=ClientNetworks.of(["192.168.0.0/16", "::1"]),
    )
    for path in (b"/images/streams/v1/index.json", b"/healthz", b"/"):
        answer = get(root, path, IPv4Address("TCP", "10.0.0.7", 5000))
        assert answer.startswith(b"HTTP/1.1 403 "), (path, answer)
        assert b"10.0.0.7 is not in a network this proxy serves" in answer
    assert upstream.reached == 0
    for peer in (IPv4Address("TCP", "192.168.1.20", 5000), IPv6Address("TCP", "::1", 5000)):
        answer = get(root, b"/images/streams/v1/index.json", peer)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok")
    assert upstream.reached == 2
