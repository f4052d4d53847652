"""
The proxy's own process failing: killed with SIGKILL in the middle of downloads, and writing to
a file system that is full.

SIGKILL: a real proxy process (L{ProxyProcess}) in front of a loopback upstream that sends each
file at a steady pace; twenty clients ask for twenty files at once and the process is killed
once they have a random number of bytes between them (seeded: the seed is printed, and
C{FAULTS_SEED} replays one; the process's own pace still varies). After each kill
the cache on disk is checked as it was left, then the proxy starts again on it. Finally every
file is fetched whole and the index reopens with nothing to repair.

A full disk: the cache directory is a small tmpfs (mounting one needs root; the tests skip
otherwise), filled up but for a little less than one file. The proxy runs in the test's reactor.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.index import CacheIndex
from tests.faults.upstreams import (
    BROKEN,
    NAME,
    OTHER,
    PRODUCTS,
    Loopback,
    start_loopback,
    write_tree,
)
from tests.helpers.certs import make_ca
from tests.helpers.invariants import (
    Received,
    assert_index_reopens,
    assert_no_traceback,
    assert_not_wrong,
    assert_only_catalogue,
    assert_store_verified,
    assert_whole,
    receive,
)
from tests.helpers.logs import Logged
from tests.helpers.proxy_process import ProxyProcess, https_client
from tests.helpers.upstream import RunningUpstream, Throttle, start_https_upstream
from tests.helpers.wired import INDEX, catalogue_tree

reactor: Any = _reactor

DEFAULT_SEED = 9
KILLS = 3
PRODUCT_COUNT = 10
FILE_BYTES = 200_000
# 32 KiB every 20 ms, about 1.6 MB/s a file: twenty files take a few tenths of a second.
PACE = Throttle(32 * 1024, 0.02)
NET_TIMEOUT_SECONDS = 60.0


def twenty_files() -> dict[str, bytes]:
    """A catalogue of ten products, each a metadata file and a rootfs of its own bytes."""
    products = {
        f"os{i}:1.0:amd64:default": {
            "20240101_0000": (f"meta {i}\n".encode() * 500, random.Random(i).randbytes(FILE_BYTES))
        }
        for i in range(PRODUCT_COUNT)
    }
    return catalogue_tree({PRODUCTS: products})


def write_config(directory: Path, upstream: RunningUpstream) -> Path:
    (directory / "ca.pem").write_bytes(upstream.ca_pem)
    config = directory / "proxy.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:0"]
tls_names = ["localhost"]
port_file = "port"
workers = 1

[metrics]
listen = ["127.0.0.1:0"]
[cache]
dir = "state"

[upstreams.{NAME}]
url = "{upstream.url}"
ca_file = "ca.pem"
""")
    return config


def check_cache_at_rest(state: Path, *, reopen: bool = False) -> None:
    """(b), and with C{reopen} (c), on the cache a stopped or killed proxy left."""
    store = BlobStore(FilePath(str(state)))
    index = CacheIndex(str(state / "index"), reactor)
    try:
        assert_store_verified(store, index)
    finally:
        if reopen:
            assert_index_reopens(index, store)
        else:
            index.close()


def download_all(
    client: HTTPClient, port: int, paths: list[str], progress: Callable[[int], None] | None = None
) -> Deferred[list[Received]]:
    """Every one of C{paths} at once; C{progress} is told of every piece of every body."""
    base = f"https://localhost:{port}/{NAME}"
    pending = [
        Deferred.fromCoroutine(receive(client.get(f"{base}/{p}", unbuffered=True), progress))
        for p in paths
    ]
    done: Deferred[list[Received]] = gatherResults(pending)
    return done.addTimeout(NET_TIMEOUT_SECONDS, reactor)


class KillPoint:
    """Fires C{reached} once the clients together have C{threshold} bytes of their bodies."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.received = 0
        self.reached: Deferred[None] = Deferred()

    def __call__(self, size: int) -> None:
        self.received += size
        if self.received >= self.threshold and not self.reached.called:
            self.reached.callback(None)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_sigkill_at_random_points_during_twenty_downloads(
    tmp_path: Path, proxy_processes: list[ProxyProcess]
) -> None:
    seed = int(os.environ.get("FAULTS_SEED", DEFAULT_SEED))
    print(f"SIGKILL points from seed {seed} (FAULTS_SEED={seed} replays them)")
    rng = random.Random(seed)
    files = twenty_files()
    items = [path for path in files if path.startswith("images/")]
    assert len(items) == 20
    total = sum(len(files[path]) for path in items)
    upstream = start_https_upstream(reactor, write_tree(tmp_path / "tree", files), make_ca())
    upstream.resource.throttle = PACE
    try:
        proxy = ProxyProcess(write_config(tmp_path, upstream))
        proxy_processes.append(proxy)
        state = tmp_path / "state"
        for kill in range(KILLS):
            port = await proxy.start()
            client = https_client((state / "tls" / "server.crt").read_bytes())
            order = rng.sample(items, len(items))
            point = KillPoint(rng.randrange(total))
            downloads = download_all(client, port, order, point)
            # Whichever comes first; neither is cancelled.
            first: list[Deferred[Any]] = [point.reached, downloads]
            await DeferredList(first, fireOnOneCallback=True).addTimeout(NET_TIMEOUT_SECONDS, reactor)
            assert proxy.process is not None
            proxy.process.kill()
            print(f"kill {kill + 1}: after {point.received} of the {total} bytes the clients want")
            for path, received in zip(order, await downloads):
                # A client of a killed proxy has a whole file, or a cut one: never a wrong one.
                assert_not_wrong(received, files[path])
            proxy.process.wait(timeout=NET_TIMEOUT_SECONDS)
            check_cache_at_rest(state)

        port = await proxy.start()
        client = https_client((state / "tls" / "server.crt").read_bytes())
        for path, received in zip(items, await download_all(client, port, items)):
            assert_whole(received, files[path])
        # It ends by re-raising the signal it stopped on.
        assert await proxy.stop() in (0, -signal.SIGTERM)
    finally:
        await upstream.stop()
    assert_only_catalogue(upstream.resource.paths(), files)
    check_cache_at_rest(state, reopen=True)
    log = proxy.log.read_text()
    assert "Traceback" not in log and "Unhandled" not in log, log


# -- a full disk ------------------------------------------------------------------------------

SMALL_DISK = "4m"
# Free space left on the full disk: less than a rootfs, more than a metadata file.
LEFT_FREE_BYTES = 64 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of L{SMALL_DISK}, unmounted at the end; the test is skipped where none can be."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, capture_output=True)


def fill(mount: Path, leave: int) -> Path:
    """Write a file that leaves C{leave} bytes free on C{mount}."""
    stat = os.statvfs(mount)
    size = stat.f_bavail * stat.f_frsize - leave
    filler = mount / "filler"
    with filler.open("wb") as f:
        block = b"\0" * (1024 * 1024)
        while size > 0:
            f.write(block[:size])
            size -= len(block)
    return filler


@pytest_twisted.async_yield_fixture
async def full_disk(tmp_path: Path, small_disk: Path) -> AsyncIterator[Loopback]:
    """A proxy whose cache is on a disk that has room for its catalogue and little else."""
    site = await start_loopback(reactor, tmp_path, state_dir=small_disk)
    try:
        for path in (INDEX, PRODUCTS):
            assert_whole(await site.get(path), site.files[path])
        fill(small_disk, LEFT_FREE_BYTES)
        yield site
    finally:
        await site.stop()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_full_disk_keeps_the_invariants(full_disk: Loopback, logged: Logged) -> None:
    site = full_disk
    got = await gatherResults([Deferred.fromCoroutine(site.get(BROKEN)) for _ in range(2)])
    for received in got:
        assert_not_wrong(received, site.files[BROKEN])
    (site.proxy.state_dir / "filler").unlink()
    assert_whole(await site.get(BROKEN), site.files[BROKEN])
    assert_whole(await site.get(OTHER), site.files[OTHER])
    assert_only_catalogue(site.tree.paths(), site.files)
    await site.stop_proxy()
    check_cache_at_rest(site.proxy.state_dir, reopen=True)
    assert_no_traceback(logged)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_full_disk_answers_a_miss_honestly(full_disk: Loopback) -> None:
    received = await full_disk.get(BROKEN)
    assert received.code is not None
    if received.code < 500:
        assert_whole(received, full_disk.files[BROKEN])
