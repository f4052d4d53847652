"""
A download that breaks off continues from the bytes on disk (issue 11, point 3).

In memory (L{TreeHarness}, a L{Clock}): the upstream resets the body once at 10 %, 50 % or
99 %, or stalls it past the idle timeout; two clients that asked before the fault get the
whole body, the second request asks for the rest with C{Range} and C{If-Range}, one verified
file is stored and the upstream sent at most 5 % more than the file. An upstream that ignores
the range, or whose file changed (C{If-Range} no longer matches), sends the whole file again:
the download starts over and still verifies. A partial left by a proxy that stopped is
continued by the next one over the same cache, from the sha256 of its bytes on disk.

On loopback (a real proxy service in front of a real TLS upstream): the same resets, with an
RST, and a stall under a short real idle timeout; and a proxy stopped mid-download and started
again over the same state directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath

from proxy.blobs import MAX_RESUMABLE, RESUMABLE_MAX_AGE_SECONDS, BlobStore, Resumable
from proxy.download_slots import DownloadSlots
from proxy.index import reconcile
from tests.helpers.harness import Closing, collect, outcome
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
from tests.helpers.upstream import Throttle
from tests.helpers.wired import IDLE, INDEX, rootfs_path
from tests.faults.upstreams import (
    BROKEN,
    NAME,
    KiB,
    NET_TIMEOUT_SECONDS,
    OS2,
    PRODUCTS,
    ROOTFS_BYTES,
    TreeHarness,
    V1,
    start_loopback,
    tree_files,
)

reactor: Any = _reactor

# The bytes an upstream may send for one file, whatever broke: the file and 5 %.
ALLOWED_OVERHEAD = 1.05
# Slow enough that both clients have their headers and some bytes before the fault strikes.
PACE = Throttle(8 * KiB, 0.05)
FRACTIONS = {"10 %": 0.10, "50 %": 0.50, "99 %": 0.99}


@pytest.fixture
def h(tmp_path: Path, closing: Closing) -> TreeHarness:
    return closing(TreeHarness(tmp_path, tree_files()))


def catalogue(h: TreeHarness) -> None:
    h.json(INDEX)
    h.json(PRODUCTS)


def two_clients(h: TreeHarness, seconds: float) -> list[Received]:
    """Two clients ask for L{BROKEN} at once; C{seconds} of paced time pass; what they got."""
    h.tree.throttle = PACE
    clients = [collect(h.receive(BROKEN)) for _ in range(2)]
    h.settle()
    h.drive(seconds, PACE.delay)
    return [outcome(c) for c in clients]


def body_seconds() -> float:
    return ROOTFS_BYTES / PACE.chunk_size * PACE.delay + 1


def assert_one_verified_file(h: TreeHarness) -> None:
    assert h.fetcher.in_flight() == {}
    assert h.index.find_path("up", BROKEN) is not None
    assert h.temp_files() == []
    assert_store_verified(h.store, h.index)


def gets(h: TreeHarness) -> list[Any]:
    return [r for r in h.tree.requests if r.path == BROKEN and r.method == "GET"]


@pytest.mark.parametrize("where", list(FRACTIONS))
def test_a_reset_body_is_resumed(h: TreeHarness, logged: Logged, where: str) -> None:
    catalogue(h)
    offset = int(ROOTFS_BYTES * FRACTIONS[where])
    h.tree.reset(BROKEN, offset, times=1)
    expected = h.files[BROKEN]

    for received in two_clients(h, body_seconds()):
        assert_whole(received, expected)
    assert_one_verified_file(h)
    first, second = gets(h)
    assert first.header("Range") is None
    assert second.header("Range") == f"bytes={offset}-"
    # The validator of the first answer: its ETag.
    assert second.header("If-Range") is not None and second.header("If-Range").startswith('"')
    assert h.tree.sent[BROKEN] <= ALLOWED_OVERHEAD * ROOTFS_BYTES
    assert_only_catalogue(h.tree.paths(), h.files)
    assert_no_traceback(logged)
    assert_index_reopens(h.index, h.store)


def test_a_stalled_body_is_resumed(h: TreeHarness, logged: Logged) -> None:
    """A stall past the idle timeout: the followers wait, and get the whole body."""
    catalogue(h)
    offset = ROOTFS_BYTES // 2
    h.tree.stall(BROKEN, offset, times=1)

    for received in two_clients(h, body_seconds() + IDLE + 5):
        assert_whole(received, h.files[BROKEN])
    assert_one_verified_file(h)
    assert [r.header("Range") for r in gets(h)] == [None, f"bytes={offset}-"]
    assert h.tree.sent[BROKEN] <= ALLOWED_OVERHEAD * ROOTFS_BYTES
    assert_no_traceback(logged)


@pytest.mark.parametrize("how", ["range ignored", "validator changed"])
def test_a_whole_body_instead_of_the_rest_starts_over(h: TreeHarness, how: str) -> None:
    """A 200 for a resume: the bytes on disk go, the whole body comes again and verifies."""
    catalogue(h)
    offset = ROOTFS_BYTES // 2
    h.tree.reset(BROKEN, offset, times=1)
    if how == "range ignored":
        h.tree.ignore_ranges = True
    h.tree.throttle = PACE
    clients = [collect(h.receive(BROKEN)) for _ in range(2)]
    h.settle()
    if how == "validator changed":
        # Replaced upstream while the first body was on its way.
        h.tree.change_validator(BROKEN)
    h.drive(2 * body_seconds(), PACE.delay)

    for c in clients:
        assert_whole(outcome(c), h.files[BROKEN])
    assert_one_verified_file(h)
    first, second = gets(h)
    assert second.header("Range") == f"bytes={offset}-"
    # Sent whole twice, less what the reset cut.
    assert h.tree.sent[BROKEN] == offset + ROOTFS_BYTES


def test_a_partial_left_by_an_earlier_run_is_resumed(tmp_path: Path, closing: Closing) -> None:
    """
    The first proxy stops (its index closed) while the file is half fetched; the next one
    over the same cache keeps the partial at start-up, hashes it again and asks for the rest.
    """
    first = TreeHarness(tmp_path, tree_files())
    catalogue(first)
    offset = ROOTFS_BYTES // 2
    first.tree.stall(BROKEN, offset)
    collect(first.receive(BROKEN))
    first.settle()
    sidecars = [p for p in first.temp_files() if p.endswith(".resume")]
    assert len(sidecars) == 1
    doc = json.loads((first.store.temp_dir.child(sidecars[0])).getContent())
    assert doc["size"] == ROOTFS_BYTES and doc["url"].endswith(BROKEN)
    sent_before = first.tree.sent[BROKEN]
    assert sent_before == offset
    first.close()
    served = tmp_path / "tree" / BROKEN
    st = served.stat()

    second = closing(TreeHarness(tmp_path, tree_files()))
    # The tree is written again, in place: the same file, so the same ETag as before.
    os.utime(served, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = reconcile(second.index, second.store)
    assert report.temp_removed == 0
    assert list(second.store.resumable) == [doc["sha256"]]
    catalogue(second)
    assert_whole(second.run(second.receive(BROKEN)), second.files[BROKEN])
    assert_one_verified_file(second)
    [resumed] = gets(second)
    assert resumed.header("Range") == f"bytes={offset}-"
    assert resumed.header("If-Range") == doc["validator"]
    assert sent_before + second.tree.sent[BROKEN] <= ALLOWED_OVERHEAD * ROOTFS_BYTES


def test_a_damaged_partial_is_fetched_whole_once_it_fails_to_verify(
    tmp_path: Path, closing: Closing, logged: Logged,
) -> None:
    """Bytes on disk that are not the file's (a power cut): the resumed file fails to verify,
    and one whole body is fetched before anything fails."""
    first = TreeHarness(tmp_path, tree_files())
    catalogue(first)
    first.tree.stall(BROKEN, ROOTFS_BYTES // 2)
    collect(first.receive(BROKEN))
    first.settle()
    [part] = [p for p in first.temp_files() if p.endswith(".part")]
    first.close()
    damaged = Path(first.store.temp_dir.child(part).path)
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    served = tmp_path / "tree" / BROKEN
    st = served.stat()

    second = closing(TreeHarness(tmp_path, tree_files()))
    # The same file upstream (its ETag unchanged): the range is answered.
    os.utime(served, ns=(st.st_atime_ns, st.st_mtime_ns))
    reconcile(second.index, second.store)
    catalogue(second)
    assert_whole(second.run(second.receive(BROKEN)), second.files[BROKEN])
    assert_one_verified_file(second)
    assert [r.header("Range") for r in gets(second)] == [f"bytes={ROOTFS_BYTES // 2}-", None]
    assert any("did not verify after a resume" in t for t in logged.texts())


def test_start_up_keeps_only_resumable_partials(tmp_path: Path) -> None:
    """No sidecar, a broken one, or a partial older than the bound: swept; a good one kept."""
    store = BlobStore(FilePath(str(tmp_path / "cache")))
    good = store.new_partial()
    good.write(b"x" * 10)
    good.write_sidecar("https://up.test/f", '"e"', "a" * 64, 100)
    bare = store.new_partial()
    bare.write(b"y" * 10)
    broken = store.new_partial()
    broken.write(b"z" * 10)
    Path(broken.sidecar).write_text("{not json")
    old = store.new_partial()
    old.write(b"o" * 10)
    old.write_sidecar("https://up.test/g", "", "b" * 64, 100)
    # A partial of a file stored meanwhile.
    done = store.new_partial()
    done.write(b"d" * 10)
    done.write_sidecar("https://up.test/h", "", "c" * 64, 100)
    stored = store.path_for("c" * 64)
    os.makedirs(stored.parent().path, exist_ok=True)
    Path(stored.path).write_bytes(b"d" * 100)
    now = Path(old.path.path).stat().st_mtime + RESUMABLE_MAX_AGE_SECONDS + 1
    for p in (good, bare, broken, old, done):
        p.keep()
    # Only the good one's part and the stored one's are recent enough at `now`.
    for p in (good, done):
        os.utime(p.path.path, (now, now))

    assert store.clear_temp(keep_resumable=True, now=now) == 7
    assert sorted(p.name for p in Path(store.temp_dir.path).iterdir()) == sorted(
        [good.path.basename(), Path(good.sidecar).name]
    )
    assert list(store.resumable) == ["a" * 64]
    resumed = store.resume("a" * 64)
    assert resumed is not None and resumed.rehash() == 10
    assert store.resume("a" * 64) is None


# -- on loopback ------------------------------------------------------------------------------

# Long enough that a loaded machine never idles out a healthy attempt (which would add a
# third request), short enough for the stall case to stay quick.
LOOPBACK_IDLE_SECONDS = 2.0
# About 0.6 s for the rootfs: both clients join well before any fault.
LOOPBACK_PACE = Throttle(16 * KiB, 0.05)


@pytest.mark.loopback
@pytest.mark.parametrize("fault", ["reset at 10 %", "reset at 50 %", "reset at 99 %", "stall at 50 %"])
@pytest_twisted.ensureDeferred
async def test_a_broken_body_is_resumed_on_loopback(tmp_path: Path, logged: Logged, fault: str) -> None:
    site = await start_loopback(
        reactor, tmp_path, cache={"download_idle_timeout": f"{LOOPBACK_IDLE_SECONDS:g}s"}
    )
    try:
        expected = site.files[BROKEN]
        for path in (INDEX, PRODUCTS):
            assert_whole(await site.get(path), site.files[path])
        kind, _, where, _ = fault.split()
        offset = int(ROOTFS_BYTES * int(where) / 100)
        if kind == "reset":
            site.tree.reset(BROKEN, offset, times=1)
        else:
            site.tree.stall(BROKEN, offset, times=1)
        site.tree.throttle = LOOPBACK_PACE
        clients: Deferred[list[Received]] = gatherResults(
            [Deferred.fromCoroutine(site.get(BROKEN)) for _ in range(2)]
        )
        for received in await clients:
            assert_whole(received, expected)
        ranges = [r.header("Range") for r in site.tree.requests if r.path == BROKEN]
        assert ranges[0] is None and len(ranges) == 2
        # What a reset's RST dropped on the way is asked for again.
        assert ranges[1] is not None and int(ranges[1][len("bytes="):-1]) <= offset
        assert site.tree.sent[BROKEN] <= ALLOWED_OVERHEAD * ROOTFS_BYTES
        if kind == "stall":
            site.tree.clear()
        await site.stop_proxy()
        index, store = site.open_cache()
        assert_store_verified(store, index)
        assert_index_reopens(index, store)
    finally:
        await site.stop()
    assert_no_traceback(logged)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_download_continues_after_a_restart_on_loopback(tmp_path: Path, logged: Logged) -> None:
    """The proxy is stopped with the file half fetched, and started again over the same state."""
    site = await start_loopback(reactor, tmp_path)
    state = site.proxy.state_dir
    try:
        for path in (INDEX, PRODUCTS):
            assert_whole(await site.get(path), site.files[path])
        offset = ROOTFS_BYTES // 2
        site.tree.stall(BROKEN, offset, times=1)
        client = Deferred.fromCoroutine(site.get(BROKEN))
        client.addErrback(lambda _: None)
        await site.tree.when_held(BROKEN).addTimeout(NET_TIMEOUT_SECONDS, reactor)
        # The last bytes before the stall reach the proxy's disk and its sidecar is written.
        for _ in range(100):
            parts = [p for p in (state / "tmp").iterdir() if p.suffix == ".part"]
            sidecars = [p for p in (state / "tmp").iterdir() if p.suffix == ".resume"]
            if parts and sidecars and parts[0].stat().st_size == offset:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            raise AssertionError("the partial and its sidecar never reached the disk")
        await site.stop_proxy()
        # The stop cut the upstream connection: the parked body is gone with it.
        for _ in range(100):
            if site.tree.held(BROKEN) == 0:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            raise AssertionError("the upstream never saw the stopped proxy's connection go")
        site.tree.clear()
        await client
        site.proxy = await start_proxy(reactor, state, {NAME: (site.upstream.url, site.upstream.ca_pem)})
        assert_whole(await site.get(BROKEN), site.files[BROKEN])
        ranges = [r.header("Range") for r in site.tree.requests if r.path == BROKEN]
        assert ranges == [None, f"bytes={offset}-"]
        assert site.tree.sent[BROKEN] <= ALLOWED_OVERHEAD * ROOTFS_BYTES
        await site.stop_proxy()
        index, store = site.open_cache()
        assert_store_verified(store, index)
        assert_index_reopens(index, store)
    finally:
        await site.stop()
    assert_no_traceback(logged)


def test_a_sidecar_written_late_stays_only_with_a_kept_partial(tmp_path: Path) -> None:
    """The sidecar is written on a worker: one that lands after the partial went is removed."""
    store = BlobStore(FilePath(str(tmp_path / "cache")))
    kept = store.new_partial()
    kept.write(b"k")
    kept.keep()
    kept.write_sidecar("https://up.test/k", "", "a" * 64, 10)
    assert Path(kept.sidecar).exists() and Path(kept.path.path).exists()
    gone = store.new_partial()
    gone.write(b"g")
    gone.discard()
    gone.write_sidecar("https://up.test/g", "", "b" * 64, 10)
    assert not Path(gone.sidecar).exists() and not Path(gone.path.path).exists()


def test_an_upstream_that_stops_answering_fails_the_followers_within_two_idle_timeouts(
    h: TreeHarness, logged: Logged,
) -> None:
    """A body stalls and every resume gets no answer: the followers, who have seen no byte
    since, are failed (cut) within 2 x the idle timeout of the stall, not after 5 attempts of
    a full idle timeout each; the file's failure is remembered and the bytes kept."""
    catalogue(h)
    offset = ROOTFS_BYTES // 2
    h.tree.stall(BROKEN, offset, times=1)
    h.tree.throttle = PACE
    clients = [collect(h.receive(BROKEN)) for _ in range(2)]
    h.settle()
    h.drive(body_seconds() / 2 + 1, PACE.delay)
    assert not any(clients)
    h.tree.silence(BROKEN)
    stalled_at = h.clock.seconds()
    while not all(clients) and h.clock.seconds() - stalled_at < 6 * IDLE:
        h.drive(1, 1)
    assert all(clients)
    assert h.clock.seconds() - stalled_at <= 2 * IDLE + 5
    for c in clients:
        got = outcome(c)
        assert got.code == 200 and not got.complete
    assert h.fetcher.in_flight() == {}
    assert h.index.find_path("up", BROKEN) is None
    # the file's failure is counted (backed off from the next one) and the upstream that
    # stopped answering is offline; the bytes are kept for the next request to continue
    assert len(h.fetcher._file_failures) == 1
    assert h.health.offline
    assert h.store.resumable
    assert_no_traceback(logged)
    h.tree.clear()


def test_a_partial_taken_by_a_download_still_queued_at_stop_is_kept(
    tmp_path: Path, closing: Closing,
) -> None:
    """
    The second run takes the partial the first left for a download that waits for its
    upstream's slot; the service stops before its turn: the bytes and their sidecar stay for
    the third run, which continues from them.
    """
    first = TreeHarness(tmp_path, tree_files())
    catalogue(first)
    offset = ROOTFS_BYTES // 2
    first.tree.stall(BROKEN, offset)
    collect(first.receive(BROKEN))
    first.settle()
    first.close()
    served = tmp_path / "tree" / BROKEN
    st = served.stat()

    second = TreeHarness(tmp_path, tree_files())
    os.utime(served, ns=(st.st_atime_ns, st.st_mtime_ns))
    reconcile(second.index, second.store)
    assert second.store.resumable
    second.fetcher._slots = DownloadSlots({"up": 1})
    catalogue(second)
    other = rootfs_path(OS2, V1)
    second.tree.hold(other)
    collect(second.receive(other))
    second.settle()
    queued = collect(second.receive(BROKEN))
    second.settle()
    assert second.fetcher.queued() == {"up": 1}
    second.fetcher.stop()
    second.settle()
    assert queued
    kept = second.temp_files()
    second.tree.release(other)
    second.close()
    assert any(p.endswith(".resume") for p in kept)

    third = closing(TreeHarness(tmp_path, tree_files()))
    os.utime(served, ns=(st.st_atime_ns, st.st_mtime_ns))
    reconcile(third.index, third.store)
    catalogue(third)
    assert_whole(third.run(third.receive(BROKEN)), third.files[BROKEN])
    assert [r.header("Range") for r in gets(third)] == [f"bytes={offset}-"]


def test_at_most_so_many_partial_downloads_are_kept(tmp_path: Path) -> None:
    """Partials kept for a later request are bounded, at runtime and at start-up: a file
    nobody asks for again must not hold gigabytes that min_free pays for with cached files."""
    store = BlobStore(FilePath(str(tmp_path / "cache")))
    kept: list[Resumable] = []
    dropped: list[Resumable] = []
    for n in range(MAX_RESUMABLE + 3):
        partial = store.new_partial()
        partial.write(b"p" * 10)
        sha = f"{n:064x}"
        partial.write_sidecar(f"https://up.test/{n}", "", sha, 100)
        partial.keep()
        os.utime(partial.path.path, (1_500_000 + n, 1_500_000 + n))
        found = Resumable(partial.path, f"https://up.test/{n}", "", sha, 100)
        kept.append(found)
        dropped += store.keep_resumable(found)
    assert dropped == kept[:3]
    assert list(store.resumable) == [k.sha256 for k in kept[3:]]
    for found in dropped:
        BlobStore.remove_resumable(found)
    assert len(list(Path(store.temp_dir.path).iterdir())) == 2 * MAX_RESUMABLE

    # the same bound at start-up, over partials left by several runs: the newest stay
    again = BlobStore(FilePath(str(tmp_path / "cache")))
    for n in range(3):
        partial = again.new_partial()
        partial.write(b"q" * 10)
        partial.write_sidecar("https://up.test/new", "", f"{n + 100:064x}", 100)
        partial.keep()
        os.utime(partial.path.path, (2_000_000 + n, 2_000_000 + n))
    again.clear_temp(keep_resumable=True, now=2_000_100)
    assert len(again.resumable) == MAX_RESUMABLE
    assert f"{102:064x}" in again.resumable and kept[3].sha256 not in again.resumable
    assert len(list(Path(again.temp_dir.path).iterdir())) == 2 * MAX_RESUMABLE
