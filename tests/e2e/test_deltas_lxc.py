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

from tests.e2e.lxd import LxdDaemon, running_daemon
from tests.helpers.certs import make_ca
from tests.helpers.logs import Logged
from tests.helpers.running_proxy import start_proxy
from tests.helpers.tree import ProductSpec, build_tree
from tests.helpers.upstream import start_https_upstream

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


@pytest_twisted.ensureDeferred
async def test_a_refresh_after_auto_update_takes_the_stored_delta_and_never_reaches_the_upstream(
    tmp_path: Path, lxd_daemon: LxdDaemon, logged: Logged
) -> None:
    _require_tools()
    spec = ProductSpec("deltaos", "1.0", arches=("amd64",), versions=(V1,), aliases=(ALIAS,),
                       rootxz=False, deltas=True)
    tree = build_tree(tmp_path / "tree", [spec])
    first = tree.image(ALIAS)
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    # An hour of TTL: nothing the daemon asks for during the refresh revalidates a catalogue.
    proxy = await start_proxy(
        reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)}, cache={"metadata_ttl": "1h"},
    )
    try:
        client = lxd_daemon.client()
        await client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        await client.image_copy(f"cache:{ALIAS}", "local", "--auto-update", "--alias", "mine")
        assert [i["fingerprint"] for i in await client.image_list("local")] == [first.fingerprint]
        assert (lxd_daemon.lxd_dir / "images" / f"{first.fingerprint}.rootfs").exists()

        # The upstream publishes V2 with a delta from V1; the hour passes for the proxy's
        # copies of the catalogue, and its auto-update runs.
        [newer] = tree.add_version("deltaos", "1.0", V2)
        delta = newer.delta_from(V1)
        assert newer.root is not None and newer.fingerprint != first.fingerprint
        index = proxy.cache.index
        for record in list(index.metadata_records()):
            await index.write(index.put_metadata, attrs.evolve(record, checked_at=record.checked_at - 2 * HOUR))
        # The daemon's use of V1 is in the index, for the auto-update to follow it.
        await index.flush_usage_later()
        report = await proxy.cache.prefetcher.run()
        assert sorted(report.downloaded) == sorted(f.path for f in newer.files)
        assert (report.deltas, report.failed, report.deltas_failed) == ([delta.path], [], [])
        record = index.get(delta.sha256)
        assert record is not None and proxy.cache.store.exists(delta.sha256)

        # An hour later for the daemon too: its copy of the catalogue is stale.
        _age([p for p in (lxd_daemon.lxd_dir / "cache").rglob("*") if p.is_file()], 2 * HOUR)
        asked = len(upstream.resource.requests)
        mark = len(logged)
        result = await client.run("image", "refresh", "mine", check=True)
        # lxc draws the transfer it was told of: the metadata file, then the rootfs delta.
        assert "rootfs delta" in result.out and "Image refreshed successfully" in result.out, result.out

        assert [i["fingerprint"] for i in await client.image_list("local")] == [newer.fingerprint]
        # No request reached the upstream during the refresh: catalogue, metadata file and the
        # delta all came from the cache.
        assert [r.path for r in upstream.resource.requests[asked:]] == []
        served = [
            (e["path"], e["status"], e["cache"]) for e in logged[mark:]
            if e.get("log_namespace") == "proxy.access" and e.get("face") == "cache"
        ]
        assert (f"/cache/{delta.path}", 200, "hit") in served, served
        # The delta replaced the full root file: the daemon never asked for it.
        assert not any(path.endswith(newer.root.path) for path, _status, _cache in served), served
        assert (lxd_daemon.lxd_dir / "images" / f"{newer.fingerprint}.rootfs").exists()
        assert not (lxd_daemon.lxd_dir / "images" / f"{first.fingerprint}.rootfs").exists()
    finally:
        await proxy.stop()
        await upstream.stop()
