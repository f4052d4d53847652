# -*- test-case-name: tests.test_peers -*-
"""Peer fill: the other nodes of a pool behind one load balancer, asked before the upstream.

Behind a hashing load balancer each image file is stored on one node. When a node joins the
pool (or comes back with an empty disk) a share of the files is hashed to it; without help it
would fetch each over the WAN again although a sibling holds it. With C{[cluster] peers}, a
node that misses a file first asks every peer at once with C{Cache-Control: only-if-cached}
(RFC 9111 5.2.1.7): a peer answers from its store alone, or 504, and never downloads, joins a
download or asks its upstream because of such a request. The first peer to answer 200 sends
the file; its body goes through the same verification and commit as an upstream's (the
catalogue's sha256 is the judge, so a peer is trusted for no byte). No 200 within
L{PEER_WAIT_SECONDS} of asking (every peer said 504, was down, or hangs): the upstream is
asked as if there were no peers.

The peers are reached through an L{proxy.upstream.UpstreamClient} of their own, whose
allow-list holds their origins only, and only ever for an item of a configured upstream's
catalogue (the fetcher asks for nothing else): a node is never an open proxy towards its peers.

A node's own URL in C{peers} (one list for every node is easiest to deploy) is recognised by
the L{NODE_HEADER} of its answers, which carries a random id per process, and left out from
then on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Callable, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from proxy.errors import ProxyError
from proxy.fetch import discard_body

# Bound on the whole question (every peer asked at once), from asking to the first 200's
# headers. A peer on the same LAN answers a cached-only request in milliseconds; one that
# takes longer is down or overloaded, and the upstream is the better bet.
PEER_WAIT_SECONDS = 1.0
# Says, on a cached-only answer, which node (which process) answered.
NODE_HEADER = b"Lxd-Image-Proxy-Node"
CACHED_ONLY = b"only-if-cached"

PeerGet = Callable[[str, Mapping[bytes, bytes]], "Deferred[IResponse]"]


class NotCachedHere(ProxyError):
    """A cached-only request for a file this node does not hold (RFC 9111 5.2.1.7: 504)."""

    code = 504


def new_node_id() -> str:
    return uuid.uuid4().hex


def wants_cached_only(request: Request) -> bool:
    """Whether C{request} carries C{Cache-Control: only-if-cached}."""
    for value in request.requestHeaders.getRawHeaders(b"Cache-Control") or []:
        for directive in value.split(b","):
            if directive.strip().lower() == CACHED_ONLY:
                return True
    return False


class _Drop(Protocol):
    """Takes an unwanted answer's body by dropping its connection at once."""

    def connectionMade(self) -> None:
        # A response body's transport is a TransportProxyProducer: stopping it drops the
        # connection (as proxy.upstream.BodyReceiver does).
        cast(IPushProducer, self.transport).stopProducing()


def drop(response: IResponse) -> None:
    response.deliverBody(_Drop())


class Peers:
    """
    The other nodes of the pool (see the module), asked for a file before its upstream is.

    @param urls: the peers' base URLs, this node's own possibly among them.
    @param get: sends one GET with extra headers (the peers' own L{UpstreamClient.get}).
    @param node_id: this process's id, sent and compared in L{NODE_HEADER}.
    """

    log = Logger()

    def __init__(
        self, urls: Iterable[str], get: PeerGet, clock: IReactorTime, node_id: str, *,
        wait: float = PEER_WAIT_SECONDS,
    ) -> None:
        self.urls = tuple(urls)
        self.node_id = node_id
        self._get = get
        self._clock = clock
        self._wait = wait
        # The URLs found to be this node's own.
        self.own: set[str] = set()

    def asked(self) -> tuple[str, ...]:
        """The peers a miss asks now."""
        return tuple(url for url in self.urls if url not in self.own)

    def find(self, upstream: str, path: str) -> "Deferred[tuple[str, IResponse] | None]":
        """
        Ask every peer for C{path} of C{upstream}, cached only, all at once.

        Fires with (the peer's base URL, its 200 answer, body unread) for the first peer to
        answer 200, or with None once every peer has said no, failed or the wait ran out;
        never fails. The other answers are dropped.
        """
        found: Deferred[tuple[str, IResponse] | None] = Deferred()
        peers = self.asked()
        if not peers:
            found.callback(None)
            return found
        headers = {b"Cache-Control": CACHED_ONLY, NODE_HEADER: self.node_id.encode("ascii")}
        asks: list[Deferred[IResponse]] = []
        left = [len(peers)]

        def answered(response: IResponse, url: str) -> None:
            theirs = response.headers.getRawHeaders(NODE_HEADER) or []
            if self.node_id.encode("ascii") in theirs:
                if url not in self.own:
                    self.log.info("peer {url} is this node: not asked again", url=url)
                    self.own.add(url)
            elif response.code == 200 and not found.called:
                self.log.info("peer {url} holds {upstream}/{path}", url=url, upstream=upstream, path=path)
                found.callback((url, response))
                return
            elif response.code != 504:
                self.log.warn(
                    "peer {url} answered {code} to a cached-only request for {upstream}/{path}",
                    url=url, code=response.code, upstream=upstream, path=path,
                )
            if response.code == 200:
                # A second holder's file: not wanted, and not worth reading.
                drop(response)
            else:
                # A short error page: read, so that the connection serves the next question.
                Deferred.fromCoroutine(discard_body(response))

        def failed(failure: Failure, url: str) -> None:
            self.log.info(
                "peer {url} did not answer for {upstream}/{path}: {reason}", url=url,
                upstream=upstream, path=path, reason=failure.getErrorMessage() or "no answer in time",
            )

        def one_done(_: object) -> None:
            left[0] -= 1
            if left[0] == 0 and not found.called:
                found.callback(None)

        for url in peers:
            ask = self._get(f"{url}/{upstream}/{path}", headers)
            asks.append(ask)
            ask.addCallbacks(answered, failed, callbackArgs=(url,), errbackArgs=(url,))
            ask.addBoth(one_done)

        def give_up() -> None:
            for ask in asks:
                ask.cancel()
            if not found.called:
                found.callback(None)

        timer = self._clock.callLater(self._wait, give_up)

        def settled(result: tuple[str, IResponse] | None) -> tuple[str, IResponse] | None:
            if timer.active():
                timer.cancel()
            # The slower peers are not waited for: their answers, if any, are dropped.
            for ask in asks:
                ask.cancel()
            return result

        return found.addCallback(settled)


__all__ = [
    "CACHED_ONLY", "NODE_HEADER", "NotCachedHere", "PEER_WAIT_SECONDS", "Peers",
    "new_node_id", "wants_cached_only",
]
