"""Callers waiting for one outcome, each with a Deferred of its own."""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

__all__ = ["Observers"]


class Observers(Generic[T]):
    """
    The callers waiting for one outcome (a download's end, a refresh, a parse).

    Each caller gets a Deferred of its own, so that one that is cancelled (a client that went
    away) cancels nothing else: neither the other callers nor the work they wait for.
    """

    def __init__(self) -> None:
        self._waiting: list[Deferred[T]] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self) -> "Deferred[T]":
        """A new Deferred, fired by the next L{fire}."""
        d: Deferred[T] = Deferred()
        self._waiting.append(d)
        return d

    def fire(self, result: "T | Failure") -> None:
        """Give C{result} (or fail with it) to every caller waiting now; forget them."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            # A caller that went away cancelled its own Deferred: it has its answer.
            if d.called:
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
