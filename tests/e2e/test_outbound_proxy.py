"""
The proxy service reaches a real HTTPS upstream through a real forward proxy (Debian's
C{tinyproxy}, and C{squid} once), all on loopback: the forward proxy's log shows the C{CONNECT}s it was asked for,
the upstream records what reached it, and the bytes the client gets are checked against the
catalogue's files.

Covered: the catalogue and an image file through the tunnel (TLS verified end to end); a
redirect to a foreign origin that never becomes a C{CONNECT}; a forward proxy that is gone; one
that demands credentials (right ones work; wrong or none give one clear warning and a 502 that
names the proxy and its answer, the upstream is marked offline, and the password is in no log
line, answer, status page or configuration repr); one that refuses the C{CONNECT}
(C{ConnectPort 443} only); squid with credentials, right and missing; C{HTTPS_PROXY} from
the environment, C{NO_PROXY} excluding the
upstream, and C{upstream_proxy = ""} ignoring the environment.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import LogLevel

from tests.faults.upstreams import BROKEN, NAME, OTHER, PRODUCTS, tree_files, write_tree
from tests.helpers.certs import make_ca
from tests.helpers.forward_proxy import ForwardProxy, free_port, start_squid, start_tinyproxy
from tests.helpers.invariants import Received, receive
from tests.helpers.logs import Logged
from tests.helpers.proxy_process import https_client
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.upstream import RunningUpstream, start_https_upstream

reactor: Any = _reactor
pytestmark = pytest.mark.loopback

INDEX = "streams/v1/index.json"
PASSWORD = "pa55-w0rd-xyz"
WRONG = "wr0ng-pa55-qrs"
NET_TIMEOUT_SECONDS = 20.0
# Rounds of LOG_POLL_SECONDS waiting for a forward proxy's log line.
LOG_POLLS = 200
LOG_POLL_SECONDS = 0.025


class Scene:
    """What one test runs: an upstream, forward proxies, proxy services; all stopped at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.files = tree_files()
        self._stops: list[Callable[[], Awaitable[None] | None]] = []
        self._count = 0

    def upstream(self) -> RunningUpstream:
        ca = make_ca()
        self.ca_pem = ca.cert_pem
        upstream = start_https_upstream(reactor, write_tree(self.tmp / "tree", self.files), ca)
        self._stops.append(upstream.stop)
        return upstream

    async def forward_proxy(self, **options: Any) -> ForwardProxy:
        self._count += 1
        proxy = await start_tinyproxy(reactor, self.tmp / f"tinyproxy{self._count}", **options)
        self._stops.append(proxy.stop)
        return proxy

    async def squid(self, **options: Any) -> ForwardProxy:
        proxy = await start_squid(reactor, **options)
        self._stops.append(proxy.stop)
        return proxy

    async def proxy(
        self, upstream: RunningUpstream, *, server: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[RunningProxy, HTTPClient]:
        self._count += 1
        running = await start_proxy(
            reactor, self.tmp / f"state{self._count}", {NAME: (upstream.url, self.ca_pem)},
            server=server, upstream_options={NAME: dict(options or {})},
        )
        self._stops.append(running.stop)
        return running, https_client(running.cert_pem)

    async def close(self) -> None:
        """Stop everything, the last started first; every stop is tried, the first error raised."""
        errors: list[BaseException] = []
        for stop in reversed(self._stops):
            try:
                result = stop()
                if isinstance(result, Deferred) or hasattr(result, "__await__"):
                    await result  # type: ignore[misc]
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


async def get(client: HTTPClient, running: RunningProxy, path: str) -> Received:
    """GET C{/cache/PATH}, or C{PATH} itself when it starts with a slash."""
    url = f"https://localhost:{running.port}{path}" if path.startswith("/") else f"{running.url(NAME)}/{path}"
    d: Deferred[Received] = Deferred.fromCoroutine(receive(client.get(url, unbuffered=True)))
    return await d.addTimeout(NET_TIMEOUT_SECONDS, reactor)


def requested(upstream: RunningUpstream) -> list[str]:
    return [r.path for r in upstream.resource.requests]


@pytest_twisted.ensureDeferred
async def test_catalogue_and_image_through_the_forward_proxy(tmp_path: Path, logged: Logged) -> None:
    scene = Scene(tmp_path)
    try:
        upstream = scene.upstream()
        forward = await scene.forward_proxy()
        running, client = await scene.proxy(upstream, server={"upstream_proxy": forward.url()})
        index = await get(client, running, INDEX)
        assert (index.code, index.body) == (200, scene.files[INDEX]), index.describe()
        products = await get(client, running, PRODUCTS)
        assert (products.code, products.body) == (200, scene.files[PRODUCTS])
        image = await get(client, running, BROKEN)
        assert image.complete and (image.code, image.body) == (200, scene.files[BROKEN])
        # Through the tunnel, and only to the upstream's origin.
        target = f"127.0.0.1:{upstream.port}"
        assert forward.connects() and set(forward.connects()) == {target}
        assert {INDEX, PRODUCTS, BROKEN} <= set(requested(upstream))
        # Quiet as a direct connection: no line per tunnel.
        assert not [t for t in logged.texts() if "Starting factory <twisted.internet.protocol" in t]
        # A redirect off the upstream is refused before any connection: the forward proxy
        # never hears of the foreign origin.
        foreign = free_port()
        upstream.resource.redirect(OTHER, f"https://127.0.0.1:{foreign}/{OTHER}")
        before = len(forward.connects())
        redirected = await get(client, running, OTHER)
        assert redirected.code == 502 and OTHER in requested(upstream)
        assert f":{foreign}" not in forward.log()
        assert set(forward.connects()) == {target} and len(forward.connects()) >= before
        # The forward proxy gone: named, and the upstream offline as after a connect failure.
        upstream.resource.clear(OTHER)
        forward.stop()
        gone = await get(client, running, OTHER)
        unreachable = f"cannot reach the outbound proxy {forward.url()} (for {target}): "
        assert gone.code == 502 and unreachable in gone.body.decode(), gone.describe()
        assert running.cache.health[NAME].offline
        assert [line for line in logged.lines(LogLevel.warn) if line.startswith(unreachable)]
    finally:
        await scene.close()


async def refused(client: HTTPClient, running: RunningProxy, refusal: str) -> list[Received]:
    """
    A request, then three at once, while the forward proxy refuses: the first is a 502 that
    marks the upstream offline; the others wait for one probe of the catalogue and get its
    502 (a request that found a probe running elsewhere would get a 503). Every answer says
    what the forward proxy answered.
    """
    first = await get(client, running, INDEX)
    assert first.code == 502, first.describe()
    health = running.cache.health[NAME]
    assert health.offline and refusal in health.describe()
    answers = [first] + list(await gatherResults([
        Deferred.fromCoroutine(get(client, running, path)) for path in (INDEX, BROKEN, OTHER)
    ]))
    for answer in answers:
        assert answer.code in (502, 503) and refusal in answer.body.decode(), answer.body
    return answers


def proxy_warnings(logged: Logged) -> list[str]:
    return [line for line in logged.lines(LogLevel.warn) if line.startswith("the outbound proxy")]


@pytest_twisted.ensureDeferred
async def test_a_proxy_that_demands_credentials(tmp_path: Path, logged: Logged) -> None:
    scene = Scene(tmp_path)
    try:
        upstream = scene.upstream()
        forward = await scene.forward_proxy(credentials=("alice", PASSWORD))
        target = f"127.0.0.1:{upstream.port}"
        # Per upstream, the right credentials.
        right, client = await scene.proxy(
            upstream, options={"proxy": forward.url(f"alice:{PASSWORD}")}
        )
        await get(client, right, INDEX)
        await get(client, right, PRODUCTS)
        image = await get(client, right, BROKEN)
        assert image.complete and image.body == scene.files[BROKEN], image.describe()
        assert proxy_warnings(logged) == []
        # The wrong ones: refused, said once, the upstream offline after the first failure.
        wrong, client = await scene.proxy(upstream, server={"upstream_proxy": forward.url(f"alice:{WRONG}")})
        seen = len(requested(upstream))
        # tinyproxy's answer to wrong credentials (none get 407, below).
        refusal = f"the outbound proxy {forward.url()} refused CONNECT to {target}: 401 Unauthorized"
        answers = await refused(client, wrong, refusal)
        status = await get(client, wrong, "/status.json")
        page = await get(client, wrong, "/")
        assert json.loads(status.body)["upstreams"][0]["via"] == forward.url()
        assert f"via {forward.url()}" in page.body.decode()
        assert proxy_warnings(logged) == [refusal]
        assert len(requested(upstream)) == seen
        # Nowhere a password: not in the log, the answers, or the status page.
        shown = "\n".join(logged.texts()) + "".join(a.body.decode() for a in answers)
        shown += status.body.decode() + page.body.decode() + repr(wrong.cache.config)
        assert refusal in status.body.decode(), json.loads(status.body)
        assert PASSWORD not in shown and WRONG not in shown
        assert PASSWORD not in forward.log() and WRONG not in forward.log()
        # Without credentials.
        none, client = await scene.proxy(upstream, server={"upstream_proxy": forward.url()})
        assert (await get(client, none, INDEX)).code == 502
        assert proxy_warnings(logged)[1:] == [
            f"the outbound proxy {forward.url()} refused CONNECT to {target}: "
            f"407 Proxy Authentication Required"
        ]
    finally:
        await scene.close()


@pytest_twisted.ensureDeferred
async def test_a_proxy_that_refuses_the_connect(tmp_path: Path, logged: Logged) -> None:
    scene = Scene(tmp_path)
    try:
        upstream = scene.upstream()
        forward = await scene.forward_proxy(connect_ports=[443])
        running, client = await scene.proxy(upstream, server={"upstream_proxy": forward.url()})
        refusal = (f"the outbound proxy {forward.url()} refused CONNECT to "
                   f"127.0.0.1:{upstream.port}: 403 Access violation")
        await refused(client, running, refusal)
        assert proxy_warnings(logged) == [refusal]
        assert requested(upstream) == []
        # The first request and the probes, nothing else.
        assert set(forward.connects()) == {f"127.0.0.1:{upstream.port}"}
    finally:
        await scene.close()


@pytest_twisted.ensureDeferred
async def test_https_proxy_and_no_proxy_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged: Logged
) -> None:
    scene = Scene(tmp_path)
    try:
        upstream = scene.upstream()
        forward = await scene.forward_proxy()
        # (conftest.py starts every test without proxy variables)
        monkeypatch.setenv("HTTPS_PROXY", forward.url())
        through, client = await scene.proxy(upstream)
        assert (await get(client, through, INDEX)).code == 200
        assert forward.connects() == [f"127.0.0.1:{upstream.port}"]
        # Said at start-up, with where it came from.
        assert (f"upstream https://127.0.0.1:{upstream.port} is reached through the outbound "
                f"proxy {forward.url()} (HTTPS_PROXY)") in logged.lines(LogLevel.info)
        # NO_PROXY takes the upstream out of the environment's proxy...
        monkeypatch.setenv("NO_PROXY", f"example.com, 127.0.0.0/8:{upstream.port}")
        direct, client = await scene.proxy(upstream)
        assert (await get(client, direct, INDEX)).code == 200
        # ... and [server] upstream_proxy = "" the environment altogether.
        monkeypatch.delenv("NO_PROXY")
        ignored, client = await scene.proxy(upstream, server={"upstream_proxy": ""})
        assert (await get(client, ignored, INDEX)).code == 200
        assert len(forward.connects()) == 1
        assert requested(upstream).count(INDEX) == 3
    finally:
        await scene.close()


@pytest_twisted.ensureDeferred
async def test_through_squid_with_credentials(tmp_path: Path, logged: Logged) -> None:
    scene = Scene(tmp_path)
    try:
        upstream = scene.upstream()
        squid = await scene.squid(credentials=("alice", PASSWORD))
        target = f"127.0.0.1:{upstream.port}"
        right, client = await scene.proxy(
            upstream, server={"upstream_proxy": squid.url(f"alice:{PASSWORD}")}
        )
        assert (await get(client, right, INDEX)).code == 200
        assert (await get(client, right, PRODUCTS)).code == 200
        image = await get(client, right, BROKEN)
        assert image.complete and image.body == scene.files[BROKEN], image.describe()
        # squid logs a tunnel once it is closed: close the kept connections, then look.
        await right.cache.core.close()
        for _ in range(LOG_POLLS):
            if squid.connects():
                break
            await deferLater(reactor, LOG_POLL_SECONDS, lambda: None)
        assert set(squid.connects()) == {target}
        assert f"CONNECT {target} alice " in squid.log()
        # Without credentials: squid's 407, said once, named in the answers.
        none, client = await scene.proxy(upstream, server={"upstream_proxy": squid.url()})
        refusal = (f"the outbound proxy {squid.url()} refused CONNECT to {target}: "
                   f"407 Proxy Authentication Required")
        await refused(client, none, refusal)
        assert proxy_warnings(logged) == [refusal]
        assert PASSWORD not in "\n".join(logged.texts())
    finally:
        await scene.close()
