"""
Tiers with the real C{lxc} client: branch -> regional -> the real HTTPS test upstream, each
proxy pinning its parent's certificate with C{ca_file}; the clients ask the branch.

Once with the regional proxy's simplestreams face between the two proxies, once with its LXD
face (C{protocol = "lxd"}); then a loop: two proxies upstream of each other.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.filepath import FilePath
from twisted.web.server import Request

from proxy.tls import ensure_server_certificate
from tests.e2e.lxd import LxcClient, LxdDaemon, running_daemon
from tests.helpers.certs import make_ca
from tests.helpers.logs import Logged
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import Tree, TreeImage, build_tree
from tests.helpers.upstream import RunningUpstream, start_https_upstream

ALIASES = ("testos/1.0", "testos/3.0")
CLIENTS = 3
reactor: Any = _reactor

pytestmark = [pytest.mark.loopback, pytest.mark.lxc]


def _require_tools() -> None:
    for tool, package in (("lxc", "lxd-client"), ("mksquashfs", "squashfs-tools")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install {package})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fingerprint(files: list[Path]) -> str:
    """An export's fingerprint: sha256 of the metadata file then the root (LXD's order)."""
    meta = [f for f in files if f.name.startswith("meta-") or f.name.endswith(".tar.xz")]
    rest = [f for f in files if f not in meta]
    return _sha256(*meta, *rest)


@attrs.define
class Tiers:
    tree: Tree
    top: RunningUpstream
    regional: RunningProxy
    branch: RunningProxy
    at_regional: list[str]
    lxd: bool

    def images(self) -> list[TreeImage]:
        return [self.tree.image(alias) for alias in ALIASES]

    async def client(self, path: Path) -> LxcClient:
        client = LxcClient(path)
        if self.lxd:
            await client.add_lxd_remote("branch", f"https://127.0.0.1:{self.branch.port}")
        else:
            await client.add_simplestreams_remote(
                "branch", self.branch.url("images"), self.branch.cert_pem
            )
        return client


def _count_requests(proxy: RunningProxy) -> list[str]:
    seen: list[str] = []
    site = proxy.service.listener.site
    original = site.getResourceFor

    def counting(request: Request) -> Any:
        seen.append(request.path.decode("utf-8", "replace"))
        return original(request)

    site.getResourceFor = counting  # type: ignore[method-assign]
    return seen


@pytest_twisted.async_yield_fixture(params=["simplestreams", "lxd"])
async def tiers(request: Any, tmp_path: Path) -> AsyncIterator[Tiers]:
    _require_tools()
    lxd = request.param == "lxd"
    tree = build_tree(tmp_path / "tree")
    ca = make_ca("top upstream CA")
    top = start_https_upstream(reactor, tree.root, ca)
    regional = branch = None
    try:
        regional = await start_proxy(reactor, tmp_path / "regional", {"images": (top.url, ca.cert_pem)})
        at_regional = _count_requests(regional)
        # The parent's own certificate is the child's ca_file (start_proxy writes it there).
        url = f"https://localhost:{regional.port}" if lxd else regional.url("images")
        branch = await start_proxy(
            reactor, tmp_path / "branch", {"images": (url, regional.cert_pem)},
            upstream_options={"images": {"protocol": "lxd"}} if lxd else None,
        )
        yield Tiers(tree, top, regional, branch, at_regional, lxd)
    finally:
        if branch is not None:
            await branch.stop()
        # A test may have stopped it (the branch then serves alone).
        if regional is not None and regional.service.running:
            await regional.stop()
        await top.stop()


@pytest_twisted.ensureDeferred
async def test_every_file_crosses_each_link_once_and_the_branch_serves_alone(
    tiers: Tiers, tmp_path: Path,
) -> None:
    clients = [await tiers.client(tmp_path / f"lxc{n}") for n in range(CLIENTS)]
    exports = await gatherResults([
        Deferred.fromCoroutine(client.image_export(f"branch:{alias}", tmp_path / f"out{n}-{a}"))
        for n, client in enumerate(clients) for a, alias in enumerate(ALIASES)
    ]).addTimeout(240, reactor)
    for files, (n, a) in zip(exports, [(n, a) for n in range(CLIENTS) for a in range(len(ALIASES))]):
        assert _fingerprint(files) == tiers.images()[a].fingerprint, (n, a, files)
    for image in tiers.images():
        for item in image.files:
            # The top link: once per file, however many clients asked at the bottom.
            assert tiers.top.resource.count(item.path) == 1, item.path
            assert tiers.regional.cache.store.exists(item.sha256)
            assert tiers.branch.cache.store.exists(item.sha256)
        # The middle link: once per file (simplestreams face) or per image export (LXD face).
        if tiers.lxd:
            asked = [p for p in tiers.at_regional if p == f"/1.0/images/{image.fingerprint}/export"]
            assert len(asked) == 1, image.fingerprint
        else:
            for item in image.files:
                assert tiers.at_regional.count(f"/images/{item.path}") == 1, item.path

    # The regional proxy goes away: the branch serves what it stored, to a new client too.
    await tiers.regional.stop()
    late = await tiers.client(tmp_path / "late")
    for alias, image in zip(ALIASES, tiers.images()):
        files = await late.image_export(f"branch:{alias}", tmp_path / f"late-{alias.replace('/', '-')}")
        assert _fingerprint(files) == image.fingerprint
    listed = await late.image_list("branch")
    assert {i.fingerprint for i in tiers.images()} <= {i["fingerprint"] for i in listed}


@pytest_twisted.async_yield_fixture
async def lxd_daemon() -> AsyncIterator[LxdDaemon]:
    async with running_daemon() as daemon:
        yield daemon


@pytest.mark.lxd
@pytest_twisted.ensureDeferred
async def test_a_daemon_copies_through_the_branch_with_or_without_the_regional_proxy(
    tiers: Tiers, lxd_daemon: LxdDaemon,
) -> None:
    image = tiers.images()[0]
    client = lxd_daemon.client()
    if tiers.lxd:
        await client.add_lxd_remote("branch", f"https://127.0.0.1:{tiers.branch.port}")
    else:
        await client.add_simplestreams_remote("branch", tiers.branch.url("images"), tiers.branch.cert_pem)
    await client.image_copy(f"branch:{ALIASES[0]}", "local")
    assert [i["fingerprint"] for i in await client.image_list("local")] == [image.fingerprint]
    for item in image.files:
        assert tiers.top.resource.count(item.path) == 1
    await tiers.regional.stop()
    await client.run("image", "delete", f"local:{image.fingerprint}", check=True)
    await client.image_copy(f"branch:{ALIASES[0]}", "local")
    assert [i["fingerprint"] for i in await client.image_list("local")] == [image.fingerprint]


@pytest_twisted.ensureDeferred
async def test_two_proxies_upstream_of_each_other_give_lxc_a_clear_error(
    tmp_path: Path, logged: Logged,
) -> None:
    _require_tools()
    port_a = _free_port()
    cert_a, _ = ensure_server_certificate(FilePath(str(tmp_path / "a")), ["localhost"])
    b = await start_proxy(
        reactor, tmp_path / "b", {"images": (f"https://localhost:{port_a}/images", cert_a.getContent())},
    )
    a = None
    try:
        a = await start_proxy(
            reactor, tmp_path / "a", {"images": (b.url("images"), b.cert_pem)},
            server={"listen": [f"127.0.0.1:{port_a}"]},
        )
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("a", a.url("images"), a.cert_pem)
        started = time.monotonic()
        result = await client.run("image", "list", "a:", timeout=30)
        assert time.monotonic() - started < 5.0
        assert result.code != 0
        # lxc shows the status line of a simplestreams server's error.
        assert "502" in result.err or "Bad Gateway" in result.err, result.err
        assert logged.matching("leads back to this proxy")
        assert logged.matching("came back to this proxy")
    finally:
        if a is not None:
            await a.stop()
        await b.stop()
