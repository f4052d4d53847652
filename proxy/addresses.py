# -*- test-case-name: tests.test_addresses -*-
"""
The address to tell clients to use, for a listener bound to a given address.

The start-up hints (C{lxc remote add ... https://HOST:PORT}) must name something the proxy
listens on: the address itself when it is bound to one, and for a wildcard (C{0.0.0.0},
C{::}) one of this host's own addresses, found from its network interfaces without asking
any resolver (a host name may resolve to C{127.0.1.1}, or not at all for other hosts).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence

# ioctl(2) request for an interface's IPv4 address (linux/sockios.h).
SIOCGIFADDR = 0x8915
_WILDCARDS = ("", "0.0.0.0", "::", "::0")


def interface_addresses() -> list[str]:
    """
    This host's IPv4 addresses, one per interface, in interface order (the primary address
    of each; an interface without an IPv4 address is left out). Empty where it cannot be read.
    """
    found: list[str] = []
    try:
        names = [name for _index, name in socket.if_nameindex()]
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return found
    with probe:
        for name in names:
            try:
                answer = fcntl.ioctl(
                    probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15])
                )
            except OSError:
                continue
            found.append(socket.inet_ntoa(answer[20:24]))
    return found


def _rank(address: str) -> int:
    """Lower is better: a global address, then a private one, then link-local, then loopback."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return 3
    if ip.is_link_local:
        return 2
    if ip.is_private:
        return 1
    return 0


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def url_host(address: str) -> str:
    """C{address} as the host part of a URL: an IPv6 address in brackets."""
    return f"[{address}]" if ":" in address else address


def advertised_host(
    bound: str,
    tls_names: Sequence[str] = (),
    addresses: Callable[[], list[str]] = interface_addresses,
) -> str:
    """
    The host part of a URL for clients of a listener bound to the address C{bound}.

    A listener bound to a loopback address gets that address: no other host can reach it by
    any name. Otherwise the first of C{tls_names} is the name clients are meant to use (the
    generated certificate lists it first), so it is used when set; failing that, a listener
    bound to one address gets that address, and a wildcard the best of this host's
    C{addresses()} (global before private before link-local; the first of equals), or
    C{127.0.0.1} when it has no other.
    """
    wildcard = bound in _WILDCARDS
    if not wildcard and _is_loopback(bound):
        return url_host(bound)
    if tls_names:
        return url_host(tls_names[0])
    if not wildcard:
        return url_host(bound)
    usable = sorted(addresses(), key=_rank)
    return url_host(usable[0]) if usable else "127.0.0.1"


__all__ = ["advertised_host", "interface_addresses", "url_host"]
