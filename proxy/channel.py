# -*- test-case-name: tests.test_channel -*-
"""
The HTTP/1.1 connection as the proxy runs it: deadlines and size limits for request heads.

Twisted's L{HTTPChannel} has limits of its own, but none of them helps over TLS:

  - a line longer than C{MAX_LENGTH} (16 KiB) goes to L{LineReceiver.lineLengthExceeded},
    which calls C{transport.loseConnection()} without answering.  The channel is the TLS
    transport's registered producer, and L{twisted.protocols.tls.TLSMemoryBIOProtocol}
    postpones its close until the producer is unregistered, which nothing does: the
    connection sits until the idle timeout;
  - C{totalHeadersSize} and C{maxHeaders} do answer, but with a bare 400;
  - the idle timeout (C{timeOut}, 60 s) is reset by every byte, so a head trickled a byte
    at a time never ends, and it also counts the TLS handshake, so one byte of a TLS record
    holds a connection for a minute.

L{ProxyChannel} replaces these with a deadline for the TLS handshake, a deadline for each
request head counted from its first byte, a shorter idle timeout between requests than
while one is in progress, and a 414 or 431 at once for a request line or header section
over its limit.  L{ProxySite} is a L{Site} that builds it.
"""

from __future__ import annotations

from weakref import WeakSet

from typing import Any, cast

from attrs import frozen
from zope.interface import implementer

from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    INegotiated,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Site

from proxy.config import (
    DEFAULT_KEEPALIVE_TIMEOUT_SECONDS,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADERS,
    DEFAULT_MAX_REQUEST_LINE,
    DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS,
    DEFAULT_SEND_TIMEOUT_SECONDS,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECONDS,
    ServerConfig,
)
from proxy.access_log import LoggedRequest
from proxy.via import ViaGuard

# After the proxy closes a connection, a TLS peer has this long to answer with its own
# close_notify (or to close) before the connection is aborted; until then the TLS layer
# keeps the socket open.
CLOSE_GRACE_SECONDS = 15.0
# The same after the last response on a connection that does not persist, which may still
# be draining a response's tail to a slow reader.
RESPONSE_CLOSE_GRACE_SECONDS = 60.0


@frozen
class HeadLimits:
    """
    What a connection may take to send a request head, and how big a head may be.

    See L{ServerConfig} for each value's meaning.
    """

    request_head_timeout: float = DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECONDS
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS
    send_timeout: float = DEFAULT_SEND_TIMEOUT_SECONDS
    max_request_line: int = DEFAULT_MAX_REQUEST_LINE
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS

    @classmethod
    def from_config(cls, server: ServerConfig) -> HeadLimits:
        return cls(
            request_head_timeout=server.request_head_timeout,
            tls_handshake_timeout=server.tls_handshake_timeout,
            keepalive_timeout=server.keepalive_timeout,
            send_timeout=server.send_timeout,
            max_request_line=server.max_request_line,
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
        )


# Where a connection is between its requests.
HANDSHAKE = "handshake"  # TLS handshake under way
IDLE = "idle"  # waiting for the first byte of a request
HEAD = "head"  # reading a request line and headers
BODY = "body"  # reading a request body
BUSY = "busy"  # a request is being answered
CLOSING = "closing"  # closed by the proxy; whatever arrives is dropped


def _answer(status: bytes, message: str) -> bytes:
    body = f"{message}\n".encode("utf-8")
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n"
        b"\r\n" % (len(body),)
    ) + body


def _cancel(call: IDelayedCall | None) -> None:
    """Cancel C{call} if it is still pending."""
    if call is not None and call.active():
        call.cancel()


@implementer(IHandshakeListener)
class ProxyChannel(HTTPChannel):
    """
    An L{HTTPChannel} with the deadlines and limits of L{HeadLimits}.

    While a request is being answered no deadline applies (as in L{HTTPChannel}), so a
    slow reader of a large response is never cut off, unless it reads nothing at all for
    C{send_timeout} (the transport keeps the channel paused that long); while a request body
    arrives, the site's idle timeout (C{timeOut}) does, reset by every byte.
    """

    log = Logger()

    def __init__(self, limits: HeadLimits) -> None:
        super().__init__()
        self.limits = limits
        self.state = IDLE
        # Set when the proxy stops: this connection's response in progress is its last.
        self._last_response = False
        # The site's idle timeout, for a request body; set in connectionMade.
        self._active_timeout: float | None = None
        self._deadline: IDelayedCall | None = None
        # Runs while the transport has paused the channel: its send buffers are full.
        self._stalled: IDelayedCall | None = None
        self._close_grace = CLOSE_GRACE_SECONDS
        # The head being read: still its request line, and its header bytes and fields.
        self._in_request_line = True
        self._header_bytes = 0
        self._header_count = 0
        self._reset_head()
        # Never reached first: the limits here answer before Twisted's own 400s.
        self.maxHeaders = limits.max_headers
        self.totalHeadersSize = limits.max_request_line + limits.max_header_bytes

    # -- the connection's phases ----------------------------------------------------------

    def connectionMade(self) -> None:
        self._active_timeout = self.timeOut
        super().connectionMade()
        if INegotiated.providedBy(self.transport):
            # Made on the connection's first byte (see proxy.listen), so counted from it.
            self.state = HANDSHAKE
            self._start_deadline(self.limits.tls_handshake_timeout, self._handshake_expired)
        else:
            self._enter_idle()

    def handshakeCompleted(self) -> None:
        if self.state == HANDSHAKE:
            self._cancel_deadline()
            self._enter_idle()

    def dataReceived(self, data: bytes) -> None:
        if self.state == CLOSING:
            return
        if self.state == HANDSHAKE:
            self.handshakeCompleted()
        if self.state == IDLE and data:
            self._begin_head()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.state == CLOSING:
            return
        if self.state == IDLE:
            # A pipelined request parsed straight after a response finished synchronously.
            self._begin_head()
        if self._in_request_line:
            # An empty line before the request line is tolerated once by HTTPChannel.
            if line:
                self._in_request_line = False
                self.MAX_LENGTH = self.limits.max_header_bytes
        else:
            self._header_bytes += len(line)
            if self._header_bytes > self.limits.max_header_bytes:
                self._headers_too_large()
                return
            # A partial line that would go over the budget is refused without waiting for
            # its end.
            self.MAX_LENGTH = self.limits.max_header_bytes - self._header_bytes
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._in_request_line:
            self._refuse(
                b"414 URI Too Long",
                f"request line longer than {self.limits.max_request_line} bytes",
            )
        else:
            self._headers_too_large()

    def headerReceived(self, line: bytes) -> bool:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._headers_too_large()
            return False
        ok: bool = super().headerReceived(line)
        return ok

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        self.state = BODY
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self.state = BUSY
        super().allContentReceived()

    def stop_serving(self) -> None:
        """
        The proxy stops: an idle connection is closed now, a busy one after its response
        (with C{Connection: close}), so that no request reaches a cache that is closing.
        """
        self._last_response = True
        if self.state == IDLE:
            self.loseConnection()
            return
        self.persistent = False
        for request in self.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self._last_response:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            # Before HTTPChannel replays pipelined bytes, which may start the next head.
            self._enter_idle()
        else:
            self._close_grace = RESPONSE_CLOSE_GRACE_SECONDS
        super().requestDone(request)
        if self.state == IDLE:
            # HTTPChannel has just restored the timeout it saved for the request.
            self.setTimeout(self.limits.keepalive_timeout)

    def loseConnection(self) -> None:
        self.state = CLOSING
        self._cancel_deadline()
        self.setTimeout(None)
        if self._abortingCall is None and self.transport is not None:
            self._abortingCall = self.callLater(self._close_grace, self.forceAbortClient)
        super().loseConnection()

    def timeoutConnection(self) -> None:
        # HTTPChannel logs every idle close at info; between requests it is routine.
        self.log.debug("closing idle connection from {peer}", peer=self._peer())
        self.loseConnection()

    def forceAbortClient(self) -> None:
        self.log.debug("aborting connection from {peer}: it did not close", peer=self._peer())
        self._abortingCall = None
        self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self._cancel_stall()
        # The close grace's abort has nothing left to abort.
        _cancel(self._abortingCall)
        self._abortingCall = None
        super().connectionLost(reason)

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if self._stalled is None:
            self._stalled = self.callLater(self.limits.send_timeout, self._send_expired)

    def resumeProducing(self) -> None:
        self._cancel_stall()
        super().resumeProducing()

    # -- helpers --------------------------------------------------------------------------

    def _reset_head(self) -> None:
        self._in_request_line = True
        self._header_bytes = 0
        self._header_count = 0
        self.MAX_LENGTH = self.limits.max_request_line

    def _enter_idle(self) -> None:
        self.state = IDLE
        self._reset_head()
        self.setTimeout(self.limits.keepalive_timeout)

    def _begin_head(self) -> None:
        self.state = HEAD
        self.setTimeout(self._active_timeout)
        self._start_deadline(self.limits.request_head_timeout, self._head_expired)

    def _start_deadline(self, seconds: float, expired: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.callLater(seconds, expired)

    def _cancel_deadline(self) -> None:
        _cancel(self._deadline)
        self._deadline = None

    def _handshake_expired(self) -> None:
        self._deadline = None
        self.log.debug(
            "TLS handshake from {peer} not done in {seconds} s; aborting",
            peer=self._peer(), seconds=self.limits.tls_handshake_timeout,
        )
        self.state = CLOSING
        # No TLS session to close politely.
        self._abort()

    def _cancel_stall(self) -> None:
        _cancel(self._stalled)
        self._stalled = None

    def _send_expired(self) -> None:
        self._stalled = None
        self.log.info(
            "client {peer} read nothing for {seconds:g} s; dropping its connection",
            peer=self._peer(), seconds=self.limits.send_timeout,
        )
        self.state = CLOSING
        self._cancel_deadline()
        # Its buffers are full: a polite close would wait on it too.
        self._abort()

    def _head_expired(self) -> None:
        self._deadline = None
        self._refuse(
            b"408 Request Timeout",
            f"request head not received within {self.limits.request_head_timeout:g} s",
        )

    def _headers_too_large(self) -> None:
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"request headers over {self.limits.max_header_bytes} bytes or "
            f"{self.limits.max_headers} fields",
        )

    def _refuse(self, status: bytes, message: str) -> None:
        if self.state == CLOSING or self.transport is None:
            return
        self.log.debug(
            "{status} to {peer}: {message}",
            status=status.decode("ascii"), peer=self._peer(), message=message,
        )
        self.transport.write(_answer(status, message))
        self.loseConnection()

    def _abort(self) -> None:
        # A TLS transport whose connection is already gone cannot be aborted (its TLS state is
        # dropped: abortConnection raises), and there is nothing left to abort.
        if self.transport is not None and getattr(self.transport, "connected", True):
            # Every stream transport has abortConnection, though ITransport does not say so.
            cast(ITCPTransport, self.transport).abortConnection()

    def _peer(self) -> str:
        return str(self.transport.getPeer()) if self.transport is not None else "?"


class ProxySite(Site):
    """
    A L{Site} whose connections are L{ProxyChannel}s and whose requests L{LoggedRequest}s,
    which write the access log (L{proxy.access_log}) instead of Twisted's combined-log line.
    """

    # Loop protection and the responses' Via (proxy.via); set by the service.
    via: ViaGuard | None = None

    def __init__(self, resource: IResource, limits: HeadLimits, reactor: IReactorTime) -> None:
        super().__init__(resource, requestFactory=LoggedRequest, reactor=reactor)
        self.limits = limits
        # Open connections, for stop_serving; a closed one drops out by itself.
        self.channels: WeakSet[ProxyChannel] = WeakSet()

    def log(self, request: Any) -> None:
        # Called by Request.finish: the response is complete.
        if isinstance(request, LoggedRequest):
            request.log_finished()

    def protocol(self) -> ProxyChannel:  # type: ignore[override]
        # Twisted's default wraps the channel in a proxy that can switch to HTTP/2 (never
        # negotiated here) and hides the channel's IHandshakeListener from the TLS layer.
        channel = ProxyChannel(self.limits)
        self.channels.add(channel)
        return channel

    def stop_serving(self) -> None:
        """
        Close the connections kept alive (after their response in progress): a client's next
        request must find the port closed, not a cache being shut down behind it.
        """
        for channel in list(self.channels):
            channel.stop_serving()


__all__ = ["HeadLimits", "ProxyChannel", "ProxySite"]
