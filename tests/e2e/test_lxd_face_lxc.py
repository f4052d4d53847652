"""
The LXD image API face end to end: the real C{lxc} client and LXD daemon reach the images of a
simplestreams upstream through C{lxc remote add p https://127.0.0.1:PORT --public
--accept-certificate}, the protocol C{lxd}, with no certificate set up by hand.
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

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.proxy.port}"


def _require_tools() -> None:
    for tool, package in (("lxc", "lxd-client"), ("mksquashfs", "squashfs-tools")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")


def _count_requests(proxy: RunningProxy, seen: list[str]) -> None:
    site = proxy.service.listener.site
    original = site.getResourceFor

    def counting(request: Request) -> Any:
        seen.append(request.path.decode("utf-8", "replace"))
        return original(request)

    site.getResourceFor = counting  # type: ignore[method-assign]


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
        await client.add_lxd_remote("p", f"https://127.0.0.1:{proxy.port}")
        yield Setup(tree, upstream, proxy, client, seen)
    finally:
        if proxy is not None:
            await proxy.stop()
        await upstream.stop()


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _export_fingerprint(files: list[Path]) -> str:
    """sha256(metadata ‖ rootfs) of an LXD-protocol export: the metadata file is meta-FP.*."""
    meta = [f for f in files if f.name.startswith("meta-")]
    rest = [f for f in files if not f.name.startswith("meta-")]
    return _sha256(*meta, *rest)


@pytest_twisted.ensureDeferred
async def test_remote_add_pins_the_certificate_and_lists_every_image(setup: Setup) -> None:
    # --accept-certificate stored the proxy's own certificate: no CA set-up was needed.
    pinned = (setup.client.conf_dir / "servercerts" / "p.crt").read_bytes()
    assert pinned.strip() == setup.proxy.cert_pem.strip()
    images = await setup.client.image_list("p")
    listed = {i["fingerprint"]: i for i in images}
    assert set(listed) == {i.fingerprint for i in setup.tree.images}
    for image in setup.tree.images:
        assert listed[image.fingerprint]["type"] == image.type
        assert listed[image.fingerprint]["size"] == image.size
        assert listed[image.fingerprint]["public"] is True
    native = setup.tree.image(ALIAS)
    info = await setup.client.image_info(f"p:{ALIAS}")
    assert f"Fingerprint: {native.fingerprint}" in info
    # A unique start of a fingerprint works as with LXD.
    info = await setup.client.image_info(f"p:{native.fingerprint[:12]}")
    assert f"Fingerprint: {native.fingerprint}" in info
    aliases = await setup.client.run("image", "alias", "list", "p:", "--format", "csv", check=True)
    assert ALIAS in aliases.out and f"{VM_ALIAS}/vm" in aliases.out


@pytest_twisted.ensureDeferred
async def test_exports_of_container_and_vm_verify(setup: Setup, tmp_path: Path) -> None:
    for alias, type_ in ((ALIAS, "container"), (f"{VM_ALIAS}/vm", "virtual-machine")):
        image = setup.tree.image(alias.removesuffix("/vm"), type=type_)  # type: ignore[arg-type]
        files = await setup.client.image_export(f"p:{alias}", tmp_path / f"export-{type_}")
        assert len(files) == 2
        assert _export_fingerprint(files) == image.fingerprint
        for item in image.files:
            assert setup.proxy.cache.store.exists(item.sha256)
            assert setup.upstream_gets(item.path) == 1
    # Served again from the cache, and through the simplestreams face too: no new request.
    image = setup.tree.image(ALIAS)
    await setup.client.image_export(f"p:{ALIAS}", tmp_path / "again")
    await setup.client.add_simplestreams_remote("cache", setup.proxy.url("cache"), setup.proxy.cert_pem)
    files = await setup.client.image_export(f"cache:{ALIAS}", tmp_path / "simplestreams")
    assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
    for item in image.files:
        assert setup.upstream_gets(item.path) == 1


@pytest_twisted.ensureDeferred
async def test_sixteen_concurrent_cold_exports_make_one_upstream_get_per_file(
    setup: Setup, tmp_path: Path
) -> None:
    image = setup.tree.image(BIG_ALIAS)
    assert image.root is not None
    export_path = f"/1.0/images/{image.fingerprint}/export"
    setup.upstream.resource.hold(image.root.path)
    clients = [LxcClient(tmp_path / f"lxc{n}") for n in range(16)]
    for client in clients:
        await client.add_lxd_remote("p", setup.address)
    exports = [
        Deferred.fromCoroutine(client.image_export(f"p:{BIG_ALIAS}", tmp_path / f"out{n}"))
        for n, client in enumerate(clients)
    ]
    for _ in range(600):
        if setup.seen.count(export_path) >= 16:
            break
        await deferLater(reactor, 0.1, lambda: None)
    waiting = setup.seen.count(export_path)
    setup.upstream.resource.release(image.root.path)
    results = await gatherResults(exports).addTimeout(180, reactor)
    assert waiting == 16
    for files in results:
        assert _export_fingerprint(files) == image.fingerprint
    for item in image.files:
        assert setup.upstream_gets(item.path) == 1, item.path


@pytest_twisted.ensureDeferred
async def test_a_corrupt_upstream_file_fails_the_export(setup: Setup, tmp_path: Path) -> None:
    image = setup.tree.image(ALIAS)
    assert image.root is not None
    setup.upstream.resource.corrupt(image.root.path)
    result = await setup.client.run("image", "export", f"p:{ALIAS}", str(tmp_path / "bad") + "/")
    assert result.code != 0
    assert not setup.proxy.cache.store.exists(image.root.sha256)


@pytest_twisted.async_yield_fixture
async def lxd_daemon() -> AsyncIterator[LxdDaemon]:
    async with running_daemon() as daemon:
        yield daemon


@pytest.mark.lxd
@pytest_twisted.ensureDeferred
async def test_daemon_copies_an_image_through_the_lxd_face(setup: Setup, lxd_daemon: LxdDaemon) -> None:
    image = setup.tree.image(ALIAS)
    client = lxd_daemon.client()
    await client.add_lxd_remote("p", setup.address)
    await client.image_copy(f"p:{ALIAS}", "local")
    images = await client.image_list("local")
    assert [i["fingerprint"] for i in images] == [image.fingerprint]
    for item in image.files:
        assert setup.upstream_gets(item.path) == 1


@pytest_twisted.ensureDeferred
async def test_remote_add_without_public_finds_a_public_server(setup: Setup) -> None:
    # The form the README gives first: the client asks /1.0, sees public: true, and keeps the
    # remote as a public image server (no trust password, no client certificate trusted).
    await setup.client.run("remote", "add", "q", setup.address, "--accept-certificate", check=True)
    listed = await setup.client.run("remote", "list", "--format", "csv", check=True)
    row = next(line for line in listed.out.splitlines() if line.startswith("q,"))
    assert ",lxd," in row and ",YES," in row
    images = await setup.client.image_list("q")
    assert {i["fingerprint"] for i in images} == {i.fingerprint for i in setup.tree.images}
