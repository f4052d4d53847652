"""The address the start-up hints name, for each kind of listening address."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.addresses import advertised_host, interface_addresses


def these(*addresses: str) -> Callable[[], list[str]]:
    return lambda: list(addresses)


@pytest.mark.parametrize(("bound", "names", "host"), [
    # Bound to loopback: nothing else can reach it, whatever the certificate names.
    ("127.0.0.1", [], "127.0.0.1"),
    ("127.0.0.1", ["cache.lan"], "127.0.0.1"),
    ("::1", [], "[::1]"),
    # Bound to one address: the name clients are meant to use, else the address.
    ("192.0.2.10", [], "192.0.2.10"),
    ("192.0.2.10", ["cache.lan"], "cache.lan"),
    ("2001:db8::5", [], "[2001:db8::5]"),
    # A wildcard: the name, else one of this host's addresses, never the wildcard.
    ("0.0.0.0", ["cache.lan"], "cache.lan"),
    ("0.0.0.0", [], "192.168.1.5"),
    ("::", [], "192.168.1.5"),
])
def test_advertised_host(bound: str, names: list[str], host: str) -> None:
    addresses = these("127.0.0.1", "169.254.1.1", "192.168.1.5", "10.0.3.1")
    assert advertised_host(bound, names, addresses) == host


def test_a_global_address_goes_before_a_private_one() -> None:
    addresses = these("127.0.0.1", "10.0.3.1", "93.184.216.34")
    assert advertised_host("0.0.0.0", (), addresses) == "93.184.216.34"


def test_a_host_with_loopback_alone_is_told_loopback() -> None:
    assert advertised_host("0.0.0.0", (), these("127.0.0.1")) == "127.0.0.1"
    assert advertised_host("0.0.0.0", (), these()) == "127.0.0.1"


def test_this_hosts_addresses_are_read() -> None:
    # Every Linux host has its loopback interface.
    assert "127.0.0.1" in interface_addresses()
