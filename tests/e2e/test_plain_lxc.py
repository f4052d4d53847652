"""
Image files over plain HTTP with the real C{lxc} client and the real LXD daemon.

Both fetch each image file over plain C{http://} on the remote's host and port first
(PROTOCOLS.md §1.8); the proxy serves it there (proxy.plain), with sendfile, and the access
log says C{via=plain}; the catalogue still comes over HTTPS. A stored file whose bytes went
bad is refused by the client's own sha256 check over both schemes; with
C{plain_http_files = false} the client falls back to HTTPS at once and succeeds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from attrs import define
from twisted.internet import reactor as _reactor

from tests.e2e.lxd import LxcClient, LxdDaemon, running_daemon
from tests.helpers.certs import make_ca
from tests.helpers.logs import Logged
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import Tree, build_tree
from tests.helpers.upstream import RunningUpstream, start_https_upstream

ALIAS = "testos/1.0"
reactor: Any = _reactor

pytestmark = [pytest.mark.loopback, pytest.mark.lxc]


@define
class Setup:
    tree: Tree
    upstream: RunningUpstream
    proxy: RunningProxy
    client: LxcClient


async def _setup(tmp_path: Path, **server: Any) -> AsyncIterator[Setup]:
    tree = build_tree(tmp_path / "tree")
    ca = make_ca("upstream test CA")
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = None
    try:
        proxy = await start_proxy(
            reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)}, server=server
        )
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        yield Setup(tree, upstream, proxy, client)
    finally:
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async for value in _setup(tmp_path):
        yield value


@pytest_twisted.async_yield_fixture
async def https_only(tmp_path: Path) -> AsyncIterator[Setup]:
    async for value in _setup(tmp_path, plain_http_files=False):
        yield value


@pytest_twisted.async_yield_fixture
async def lxd_daemon() -> AsyncIterator[LxdDaemon]:
    async with running_daemon() as daemon:
        yield daemon


def _access(logged: Logged) -> list[tuple[str, str, int, str, str]]:
    """(path, via, status, cache, end) of every request the proxy answered."""
    return [
        (e["path"], e["via"], e["status"], e["cache"], e["end"])
        for e in logged if e.get("log_namespace") == "proxy.access"
    ]


def _file_paths(setup: Setup) -> set[str]:
    return {f"/cache/{item.path}" for item in setup.tree.image(ALIAS).files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spoil(setup: Setup, sha256: str) -> None:
    """Overwrite a stored file's bytes in place, its size kept: a disk that went bad."""
    blob = setup.proxy.cache.store.path_for(sha256).path
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 64)


def _assert_files_over_plain_and_catalogue_over_tls(setup: Setup, logged: Logged) -> None:
    access = _access(logged)
    files = _file_paths(setup)
    served = [a for a in access if a[0] in files]
    # Each file once, over plain HTTP, whole: the first attempt succeeded.
    assert sorted(a[0] for a in served) == sorted(files)
    assert {(a[1], a[2], a[4]) for a in served} == {("plain", 200, "done")}
    catalogue = [a for a in access if "/streams/" in a[0]]
    assert catalogue and {a[1] for a in catalogue} == {"tls"}


@pytest_twisted.ensureDeferred
async def test_lxc_fetches_image_files_over_plain_http(
    setup: Setup, tmp_path: Path, logged: Logged
) -> None:
    image = setup.tree.image(ALIAS)
    files = await setup.client.image_export(f"cache:{ALIAS}", tmp_path / "out")
    assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
    _assert_files_over_plain_and_catalogue_over_tls(setup, logged)
    assert {a[3] for a in _access(logged) if a[0] in _file_paths(setup)} == {"miss"}


@pytest_twisted.ensureDeferred
async def test_lxc_refuses_a_spoiled_stored_file_served_over_plain_http(
    setup: Setup, tmp_path: Path, logged: Logged
) -> None:
    image = setup.tree.image(ALIAS)
    assert image.root is not None
    await setup.client.image_export(f"cache:{ALIAS}", tmp_path / "warm")
    _spoil(setup, image.root.sha256)
    before = len(_access(logged))
    (tmp_path / "bad").mkdir()
    result = await setup.client.run("image", "export", f"cache:{ALIAS}", f"{tmp_path / 'bad'}/")
    root = f"/cache/{image.root.path}"
    # What lxc says: "Error: Hash mismatch for https://localhost:PORT/cache/.../rootfs.squashfs:
    # <sha256 of what it got> != <the catalogue's>", naming its last attempt, over HTTPS.
    assert result.code != 0
    assert f"Hash mismatch for {setup.proxy.url('cache')}/{image.root.path}: " in result.err
    assert result.err.rstrip().endswith(f" != {image.root.sha256}")
    attempts = [a for a in _access(logged)[before:] if a[0] == root]
    # The plain attempt got the stored (spoiled) bytes, whole; the client checked them, threw
    # them away and tried HTTPS, which it refused too.
    assert attempts[0][:4] == (root, "plain", 200, "hit")
    assert ("tls", 200) in {(a[1], a[2]) for a in attempts}


@pytest_twisted.ensureDeferred
async def test_lxc_with_plain_http_files_off_uses_https(
    https_only: Setup, tmp_path: Path, logged: Logged
) -> None:
    setup = https_only
    image = setup.tree.image(ALIAS)
    files = await setup.client.image_export(f"cache:{ALIAS}", tmp_path / "out")
    assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
    served = [a for a in _access(logged) if a[0] in _file_paths(setup)]
    assert sorted(a[0] for a in served) == sorted(_file_paths(setup))
    assert {(a[1], a[2]) for a in served} == {("tls", 200)}


@pytest.mark.lxd
@pytest_twisted.ensureDeferred
async def test_daemon_fetches_over_plain_http_and_refuses_a_spoiled_file(
    setup: Setup, lxd_daemon: LxdDaemon, logged: Logged
) -> None:
    image = setup.tree.image(ALIAS)
    assert image.root is not None
    client = lxd_daemon.client()
    await client.add_simplestreams_remote("cache", setup.proxy.url("cache"), setup.proxy.cert_pem)
    await client.image_copy(f"cache:{ALIAS}", "local")
    assert [i["fingerprint"] for i in await client.image_list("local")] == [image.fingerprint]
    _assert_files_over_plain_and_catalogue_over_tls(setup, logged)
    # The daemon's own copy gone, the proxy's stored rootfs spoiled: the copy fails.
    await client.run("image", "delete", f"local:{image.fingerprint}", check=True)
    _spoil(setup, image.root.sha256)
    result = await client.run("image", "copy", f"cache:{ALIAS}", "local:")
    assert result.code != 0
    # "Error: Failed remote image download: Hash mismatch for https://...: <got> != <want>"
    assert "Failed remote image download: Hash mismatch for " in result.err, result.err
    assert await client.image_list("local") == []
