"""The state directory: created on start and locked, so that one proxy at a time uses it.

Two proxies on one directory would each take the other's temp files for crash debris and
delete them at start-up; the lock makes the second one refuse to start instead.
"""

from __future__ import annotations

import fcntl
import os

from proxy.errors import ConfigError

LOCK_FILE_NAME = "lock"


class StateLock:
    """An exclusive lock on C{dir}/lock, held until L{release} or the process ends."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(os.path.join(directory, LOCK_FILE_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cache.dir: cannot use {directory}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"cache.dir: {directory} is in use by another lxd-image-proxy (pid {holder})"
            ) from None
        self._fd: int | None = fd
        self.claim()

    def claim(self) -> None:
        """
        Record this process's pid in the lock file.

        The lock itself survives a fork (the daemon inherits the descriptor), but the pid
        written before it is that of the process that then exits.
        """
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class HeldByParent:
    """
    The state lock of a worker process (L{proxy.workers}): the supervising process holds the
    real one for as long as any worker runs, so there is nothing to take or release here.
    """

    def claim(self) -> None:
        pass

    def release(self) -> None:
        pass
