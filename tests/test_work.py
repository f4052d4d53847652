"""Where blocking work runs (proxy/work.py), and the parse-once cache of catalogues."""

from __future__ import annotations

import gc
import threading
from typing import Any, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from proxy.metadata import ParsedOnce
from proxy.work import FREE_STEP, Workers, collect_frozen, free_in_steps, heavy, inline, kept

reactor: Any = _reactor


def test_inline_runs_now_and_carries_failures() -> None:
    assert inline(lambda a, b=0: a + b, 1, b=2).result == 3
    failed = inline(lambda: 1 / 0)
    failures: list[Failure] = []
    failed.addErrback(failures.append)
    assert failures and failures[0].check(ZeroDivisionError)


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_thread_work_runs_off_the_reactor_thread_heavy_work_with_the_collector_paused() -> None:
    workers, pools = Workers.threads(reactor)
    for pool in pools:
        pool.start()
    try:
        seen: list[tuple[str, bool]] = []

        def job(tag: str) -> str:
            seen.append((threading.current_thread().name, gc.isenabled()))
            return tag

        assert await workers.disk(job, "disk").addTimeout(10, reactor) == "disk"
        assert await workers.index(job, "index").addTimeout(10, reactor) == "index"
        assert await workers.disk(heavy(job), "parse").addTimeout(10, reactor) == "parse"
    finally:
        for pool in pools:
            pool.stop()
    # Only a heavy job (a parse, a scan) pauses the collector: while any job is paused, no
    # cyclic garbage is collected anywhere.
    assert [enabled for _name, enabled in seen] == [True, True, False]
    assert all(name != threading.current_thread().name for name, _ in seen)
    # Resumed once no heavy job runs.
    assert gc.isenabled()


def test_a_failing_thread_job_still_resumes_the_collector() -> None:
    from proxy import work

    with pytest.raises(ZeroDivisionError):
        work._without_collections(lambda: 1 / 0)
    assert gc.isenabled()


def test_kept_freezes_and_returns_the_value() -> None:
    value = {"a": [1, 2]}
    try:
        assert kept(value) is value
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


class Turns:
    """A clock whose calls run one per turn, when the test says."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callLater(self, _delay: float, f: Any, *args: Any) -> None:
        self.calls.append(lambda: f(*args))

    def turn(self) -> None:
        self.calls.pop(0)()


def test_free_in_steps_empties_a_slice_per_turn() -> None:
    clock = Turns()
    items = {i: str(i) for i in range(FREE_STEP + 10)}
    images = list(range(FREE_STEP))
    free_in_steps(cast(Any, clock), items, images)
    assert len(items) == FREE_STEP + 10  # nothing before the reactor turns
    clock.turn()
    assert len(items) == 10 and len(images) == FREE_STEP
    clock.turn()
    assert items == {} and len(images) == 10
    clock.turn()
    assert images == []
    assert len(clock.calls) <= 1
    while clock.calls:
        clock.turn()
    # Clock: every step is a zero-delay call; the whole runs to its end.
    real = Clock()
    more = list(range(3 * FREE_STEP))
    free_in_steps(real, more)
    real.advance(0)
    assert more == [] and real.getDelayedCalls() == []


def test_parsed_once_shares_a_computation_and_retires_what_it_replaces() -> None:
    retired: list[str] = []
    cache: ParsedOnce[str, str] = ParsedOnce(retire=retired.append)
    running: Deferred[str] = Deferred()
    computed: list[int] = []

    def compute() -> Deferred[str]:
        computed.append(1)
        return running

    first = cache.get("k", "v1", compute)
    second = cache.get("k", "v1", compute)
    running.callback("parsed v1")
    assert (first.result, second.result, len(computed)) == ("parsed v1", "parsed v1", 1)
    assert cache.get("k", "v1", compute).result == "parsed v1" and len(computed) == 1
    assert cache.get("k", "v2", lambda: succeed("parsed v2")).result == "parsed v2"
    assert retired == ["parsed v1"]


def test_a_job_run_while_something_else_paused_the_collector_leaves_it_paused() -> None:
    from proxy import work

    gc.disable()
    try:
        assert work._without_collections(gc.isenabled) is False
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collect_frozen_reclaims_a_cycle_frozen_while_alive() -> None:
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    alive = weakref.ref(a)
    try:
        kept(None)
        del a, b
        gc.collect()
        # Frozen: out of the collector's sight.
        assert alive() is not None
        collect_frozen()
        assert alive() is None
    finally:
        gc.unfreeze()


def test_parsed_once_keeps_a_newer_value_stored_while_an_older_one_was_computed() -> None:
    retired: list[str] = []
    cache: ParsedOnce[str, str] = ParsedOnce(retire=retired.append)
    slow: Deferred[str] = Deferred()
    old = cache.get("k", "v1", lambda: slow)
    # The copy changed and its value was stored (by a fetch's validation) meanwhile.
    cache.put("k", "v2", "parsed v2")
    slow.callback("parsed v1")
    assert old.result == "parsed v1"
    assert cache.get("k", "v2", lambda: succeed("again")).result == "parsed v2"
    assert retired == ["parsed v1"]
