"""Where blocking work runs: never on the reactor thread, which every client shares.

Two kinds of work leave the reactor:

- C{disk}: fsync and link into the store of a finished file, reading and parsing a catalogue, scanning the
  whole index, deleting files. Several threads: one slow fsync must not hold up a parse.
- C{index}: every write to the LMDB index. One thread, so that writes keep their order and
  never wait for each other's locks on the reactor; LMDB allows a write transaction on any
  one thread at a time, and with C{MDB_NOTLS} (always set by py-lmdb) read transactions on
  any thread.

Components take an L{Run} for each; without one they run the work inline (L{inline}), which is
what the deterministic tests use: the result is the same, only the thread differs.
"""

from __future__ import annotations

import functools
import gc
import threading
from typing import Any, Callable, Protocol, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

# Objects a turn of the reactor frees of a replaced catalogue (0.5 ms of work).
FREE_STEP = 2000
# Syncs of downloads in progress at once; more would only queue in the disk's own queue.
WRITEBACK_THREADS = 2
# Enough for a commit, a parse and a scan at once on a small box; the work is mostly waiting
# for the disk or holding the GIL, so more threads would not make it faster.
DISK_THREADS = 4


class Run(Protocol):
    """Runs C{fn(*args, **kwargs)} somewhere and fires with its result (or fails with its exception)."""

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]": ...


def inline(fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
    """Run C{fn} now, on the calling thread."""
    return execute(fn, *args, **kwargs)


_collector_lock = threading.Lock()
_collector_paused = 0


def _without_collections(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """
    Run C{fn} with Python's cyclic garbage collector paused.

    A parse or a scan allocates millions of objects, which sets off full collections of the
    whole heap (the catalogues held included), and a collection holds the GIL, so the reactor
    thread, for a tenth of a second and more. Paused, the collections happen after the work,
    as the allocations of the reactor thread set them off, in the usual small steps.
    """
    global _collector_paused
    with _collector_lock:
        # Someone else turned it off: leave it to them.
        pausing = _collector_paused > 0 or gc.isenabled()
        if pausing:
            _collector_paused += 1
            gc.disable()
    try:
        return fn(*args, **kwargs)
    finally:
        if pausing:
            with _collector_lock:
                _collector_paused -= 1
                if _collector_paused == 0:
                    gc.enable()


def heavy(fn: Callable[..., T]) -> Callable[..., T]:
    """
    C{fn}, to run on a worker with the cyclic collector paused: for a parse or a scan only.

    Only for such short bursts of allocation: while any job runs paused, no cyclic garbage is
    collected anywhere in the process.
    """

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> T:
        return _without_collections(fn, *args, **kwargs)

    return paused


def kept(value: T) -> T:
    """
    Return C{value}, a freshly parsed catalogue, after taking everything alive out of the
    cyclic collector's sight (C{gc.freeze}).

    A catalogue is hundreds of thousands of objects that live until the next copy. Parsed on a
    worker with the collector paused, they would all be scanned by the first collection after
    it (50 ms), and by every full collection after that (0.1 s per Ubuntu-sized catalogue), each
    holding the GIL and so the reactor. Frozen objects are still freed when their last
    reference goes (a catalogue is a tree); only a reference cycle alive at this instant that
    dies later is never collected, a bounded cost paid once per catalogue change.
    """
    gc.freeze()
    return value


def collect_frozen() -> None:
    """
    Collect everything once, frozen objects included, and freeze what survives again.

    A reference cycle that was alive when L{kept} froze it and died since is only reclaimed
    here: run hourly, it bounds that leak to an hour's catalogue changes, at the cost of one
    full collection an hour (0.1 s per two Ubuntu-sized catalogues held, GIL held). Nothing
    to do while nothing was frozen (at start-up, say).
    """
    if gc.get_freeze_count() == 0:
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def free_in_steps(clock: IReactorTime, *containers: dict[Any, Any] | list[Any]) -> None:
    """
    Empty C{containers} (a replaced catalogue's) a slice per reactor turn.

    Dropping the last reference to 100,000 objects frees them in one go (50 ms on the
    reactor); here each turn frees C{FREE_STEP} of them. Only for containers nobody reads any
    more.
    """
    pending = [c for c in containers if c]

    def step() -> None:
        for _ in range(FREE_STEP):
            while pending and not pending[0]:
                pending.pop(0)
            if not pending:
                return
            container = pending[0]
            if isinstance(container, dict):
                container.popitem()
            else:
                container.pop()
        clock.callLater(0, step)

    if pending:
        clock.callLater(0, step)


@define
class ThreadRun:
    """Runs work on a thread pool of its own, started and stopped with the service."""

    reactor: Any
    name: str
    threads: int
    _pool: ThreadPool = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name=self.name)

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        return deferToThreadPool(self.reactor, self._pool, fn, *args, **kwargs)

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """Finish the work queued, then end the threads (blocks until they have ended)."""
        self._pool.stop()


@define
class Workers:
    """The proxy's two places for blocking work (see the module docstring)."""

    disk: Run
    index: Run
    # Where downloads sync their bytes while they arrive; the disk worker when not set apart.
    writeback: Run | None = None
    # The jobs run on other threads than the caller's (the reactor's).
    threaded: bool = False

    @classmethod
    def threads(cls, reactor: Any) -> "tuple[Workers, list[ThreadRun]]":
        """Thread-backed workers, and the pools to start and stop."""
        disk = ThreadRun(reactor, "lxd-image-proxy-disk", DISK_THREADS)
        index = ThreadRun(reactor, "lxd-image-proxy-index", 1)
        # Apart from the disk pool: many downloads' syncs must not queue a commit, which the
        # last byte of a client's response waits for, behind them.
        writeback = ThreadRun(reactor, "lxd-image-proxy-writeback", WRITEBACK_THREADS)
        workers = cls(disk=disk, index=index, writeback=writeback, threaded=True)
        return workers, [disk, index, writeback]


INLINE = Workers(disk=inline, index=inline)

__all__ = [
    "DISK_THREADS",
    "collect_frozen",
    "FREE_STEP",
    "INLINE",
    "Run",
    "ThreadRun",
    "WRITEBACK_THREADS",
    "Workers",
    "free_in_steps",
    "heavy",
    "inline",
    "kept",
]
