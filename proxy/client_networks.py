"""Which client addresses may use the proxy (C{[server] allow}) and each upstream (C{allow})."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import field, frozen

from proxy.errors import Forbidden

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


def client_host(request: Any) -> str:
    """The IP address a request came from, as the transport reports it (C{""} if none)."""
    return str(getattr(request.getClientAddress(), "host", ""))


def _frozen_networks(value: Mapping[str, ClientNetworks]) -> Mapping[str, ClientNetworks]:
    return dict(value)


@frozen
class UpstreamAccess:
    """
    Who may use each upstream, within C{[server] allow} (checked first, for the whole port):
    an upstream with networks of its own (C{[upstreams.NAME] allow}) serves only clients in
    them, and the faces answer any other client as if the upstream were not theirs to use
    (403 on its own paths, left out of the LXD API's lists); one without serves everyone.
    """

    networks: Mapping[str, ClientNetworks] = field(factory=dict, converter=_frozen_networks)

    @classmethod
    def of(cls, allow: Mapping[str, Iterable[str]]) -> UpstreamAccess:
        """From each upstream's C{allow} list; empty lists restrict nothing."""
        return cls({name: ClientNetworks.of(values) for name, values in allow.items() if values})

    def permits(self, upstream: str, host: str) -> bool:
        networks = self.networks.get(upstream)
        return networks is None or networks.permits(host)

    def usable(self, host: str, upstreams: Iterable[str]) -> frozenset[str]:
        """Which of C{upstreams} a client at C{host} may use."""
        return frozenset(name for name in upstreams if self.permits(name, host))

    def refusal(self, upstream: str, host: str) -> str | None:
        """Why a client at C{host} may not use C{upstream} (naming the setting), or None."""
        if self.permits(upstream, host):
            return None
        return (
            f"{host or 'this client'} is not in a network that may use upstream {upstream!r} "
            f"(upstreams.{upstream}.allow)"
        )

    def check(self, upstream: str, host: str) -> None:
        """@raise Forbidden: a client at C{host} may not use C{upstream}."""
        refusal = self.refusal(upstream, host)
        if refusal is not None:
            raise Forbidden(refusal)


__all__ = ["ClientNetworks", "UpstreamAccess", "client_host", "parse_network"]
