"""
A misbehaving upstream: each fault of L{TreeResource}, injected on one file of the catalogue.

In memory (L{TreeHarness}: the request path wired as the service wires it, in front of a
L{TreeResource} reached through C{RequestTraversalAgent}, on a L{Clock}): two clients ask for
the file while the fault is on, the clock is driven past every timeout the fault can reach, and
the invariants of L{tests.helpers.invariants} are checked; then the fault is cleared and the
next request must get the whole file.

An error answer or a bad body for one file is that file's failure only
(L{test_a_failing_file_is_that_files_failure_only}); a file that failed twice in a row (two
clients that did not share a download) is backed off on its own for 5 s, so the next request
is made once that has run out. Headers never sent mark the upstream offline, and the next
request probes it at once.

On loopback (a real proxy service and a real TLS upstream in the test's reactor): the faults
whose meaning is in the sockets and in real time, a reset (an RST), a stall and headers never
sent (real timeouts, set short), and a body at 100 KiB/s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from attrs import frozen
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults

from proxy.downloads import RESUME_ATTEMPTS, RESUME_BACKOFF_SECONDS
from proxy.health import DEFAULT_BASE_BACKOFF_SECONDS
from tests.helpers.faces import SPLIT_OS, V3, FaceHarness
from tests.helpers.harness import Closing, collect, outcome
from tests.helpers.invariants import (
    Received,
    assert_index_reopens,
    assert_no_traceback,
    assert_not_wrong,
    assert_only_catalogue,
    assert_store_verified,
    assert_whole,
)
from tests.helpers.logs import Logged
from tests.helpers.upstream import Throttle, TreeResource
from tests.helpers.wired import IDLE, INDEX, TTL
from tests.faults.upstreams import (
    BROKEN,
    KiB,
    OTHER,
    PRODUCTS,
    ROOTFS_BYTES,
    UNLISTED,
    TreeHarness,
    start_loopback,
    tree_files,
)

reactor: Any = _reactor

# A body in 16 KiB steps every 50 ms: about a second for a rootfs.
PACE = Throttle(16 * KiB, 0.05)
# Past the first backoff of a file that failed twice in a row.
RECOVERY_SECONDS = DEFAULT_BASE_BACKOFF_SECONDS + 1


@pytest.fixture
def h(tmp_path: Path, closing: Closing) -> TreeHarness:
    return closing(TreeHarness(tmp_path, tree_files()))


@frozen
class Fault:
    """One upstream fault: how to inject it on a path, and how long it may take to show."""

    inject: Callable[[TreeResource, str], None]
    # Fake time to let pass once the clients have asked, in steps of `step`.
    seconds: float = 0.0
    step: float = 1.0
    # Whether the download can still succeed while the fault is on (a slow upstream).
    completes: bool = False


# A body that breaks off is resumed from the bytes on disk (every response of these faults
# breaks after its first 100 000 bytes, so the second completes the 160 kB file); one that
# breaks before any byte fails after RESUME_ATTEMPTS attempts and their backoff.
GIVE_UP_SECONDS = sum(RESUME_BACKOFF_SECONDS) + 1

FAULTS: dict[str, Fault] = {
    "reset before the body": Fault(lambda tree, path: tree.reset(path, 0), seconds=GIVE_UP_SECONDS),
    "reset mid-body": Fault(lambda tree, path: tree.reset(path, 100_000), completes=True),
    "wrong bytes, right length": Fault(lambda tree, path: tree.corrupt(path)),
    "short body, clean close": Fault(
        lambda tree, path: tree.truncate(path, 100_000), completes=True,
    ),
    "stall after the headers": Fault(
        lambda tree, path: tree.stall(path, 0), seconds=RESUME_ATTEMPTS * IDLE + GIVE_UP_SECONDS + 20,
        step=5.0,
    ),
    "stall after 100 000 bytes": Fault(
        lambda tree, path: tree.stall(path, 100_000), seconds=IDLE + 5, completes=True,
    ),
    "headers never sent": Fault(lambda tree, path: tree.silence(path), seconds=IDLE + 10),
    "500 for the path": Fault(lambda tree, path: tree.status(path, 500)),
    "503 for the path": Fault(lambda tree, path: tree.status(path, 503)),
    "redirect off the allow-list": Fault(
        lambda tree, path: tree.redirect(path, "https://elsewhere.test/base/" + UNLISTED)
    ),
    "100 KiB/s": Fault(
        lambda tree, path: tree.rate(path, 100 * KiB), seconds=ROOTFS_BYTES / (100 * KiB) + 1,
        step=0.1, completes=True,
    ),
}


@pytest.mark.parametrize("paced", [False, True], ids=["at once", "paced"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_an_upstream_fault_on_a_miss(h: TreeHarness, logged: Logged, name: str, paced: bool) -> None:
    """
    Two clients ask for a file while its upstream misbehaves. In memory a body arrives at
    once, so the fault is known before the clients are answered; C{paced}, the body comes in
    small steps, so they have their headers and part of the body when it strikes.
    """
    fault = FAULTS[name]
    expected = h.files[BROKEN]
    h.json(INDEX)
    h.json(PRODUCTS)
    fault.inject(h.tree, BROKEN)
    if paced:
        h.tree.throttle = PACE

    clients = [collect(h.receive(BROKEN)) for _ in range(2)]
    h.settle()
    if paced:
        h.drive(ROOTFS_BYTES / PACE.chunk_size * PACE.delay + 1, PACE.delay)
    h.drive(fault.seconds, fault.step)
    got: list[Received] = [outcome(c) for c in clients]
    for received in got:
        assert_not_wrong(received, expected)
        if fault.completes:
            assert_whole(received, expected)
    assert h.fetcher.in_flight() == {}
    assert h.temp_files() == []
    assert_store_verified(h.store, h.index)
    # A body that failed left nothing behind; one that came whole, slowly, is stored.
    assert (h.index.find_path("up", BROKEN) is not None) is fault.completes

    h.tree.clear()
    h.tree.throttle = None
    h.drive(RECOVERY_SECONDS, 1.0)
    assert_whole(h.run(h.receive(BROKEN)), expected)
    assert_whole(h.run(h.receive(OTHER)), h.files[OTHER])
    assert_only_catalogue(h.tree.paths(), h.files)
    assert_no_traceback(logged)
    assert_index_reopens(h.index, h.store)


@pytest.mark.parametrize("fault, status", [
    ("500", 502),
    ("503", 502),
    ("403", 502),
    ("404", 404),
    ("wrong bytes", 502),
])
def test_a_failing_file_is_that_files_failure_only(h: TreeHarness, fault: str, status: int) -> None:
    """
    An error answer or a bad body for one file fails that file's clients at once, and nothing
    else: the upstream stays online, the other files and the catalogue are served, and the
    next request for the file asks the upstream again.
    """
    h.json(INDEX)
    h.json(PRODUCTS)
    if fault == "wrong bytes":
        h.tree.corrupt(BROKEN)
    else:
        h.tree.status(BROKEN, int(fault))

    got = [collect(h.receive(BROKEN)) for _ in range(2)]
    h.settle()
    assert [outcome(c).code for c in got] == [status, status]
    assert not h.health.offline
    assert_whole(h.run(h.receive(OTHER)), h.files[OTHER])
    h.clock.advance(TTL + 1)
    for path in (INDEX, PRODUCTS):
        assert_whole(h.run(h.receive(path)), h.files[path])

    before = h.tree.count(BROKEN)
    h.tree.clear()
    assert_whole(h.run(h.receive(BROKEN)), h.files[BROKEN])
    assert h.tree.count(BROKEN) == before + 1
    assert_store_verified(h.store, h.index)
    assert_only_catalogue(h.tree.paths(), h.files)


@pytest.mark.parametrize("code, status", [
    (500, 502),
    (404, 404),
])
def test_a_failing_file_leaves_the_lxd_face_alone(
    tmp_path: Path, closing: Closing, code: int, status: int
) -> None:
    """The image list of the LXD face is the same before and after one file failed."""
    h = closing(FaceHarness(tmp_path))
    listed = h.metadata_of("/1.0/images?recursion=1")
    image = h.image(SPLIT_OS, "amd64", V3)
    root = image.files[-1]
    h.upstream.statuses[root] = code
    assert h.call("GET", f"/up/{root}")[0] == status
    assert not h.health.offline
    assert h.metadata_of("/1.0/images?recursion=1") == listed
    del h.upstream.statuses[root]
    code_after, body, _ = h.call("GET", f"/up/{root}")
    assert (code_after, body) == (200, h.files[root])
    assert_only_catalogue((path for _, path, _ in h.upstream.requests), h.files)


# -- on loopback ------------------------------------------------------------------------------

# Short real timeouts, so that a stall or a silence shows within a second or two.
LOOPBACK_IDLE_SECONDS = 1.0


@frozen
class LoopbackFault:
    inject: Callable[[TreeResource, str], None]
    # Whether the download can still succeed while the fault is on.
    completes: bool = False


LOOPBACK_FAULTS: dict[str, LoopbackFault] = {
    # Resumed from the bytes on disk: the second response completes the file.
    "reset mid-body": LoopbackFault(lambda tree, path: tree.reset(path, 100_000), completes=True),
    "stall after 100 000 bytes": LoopbackFault(
        lambda tree, path: tree.stall(path, 100_000), completes=True,
    ),
    # Marks the upstream offline; the next request probes it at once.
    "headers never sent": LoopbackFault(lambda tree, path: tree.silence(path)),
    "100 KiB/s": LoopbackFault(lambda tree, path: tree.rate(path, 100 * KiB), completes=True),
}


@pytest.mark.loopback
@pytest.mark.parametrize("name", list(LOOPBACK_FAULTS))
@pytest_twisted.ensureDeferred
async def test_an_upstream_fault_on_loopback(tmp_path: Path, logged: Logged, name: str) -> None:
    fault = LOOPBACK_FAULTS[name]
    site = await start_loopback(
        reactor, tmp_path, cache={"download_idle_timeout": f"{LOOPBACK_IDLE_SECONDS:g}s"}
    )
    try:
        expected = site.files[BROKEN]
        for path in (INDEX, PRODUCTS):
            assert_whole(await site.get(path), site.files[path])
        fault.inject(site.tree, BROKEN)
        both: Deferred[list[Received]] = gatherResults(
            [Deferred.fromCoroutine(site.get(BROKEN)) for _ in range(2)]
        )
        for received in await both:
            assert_not_wrong(received, expected)
            if fault.completes:
                assert_whole(received, expected)
        site.tree.clear()
        assert_whole(await site.get(BROKEN), expected)
        assert_whole(await site.get(OTHER), site.files[OTHER])
        assert_only_catalogue(site.tree.paths(), site.files)
        await site.stop_proxy()
        index, store = site.open_cache()
        assert_store_verified(store, index)
        assert_index_reopens(index, store)
    finally:
        await site.stop()
    assert_no_traceback(logged)
