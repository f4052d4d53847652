# -*- test-case-name: tests.test_workers -*-
"""
Which worker runs the background jobs: the one holding an flock on C{<cache.dir>/leader}.

With several worker processes (L{proxy.workers}) the jobs that act on the whole cache
(auto-update and prefetch, expiry and the size cap) must run once, not once per worker: N
workers would fetch every update N times over and race each other's evictions. Each worker
tries the lock every few seconds; the one that has it starts the jobs and keeps it until it
stops or dies, when the kernel releases it and the next try of another worker takes over.
Nothing is written in the file: holding the lock is the whole of it.
"""

from __future__ import annotations

import fcntl
import os

from attrs import frozen
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

LEADER_FILE_NAME = "leader"
# How often a worker that is not the leader tries the lock: the longest a dead leader's
# jobs go without a runner (they run hourly or less often, so seconds are plenty).
LEADER_RETRY_SECONDS = 2.0


@frozen
class WorkerRole:
    """
    What makes a process a worker: its number (1..N) and the listening sockets it was handed
    by the supervisor, as file descriptors (the TLS-and-sniffing ports of C{server.listen},
    then the plain-HTTP-only ports of C{server.listen_plain}).
    """

    slot: int
    tls_fds: tuple[int, ...]
    plain_fds: tuple[int, ...] = ()


class Leadership(MultiService):
    """
    Runs its child services only while this process holds the leader lock of C{directory}.

    @ivar leading: whether this process holds the lock (and its children run).
    """

    log = Logger()

    def __init__(
        self, directory: str, clock: IReactorTime, retry: float = LEADER_RETRY_SECONDS,
    ) -> None:
        super().__init__()
        self._path = os.path.join(directory, LEADER_FILE_NAME)
        self._clock = clock
        self._retry = retry
        self._fd: int | None = None
        self._loop: LoopingCall | None = None
        self.leading = False

    def startService(self) -> None:
        # Not MultiService.startService: the children start only once the lock is ours.
        self.running = 1
        loop = LoopingCall(self.try_lead)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self._retry, now=True)

    def try_lead(self) -> bool:
        """Take the lock if it is free, and start the jobs; whether this process leads now."""
        if self.leading or not self.running:
            return self.leading
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        self.leading = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.log.info("this worker runs the background jobs (auto-update, expiry, size cap)")
        for service in self:
            service.startService()
        return True

    def stopService(self) -> object:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self.leading:
            self.running = 0
            return None
        self.leading = False
        # Released once the jobs have ended rather than at exit: another worker may take
        # over while this one finishes its requests, and never while a job still runs here.
        stopped: Deferred[object] = maybeDeferred(super().stopService)
        return stopped.addBoth(self._release)

    def _release(self, result: object) -> object:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        return result
