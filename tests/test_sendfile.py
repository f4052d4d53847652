"""
L{proxy.streaming.SendfileProducer} on real loopback sockets: the bytes are identical for a
large file, a slow reader, a range, a file growing while it is sent, and pipelined requests;
a client that goes away or reads nothing ends the response and leaves no descriptor or
watched writer behind.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from attrs import define, field
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.server import Request

from proxy import streaming
from proxy.channel import HeadLimits, ProxySite
from proxy.streaming import CompleteFile, FileSource, ProducerStopped, SendfileProducer, _Writable
from proxy.web import AsyncResource, serve_file
from tests.helpers.logs import Logged

reactor: Any = _reactor

pytestmark = [pytest.mark.loopback]

MiB = 1024 * 1024


def _pattern(size: int) -> bytes:
    # Not a repeating block: a byte out of place shows.
    return random.Random(size).randbytes(size)


@define
class GrowingSource:
    """A download as followers see it: the file grows; the last byte waits for verify()."""

    path: FilePath[str]
    size: int
    written: int = 0
    verified: bool = False
    waiters: list[Deferred[None]] = field(factory=list)
    # As proxy.fetch.Download: grows when the bytes offered are dropped for others.
    restarts: int = 0

    @property
    def failure(self) -> Failure | None:
        return None

    def available(self) -> int:
        return self.size if self.verified else min(self.written, self.size - 1)

    def wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self.waiters.append(waiter)
        return waiter

    def grow(self, data: bytes) -> None:
        with open(self.path.path, "ab") as f:
            f.write(data)
        self.written += len(data)
        self._tell()

    def verify(self) -> None:
        self.verified = True
        self._tell()

    def start_over(self, data: bytes) -> None:
        """The bytes offered did not verify: the download starts again with C{data}."""
        with open(self.path.path, "r+b") as f:
            f.truncate(0)
        self.written = 0
        self.restarts += 1
        self.grow(data)

    def _tell(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)


class FileResource(AsyncResource):
    isLeaf = True

    def __init__(self, source: Callable[[], FileSource]) -> None:
        super().__init__()
        self._source = source
        self.outcomes: list[object] = []
        self.ended: Deferred[None] = Deferred()

    async def handle(self, request: Request) -> None:
        source = self._source()
        try:
            await serve_file(
                request, source, etag="e", last_modified=0, clock=reactor,
                ranges=isinstance(source, CompleteFile),
            )
            self.outcomes.append(None)
        except Exception as e:
            self.outcomes.append(e)
            raise
        finally:
            if not self.ended.called:
                self.ended.callback(None)


@define
class Server:
    resource: FileResource
    port: Any
    made: list[SendfileProducer]


@pytest_twisted.async_yield_fixture
async def serve(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Server]]:
    made: list[SendfileProducer] = []

    class Recording(SendfileProducer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(streaming, "SendfileProducer", Recording)
    ports: list[Any] = []

    def start(source: Callable[[], FileSource], send_timeout: float = 60.0) -> Server:
        resource = FileResource(source)
        site = ProxySite(resource, HeadLimits(send_timeout=send_timeout), reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return Server(resource, port, made)

    try:
        yield start
    finally:
        for port in ports:
            await port.stopListening()


class Reader(Protocol):
    """Sends C{request}, reads everything until the server closes, optionally slowly."""

    def __init__(
        self, request: bytes, *, pause_every: int = 0, pause_seconds: float = 0.0,
        abort_after: int | None = None, never_read: bool = False,
    ) -> None:
        self.request = request
        self.pause_every = pause_every
        self.pause_seconds = pause_seconds
        self.abort_after = abort_after
        self.never_read = never_read
        self.data = bytearray()
        self.done: Deferred[bytes] = Deferred()
        self._next_pause = pause_every

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.never_read:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.data += data
        if self.abort_after is not None and len(self.data) >= self.abort_after:
            self.abort_after = None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self.pause_every and len(self.data) >= self._next_pause:
            self._next_pause += self.pause_every
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            reactor.callLater(self.pause_seconds, self.transport.resumeProducing)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.done.callback(bytes(self.data))


async def fetch(server: Server, reader: Reader, timeout: float = 60) -> bytes:
    factory = ClientFactory()
    factory.buildProtocol = lambda addr: reader  # type: ignore[method-assign]
    connector = reactor.connectTCP("127.0.0.1", server.port.getHost().port, factory)
    try:
        return await reader.done.addTimeout(timeout, reactor)
    finally:
        connector.disconnect()


def split(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def GET(extra: bytes = b"") -> bytes:
    return b"GET /f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _watched() -> list[object]:
    return [w for w in reactor.getWriters() if isinstance(w, _Writable)]


async def _settle(fds: int = 1 << 30) -> None:
    # The server's side of a closed connection ends on a later turn than the client's.
    for _ in range(50):
        if not _watched() and _open_fds() <= fds:
            break
        d: Deferred[None] = Deferred()
        reactor.callLater(0.02, d.callback, None)
        await d


@pytest_twisted.ensureDeferred
async def test_large_file_identical_with_sendfile(tmp_path: Path, serve: Callable[..., Server]) -> None:
    data = _pattern(64 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server = serve(lambda: CompleteFile(FilePath(str(path)), len(data)))
    before = _open_fds()
    head, body = split(await fetch(server, Reader(GET())))
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: %d" % len(data) in head
    assert body == data
    await server.resource.ended
    assert server.resource.outcomes == [None]
    assert len(server.made) == 1
    await _settle(before)
    assert _watched() == [] and _open_fds() <= before


@pytest_twisted.ensureDeferred
async def test_slow_reader_gets_every_byte(tmp_path: Path, serve: Callable[..., Server]) -> None:
    data = _pattern(12 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server = serve(lambda: CompleteFile(FilePath(str(path)), len(data)))
    reader = Reader(GET(), pause_every=MiB, pause_seconds=0.03)
    head, body = split(await fetch(server, reader))
    assert body == data and len(server.made) == 1


@pytest_twisted.ensureDeferred
async def test_range_is_sent_from_its_offset(tmp_path: Path, serve: Callable[..., Server]) -> None:
    data = _pattern(16 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server = serve(lambda: CompleteFile(FilePath(str(path)), len(data)))
    start, end = 1000 + 3 * MiB, 9 * MiB + 17
    head, body = split(await fetch(server, Reader(GET(b"Range: bytes=%d-%d\r\n" % (start, end - 1)))))
    assert head.startswith(b"HTTP/1.1 206 ")
    assert body == data[start:end]
    assert len(server.made) == 1


@pytest_twisted.ensureDeferred
async def test_pipelined_responses_stay_in_order(tmp_path: Path, serve: Callable[..., Server]) -> None:
    data = _pattern(3 * MiB + 5)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server = serve(lambda: CompleteFile(FilePath(str(path)), len(data)))
    keep = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n"
    response = await fetch(server, Reader(keep + GET(b"Range: bytes=0-9\r\n")))
    head, rest = split(response)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert rest[: len(data)] == data
    head2, body2 = split(rest[len(data):])
    assert head2.startswith(b"HTTP/1.1 206 ") and body2 == data[:10]
    assert len(server.made) == 2


@pytest_twisted.ensureDeferred
async def test_growing_file_is_followed_and_the_last_byte_waits(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    data = _pattern(8 * MiB + 3)
    path = tmp_path / "partial"
    path.write_bytes(b"")
    source = GrowingSource(FilePath(str(path)), len(data))
    server = serve(lambda: source)
    reader = Reader(GET())
    fetched = Deferred.fromCoroutine(fetch(server, reader))
    chunk = 512 * 1024
    for offset in range(0, len(data), chunk):
        source.grow(data[offset:offset + chunk])
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    # Everything written, but not verified: all but the last byte is out, and no more.
    for _ in range(200):
        if len(split(bytes(reader.data))[1]) >= len(data) - 1:
            break
        d = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    assert len(split(bytes(reader.data))[1]) == len(data) - 1
    assert not reader.done.called
    source.verify()
    head, body = split(await fetched)
    assert body == data and len(server.made) == 1


@pytest_twisted.ensureDeferred
async def test_a_source_that_starts_over_cuts_the_response(
    tmp_path: Path, serve: Callable[..., Server]
) -> None:
    """Bytes sent are never continued with another body's: over plain HTTP as over TLS."""
    data = _pattern(4 * MiB)
    path = tmp_path / "partial"
    path.write_bytes(b"")
    source = GrowingSource(FilePath(str(path)), len(data))
    server = serve(lambda: source)
    reader = Reader(GET())
    fetched = Deferred.fromCoroutine(fetch(server, reader))
    source.grow(b"w" * MiB)
    for _ in range(200):
        if len(split(bytes(reader.data))[1]) >= MiB:
            break
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    assert split(bytes(reader.data))[1] == b"w" * MiB
    source.start_over(data)
    source.verify()
    received = await fetched
    body = split(received)[1]
    assert body == b"w" * MiB, "cut where it was, never spliced with the new body"
    await server.resource.ended.addTimeout(10, reactor)
    [outcome] = server.resource.outcomes
    assert isinstance(outcome, streaming.SourceRestarted)


@pytest_twisted.ensureDeferred
async def test_client_gone_mid_way_stops_and_releases(tmp_path: Path, serve: Callable[..., Server]) -> None:
    data = _pattern(64 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server = serve(lambda: CompleteFile(FilePath(str(path)), len(data)))
    before = _open_fds()
    received = await fetch(server, Reader(GET(), abort_after=2 * MiB))
    assert 2 * MiB <= len(received) < len(data)
    await server.resource.ended.addTimeout(10, reactor)
    [outcome] = server.resource.outcomes
    assert isinstance(outcome, ProducerStopped)
    await _settle(before)
    assert _watched() == [] and _open_fds() <= before


@pytest_twisted.ensureDeferred
async def test_client_reading_nothing_is_dropped_after_send_timeout(
    tmp_path: Path, serve: Callable[..., Server], logged: Logged
) -> None:
    data = _pattern(64 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server = serve(lambda: CompleteFile(FilePath(str(path)), len(data)), send_timeout=0.5)
    reader = Reader(GET(), never_read=True)
    fetched = Deferred.fromCoroutine(fetch(server, reader))
    await server.resource.ended.addTimeout(20, reactor)
    [outcome] = server.resource.outcomes
    assert isinstance(outcome, ProducerStopped)
    assert logged.matching("read nothing for")
    assert reader.transport is not None
    reader.transport.resumeProducing()  # type: ignore[attr-defined]
    received = await fetched
    assert len(split(received)[1]) < len(data)
    await _settle()
    assert _watched() == []



@pytest_twisted.ensureDeferred
async def test_a_failing_sendfile_cuts_the_response(
    tmp_path: Path, serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _pattern(4 * MiB)
    path = tmp_path / "blob"
    path.write_bytes(data)
    server = serve(lambda: CompleteFile(FilePath(str(path)), len(data)))

    def failing(*args: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(streaming.os, "sendfile", failing)
    head, body = split(await fetch(server, Reader(GET())))
    # The headers went out; the body is short against its Content-Length, never taken whole.
    assert head.startswith(b"HTTP/1.1 200 ") and len(body) < len(data)
    await server.resource.ended.addTimeout(10, reactor)
    [outcome] = server.resource.outcomes
    assert isinstance(outcome, OSError) and outcome.errno == errno.EIO
    await _settle()
    assert _watched() == []
