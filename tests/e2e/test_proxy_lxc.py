"""
The proxy end to end with the real C{lxc} client and the real LXD daemon.

A generated simplestreams tree (real xz tarballs, real squashfs, a qcow2 VM disk) is served over
HTTPS on 127.0.0.1 by L{tests.helpers.upstream}; the proxy runs in the test's reactor in front of
it, with the upstream's CA as its C{ca_file}; C{lxc} runs as a subprocess with its own
C{LXD_CONF} and the proxy's certificate pinned as C{servercerts/cache.crt}.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.server import Request

from tests.e2e.lxd import LxcClient, LxdDaemon, running_daemon
from tests.helpers.certs import make_ca
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import Tree, build_tree
from tests.helpers.upstream import RunningUpstream, start_https_upstream

ALIAS = "testos/1.0"
VM_ALIAS = "testos/2.0"
BIG_ALIAS = "bigos/1.0"
reactor: Any = _reactor

pytestmark = [pytest.mark.loopback, pytest.mark.lxc]


@attrs.define
class Setup:
    tree: Tree
    upstream: RunningUpstream
    proxy: RunningProxy
    client: LxcClient
    seen: list[str]

    def upstream_gets(self, path: str) -> int:
        return int(self.upstream.resource.count(path))

    def stored(self, sha256: str) -> bool:
        return bool(self.proxy.cache.store.exists(sha256))


def _require_tools() -> None:
    for tool, package in (("lxc", "lxd-client"), ("mksquashfs", "squashfs-tools")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")


def _count_requests(proxy: RunningProxy, seen: list[str]) -> None:
    """Record the path of every request that reaches the proxy's resources, HTTPS or plain."""
    listener = proxy.service.listener
    for site in (listener.site, listener.plain_site):
        if site is not None:
            _count_site(site, seen)


def _count_site(site: Any, seen: list[str]) -> None:
    original = site.getResourceFor

    def counting(request: Request) -> Any:
        seen.append(request.path.decode("utf-8", "replace"))
        return original(request)

    site.getResourceFor = counting


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    _require_tools()
    tree = build_tree(tmp_path / "tree", big_rootfs_bytes=4 * 1024 * 1024)
    ca = make_ca("upstream test CA")
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = None
    try:
        proxy = await start_proxy(
            reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)}
        )
        seen: list[str] = []
        _count_requests(proxy, seen)
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        yield Setup(tree, upstream, proxy, client, seen)
    finally:
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_client_lists_every_image_with_fingerprints_and_aliases(setup: Setup) -> None:
    images = await setup.client.image_list("cache")
    listed = {i["fingerprint"]: i for i in images}
    assert set(listed) == {i.fingerprint for i in setup.tree.images}
    for image in setup.tree.images:
        assert listed[image.fingerprint]["type"] == image.type
    native = setup.tree.image(ALIAS)
    assert ALIAS in {a["name"] for a in listed[native.fingerprint]["aliases"] or []}
    # The same client, pointed at the upstream itself, sees exactly the same images and aliases.
    await setup.client.add_simplestreams_remote("direct", setup.upstream.url, setup.upstream.cert_pem)
    direct = await setup.client.image_list("direct")
    assert _comparable(images) == _comparable(direct)
    info = await setup.client.image_info(f"cache:{ALIAS}")
    assert f"Fingerprint: {native.fingerprint}" in info
    aliases = await setup.client.run("image", "alias", "list", "cache:", "--format", "csv", check=True)
    direct_aliases = await setup.client.run("image", "alias", "list", "direct:", "--format", "csv", check=True)
    assert sorted(aliases.out.splitlines()) == sorted(direct_aliases.out.splitlines())
    assert ALIAS in aliases.out


def _comparable(images: list[dict[str, Any]]) -> list[tuple[str, str, str, list[str], int]]:
    return sorted(
        (i["fingerprint"], i["type"], i["architecture"],
         sorted(a["name"] for a in i["aliases"] or []), i["size"])
        for i in images
    )


@pytest_twisted.ensureDeferred
async def test_exports_of_container_and_vm_match_the_catalogue(setup: Setup, tmp_path: Path) -> None:
    for alias, args, type_ in ((ALIAS, (), "container"), (VM_ALIAS, ("--vm",), "virtual-machine")):
        image = setup.tree.image(alias, type=type_)  # type: ignore[arg-type]
        dest = tmp_path / f"export-{type_}"
        dest.mkdir()
        await setup.client.run("image", "export", f"cache:{alias}", str(dest) + "/", *args, check=True)
        digests = sorted(_sha256(f) for f in dest.iterdir())
        assert digests == sorted(f.sha256 for f in image.files)
        for item in image.files:
            assert setup.stored(item.sha256)
            assert setup.upstream_gets(item.path) == 1
    # A second export is served from the cache: no new upstream request for the files.
    image = setup.tree.image(ALIAS)
    await setup.client.image_export(f"cache:{ALIAS}", tmp_path / "again")
    for item in image.files:
        assert setup.upstream_gets(item.path) == 1


@pytest_twisted.ensureDeferred
async def test_sixteen_concurrent_cold_exports_make_one_upstream_get_per_file(
    setup: Setup, tmp_path: Path
) -> None:
    image = setup.tree.image(BIG_ALIAS)
    assert image.root is not None
    rootfs_path = f"/cache/{image.root.path}"
    # Hold the big rootfs upstream until all 16 clients wait on the proxy for it, so every one
    # of them joins the same in-flight download.
    setup.upstream.resource.hold(image.root.path)
    clients = [LxcClient(tmp_path / f"lxc{n}") for n in range(16)]
    for client in clients:
        await client.add_simplestreams_remote("cache", setup.proxy.url("cache"), setup.proxy.cert_pem)
    dests = [tmp_path / f"out{n}" for n in range(16)]
    exports = [
        Deferred.fromCoroutine(client.image_export(f"cache:{BIG_ALIAS}", dest))
        for client, dest in zip(clients, dests)
    ]
    for _ in range(600):
        if setup.seen.count(rootfs_path) >= 16:
            break
        await deferLater(reactor, 0.1, lambda: None)
    waiting = setup.seen.count(rootfs_path)
    setup.upstream.resource.release(image.root.path)
    results = await gatherResults(exports).addTimeout(180, reactor)
    assert waiting == 16
    for files in results:
        assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
    for item in image.files:
        assert setup.upstream_gets(item.path) == 1, item.path


@pytest_twisted.ensureDeferred
async def test_corrupted_upstream_file_is_never_committed(setup: Setup, tmp_path: Path) -> None:
    image = setup.tree.image(ALIAS)
    assert image.root is not None
    setup.upstream.resource.corrupt(image.root.path)
    result = await setup.client.run("image", "export", f"cache:{ALIAS}", str(tmp_path / "bad") + "/")
    assert result.code != 0
    assert not setup.stored(image.root.sha256)
    assert setup.proxy.cache.index.get(image.root.sha256) is None
    assert list((setup.proxy.state_dir / "tmp").iterdir()) == []
    # Once the upstream is healthy again the same export succeeds.
    setup.upstream.resource.clear(image.root.path)
    files = await setup.client.image_export(f"cache:{ALIAS}", tmp_path / "good")
    assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)


@pytest_twisted.ensureDeferred
async def test_cached_images_are_served_while_the_upstream_is_down(tmp_path: Path) -> None:
    _require_tools()
    tree = build_tree(tmp_path / "tree")
    ca = make_ca("upstream test CA")
    upstream = start_https_upstream(reactor, tree.root, ca)
    # A zero TTL makes every request revalidate, so the outage is met on every one.
    proxy = await start_proxy(
        reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)},
        cache={"metadata_ttl": 0, "connect_timeout": 2},
    )
    try:
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        image = tree.image(ALIAS)
        await client.image_export(f"cache:{ALIAS}", tmp_path / "first")
        await upstream.stop()
        listed = await client.image_list("cache")
        assert image.fingerprint in {i["fingerprint"] for i in listed}
        files = await client.image_export(f"cache:{ALIAS}", tmp_path / "offline")
        assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
    finally:
        await proxy.stop()
        await upstream.stop()


@pytest_twisted.async_yield_fixture
async def lxd_daemon() -> AsyncIterator[LxdDaemon]:
    async with running_daemon() as daemon:
        yield daemon


@pytest.mark.lxd
@pytest_twisted.ensureDeferred
async def test_daemon_copies_an_image_through_the_proxy(setup: Setup, lxd_daemon: LxdDaemon) -> None:
    image = setup.tree.image(ALIAS)
    client = lxd_daemon.client()
    await client.add_simplestreams_remote("cache", setup.proxy.url("cache"), setup.proxy.cert_pem)
    await client.image_copy(f"cache:{ALIAS}", "local")
    images = await client.image_list("local")
    assert [i["fingerprint"] for i in images] == [image.fingerprint]
    for item in image.files:
        assert setup.upstream_gets(item.path) == 1
        assert setup.stored(item.sha256)
    # lxc init of the same alias reuses the daemon's copy; the proxy sees no new file request.
    await client.run("init", f"cache:{ALIAS}", "c1", check=True)
    for item in image.files:
        assert setup.upstream_gets(item.path) == 1
