# -*- test-case-name: tests.test_download_slots -*-
"""At most so many downloads per upstream at once; the others wait their turn.

A burst of misses for different files (a rack of hosts launching different images, an
auto-update round) would otherwise open as many upstream transfers as there are files, sharing
the WAN link so thinly that none finishes soon. L{DownloadSlots} lets C{limit} of an
upstream's downloads run and queues the rest: those a client waits for first, then background
work (auto-update, prefetch), first come first served within each class. A background download
that a client joins is promoted to the clients' queue.

It only counts and queues; what a waiting download shows its clients (headers at once, bytes
when it starts) is the engine's (L{proxy.downloads.Fetcher}) and the faces'.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

from attrs import define, field
from twisted.internet.defer import Deferred


@define(eq=False)
class Slot:
    """
    One download's place: running (C{granted} has fired) or queued. Given back with
    L{DownloadSlots.release} whatever happened, exactly once.
    """

    upstream: str
    background: bool
    granted: "Deferred[None]" = field(factory=Deferred)
    released: bool = False

    @property
    def queued(self) -> bool:
        return not self.granted.called


@define
class _Upstream:
    limit: int | None
    running: int = 0
    clients: deque[Slot] = field(factory=deque)
    background: deque[Slot] = field(factory=deque)

    def waiting(self) -> Iterator[Slot]:
        yield from self.clients
        yield from self.background


class DownloadSlots:
    """
    The running and queued downloads of every upstream.

    @param limits: the most downloads at once, by upstream; an upstream not named (or named
        with None or 0) is not limited.
    """

    def __init__(self, limits: Mapping[str, int | None] | None = None) -> None:
        self._limits = dict(limits or {})
        self._upstreams: dict[str, _Upstream] = {}

    def _of(self, upstream: str) -> _Upstream:
        state = self._upstreams.get(upstream)
        if state is None:
            state = self._upstreams[upstream] = _Upstream(self._limits.get(upstream) or None)
        return state

    def take(self, upstream: str, *, background: bool = False) -> Slot:
        """
        A place for one download of C{upstream}: C{granted} has fired already when one is free,
        else it fires when the download's turn comes (clients' downloads before background
        ones). Never fails; cancelling C{granted} is not the way out, L{release} is.
        """
        state = self._of(upstream)
        slot = Slot(upstream, background)
        if state.limit is None or state.running < state.limit:
            state.running += 1
            slot.granted.callback(None)
        else:
            (state.background if background else state.clients).append(slot)
        return slot

    def promote(self, slot: Slot) -> None:
        """A client now waits for C{slot}'s download: it queues with the clients' from now."""
        if not slot.background:
            return
        slot.background = False
        state = self._of(slot.upstream)
        if slot in state.background:
            state.background.remove(slot)
            state.clients.append(slot)

    def release(self, slot: Slot) -> None:
        """C{slot}'s download is over (or will not run): the next one waiting starts."""
        if slot.released:
            return
        slot.released = True
        state = self._of(slot.upstream)
        if slot.queued:
            # Never started: it only leaves the queue.
            for queue in (state.clients, state.background):
                if slot in queue:
                    queue.remove(slot)
            return
        state.running -= 1
        self._dispatch(state)

    def cancel(self, slot: Slot, reason: Exception) -> None:
        """
        C{slot} is queued and will never run (the service stops): it leaves the queue and
        C{granted} fails with C{reason}, so that its download ends instead of waiting for ever.
        """
        if not slot.queued or slot.released:
            return
        self.release(slot)
        slot.granted.errback(reason)

    def _dispatch(self, state: _Upstream) -> None:
        while state.limit is None or state.running < state.limit:
            queue = state.clients or state.background
            if not queue:
                return
            slot = queue.popleft()
            # Counted before it runs: the download it resumes may end (and release) at once.
            state.running += 1
            slot.granted.callback(None)

    def running(self, upstream: str) -> int:
        """The downloads of C{upstream} holding a slot now."""
        return self._of(upstream).running

    def queued(self) -> dict[str, int]:
        """By upstream, the downloads waiting for a slot now (upstreams with none left out)."""
        return {
            name: len(state.clients) + len(state.background)
            for name, state in self._upstreams.items()
            if state.clients or state.background
        }


__all__ = ["DownloadSlots", "Slot"]
