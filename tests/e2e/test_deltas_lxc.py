"""
Deltas end to end: a real LXD daemon refreshes an image through the proxy from the delta the
proxy's auto-update stored, and the upstream sees nothing of it.

What LXD 5.0.2 does (Debian's lxd 5.0.2-5+deb12u6, whose source this follows):

  - C{lxc image refresh NAME} (C{POST /1.0/images/FP/refresh}) runs the daemon's
    C{autoUpdateImage}: C{ImageDownload} of the image's source alias, which resolves it again
    in the remote's catalogue and, for a new fingerprint, calls the simplestreams client's
    C{GetImageFile} with a C{DeltaSourceRetriever} that answers C{images/<fp>.rootfs} when the
    daemon holds it. The old image's files are removed only after the new one is in.
  - The catalogue's C{ToLXD} (shared/simplestreams/products.go) lists, for a C{squashfs} root
    only (5.0 knows no VM deltas), every item of ftype C{squashfs.vcdiff} whose C{delta_base}
    version the product still lists, as C{root.delta-<combined_squashfs_sha256 of that
    version's lxd.tar.xz>}.
  - C{GetImageFile} fetches the metadata file, then, when C{xdelta3} is on the daemon's PATH,
    each delta whose source it holds (instead of the root file), and runs C{xdelta3 -f -d -s
    OLD DELTA NEW}; the Debian security patch for CVE-2026-33542 then checks sha256(meta ||
    rootfs) against the fingerprint. A delta that fails to download or apply fails the
    refresh: there is no fall back to the full file in this version.
  - The daemon keeps the catalogue it read in C{$LXD_DIR/cache/<sha256(url)>/} for an hour
    (by file mtime), so the test ages that copy, as the hour between auto-updates would.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor

from tests.e2e.lxd import LxcClient, LxdDaemon, running_daemon
from tests.helpers.certs import make_ca
from tests.helpers.logs import Logged
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import ProductSpec, Tree, TreeImage, build_tree
from tests.helpers.upstream import RunningUpstream, start_https_upstream

reactor: Any = _reactor

ALIAS = "deltaos/1.0"
V1, V2 = "20240101_0000", "20240201_0000"
HOUR = 3600.0

pytestmark = [pytest.mark.loopback, pytest.mark.lxc, pytest.mark.lxd]


@pytest_twisted.async_yield_fixture
async def lxd_daemon() -> AsyncIterator[LxdDaemon]:
    async with running_daemon() as daemon:
        yield daemon


def _require_tools() -> None:
    # A test that cannot run fails: without xdelta3 neither the tree's deltas nor LXD's use
    # of them exist.
    for tool, package in (("xdelta3", "xdelta3"), ("mksquashfs", "squashfs-tools")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install {package})")


def _age(paths: list[Path], seconds: float) -> None:
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


@attrs.define
class Setup:
    """V1 copied into the daemon through the proxy, with --auto-update, as the alias C{mine}."""

    tree: Tree
    upstream: RunningUpstream
    proxy: RunningProxy
    client: LxcClient
    first: TreeImage


async def _copied(tmp_path: Path, daemon: LxdDaemon) -> Setup:
    spec = ProductSpec("deltaos", "1.0", arches=("amd64",), versions=(V1,), aliases=(ALIAS,),
                       rootxz=False, deltas=True)
    tree = build_tree(tmp_path / "tree", [spec])
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    try:
        # An hour of TTL: nothing the daemon asks for during a refresh revalidates a catalogue
        # unless the test ages the proxy's copies.
        proxy = await start_proxy(
            reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)}, cache={"metadata_ttl": "1h"},
        )
    except BaseException:
        await upstream.stop()
        raise
    setup = Setup(tree, upstream, proxy, daemon.client(), tree.image(ALIAS))
    try:
        await setup.client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        await setup.client.image_copy(f"cache:{ALIAS}", "local", "--auto-update", "--alias", "mine")
        assert [i["fingerprint"] for i in await setup.client.image_list("local")] == [setup.first.fingerprint]
        assert (daemon.lxd_dir / "images" / f"{setup.first.fingerprint}.rootfs").exists()
    except BaseException:
        await _stop(setup)
        raise
    return setup


async def _stop(setup: Setup) -> None:
    try:
        await setup.proxy.stop()
    finally:
        await setup.upstream.stop()


async def _an_hour_passes_for_the_proxy(setup: Setup) -> None:
    """Its copies of the catalogue age past their TTL, as between two auto-update runs."""
    index = setup.proxy.cache.index
    for record in list(index.metadata_records()):
        await index.write(index.put_metadata, attrs.evolve(record, checked_at=record.checked_at - 2 * HOUR))


def _an_hour_passes_for_the_daemon(daemon: LxdDaemon) -> None:
    """Its own copy of the catalogue, kept an hour by file mtime, is stale."""
    _age([p for p in (daemon.lxd_dir / "cache").rglob("*") if p.is_file()], 2 * HOUR)


def _served(logged: Logged, mark: int) -> list[tuple[str, int, str]]:
    """(path, status, cache) of every access to the proxy's C{cache} face since C{mark}."""
    return [
        (e["path"], e["status"], e["cache"]) for e in logged[mark:]
        if e.get("log_namespace") == "proxy.access" and e.get("face") == "cache"
    ]


@pytest_twisted.ensureDeferred
async def test_a_refresh_after_auto_update_takes_the_stored_delta_and_never_reaches_the_upstream(
    tmp_path: Path, lxd_daemon: LxdDaemon, logged: Logged
) -> None:
    _require_tools()
    setup = await _copied(tmp_path, lxd_daemon)
    try:
        tree, upstream, proxy, client, first = setup.tree, setup.upstream, setup.proxy, setup.client, setup.first
        # The upstream publishes V2 with a delta from V1; the hour passes for the proxy's
        # copies of the catalogue, and its auto-update runs.
        [newer] = tree.add_version("deltaos", "1.0", V2)
        delta = newer.delta_from(V1)
        assert newer.root is not None and newer.fingerprint != first.fingerprint
        await _an_hour_passes_for_the_proxy(setup)
        # The daemon's use of V1 is in the index, for the auto-update to follow it.
        index = proxy.cache.index
        await index.flush_usage_later()
        report = await proxy.cache.prefetcher.run()
        assert sorted(report.downloaded) == sorted(f.path for f in newer.files)
        assert (report.deltas, report.failed, report.deltas_failed) == ([delta.path], [], [])
        record = index.get(delta.sha256)
        assert record is not None and proxy.cache.store.exists(delta.sha256)

        _an_hour_passes_for_the_daemon(lxd_daemon)
        asked = len(upstream.resource.requests)
        mark = len(logged)
        result = await client.run("image", "refresh", "mine", check=True)
        # lxc draws the transfer it was told of: the metadata file, then the rootfs delta.
        assert "rootfs delta" in result.out and "Image refreshed successfully" in result.out, result.out

        assert [i["fingerprint"] for i in await client.image_list("local")] == [newer.fingerprint]
        # No request reached the upstream during the refresh: catalogue, metadata file and the
        # delta all came from the cache.
        assert [r.path for r in upstream.resource.requests[asked:]] == []
        served = _served(logged, mark)
        assert (f"/cache/{delta.path}", 200, "hit") in served, served
        # The delta replaced the full root file: the daemon never asked for it.
        assert not any(path.endswith(newer.root.path) for path, _status, _cache in served), served
        assert (lxd_daemon.lxd_dir / "images" / f"{newer.fingerprint}.rootfs").exists()
        assert not (lxd_daemon.lxd_dir / "images" / f"{first.fingerprint}.rootfs").exists()
    finally:
        await _stop(setup)


@pytest_twisted.ensureDeferred
async def test_without_the_delta_stored_the_refresh_asks_for_the_delta_not_the_root(
    tmp_path: Path, lxd_daemon: LxdDaemon, logged: Logged
) -> None:
    """What the proxy stores is what LXD asks for first: here no auto-update ran, and the one
    image file the refresh misses is the delta (then stored like any file)."""
    _require_tools()
    setup = await _copied(tmp_path, lxd_daemon)
    try:
        tree, upstream, client = setup.tree, setup.upstream, setup.client
        [newer] = tree.add_version("deltaos", "1.0", V2)
        delta = newer.delta_from(V1)
        assert newer.root is not None
        await _an_hour_passes_for_the_proxy(setup)
        # An expired catalogue is served at once while it is refreshed behind (stale while
        # revalidate): some earlier request has brought the new one, as between two refreshes.
        for by_family in setup.proxy.cache.families.values():
            for metadata in by_family.values():
                await metadata.revalidate()
        _an_hour_passes_for_the_daemon(lxd_daemon)
        asked = len(upstream.resource.requests)
        mark = len(logged)
        result = await client.run("image", "refresh", "mine", check=True)
        assert "rootfs delta" in result.out, result.out
        assert [i["fingerprint"] for i in await client.image_list("local")] == [newer.fingerprint]
        files = [r.path for r in upstream.resource.requests[asked:] if r.path in tree.files]
        assert files == [newer.meta.path, delta.path]
        served = _served(logged, mark)
        assert (f"/cache/{delta.path}", 200, "miss") in served, served
        assert setup.proxy.cache.index.get(delta.sha256) is not None
    finally:
        await _stop(setup)
