"""A file source the tests grow by hand, for the producer and serve_file tests."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath


class FakeSource:
    """
    A L{FileSource} the test grows by hand: L{append} writes to a real file
    and wakes the waiters, L{fail} fails it.
    """

    def __init__(self, path: FilePath[str], size: int) -> None:
        self.path = path
        self.size = size
        self.failure: Failure | None = None
        self.cancelled_waits = 0
        self.restarts = 0
        self._available = 0
        self._waiters: list[Deferred[None]] = []
        path.setContent(b"")

    def available(self) -> int:
        return self._available

    def wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters.append(waiter)
        return waiter

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def append(self, data: bytes) -> None:
        assert self._available + len(data) <= self.size
        with self.path.open("a") as f:
            f.write(data)
        self._available += len(data)
        self._notify()

    def start_over(self) -> None:
        """The download starts again from zero after bytes that did not verify."""
        # In place, as PartialBlob.truncate: the followers' open files see it.
        with open(self.path.path, "r+b") as f:
            f.truncate(0)
        self._available = 0
        self.restarts += 1

    def fail(self, error: Exception) -> None:
        self.failure = Failure(error)
        self._notify()

    def _forget(self, waiter: Deferred[None]) -> None:
        self.cancelled_waits += 1
        self._waiters.remove(waiter)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
