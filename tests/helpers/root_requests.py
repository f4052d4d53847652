"""One request to a L{RootResource} from a chosen client address, and a face that counts them.

For the allow-list tests (C{[server] allow}, each upstream's C{allow}): what a client at an
address gets, and whether anything behind the refusal was reached.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy.simplestreams import RootResource


class Upstream(Resource):
    """Stands for an upstream's face: counts what reaches it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reached = 0

    def render_GET(self, request: Any) -> bytes:
        self.reached += 1
        return b"ok"


def get(root: RootResource, path: bytes, peer: IPv4Address | IPv6Address) -> bytes:
    """One request over an in-memory connection from C{peer}: the raw response."""
    channel = Site(root).buildProtocol(peer)
    assert channel is not None
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
    return transport.value()
