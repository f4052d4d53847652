# -*- test-case-name: tests.test_listen -*-
"""Listening for HTTPS, with plain HTTP on the same port for image files or an immediate 400.

The LXD client downloads every image file over plain C{http://} on the HTTPS port first and
falls back to HTTPS only when that attempt fails.  If the port swallowed the plain request
(a TLS server waiting for a ClientHello), each file would stall until a client timeout, so
the first byte of each connection is sniffed: a TLS handshake record goes to TLS; anything
else goes to the plain-HTTP site when there is one (L{proxy.plain}: image files only, the
rest a 400 pointing to C{https://}), or else gets that C{400} at once and is closed.
L{listen_plain} listens for plain HTTP alone (port 80, for remotes whose URL has no port).

With a L{ConnectionCap}, a connection over the cap is closed as soon as it is accepted,
before any byte is read.
"""

from __future__ import annotations

import os
import socket
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from proxy.admission import ConnectionCap

# The content type byte of a TLS handshake record, which every ClientHello starts with.
TLS_HANDSHAKE_RECORD = 0x16
# A connection that sends nothing at all for this long is closed: no other timeout covers
# a connection before its first byte.
FIRST_BYTE_TIMEOUT_SECONDS = 30.0
# The listen queue when an address does not give one: nginx's on Linux. Twisted's 50 overflows
# when hundreds of clients connect at once (each overflow costs its client a 1 s SYN retry).
DEFAULT_BACKLOG = 511

PLAIN_HTTP_BODY = b"This port speaks HTTPS only; use https:// to reach the LXD image proxy.\n"
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(PLAIN_HTTP_BODY)).encode("ascii") + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + PLAIN_HTTP_BODY
)


class SniffingProtocol(Protocol):
    """
    Looks at the first byte of a connection and hands the connection to TLS or, for plain
    HTTP, to C{plain}; without C{plain} it answers with L{PLAIN_HTTP_ANSWER} and closes it.
    Without C{tls_factory} (a plain-HTTP listener) a TLS handshake is closed at once.

    After the hand-over every byte read is passed on to the chosen protocol, which writes to
    the real transport itself (a plain channel sees the TCP transport: see
    L{proxy.streaming.SendfileProducer}).
    """

    log = Logger()

    def __init__(
        self,
        tls_factory: IProtocolFactory | None,
        clock: IReactorTime,
        cap: ConnectionCap | None = None,
        plain: IProtocolFactory | None = None,
    ) -> None:
        self._tls_factory = tls_factory
        self._clock = clock
        self._cap = cap
        self._plain = plain
        self._delegate: IProtocol | None = None
        self._answered = False
        self._timeout: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timeout = self._clock.callLater(FIRST_BYTE_TIMEOUT_SECONDS, self._first_byte_timeout)

    def _first_byte_timeout(self) -> None:
        self._timeout = None
        # Every stream transport has abortConnection, though ITransport does not say so.
        cast(ITCPTransport, self.transport).abortConnection()

    def _cancel_timeout(self) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        if self._answered or not data:
            # Whatever a rejected client sends while its connection closes is dropped.
            return
        self._cancel_timeout()
        assert self.transport is not None
        tls = data[0] == TLS_HANDSHAKE_RECORD
        # Plain HTTP starts with a method (upper-case letters); anything else is neither and
        # gets the immediate 400 rather than waiting for a request line that never ends.
        factory = self._tls_factory if tls else self._plain if data[:1].isupper() else None
        if factory is not None:
            protocol = factory.buildProtocol(self.transport.getPeer())
            if protocol is None:
                self.transport.loseConnection()
                return
            self._delegate = protocol
            protocol.makeConnection(self.transport)
            protocol.dataReceived(data)
            return
        self._answered = True
        if tls:
            self.log.debug(
                "TLS handshake from {peer} on a plain-HTTP port", peer=self.transport.getPeer()
            )
            self.transport.loseConnection()
            return
        self.log.debug("plain request from {peer} answered with 400", peer=self.transport.getPeer())
        self.transport.write(PLAIN_HTTP_ANSWER)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timeout()
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        if self._delegate is not None:
            self._delegate.connectionLost(reason)


class SniffingFactory(Factory):
    """
    Builds a L{SniffingProtocol} per connection admitted by C{cap}; starts and stops the
    TLS and plain factories with it.
    """

    noisy = False

    def __init__(
        self,
        tls_factory: IProtocolFactory | None,
        clock: IReactorTime,
        cap: ConnectionCap | None = None,
        plain: IProtocolFactory | None = None,
    ) -> None:
        self._tls_factory = tls_factory
        self._clock = clock
        self._cap = cap
        self._plain = plain
        self._factories = [f for f in (tls_factory, plain) if f is not None]

    def logPrefix(self) -> str:
        # Shown by the port: "HTTPS starting on 8443".
        return "HTTPS" if self._tls_factory is not None else "HTTP"

    def startFactory(self) -> None:
        for factory in self._factories:
            factory.doStart()

    def stopFactory(self) -> None:
        for factory in self._factories:
            factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self._cap is not None and not self._cap.admit():
            # The port closes the accepted socket at once.
            return None
        protocol = SniffingProtocol(self._tls_factory, self._clock, self._cap, self._plain)
        protocol.factory = self
        return protocol


def sniffing_tls_factory(
    tls_options: IOpenSSLServerConnectionCreator,
    factory: IProtocolFactory,
    clock: IReactorTime,
    cap: ConnectionCap | None = None,
    plain: IProtocolFactory | None = None,
) -> SniffingFactory:
    """The factory L{listen_tls} listens with: sniffing, then TLS around C{factory}."""
    # The TLS layer gathers small writes until the clock's next turn.
    return SniffingFactory(
        TLSMemoryBIOFactory(tls_options, False, factory, clock), clock, cap, plain
    )


def _endpoint(reactor: IReactorTime, description: str) -> Any:
    if ":backlog=" not in description:
        description += f":backlog={DEFAULT_BACKLOG}"
    return serverFromString(reactor, description)


def listen_tls(
    reactor: IReactorTime,
    description: str,
    tls_options: IOpenSSLServerConnectionCreator,
    factory: IProtocolFactory,
    cap: ConnectionCap | None = None,
    plain: IProtocolFactory | None = None,
) -> Deferred[IListeningPort]:
    """
    Listen on the plain TCP endpoint C{description} and serve C{factory} over TLS there,
    and plain HTTP with C{plain} or else a 400 (see the module docstring).

    @param reactor: the reactor to listen with; it must also provide C{IReactorTCP}.
    @param tls_options: e.g. L{proxy.tls.server_tls_options}.
    @param cap: the cap on client connections open at once, shared by every listener.
    @return: fires with the listening port, or fails with
        L{twisted.internet.error.CannotListenError}.
    """
    endpoint = _endpoint(reactor, description)
    listened: Deferred[IListeningPort] = endpoint.listen(
        sniffing_tls_factory(tls_options, factory, reactor, cap, plain)
    )
    return listened


def listen_plain(
    reactor: IReactorTime,
    description: str,
    plain: IProtocolFactory,
    cap: ConnectionCap | None = None,
) -> Deferred[IListeningPort]:
    """
    Listen on C{description} for plain HTTP only, served by C{plain}; a TLS handshake there is
    closed at once. The first-byte timeout and C{cap} apply as in L{listen_tls}.
    """
    listened: Deferred[IListeningPort] = _endpoint(reactor, description).listen(
        SniffingFactory(None, reactor, cap, plain)
    )
    return listened


class ListeningService(Service):
    """
    Listens once on the ports of L{listenings}: in C{privilegedStartService} (before twistd
    drops privileges, so that port 443 works for a root-started proxy), or in C{startService}
    (the twist runner, C{python -m twisted}, calls only that).

    TCP endpoints listen at once, so the outcome is known before the reactor runs: a port that
    cannot be had stops start-up with one sentence (C{failure_prefix} and the reasons) and a
    non-zero exit. Otherwise L{listened} is told the ports and C{ready} fires with their numbers.
    """

    failure_prefix = "cannot listen"

    def __init__(self) -> None:
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[list[int]] = Deferred()
        self._listening_started = False

    def listenings(self) -> list[Deferred[IListeningPort]]:
        """Start listening on every address; called once."""
        raise NotImplementedError

    def listened(self, ports: list[IListeningPort]) -> None:
        """Every port listens (C{ports}, in order); say so."""

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self._listening_started:
            return
        self._listening_started = True
        outcome: list[list[tuple[bool, Any]]] = []
        all_listening = DeferredList(self.listenings(), consumeErrors=True)
        all_listening.addCallback(outcome.append)
        if outcome:
            self._listening(outcome[0])
        else:
            all_listening.addCallback(lambda _: self._listening(outcome[0]))

    def _listening(self, results: list[tuple[bool, Any]]) -> None:
        failures = [r for ok, r in results if not ok]
        self.ports = [r for ok, r in results if ok]
        if failures:
            for port in self.ports:
                port.stopListening()
            self.ports = []
            reasons = "; ".join(f.getErrorMessage() for f in failures)
            raise SystemExit(f"lxd-image-proxy: {self.failure_prefix}: {reasons}")
        self.listened(self.ports)
        self.ready.callback([cast(IPv4Address | IPv6Address, p.getHost()).port for p in self.ports])

    def stopService(self) -> "Deferred[Any]":
        super().stopService()
        ports, self.ports = self.ports, []
        return DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


def adopt_port(reactor: Any, fd: int, factory: IProtocolFactory) -> IListeningPort:
    """
    Serve C{factory} on the listening TCP socket C{fd}, handed over by another process
    (L{proxy.workers}); C{fd} itself is closed (the port has its own copy).
    """
    probe = socket.socket(fileno=os.dup(fd))
    family = probe.family
    probe.close()
    port: IListeningPort = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)
    return port


def listen_handed(reactor: Any, description: str, count: int) -> list[IListeningPort]:
    """
    Bind C{count} sockets to the address of C{description}, one per worker process
    (L{proxy.workers}), with C{SO_REUSEPORT} so that the kernel spreads the connections over
    them; none is ever accepted from here. Port 0 is chosen by the first; the rest take the
    same port. The ports are returned stopped (not read), for their descriptors and address.

    @raise CannotListenError: the address cannot be had.
    """
    endpoint: Any = _endpoint(reactor, description)
    interface, port, backlog = endpoint._interface, endpoint._port, endpoint._backlog
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    unused = Factory.forProtocol(Protocol)
    unused.noisy = False
    ports: list[IListeningPort] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((interface, port))
                sock.listen(backlog)
                sock.setblocking(False)
                port = sock.getsockname()[1]
                listening = reactor.adoptStreamPort(sock.fileno(), family, unused)
            except OSError as e:
                raise CannotListenError(interface, port, e) from None
            finally:
                sock.close()
            listening.stopReading()
            ports.append(listening)
    except BaseException:
        for p in ports:
            p.stopListening()
        raise
    return ports
