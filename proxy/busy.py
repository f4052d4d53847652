"""Which stored files are being served right now, and which are being removed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Iterator

from twisted.internet.defer import Deferred, succeed

from proxy.observers import Observers


class InUse:
    """
    Counts the responses reading each blob (by sha256), so that nothing evicts them
    mid-response; and names the blobs being removed (by expiry or eviction, on a worker), so
    that nothing serves or stores them until their removal is over.
    """

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._removing: set[str] = set()
        self._settled: Observers[None] = Observers()

    @contextmanager
    def holding(self, sha256: str) -> Iterator[None]:
        self._counts[sha256] += 1
        try:
            yield
        finally:
            self._counts[sha256] -= 1
            if self._counts[sha256] <= 0:
                del self._counts[sha256]

    def current(self) -> set[str]:
        return set(self._counts)

    def holders(self, sha256: str) -> int:
        """How many responses are reading C{sha256} now (for a download: its followers)."""
        return self._counts.get(sha256, 0)

    # -- removal -------------------------------------------------------------------------------

    def removing(self, sha256: str) -> bool:
        return sha256 in self._removing

    def claim(self, sha256s: Iterable[str]) -> list[str]:
        """Mark for removal those of C{sha256s} nobody holds now; return them."""
        claimed = [s for s in sha256s if s not in self._counts]
        self._removing.update(claimed)
        return claimed

    def release(self, sha256s: Iterable[str]) -> None:
        """Their removal is over (done or failed)."""
        self._removing.difference_update(sha256s)
        self._settled.fire(None)

    async def settled(self, sha256s: Iterable[str]) -> None:
        """Wait until none of C{sha256s} is being removed."""
        wanted = list(sha256s)
        # Bounded by the removals under way: each release wakes every waiter.
        while any(s in self._removing for s in wanted):
            await self._settled.add()


__all__ = ["InUse"]
