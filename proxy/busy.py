"""Which stored files are being served right now, so that nothing evicts them mid-response."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator


class InUse:
    """Counts the responses reading each blob (by sha256)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

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
