"""
Image files over plain HTTP (proxy.plain), on a real proxy on loopback: LXD's first attempt.

The HTTPS port serves a plain-HTTP GET or HEAD of a catalogued file as over HTTPS (misses,
joins and hits, ranges of a stored file), and everything else over plain HTTP gets the 400
pointing to https://; C{listen_plain} adds plain-only ports; C{plain_http_files = false}
turns it all off; C{[server] allow} holds on every port. The bytes go out with sendfile
(tests/test_sendfile.py tests that part on its own).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from attrs import define
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from proxy import streaming
from proxy.listen import PLAIN_HTTP_BODY, TLS_HANDSHAKE_RECORD
from proxy.plain import HTTPS_ONLY_BODY
from tests.helpers.certs import make_ca
from tests.helpers.logs import Logged
from tests.helpers.proxy_process import https_client
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import Tree, build_tree
from tests.helpers.upstream import RunningUpstream, start_https_upstream

reactor: Any = _reactor

pytestmark = [pytest.mark.loopback]

BIG_BYTES = 6 * 1024 * 1024


@define
class Plain:
    tree: Tree
    upstream: RunningUpstream
    proxy: RunningProxy
    http: HTTPClient

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.proxy.port}/up/{path}"


def plain_client() -> HTTPClient:
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


async def _start(tmp_path: Path, **server: Any) -> tuple[Tree, RunningUpstream, RunningProxy]:
    tree = build_tree(tmp_path / "tree", big_rootfs_bytes=BIG_BYTES)
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    try:
        proxy = await start_proxy(
            reactor, tmp_path / "state", {"up": (upstream.url, ca.cert_pem)}, server=server
        )
    except BaseException:
        await upstream.stop()
        raise
    return tree, upstream, proxy


@pytest_twisted.async_yield_fixture
async def plain(tmp_path: Path) -> AsyncIterator[Plain]:
    tree, upstream, proxy = await _start(tmp_path, listen_plain=["127.0.0.1:0"])
    try:
        yield Plain(tree, upstream, proxy, plain_client())
    finally:
        await proxy.stop()
        await upstream.stop()


def access_events(logged: Logged) -> list[dict[str, Any]]:
    return [dict(e) for e in logged if e.get("log_namespace") == "proxy.access"]


async def _get(client: HTTPClient, url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    response = await client.get(url, **kwargs).addTimeout(30, reactor)
    body = await treq.content(response).addTimeout(60, reactor)
    return response.code, response.headers, body


@pytest_twisted.ensureDeferred
async def test_image_files_cold_joined_and_hit_over_plain_http(plain: Plain, logged: Logged) -> None:
    image = plain.tree.image("bigos/1.0")
    assert image.root is not None
    root = image.root
    url = plain.url(root.path)
    # Two clients of one cold file: the second joins the download while it grows.
    plain.upstream.resource.stall(root.path, 1024 * 1024)
    first = plain.http.get(url, unbuffered=True).addTimeout(30, reactor)
    second = plain.http.get(url, unbuffered=True).addTimeout(30, reactor)
    responses = [await first, await second]
    plain.upstream.resource.release(root.path)
    for response in responses:
        assert response.code == 200
        body = await treq.content(response).addTimeout(60, reactor)
        assert hashlib.sha256(body).hexdigest() == root.sha256
    # Then a hit, whole and as a range.
    code, headers, body = await _get(plain.http, url)
    assert (code, hashlib.sha256(body).hexdigest()) == (200, root.sha256)
    assert headers.getRawHeaders(b"Content-Type") == [b"application/octet-stream"]
    code, headers, body = await _get(plain.http, url, headers={b"Range": [b"bytes=1000-1999999"]})
    whole = (plain.tree.root / root.path).read_bytes()
    assert (code, body) == (206, whole[1000:2000000])
    head = await plain.http.head(url).addTimeout(30, reactor)
    assert head.code == 200 and head.headers.getRawHeaders(b"Content-Length") == [str(root.size).encode()]
    assert plain.upstream.resource.count(root.path) == 1
    files = [e for e in access_events(logged) if e["path"].endswith(root.path)]
    assert sorted(e["cache"] for e in files[:2]) == ["joined", "miss"]
    assert [(e["cache"], e["via"], e["status"], e["end"]) for e in files[2:]] == [
        ("hit", "plain", 200, "done"), ("hit", "plain", 206, "done"), ("hit", "plain", 200, "done"),
    ]
    assert {e["via"] for e in files} == {"plain"}
    assert [e["bytes"] for e in files[:3]] == [root.size] * 3


@pytest_twisted.ensureDeferred
async def test_everything_else_over_plain_http_gets_the_400(plain: Plain, logged: Logged) -> None:
    meta = plain.tree.image("testos/1.0").meta
    base = f"http://127.0.0.1:{plain.proxy.port}"
    for path in (
        "/up/streams/v1/index.json", "/up/streams/v1/images.json", "/up/", "/up",
        "/1.0", "/1.0/images", "/", "/status.json", "/setup.sh", "/import/x", "/nothing/x",
        "/up/%2e%2e/streams/v1/index.json",
    ):
        code, headers, body = await _get(plain.http, base + path)
        assert (path, code, body) == (path, 400, HTTPS_ONLY_BODY)
    # Not a read.
    response = await plain.http.post(plain.url(meta.path), data=b"x").addTimeout(30, reactor)
    assert (response.code, await treq.content(response)) == (400, HTTPS_ONLY_BODY)
    # No upstream request for any of it, and the catalogue was never fetched.
    assert plain.upstream.resource.count("streams/v1/index.json") == 0
    # HTTPS on the same port still serves the catalogue.
    tls = https_client(plain.proxy.cert_pem)
    code, _, body = await _get(tls, f"{plain.proxy.url('up')}/streams/v1/index.json")
    assert code == 200 and body.startswith(b"{")
    index = [e for e in access_events(logged) if e["path"] == "/up/streams/v1/index.json"]
    assert [e["via"] for e in index] == ["plain", "tls"]


@pytest_twisted.ensureDeferred
async def test_listen_plain_serves_only_the_files(plain: Plain) -> None:
    ports = await plain.proxy.service.listener.ready
    assert len(ports) == 2 and ports[0] == plain.proxy.port
    port = ports[1]
    meta = plain.tree.image("testos/1.0").meta
    code, _, body = await _get(plain.http, plain.url(meta.path, port))
    assert (code, hashlib.sha256(body).hexdigest()) == (200, meta.sha256)
    code, _, body = await _get(plain.http, plain.url("streams/v1/index.json", port))
    assert (code, body) == (400, HTTPS_ONLY_BODY)
    # A TLS handshake there is closed at once, unanswered.
    received = await _raw(port, bytes([TLS_HANDSHAKE_RECORD, 3, 1, 0, 5]) + b"hello")
    assert received == b""


@pytest_twisted.ensureDeferred
async def test_plain_http_files_off_answers_the_400_at_once(tmp_path: Path) -> None:
    tree, upstream, proxy = await _start(
        tmp_path, plain_http_files=False, listen_plain=["127.0.0.1:0"]
    )
    try:
        assert len(await proxy.service.listener.ready) == 1
        meta = tree.image("testos/1.0").meta
        code, _, body = await _get(plain_client(), f"http://127.0.0.1:{proxy.port}/up/{meta.path}")
        assert (code, body) == (400, PLAIN_HTTP_BODY)
        assert upstream.resource.count(meta.path) == 0
    finally:
        await proxy.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_allow_holds_over_plain_http(tmp_path: Path) -> None:
    tree, upstream, proxy = await _start(tmp_path, allow=["192.0.2.0/24"])
    try:
        meta = tree.image("testos/1.0").meta
        code, _, _ = await _get(plain_client(), f"http://127.0.0.1:{proxy.port}/up/{meta.path}")
        assert code == 403
        assert upstream.resource.count(meta.path) == 0
    finally:
        await proxy.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_without_sendfile_the_same_bytes(plain: Plain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "SENDFILE_ENABLED", False)
    image = plain.tree.image("bigos/1.0")
    assert image.root is not None
    code, _, body = await _get(plain.http, plain.url(image.root.path))
    assert (code, hashlib.sha256(body).hexdigest()) == (200, image.root.sha256)


class _Raw(Protocol):
    def __init__(self, payload: bytes, done: Deferred[bytes]) -> None:
        self.payload = payload
        self.done = done
        self.data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.done.callback(self.data)


async def _raw(port: int, payload: bytes) -> bytes:
    """What the port answers to C{payload}, once it closes the connection."""
    done: Deferred[bytes] = Deferred()
    factory = ClientFactory()
    factory.buildProtocol = lambda addr: _Raw(payload, done)  # type: ignore[method-assign]
    connector = reactor.connectTCP("127.0.0.1", port, factory)
    try:
        return await done.addTimeout(10, reactor)
    finally:
        connector.disconnect()


@pytest_twisted.ensureDeferred
async def test_sendfile_on_plain_connections_only(plain: Plain, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []

    class Recording(streaming.SendfileProducer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(streaming, "SendfileProducer", Recording)
    meta = plain.tree.image("testos/1.0").meta
    tls = https_client(plain.proxy.cert_pem)
    for client, url, count in (
        (plain.http, plain.url(meta.path), 1),  # a miss: the download followed with sendfile
        (tls, f"{plain.proxy.url('up')}/{meta.path}", 1),  # TLS: the file producer
        (plain.http, plain.url(meta.path), 2),  # a hit
    ):
        code, _, body = await _get(client, url)
        assert (code, hashlib.sha256(body).hexdigest()) == (200, meta.sha256)
        assert len(made) == count
