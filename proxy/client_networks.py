"""Which client addresses may use the proxy: C{[server] allow}, a list of networks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from attrs import frozen

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(value: str) -> Network:
    """
    A network in CIDR notation, or one address (a /32 or /128); host bits may be set
    (C{"10.1.2.3/8"} is C{10.0.0.0/8}), as admins write them.

    @raise ValueError: C{value} is neither.
    """
    return ipaddress.ip_network(value.strip(), strict=False)


@frozen
class ClientNetworks:
    """
    The networks whose clients may use the proxy; none listed means everyone may.

    An IPv4 client reached through an IPv6 socket (C{::ffff:10.0.0.5}, what a C{[::]} listener
    sees) is matched as the IPv4 address it is.
    """

    networks: tuple[Network, ...] = ()

    @classmethod
    def of(cls, values: Iterable[str]) -> ClientNetworks:
        return cls(tuple(parse_network(v) for v in values))

    def permits(self, host: str) -> bool:
        """Whether a client at C{host} (an IP address as the transport reports it) may."""
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            # Not an IP peer (a UNIX socket, a test transport): nothing to match it against.
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


__all__ = ["ClientNetworks", "parse_network"]
