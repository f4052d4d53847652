"""
An upstream of protocol C{lxd}: a second real LXD daemon, listening on 127.0.0.1 with a
certificate from the test CA, holds a public image; the proxy reads it through its REST API and
the real C{lxc} client reaches it through both faces of the proxy.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.server import Request

from tests.e2e.lxd import LxcClient, LxdDaemon
from tests.helpers.certs import CA, make_ca
from tests.helpers.logs import Logged
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import Tree, TreeImage, build_tree

ALIAS = "testos/1.0"
reactor: Any = _reactor

pytestmark = [pytest.mark.loopback, pytest.mark.lxc, pytest.mark.lxd]


@attrs.define
class Setup:
    tree: Tree
    image: TreeImage
    daemon: LxdDaemon
    proxy: RunningProxy
    client: LxcClient
    seen: list[str]

    def exports_upstream(self) -> int:
        """How many times the upstream daemon was asked for the image's export."""
        log = self.daemon.log_file.read_text(errors="replace")
        return log.count(f"/1.0/images/{self.image.fingerprint}/export")


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


def _export_fingerprint(files: list[Path]) -> str:
    meta = [f for f in files if f.name.startswith("meta-")]
    rest = [f for f in files if not f.name.startswith("meta-")]
    return _sha256(*meta, *rest)


async def _start_upstream_daemon(ca: CA, image: TreeImage, tree: Tree) -> tuple[LxdDaemon, int]:
    LxdDaemon.skip_if_unavailable()
    daemon = LxdDaemon.temporary()
    # The daemon serves the certificate found in its LXD_DIR: one from the test CA, so that the
    # proxy verifies it like any upstream, hostname included.
    daemon.lxd_dir.mkdir(parents=True)
    cert, key = ca.issue(["localhost", "127.0.0.1"])
    (daemon.lxd_dir / "server.crt").write_bytes(cert)
    (daemon.lxd_dir / "server.key").write_bytes(key)
    try:
        await daemon.start()
        port = _free_port()
        local = daemon.client()
        await local.run("config", "set", "core.https_address", f"127.0.0.1:{port}", check=True)
        assert image.root is not None
        await local.run(
            "image", "import", str(tree.root / image.meta.path), str(tree.root / image.root.path),
            "--public", "--alias", ALIAS, check=True,
        )
    except BaseException:
        await daemon.stop()
        raise
    return daemon, port


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    tree = build_tree(tmp_path / "tree")
    image = tree.image(ALIAS)
    ca = make_ca("upstream test CA")
    daemon, port = await _start_upstream_daemon(ca, image, tree)
    proxy = None
    try:
        proxy = await start_proxy(
            reactor, tmp_path / "state", {"lxd1": (f"https://localhost:{port}", ca.cert_pem)},
            upstream_options={"lxd1": {"protocol": "lxd"}},
        )
        seen: list[str] = []
        site = proxy.service.listener.site
        original = site.getResourceFor

        def counting(request: Request) -> Any:
            seen.append(request.path.decode("utf-8", "replace"))
            return original(request)

        site.getResourceFor = counting  # type: ignore[method-assign]
        client = LxcClient(tmp_path / "lxc")
        await client.add_lxd_remote("p", f"https://127.0.0.1:{proxy.port}")
        yield Setup(tree, image, daemon, proxy, client, seen)
    finally:
        if proxy is not None:
            await proxy.stop()
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_an_lxd_upstream_through_both_faces(
    setup: Setup, tmp_path: Path, logged: Logged
) -> None:
    listed = await setup.client.image_list("p")
    assert [i["fingerprint"] for i in listed] == [setup.image.fingerprint]
    info = await setup.client.image_info(f"p:{ALIAS}")
    assert f"Fingerprint: {setup.image.fingerprint}" in info

    # Through the LXD face: fetched once from the upstream daemon, verified, stored in parts.
    files = await setup.client.image_export(f"p:{ALIAS}", tmp_path / "lxd-face")
    assert _export_fingerprint(files) == setup.image.fingerprint
    for item in setup.image.files:
        assert setup.proxy.cache.store.exists(item.sha256)
    exports = setup.exports_upstream()
    assert exports == 1

    # Through the simplestreams face: the synthesised catalogue lists it, and the files come
    # from the cache.
    await setup.client.add_simplestreams_remote("ss", setup.proxy.url("lxd1"), setup.proxy.cert_pem)
    ss_listed = await setup.client.image_list("ss")
    assert setup.image.fingerprint in {i["fingerprint"] for i in ss_listed}
    ss_files = await setup.client.image_export(f"ss:{ALIAS}", tmp_path / "ss-face")
    assert sorted(_sha256(f) for f in ss_files) == sorted(f.sha256 for f in setup.image.files)
    assert setup.exports_upstream() == exports
    # The client's first attempt at each file, plain HTTP, is served (an LXD upstream's files
    # as any simplestreams upstream's); the catalogue comes over TLS.
    access = [
        (e["path"], e["via"], e["status"], e["cache"]) for e in logged
        if e.get("log_namespace") == "proxy.access" and e["path"].startswith("/lxd1/")
    ]
    ss_access = [a for a in access if "/streams/" not in a[0]]
    assert len(ss_access) == len(setup.image.files)
    assert {a[1:] for a in ss_access} == {("plain", 200, "hit")}
    assert {a[1] for a in access if "/streams/" in a[0]} == {"tls"}


@pytest_twisted.ensureDeferred
async def test_concurrent_cold_exports_make_one_upstream_export(setup: Setup, tmp_path: Path) -> None:
    clients = [LxcClient(tmp_path / f"lxc{n}") for n in range(8)]
    for client in clients:
        await client.add_lxd_remote("p", f"https://127.0.0.1:{setup.proxy.port}")
    results = await gatherResults([
        Deferred.fromCoroutine(client.image_export(f"p:{ALIAS}", tmp_path / f"out{n}"))
        for n, client in enumerate(clients)
    ]).addTimeout(180, reactor)
    for files in results:
        assert _export_fingerprint(files) == setup.image.fingerprint
    assert setup.exports_upstream() == 1


@pytest_twisted.ensureDeferred
async def test_a_pinned_split_image_of_an_lxd_upstream_is_fetched_by_auto_update(tmp_path: Path) -> None:
    tree = build_tree(tmp_path / "tree")
    image = tree.image(ALIAS)
    ca = make_ca("upstream test CA")
    daemon, port = await _start_upstream_daemon(ca, image, tree)
    try:
        proxy = await start_proxy(
            reactor, tmp_path / "state", {"lxd1": (f"https://localhost:{port}", ca.cert_pem)},
            upstream_options={"lxd1": {"protocol": "lxd"}},
            pins=[{"upstream": "lxd1", "alias": ALIAS, "arch": "x86_64"}],
        )
        try:
            # No client asked: the split image's files are learnt from one export download,
            # after which the pin resolves and the files are kept pinned.
            report = await proxy.cache.prefetcher.run()
            assert report.unresolved == []
            for item in image.files:
                record = proxy.cache.index.get(item.sha256)
                assert record is not None and not record.cached and record.auto_update
        finally:
            await proxy.stop()
    finally:
        await daemon.stop()
