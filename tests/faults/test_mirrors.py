"""
Mirror failover (issue 11, point 2) on loopback: two HTTPS mirrors serving the same tree.

The first mirror is stopped (its listener closed, its connections aborted) in the middle of a
cold download that four clients follow: the download moves to the second mirror, asking for the
rest with C{Range} (and no C{If-Range}: the first mirror's ETag means nothing to the second),
and every client gets the one verified copy. While the first is down the catalogue comes from
the second; once it is back and its backoff has run out, it is asked first again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
import treq
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import deferLater
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from proxy.mirrors import Mirrors
from tests.faults.upstreams import (
    BROKEN,
    NAME,
    NET_TIMEOUT_SECONDS,
    OTHER,
    PRODUCTS,
    ROOTFS_BYTES,
    KiB,
    Loopback,
    tree_files,
    write_tree,
)
from tests.helpers.certs import make_ca
from tests.helpers.invariants import (
    Received,
    assert_index_reopens,
    assert_no_traceback,
    assert_only_catalogue,
    assert_store_verified,
    assert_whole,
)
from tests.helpers.logs import Logged
from tests.helpers.running_proxy import start_proxy
from tests.helpers.upstream import RunningUpstream, Throttle, start_https_upstream
from tests.helpers.wired import INDEX

reactor: Any = _reactor

# About half a second for the rootfs, so the first mirror can be stopped in the middle.
PACE = Throttle(8 * KiB, 0.02)
CLIENTS = 4
# Short, so that the test need not wait 5 s for the first mirror to be tried again.
MIRROR_BACKOFF_SECONDS = 0.5
POLL_SECONDS = 0.01
POLLS = int(NET_TIMEOUT_SECONDS / POLL_SECONDS)


async def until(condition: Any, what: str) -> None:
    for _ in range(POLLS):
        if condition():
            return
        await deferLater(reactor, POLL_SECONDS, lambda: None)
    raise AssertionError(f"timed out waiting until {what}")


def gets(upstream: RunningUpstream, path: str) -> list[Any]:
    return [r for r in upstream.resource.requests if r.path == path and r.method == "GET"]


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_mirror_killed_in_the_middle_of_a_download(tmp_path: Path, logged: Logged) -> None:
    files = tree_files()
    root = write_tree(tmp_path / "tree", files)
    ca = make_ca()
    first = start_https_upstream(reactor, root, ca)
    second = start_https_upstream(reactor, root, ca)
    back: RunningUpstream | None = None
    site: Loopback | None = None
    try:
        proxy = await start_proxy(
            reactor, tmp_path / "state", {NAME: (first.url, ca.cert_pem)},
            {"download_idle_timeout": "2s", "metadata_ttl": "1s"},
            upstream_options={NAME: {"urls": [first.url, second.url]}},
        )
        trust = trustRootFromCertificates([Certificate.loadPEM(proxy.cert_pem)])
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool))
        site = Loopback(reactor, files, first, proxy, client, pool)
        mirrors: Mirrors = proxy.cache.core.mirrors[NAME]
        mirrors.base_backoff = MIRROR_BACKOFF_SECONDS

        # The catalogue comes from the first mirror while it is up.
        for path in (INDEX, PRODUCTS):
            assert_whole(await site.get(path), files[path])
        assert (len(gets(first, INDEX)), len(gets(second, INDEX))) == (1, 0)

        # Four clients follow one cold download; the first mirror goes in the middle of it.
        first.resource.throttle = PACE
        clients: Deferred[list[Received]] = gatherResults(
            [Deferred.fromCoroutine(site.get(BROKEN)) for _ in range(CLIENTS)]
        )
        await until(lambda: first.resource.sent.get(BROKEN, 0) >= ROOTFS_BYTES // 2, "half is sent")
        await first.stop()
        for received in await clients:
            assert_whole(received, files[BROKEN])
        assert len(gets(first, BROKEN)) == 1
        [rest] = gets(second, BROKEN)
        assert rest.header("If-Range") is None
        start = int(rest.header("Range").removeprefix("bytes=").removesuffix("-"))
        sent_first = first.resource.sent[BROKEN]
        assert 0 < start <= sent_first
        # One file, plus what the first mirror sent that never reached the disk.
        assert sent_first + second.resource.sent[BROKEN] <= ROOTFS_BYTES + (sent_first - start)
        assert second.resource.sent[BROKEN] == ROOTFS_BYTES - start

        # The catalogue now comes from the second mirror; the status shows the first down.
        await deferLater(reactor, 1.1, lambda: None)
        assert_whole(await site.get(INDEX), files[INDEX])
        # The expired copy is served at once; its refresh, behind it, goes to the second.
        await until(lambda: len(gets(second, INDEX)) == 1, "the second mirror is asked")
        status = json.loads(await treq.content(await client.get(proxy.url("status.json"))))
        [upstream] = [u for u in status["upstreams"] if u["name"] == NAME]
        assert [(m["url"], m["down"]) for m in upstream["mirrors"]] == [
            (first.url, True), (second.url, False),
        ]
        assert upstream["online"] is True
        scraped = await treq.content(
            await client.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics")
        )
        for url, up in ((first.url, 0), (second.url, 1)):
            line = f'lxd_image_proxy_upstream_mirror_up{{upstream="{NAME}",url="{url}"}} {up}.0'
            assert line.encode() in scraped, scraped

        # Back on the same port: once its backoff has run out, the first mirror is asked first.
        back = start_https_upstream(reactor, root, ca, port=first.port)
        [state, _] = mirrors.states()
        assert state.retry_at is not None
        await deferLater(reactor, max(0.0, state.retry_at - reactor.seconds()) + 0.1, lambda: None)
        assert_whole(await site.get(OTHER), files[OTHER])
        assert (len(gets(back, OTHER)), len(gets(second, OTHER))) == (1, 0)
        assert [m.down for m in mirrors.states()] == [False, False]

        await site.stop_proxy()
        index, store = site.open_cache()
        assert_store_verified(store, index)
        assert_index_reopens(index, store)
        assert_only_catalogue(
            [*first.resource.paths(), *second.resource.paths(), *back.resource.paths()], files
        )
    finally:
        if site is not None:
            await site.pool.closeCachedConnections()
            if site.proxy.service.running:
                await site.proxy.stop()
        await first.stop()
        await second.stop()
        if back is not None:
            await back.stop()
    assert_no_traceback(logged)
