"""
Tests for L{proxy.web}: real C{twisted.web} requests through L{StubTreq}.

The resource under test streams with a L{Clock} of ours, while
L{StubTreq} moves bytes with its own memory reactor; L{Harness.run} and
L{Harness.settle} drive both, a bounded number of rounds.  Bodies that arrive while the test
grows the source are read with C{unbuffered=True} and L{treq.collect}.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web import http
from twisted.web.client import ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from treq.client import HTTPClient

from tests.helpers.harness import SiteClient, Streamed
from tests.helpers.logs import Logged
from tests.helpers.sources import FakeSource
from proxy.errors import NotFound, ProxyError, UpstreamFailed
from proxy.streaming import CHUNK_SIZE_BYTES, CompleteFile, FileSource, ProducerStopped
from proxy.web import AsyncResource, finish_request, serve_file

URL = "http://proxy.test/file"
ETAG = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
LAST_MODIFIED = 1_700_000_000.25
LAST_MODIFIED_HEADER = http.datetimeToString(1_700_000_000)


class FileResource(AsyncResource):
    """Serves one source and records how each C{serve_file} call ended."""

    isLeaf = True

    def __init__(self, source: FileSource, clock: IReactorTime) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.outcomes: list[BaseException | None] = []
        self.requests: list[Request] = []

    async def handle(self, request: Request) -> None:
        self.requests.append(request)
        try:
            await serve_file(
                request,
                self.source,
                etag=ETAG,
                last_modified=LAST_MODIFIED,
                clock=self.clock,
            )
        except BaseException as error:
            self.outcomes.append(error)
            raise
        self.outcomes.append(None)


class Handler(AsyncResource):
    """An L{AsyncResource} whose C{handle} is given by the test."""

    isLeaf = True

    def __init__(self, handle: Callable[[Request], Any]) -> None:
        super().__init__()
        self._handle = handle

    async def handle(self, request: Request) -> bytes | None:
        result: bytes | None = await self._handle(request)
        return result


class Harness(SiteClient):
    def get(self, *, method: str = "GET", headers: dict[str, str] | None = None) -> IResponse:
        return self.request(method, URL, headers)


def harness_for(resource: Resource, clock: Clock | None = None) -> Harness:
    return Harness(resource, clock)


def header(response: IResponse, name: str) -> str | None:
    if name.lower() == "content-length":
        # The client turns the header into response.length.
        return None if response.length == UNKNOWN_LENGTH else str(response.length)
    values = response.headers.getRawHeaders(name.encode("ascii"))
    return None if values is None else values[-1].decode("latin-1")


@pytest.fixture
def data() -> bytes:
    return os.urandom(3 * CHUNK_SIZE_BYTES + 99)


@pytest.fixture
def blob(tmp_path: object, data: bytes) -> FilePath[str]:
    path = FilePath(str(tmp_path)).child("blob")
    path.setContent(data)
    return path


@pytest.fixture
def cached(blob: FilePath[str], data: bytes) -> tuple[Harness, FileResource]:
    clock = Clock()
    resource = FileResource(CompleteFile(blob, len(data)), clock)
    return harness_for(resource, clock), resource


# serve_file on a complete file


def test_full_body(cached: tuple[Harness, FileResource], data: bytes) -> None:
    harness, resource = cached
    response = harness.get()
    assert response.code == 200
    assert header(response, "Content-Length") == str(len(data))
    assert header(response, "Content-Type") == "application/octet-stream"
    assert header(response, "ETag") == f'"{ETAG}"'
    assert header(response, "Last-Modified") == LAST_MODIFIED_HEADER.decode()
    assert header(response, "Accept-Ranges") == "bytes"
    assert harness.body(response) == data
    assert resource.outcomes == [None]


def test_head(cached: tuple[Harness, FileResource], data: bytes) -> None:
    harness, resource = cached
    response = harness.get(method="HEAD")
    assert response.code == 200
    # The client knows a HEAD has no body and says length 0; look at what
    # the server sent instead.
    [request] = resource.requests
    assert request.responseHeaders.getRawHeaders(b"Content-Length") == [b"%d" % len(data)]
    assert header(response, "ETag") == f'"{ETAG}"'
    assert harness.body(response) == b""
    assert resource.outcomes == [None]
    assert harness.clock.getDelayedCalls() == [], "no producer for HEAD"


@pytest.mark.parametrize(
    "condition", [f'"{ETAG}"', f'"other", W/"{ETAG}"', "*", f' "x",  "{ETAG}" ']
)
def test_if_none_match(cached: tuple[Harness, FileResource], condition: str) -> None:
    harness, resource = cached
    response = harness.get(headers={"If-None-Match": condition})
    assert response.code == 304
    assert header(response, "ETag") == f'"{ETAG}"'
    [request] = resource.requests
    assert request.responseHeaders.getRawHeaders(b"Content-Length") is None
    assert request.responseHeaders.getRawHeaders(b"Content-Type") is None
    assert harness.body(response) == b""


def test_if_none_match_other(cached: tuple[Harness, FileResource], data: bytes) -> None:
    harness, _ = cached
    response = harness.get(
        headers={"If-None-Match": '"other"', "If-Modified-Since": LAST_MODIFIED_HEADER.decode()}
    )
    assert response.code == 200, "If-None-Match wins over If-Modified-Since"
    assert harness.body(response) == data


def test_if_modified_since(cached: tuple[Harness, FileResource], data: bytes) -> None:
    harness, _ = cached
    response = harness.get(headers={"If-Modified-Since": LAST_MODIFIED_HEADER.decode()})
    assert response.code == 304
    earlier = http.datetimeToString(1_600_000_000).decode()
    response = harness.get(headers={"If-Modified-Since": earlier})
    assert response.code == 200
    assert harness.body(response) == data


@pytest.mark.parametrize("value", ["", " ", "yesterday", "Mon, 01 Jan", "a b c d e"])
def test_malformed_if_modified_since_ignored(
    cached: tuple[Harness, FileResource], data: bytes, value: str
) -> None:
    harness, _ = cached
    response = harness.get(headers={"If-Modified-Since": value})
    assert response.code == 200
    assert harness.body(response) == data


@pytest.mark.parametrize(
    "spec, start, end",
    [
        ("bytes=10-19", 10, 20),
        ("bytes=0-0", 0, 1),
        ("bytes=100-", 100, None),
        ("bytes=-10", -10, None),
        ("bytes=5-999999999", 5, None),
        ("bytes=-999999999", 0, None),
        ("Bytes = 65530 - 65545", 65530, 65546),
    ],
)
def test_range(
    cached: tuple[Harness, FileResource], data: bytes, spec: str, start: int, end: int | None
) -> None:
    harness, _ = cached
    expected = data[start:end]
    first = len(data) + start if start < 0 else start
    response = harness.get(headers={"Range": spec})
    assert response.code == 206
    assert header(response, "Content-Range") == (
        f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    )
    assert header(response, "Content-Length") == str(len(expected))
    assert harness.body(response) == expected


@pytest.mark.parametrize("spec", ["bytes=-0", "bytes={size}-", "bytes={size}-{more}"])
def test_range_not_satisfiable(
    cached: tuple[Harness, FileResource], data: bytes, spec: str
) -> None:
    harness, resource = cached
    spec = spec.format(size=len(data), more=len(data) + 10)
    response = harness.get(headers={"Range": spec})
    assert response.code == 416
    assert header(response, "Content-Range") == f"bytes */{len(data)}"
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert harness.body(response) == b"requested range not satisfiable\n"


@pytest.mark.parametrize(
    "spec",
    ["bytes=5-2", "bytes=abc", "items=0-1", "bytes=0-1,5-6", "bytes=-", "bytes 0-1", "bytes=+1-2"],
)
def test_malformed_range_ignored(
    cached: tuple[Harness, FileResource], data: bytes, spec: str
) -> None:
    harness, _ = cached
    response = harness.get(headers={"Range": spec})
    assert response.code == 200
    assert header(response, "Content-Range") is None
    assert harness.body(response) == data


def test_range_on_head_ignored(cached: tuple[Harness, FileResource], data: bytes) -> None:
    harness, resource = cached
    response = harness.get(method="HEAD", headers={"Range": "bytes=0-9"})
    assert response.code == 200
    [request] = resource.requests
    assert request.responseHeaders.getRawHeaders(b"Content-Length") == [b"%d" % len(data)]
    assert request.responseHeaders.getRawHeaders(b"Content-Range") is None


def test_if_range(cached: tuple[Harness, FileResource], data: bytes) -> None:
    harness, _ = cached
    response = harness.get(headers={"Range": "bytes=0-9", "If-Range": f'"{ETAG}"'})
    assert response.code == 206
    assert harness.body(response) == data[:10]
    response = harness.get(headers={"Range": "bytes=0-9", "If-Range": '"older"'})
    assert response.code == 200
    assert harness.body(response) == data
    response = harness.get(
        headers={"Range": "bytes=0-9", "If-Range": LAST_MODIFIED_HEADER.decode()}
    )
    assert response.code == 206


def test_empty_file(tmp_path: object) -> None:
    path = FilePath(str(tmp_path)).child("empty")
    path.setContent(b"")
    clock = Clock()
    harness = harness_for(FileResource(CompleteFile(path, 0), clock), clock)
    response = harness.get()
    assert response.code == 200
    assert header(response, "Content-Length") == "0"
    assert harness.body(response) == b""
    response = harness.get(headers={"Range": "bytes=0-"})
    assert response.code == 416


# serve_file on a growing source


@pytest.fixture
def growing(tmp_path: object) -> tuple[Harness, FileResource, FakeSource, bytes]:
    content = os.urandom(4 * CHUNK_SIZE_BYTES + 5)
    source = FakeSource(FilePath(str(tmp_path)).child("part"), len(content))
    clock = Clock()
    resource = FileResource(source, clock)
    return harness_for(resource, clock), resource, source, content


def test_growing_source_streamed(growing: tuple[Harness, FileResource, FakeSource, bytes]) -> None:
    harness, resource, source, content = growing
    response = harness.get()
    assert response.code == 200, "headers go out before any byte is there"
    assert header(response, "Content-Length") == str(len(content))
    body = Streamed()
    collected = treq.collect(response, body.chunks.append)
    done: list[object] = []
    collected.addBoth(done.append)

    source.append(content[:100_000])
    harness.settle()
    assert body.data == content[:100_000]
    assert done == []

    source.append(content[100_000:200_000])
    harness.settle()
    assert body.data == content[:200_000]
    assert done == []

    source.append(content[200_000:])
    harness.settle()
    assert done == [None]
    assert body.data == content
    assert resource.outcomes == [None]


def test_range_of_growing_source(
    growing: tuple[Harness, FileResource, FakeSource, bytes],
) -> None:
    harness, _, source, content = growing
    source.append(content[:1000])
    response = harness.get(headers={"Range": "bytes=150000-"})
    assert response.code == 206
    assert header(response, "Content-Range") == (
        f"bytes 150000-{len(content) - 1}/{len(content)}"
    )
    body = Streamed()
    collected = treq.collect(response, body.chunks.append)
    source.append(content[1000:160_000])
    harness.settle()
    assert body.data == content[150_000:160_000]
    source.append(content[160_000:])
    harness.run(collected)
    assert body.data == content[150_000:]


def test_failure_after_headers_aborts(
    growing: tuple[Harness, FileResource, FakeSource, bytes],
    logged: Logged,
) -> None:
    harness, resource, source, content = growing
    response = harness.get()
    body = Streamed()
    collected = treq.collect(response, body.chunks.append)
    source.append(content[:100_000])
    harness.settle()

    source.fail(UpstreamFailed("upstream sent a bad file"))
    with pytest.raises(ResponseFailed):
        harness.run(collected)
    assert body.data == content[:100_000]
    [error] = resource.outcomes
    assert isinstance(error, UpstreamFailed)
    assert any("upstream sent a bad file" in text for text in logged.texts())


def test_failure_before_headers(
    growing: tuple[Harness, FileResource, FakeSource, bytes],
) -> None:
    harness, _, source, _ = growing
    source.fail(UpstreamFailed("upstream is down"))
    response = harness.get()
    assert response.code == 502
    assert harness.body(response) == b"upstream is down\n"


def test_truncated_file_aborts(tmp_path: object, logged: Logged) -> None:
    path = FilePath(str(tmp_path)).child("short")
    path.setContent(b"x" * 1000)
    clock = Clock()
    harness = harness_for(FileResource(CompleteFile(path, 2000), clock), clock)
    response = harness.get()
    assert response.code == 200
    with pytest.raises(ResponseFailed):
        harness.body(response)


def test_client_disconnect(growing: tuple[Harness, FileResource, FakeSource, bytes]) -> None:
    """
    A client that goes away stops its own response; the shared source goes
    on and another client still gets the whole body.
    """
    harness, resource, source, content = growing
    leaving = harness.get()
    staying = harness.get()

    def hang_up(data: bytes) -> None:
        raise RuntimeError("client closes the connection")

    left = treq.collect(leaving, hang_up)
    body = Streamed()
    collected = treq.collect(staying, body.chunks.append)
    source.append(content[:1000])
    with pytest.raises(RuntimeError):
        harness.run(left)
    harness.settle()

    [error] = resource.outcomes
    assert isinstance(error, CancelledError)
    assert source.failure is None
    assert source.waiting == 1, "only the staying client still waits"

    source.append(content[1000:])
    harness.run(collected)
    assert body.data == content
    assert resource.outcomes[1:] == [None]


def test_transport_stops_producer(
    growing: tuple[Harness, FileResource, FakeSource, bytes],
    logged: Logged,
) -> None:
    """
    A real transport that loses its client calls stopProducing before the
    request hears of it; that is a client going away, not an error.
    """
    harness, resource, source, content = growing
    response = harness.get()
    collected = treq.collect(response, lambda data: None)
    source.append(content[:1000])
    harness.settle()
    [request] = resource.requests

    assert request.producer is not None
    assert request.transport is not None
    request.producer.stopProducing()
    request.transport.loseConnection()
    with pytest.raises(ResponseFailed):
        harness.run(collected)

    [error] = resource.outcomes
    assert isinstance(error, ProducerStopped)
    assert logged.failures() == []
    assert source.failure is None
    assert source.waiting == 0


# AsyncResource


def test_returned_bytes() -> None:
    async def handle(request: Request) -> bytes:
        return b"hello"

    harness = harness_for(Handler(handle))
    response = harness.get()
    assert response.code == 200
    assert header(response, "Content-Length") == "5"
    assert harness.body(response) == b"hello"


def test_handler_writes_itself() -> None:
    async def handle(request: Request) -> None:
        request.setHeader(b"Content-Type", b"text/plain")
        request.write(b"one ")
        request.write(b"two")

    harness = harness_for(Handler(handle))
    response = harness.get()
    assert harness.body(response) == b"one two"


def test_proxy_error_rendered() -> None:
    async def handle(request: Request) -> None:
        request.setHeader(b"ETag", b'"x"')
        raise NotFound("no such image:\nreally")

    harness = harness_for(Handler(handle))
    response = harness.get()
    assert response.code == 404
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert harness.body(response) == b"no such image: really\n"


def test_proxy_error_on_head() -> None:
    async def handle(request: Request) -> None:
        raise NotFound("gone")

    harness = harness_for(Handler(handle))
    response = harness.get(method="HEAD")
    assert response.code == 404
    assert harness.body(response) == b""


def test_unexpected_error(logged: Logged) -> None:
    async def handle(request: Request) -> None:
        raise ZeroDivisionError("secret detail")

    harness = harness_for(Handler(handle))
    response = harness.get()
    assert response.code == 500
    body = harness.body(response)
    assert body == b"internal error\n"
    failures = logged.failures()
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ZeroDivisionError)


def test_method_not_allowed() -> None:
    called: list[Request] = []

    async def handle(request: Request) -> None:
        called.append(request)

    harness = harness_for(Handler(handle))
    response = harness.get(method="POST")
    assert response.code == 405
    assert header(response, "Allow") == "GET, HEAD"
    assert called == []


def test_render_error_hook() -> None:
    class JSONErrors(Handler):
        def render_error(self, request: Request, error: ProxyError) -> None:
            body = b'{"error_code": %d}' % (error.code,)
            request.setResponseCode(error.code)
            request.setHeader(b"Content-Type", b"application/json")
            request.write(body)

    async def not_found(request: Request) -> None:
        raise NotFound("no")

    async def broken(request: Request) -> None:
        raise KeyError("oops")

    for handle, code in ((not_found, 404), (broken, 500)):
        harness = harness_for(JSONErrors(handle))
        response = harness.get()
        assert response.code == code
        assert header(response, "Content-Type") == "application/json"
        assert harness.body(response) == b'{"error_code": %d}' % (code,)


def test_cancelled_when_client_goes_away() -> None:
    waiting: list[Deferred[None]] = []
    cancelled: list[bool] = []

    async def handle(request: Request) -> None:
        d: Deferred[None] = Deferred(lambda _: cancelled.append(True))
        waiting.append(d)
        await d

    harness = harness_for(Handler(handle))
    pending = harness.stub.get(URL, unbuffered=True)
    harness.settle()
    assert len(waiting) == 1
    assert cancelled == []

    pending.cancel()
    harness.settle()
    assert cancelled == [True]
    results: list[object] = []
    pending.addBoth(results.append)
    assert len(results) == 1 and isinstance(results[0], Failure)


def test_no_write_after_finish(logged: Logged) -> None:
    async def handle(request: Request) -> bytes:
        request.write(b"done")
        request.finish()
        raise NotFound("too late")

    harness = harness_for(Handler(handle))
    response = harness.get()
    assert response.code == 200
    assert harness.body(response) == b"done"


def test_finish_request_tolerant() -> None:
    finished: list[Request] = []

    async def handle(request: Request) -> None:
        finish_request(request)
        finish_request(request)
        finished.append(request)

    harness = harness_for(Handler(handle))
    response = harness.get()
    assert response.code == 200
    assert harness.body(response) == b""
    [request] = finished
    assert request.finished


# Real loopback: a real TCP transport pushes back and aborts for real.


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_loopback_stream_and_abort(tmp_path: object, logged: Logged) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.server import Site

    content = os.urandom(8 * 1024 * 1024)
    whole_path = FilePath(str(tmp_path)).child("whole")
    whole_path.setContent(content)
    growing = FakeSource(FilePath(str(tmp_path)).child("part"), len(content))
    root = Resource()
    root.putChild(b"whole", FileResource(CompleteFile(whole_path, len(content)), reactor))
    root.putChild(b"growing", FileResource(growing, reactor))
    leaving = FileResource(CompleteFile(whole_path, len(content)), reactor)
    root.putChild(b"leaving", leaving)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool))
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        response = await client.get(f"{base}/whole", unbuffered=True).addTimeout(10, reactor)
        assert response.code == 200
        body = await treq.content(response).addTimeout(10, reactor)
        assert body == content

        response = await client.get(f"{base}/growing", unbuffered=True).addTimeout(10, reactor)
        assert response.code == 200
        received = Streamed()
        collected = treq.collect(response, received.chunks.append)
        growing.append(content[:1_000_000])
        for _ in range(500):
            if len(received.data) == 1_000_000:
                break
            await deferLater(reactor, 0.01)
        assert received.data == content[:1_000_000]
        growing.fail(UpstreamFailed("checksum mismatch"))
        with pytest.raises(ResponseFailed):
            await collected.addTimeout(10, reactor)

        # A client hanging up mid-body is a client going away, not an error.
        response = await client.get(f"{base}/leaving", unbuffered=True).addTimeout(10, reactor)

        def hang_up(data: bytes) -> None:
            raise RuntimeError("client closes the connection")

        with pytest.raises(RuntimeError):
            await treq.collect(response, hang_up).addTimeout(10, reactor)
        for _ in range(500):
            if leaving.outcomes:
                break
            await deferLater(reactor, 0.01)
        [error] = leaving.outcomes
        assert isinstance(error, (ProducerStopped, CancelledError))
        assert logged.failures() == []
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()
