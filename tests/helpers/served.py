"""A proxy in the test's reactor in front of one loopback upstream, as the status tests use it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import treq
from attrs import define
from treq.client import HTTPClient
from twisted.internet.defer import Deferred

from tests.helpers.certs import make_ca
from tests.helpers.proxy_process import https_client
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import Tree, build_tree
from tests.helpers.upstream import RunningUpstream, start_https_upstream

REQUEST_TIMEOUT_SECONDS = 30.0


@define
class Served:
    tree: Tree
    upstream: RunningUpstream
    proxy: RunningProxy
    client: HTTPClient
    reactor: Any

    @property
    def root(self) -> str:
        return f"https://localhost:{self.proxy.port}"

    async def get(self, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """GET C{path} of the proxy; the status and whole body."""
        d: Deferred[Any] = self.client.get(self.root + path, **kwargs)
        response = await d.addTimeout(REQUEST_TIMEOUT_SECONDS, self.reactor)
        body: bytes = await treq.content(response).addTimeout(REQUEST_TIMEOUT_SECONDS, self.reactor)
        return int(response.code), body

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/status.json")
        assert code == 200, body
        found: dict[str, Any] = json.loads(body)
        return found


@asynccontextmanager
async def served(
    reactor: Any,
    tmp_path: Path,
    names: Sequence[str] = ("images",),
    *,
    big_rootfs_bytes: int = 0,
    **proxy_options: Any,
) -> AsyncIterator[Served]:
    """One generated tree served over HTTPS on 127.0.0.1 (with C{bigos/1.0} when
    C{big_rootfs_bytes}), and a proxy with it as each of C{names}; both stopped on the way out."""
    tree = build_tree(tmp_path / "tree", big_rootfs_bytes=big_rootfs_bytes)
    ca = make_ca("upstream test CA")
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = None
    try:
        proxy = await start_proxy(
            reactor, tmp_path / "state", {name: (upstream.url, ca.cert_pem) for name in names},
            **proxy_options,
        )
        yield Served(tree, upstream, proxy, https_client(proxy.cert_pem), reactor)
    finally:
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()
