"""The test upstream: serves a tree's files, records every request, and misbehaves on demand.

`TreeResource(root)` is an ordinary `twisted.web` resource, so it works both over real loopback
TLS (`start_https_upstream`) and in memory under `treq.testing.StubTreq` /
`RequestTraversalAgent`. Bodies go out through a push producer in chunks read from disk.

Faults are set per tree path (the path relative to the tree root, e.g.
`images/testos/1.0/amd64/default/20240101_0000/lxd.tar.xz`) and apply to the next `times`
requests for it, or until `clear(path)` when `times` is None:

* `corrupt(path)`: the right length, the wrong bytes (the first byte of the body is inverted);
* `truncate(path, n)`: the full Content-Length, only `n` bytes, then the connection is closed;
* `reset(path, n)`: the full Content-Length, `n` bytes, then the connection is aborted (on a
  real socket, with a TCP RST once those bytes have left the process);
* `status(path, code)`: that status with a short text body;
* `redirect(path, location)`: a 302 (or `code`) to `location`;
* `silence(path)`: the request is read and never answered, not even with a status line;
* `rate(path, bytes_per_second)`: the body goes out a tenth of that every 0.1 s (needs a clock);
* `hold(path)`: headers and the first chunk go out, the rest waits for `release(path)`;
  `stall(path, n)` is the same after exactly `n` bytes (0: after the headers alone);
  `when_held(path)` fires once a body is parked (and is cancelled if released first).

`corrupt`, `truncate`, `reset`, `rate`, `hold` and `stall` concern bodies and are used up by
GET requests only.

`throttle=Throttle(chunk_size, delay)` sends every body in small chunks `delay` seconds apart on
the given clock (a `Clock` in memory, the reactor on loopback).

Ranges: a GET with `Range: bytes=N-` gets a 206 with `Content-Range: bytes N-(size-1)/size`,
unless its `If-Range` is neither the file's ETag nor its Last-Modified (a 200, the whole file),
or `ignore_ranges` is set (a 200 always). `change_validator(path)` gives a file another ETag
and Last-Modified (as if it had been replaced). `sent[path]` counts the body bytes written for
each path, over every request; the body faults count from the start of each response's body.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Literal, cast

from attrs import define, field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPushProducer,
    IReactorSSL,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from tests.helpers.certs import CA

CHUNK_SIZE = 64 * 1024
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@frozen
class RecordedRequest:
    """One request as the upstream saw it. `path` is the decoded tree path, without the query."""

    method: str
    path: str
    headers: Headers
    uri: str

    def header(self, name: str) -> str | None:
        """The last value of header `name`, or None."""
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


@frozen
class Throttle:
    """Send bodies `chunk_size` bytes at a time, `delay` seconds apart."""

    chunk_size: int
    delay: float


FaultKind = Literal["corrupt", "truncate", "reset", "status", "redirect", "silence", "rate"]
# The body faults a HEAD must not use up.
_BODY_FAULTS = ("corrupt", "truncate", "reset", "rate")
# A rate is kept by sending a tenth of a second's worth of bytes each tenth of a second.
RATE_TICK_SECONDS = 0.1
# A reset waits for the bytes before it to leave the process, a second at most.
RESET_DRAIN_POLL_SECONDS = 0.001
RESET_DRAIN_POLLS = 1000


@define
class _Fault:
    kind: FaultKind
    remaining: int | None
    count: int = 0
    code: int = 0
    location: bytes = b""


@define
class _Hold:
    remaining: int | None
    # Bytes sent before parking; None: the first chunk.
    after: int | None = None
    parked: list[_BodyProducer] = field(factory=list)
    waiters: list[Deferred[None]] = field(factory=list)


def _take(remaining: int | None) -> tuple[bool, int | None]:
    """Consume one use of a fault: (applies now, uses left)."""
    if remaining is None:
        return True, None
    if remaining <= 0:
        return False, 0
    return True, remaining - 1


class TreeResource(Resource):
    """Serves the files under `root` (GET and HEAD) with fault injection; see the module doc.

    `clock` is needed only for `throttle`. `chunk_size` is the unthrottled write size.
    """

    isLeaf = True

    def __init__(
        self,
        root: Path,
        clock: IReactorTime | None = None,
        throttle: Throttle | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if throttle is not None and clock is None:
            raise ValueError("throttle needs a clock")
        self.root = Path(root)
        self.clock = clock
        self.throttle = throttle
        self.chunk_size = chunk_size
        self.requests: list[RecordedRequest] = []
        self._faults: dict[str, _Fault] = {}
        self._holds: dict[str, _Hold] = {}
        self.active: set[_BodyProducer] = set()
        # Requests that `silence` left unanswered, so that `clear` can hang up on them.
        self.silenced: dict[str, list[Request]] = {}
        # Body bytes written per path, over every request.
        self.sent: dict[str, int] = {}
        self.ignore_ranges = False
        # path -> how many times its validators were changed
        self._changed: dict[str, int] = {}

    # -- fault injection ------------------------------------------------------------------------

    def corrupt(self, path: str, times: int | None = None) -> None:
        self._faults[path] = _Fault("corrupt", times)

    def truncate(self, path: str, n: int, times: int | None = None) -> None:
        self._faults[path] = _Fault("truncate", times, count=n)

    def reset(self, path: str, n: int, times: int | None = None) -> None:
        self._faults[path] = _Fault("reset", times, count=n)

    def silence(self, path: str, times: int | None = None) -> None:
        self._faults[path] = _Fault("silence", times)

    def rate(self, path: str, bytes_per_second: int, times: int | None = None) -> None:
        if self.clock is None:
            raise ValueError("a rate needs a clock")
        if bytes_per_second * RATE_TICK_SECONDS < 1:
            raise ValueError("a rate must send at least one byte per tick")
        self._faults[path] = _Fault("rate", times, count=bytes_per_second)

    def status(self, path: str, code: int, times: int | None = None) -> None:
        self._faults[path] = _Fault("status", times, code=code)

    def redirect(self, path: str, location: str, code: int = http.FOUND, times: int | None = None) -> None:
        self._faults[path] = _Fault("redirect", times, code=code, location=location.encode())

    def hold(self, path: str, times: int | None = None) -> None:
        """Park the next `times` bodies for `path` after their first chunk."""
        self._hold(path, times, None)

    def stall(self, path: str, n: int, times: int | None = None) -> None:
        """Park the next `times` bodies for `path` after exactly `n` bytes (0: the headers only)."""
        self._hold(path, times, n)

    def _hold(self, path: str, times: int | None, after: int | None) -> None:
        existing = self._holds.get(path)
        if existing is not None:
            existing.remaining = times
            existing.after = after
        else:
            self._holds[path] = _Hold(times, after)

    def release(self, path: str) -> None:
        """Stop holding `path` and let every parked body for it continue."""
        hold = self._holds.pop(path, None)
        if hold is None:
            return
        for producer in hold.parked:
            producer.unpark()
        for waiter in hold.waiters:
            waiter.cancel()

    def when_held(self, path: str) -> Deferred[None]:
        """Fires once a request for `path` is parked by `hold` (at once if one already is)."""
        hold = self._holds.get(path)
        if hold is None:
            raise KeyError(f"{path} is not held")
        if hold.parked:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        hold.waiters.append(waiter)
        return waiter

    def held(self, path: str) -> int:
        """How many bodies for `path` are parked now."""
        hold = self._holds.get(path)
        return len(hold.parked) if hold is not None else 0

    def clear(self, path: str | None = None) -> None:
        """
        Remove the fault (and hold, releasing parked bodies) of `path`, or of every path.

        Silenced requests still waiting are hung up on: they were never going to get an answer.
        """
        every = self._faults.keys() | self._holds.keys() | self.silenced.keys()
        for p in [path] if path is not None else list(every):
            self._faults.pop(p, None)
            self.release(p)
            for request in list(self.silenced.pop(p, [])):
                _transport_of(request).abortConnection()

    def change_validator(self, path: str) -> None:
        """Give `path` another ETag and Last-Modified, as if the file had been replaced."""
        self._changed[path] = self._changed.get(path, 0) + 1

    # -- inspection -----------------------------------------------------------------------------

    def count(self, path: str, method: str = "GET") -> int:
        return sum(1 for r in self.requests if r.path == path and r.method == method)

    def paths(self, method: str = "GET") -> list[str]:
        return [r.path for r in self.requests if r.method == method]

    # -- serving --------------------------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        segments = [s.decode("utf-8", "surrogateescape") for s in request.postpath or []]
        path = "/".join(segments)
        method = request.method.decode("ascii", "replace")
        self.requests.append(
            RecordedRequest(
                method=method,
                path=path,
                headers=request.requestHeaders.copy(),
                uri=request.uri.decode("ascii", "replace"),
            )
        )
        if method not in ("GET", "HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._text(request, http.NOT_ALLOWED, "method not allowed")

        fault = self._faults.get(path)
        # Body faults are kept for a GET: a HEAD first must not use them up.
        if fault is not None and (method == "GET" or fault.kind not in _BODY_FAULTS):
            applies, fault.remaining = _take(fault.remaining)
            if not applies:
                fault = None
        else:
            fault = None
        if fault is not None and fault.kind == "status":
            return self._text(request, fault.code, f"injected status {fault.code}")
        if fault is not None and fault.kind == "redirect":
            request.setResponseCode(fault.code)
            request.setHeader(b"location", fault.location)
            return b""
        if fault is not None and fault.kind == "silence":
            waiting = self.silenced.setdefault(path, [])
            waiting.append(request)
            request.notifyFinish().addBoth(lambda _: waiting.remove(request))
            return NOT_DONE_YET

        # Refuse anything that could leave the tree; the real server cleans paths the same way.
        if not segments or any(s in ("", ".", "..") for s in segments) or "\0" in path:
            return self._text(request, http.NOT_FOUND, "not found")
        local = self.root.joinpath(*segments)
        try:
            f = local.open("rb")
        except OSError:
            return self._text(request, http.NOT_FOUND, "not found")
        st = os.fstat(f.fileno())
        if not local.is_file():
            f.close()
            return self._text(request, http.NOT_FOUND, "not found")

        content_type = b"application/json" if path.endswith(".json") else b"application/octet-stream"
        request.setHeader(b"content-type", content_type)
        # The inode is part of the ETag: the tree rewrites JSON by rename, so a rewrite of the
        # same size within one mtime tick still changes it.
        changed = self._changed.get(path, 0)
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}-{changed}"'.encode()
        mtime = st.st_mtime + changed * 3600
        # As RFC 9110 says (13.1.3): with If-None-Match, If-Modified-Since is ignored. Its
        # one-second resolution would otherwise hide a rewrite within the same second.
        if request.getHeader(b"if-none-match") is not None:
            cached = request.setETag(etag)
            request.setHeader(b"last-modified", http.datetimeToString(int(mtime)))
        else:
            request.setETag(etag)
            cached = request.setLastModified(mtime)
        if cached is http.CACHED:
            f.close()
            return b""
        start = self._range_start(request, etag, http.datetimeToString(int(mtime)), st.st_size)
        if start:
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, st.st_size - 1, st.st_size))
            f.seek(start)
        request.setHeader(b"content-length", b"%d" % (st.st_size - start))
        if method == "HEAD":
            f.close()
            return b""

        hold = self._holds.get(path)
        park_at: int | None = None
        if hold is not None:
            parks, hold.remaining = _take(hold.remaining)
            if parks:
                park_at = hold.after if hold.after is not None else -1
        kind = fault.kind if fault is not None else None
        throttle = self.throttle
        if fault is not None and kind == "rate":
            throttle = Throttle(int(fault.count * RATE_TICK_SECONDS), RATE_TICK_SECONDS)
        producer = _BodyProducer(
            resource=self,
            request=request,
            path=path,
            file=f,
            length=st.st_size - start,
            stop_at=fault.count if fault is not None and kind in ("truncate", "reset") else None,
            reset=kind == "reset",
            corrupt=kind == "corrupt",
            park_at=park_at,
            throttle=throttle,
        )
        producer.start()
        return NOT_DONE_YET

    def _range_start(self, request: Request, etag: bytes, last_modified: bytes, size: int) -> int:
        """Where the body starts: a satisfiable `bytes=N-` whose If-Range (if any) matches, else 0."""
        wanted = request.getHeader(b"range")
        if wanted is None or self.ignore_ranges or request.method != b"GET":
            return 0
        condition = request.getHeader(b"if-range")
        if condition is not None and condition not in (etag, last_modified):
            return 0
        spec = wanted.removeprefix(b"bytes=")
        if spec == wanted or not spec.endswith(b"-") or not spec[:-1].isdigit():
            return 0
        start = int(spec[:-1])
        return start if start < size else 0

    def _text(self, request: Request, code: int, message: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (message + "\n").encode()

    def _parked(self, producer: _BodyProducer) -> bool:
        """Register a producer reaching its hold point; False if the hold is gone meanwhile."""
        hold = self._holds.get(producer.path)
        if hold is None:
            return False
        hold.parked.append(producer)
        waiters, hold.waiters = hold.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return True

    def _forget(self, producer: _BodyProducer) -> None:
        self.active.discard(producer)
        hold = self._holds.get(producer.path)
        if hold is not None and producer in hold.parked:
            hold.parked.remove(producer)


@implementer(IPushProducer)
class _BodyProducer:
    """
    Writes one file body to a request, honouring pause/resume, throttle, hold and faults.

    `park_at`: the bytes sent before parking (hold, stall), -1 for "after the first chunk", or
    None; `stop_at`: the bytes sent before the connection is closed (truncate) or reset.
    """

    def __init__(
        self,
        resource: TreeResource,
        request: Request,
        path: str,
        file: IO[bytes],
        length: int,
        stop_at: int | None,
        reset: bool,
        corrupt: bool,
        park_at: int | None,
        throttle: Throttle | None,
    ) -> None:
        self.resource = resource
        self.request = request
        self.path = path
        self.file = file
        self.length = length
        self.throttle = throttle
        self.chunk_size = throttle.chunk_size if throttle is not None else resource.chunk_size
        # Bytes to send before closing the connection (truncate), or the whole file.
        self.limit = length if stop_at is None else min(stop_at, length)
        self.truncated = stop_at is not None and stop_at < length
        self.reset = reset
        self.corrupt = corrupt
        self.park_at = min(self.chunk_size, length) if park_at == -1 else park_at
        self.sent = 0
        self.paused = False
        self.parked = False
        self.done = False
        self.running = False
        self.delayed: IDelayedCall | None = None

    def start(self) -> None:
        self.resource.active.add(self)
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(self._lost)
        self._run()

    def _lost(self, reason: Failure) -> None:
        self._close()

    def _run(self) -> None:
        # request.write can re-enter pauseProducing/resumeProducing; the flag keeps one loop.
        if self.running:
            return
        self.running = True
        try:
            while not (self.done or self.paused or self.parked or self.delayed is not None):
                want = min(self.chunk_size, self.limit - self.sent)
                if self.park_at is not None:
                    want = min(want, self.park_at - self.sent)
                data = self.file.read(want) if want > 0 else b""
                if self.corrupt and self.sent == 0 and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.sent += len(data)
                sent = self.resource.sent
                sent[self.path] = sent.get(self.path, 0) + len(data)
                # Even an empty write sends the headers, so a stall at 0 has sent them.
                self.request.write(data)
                if self.sent >= self.limit or (want > 0 and not data):
                    self._end()
                    return
                if self.park_at is not None and self.sent >= self.park_at:
                    self.park_at = None
                    if self.resource._parked(self):
                        self.parked = True
                        return
                throttle = self.throttle
                if throttle is not None and throttle.delay > 0:
                    clock = self.resource.clock
                    assert clock is not None
                    self.delayed = clock.callLater(throttle.delay, self._tick)
        finally:
            self.running = False

    def _tick(self) -> None:
        self.delayed = None
        self._run()

    def _end(self) -> None:
        request = self.request
        self._close()
        request.unregisterProducer()
        if self.reset:
            _reset(_transport_of(request), self.resource.clock)
        elif self.truncated or self.sent < self.length:
            # Content-Length promised more: dropping the connection is the only honest signal.
            request.loseConnection()
        else:
            request.finish()

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        if self.delayed is not None and self.delayed.active():
            self.delayed.cancel()
        self.delayed = None
        self.file.close()
        self.resource._forget(self)

    def unpark(self) -> None:
        if self.parked:
            self.parked = False
            self._run()

    # IPushProducer

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._run()

    def stopProducing(self) -> None:
        self._close()


def _transport_of(request: Request) -> ITCPTransport:
    # Every stream transport has abortConnection, though ITransport does not say so.
    return cast(ITCPTransport, request.channel.transport)


def _reset(transport: ITCPTransport, clock: IReactorTime | None) -> None:
    """
    Abort the connection; on a real socket (under TLS or not), with an RST rather than a FIN,
    once what was written has left the process: an RST drops what the socket still holds, so
    the peer would not see the offset asked for.
    """
    # TLS wraps the TCP transport (its own handle is the TLS connection): the socket is the
    # handle of a transport further in. Two layers at most; in memory there is none.
    inner: Any = transport
    sock: socket.socket | None = None
    for _layer in range(3):
        # Twisted's TLS transport holds small writes back for a reactor turn: out with them.
        aggregator = getattr(inner, "_aggregator", None)
        if aggregator is not None:
            aggregator.flush()
        handle = inner.getHandle() if hasattr(inner, "getHandle") else None
        if isinstance(handle, socket.socket):
            sock = handle
            break
        inner = getattr(inner, "transport", None)
        if inner is None:
            break
    if sock is None or clock is None:
        transport.abortConnection()
        return

    def attempt(tries_left: int) -> None:
        # Twisted's write buffers (FileDescriptor's); on loopback the kernel hands data to the
        # peer as it is sent.
        pending = getattr(inner, "dataBuffer", b"") or getattr(inner, "_tempDataBuffer", None)
        if pending and tries_left > 0:
            clock.callLater(RESET_DRAIN_POLL_SECONDS, attempt, tries_left - 1)
            return
        if sock.fileno() != -1:
            # A zero linger time makes close() send an RST.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abortConnection()

    attempt(RESET_DRAIN_POLLS)


class _TrackedChannel(HTTPChannel):
    """An HTTP channel its site can find and abort when the upstream stops."""

    def connectionMade(self) -> None:
        super().connectionMade()
        site = self.factory
        assert isinstance(site, _TrackingSite)
        site.channels[self] = Deferred()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        try:
            super().connectionLost(reason)
        finally:
            site = self.factory
            assert isinstance(site, _TrackingSite)
            lost = site.channels.pop(self, None)
            if lost is not None:
                lost.callback(None)


class _TrackingSite(Site):
    protocol = _TrackedChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.channels: dict[HTTPChannel, Deferred[None]] = {}


@define
class RunningUpstream:
    """A `TreeResource` listening with TLS on 127.0.0.1.

    `url` has no trailing slash; `ca_pem` is the issuing CA (for the proxy's `ca_file`),
    `cert_pem` the server certificate (what `lxc` wants in `servercerts/<remote>.crt`).
    """

    url: str
    port: int
    resource: TreeResource
    ca_pem: bytes
    cert_pem: bytes
    _listening: IListeningPort
    _site: _TrackingSite

    def stop(self) -> Deferred[None]:
        """Stop listening and abort open connections; fires when both are done."""
        waits: list[Deferred[Any]] = []
        for channel, lost in list(self._site.channels.items()):
            waits.append(lost)
            transport = channel.transport
            if ITCPTransport.providedBy(transport):
                transport.abortConnection()
        waits.append(maybeDeferred(self._listening.stopListening))
        done: Deferred[None] = DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)
        return done


def start_https_upstream(
    reactor: IReactorSSL,
    root: Path,
    ca: CA,
    names: Iterable[str] = DEFAULT_NAMES,
    resource: TreeResource | None = None,
    port: int = 0,
) -> RunningUpstream:
    """Serve `root` over TLS on an ephemeral 127.0.0.1 port with a certificate from `ca`.

    The certificate lists `names` in order (the lxc client uses the first DNS name as the TLS
    server name). Pass `resource` to configure throttling (with the reactor as its clock) or to
    share one resource between servers; `port` to listen on a given port again (a server back
    after an outage). The caller must `stop()` it.
    """
    cert_pem, key_pem = ca.issue(list(names))
    # cryptography objects, not pyOpenSSL ones: the latter are deprecated in pyOpenSSL.
    # Twisted's annotations still name the pyOpenSSL types; it accepts these at run time.
    options = CertificateOptions(
        privateKey=cast(Any, serialization.load_pem_private_key(key_pem, password=None)),
        certificate=cast(Any, x509.load_pem_x509_certificate(cert_pem)),
    )
    if resource is None:
        clock = cast(IReactorTime, reactor) if IReactorTime.providedBy(reactor) else None
        resource = TreeResource(root, clock=clock)
    site = _TrackingSite(resource)
    site.displayTracebacks = False
    listening = reactor.listenSSL(port, site, options, interface="127.0.0.1")
    port = listening.getHost().port  # type: ignore[attr-defined]
    return RunningUpstream(
        url=f"https://127.0.0.1:{port}",
        port=port,
        resource=resource,
        ca_pem=ca.cert_pem,
        cert_pem=cert_pem,
        listening=listening,
        site=site,
    )
