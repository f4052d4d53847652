# -*- test-case-name: tests.test_admission -*-
"""
A cap on client connections open at once, and the open-file budget it must fit in.

Past the cap a new connection is closed as soon as it is accepted.  Without a cap, clients
that hold connections open (a trickled head, a TLS handshake that never ends) can use up
the process's file descriptors; the listening socket then cannot accept at all and every
client, well behaved or not, waits.

Each client connection may hold its socket and an open cache file, so the cap needs two
descriptors per connection, plus a reserve for the index, the listening sockets, upstream
connections and downloads, and logs (L{fitting_cap}).
"""

from __future__ import annotations

import resource

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# Descriptors one client connection may hold: its socket and a cache file it is served.
FDS_PER_CONNECTION = 2
# Descriptors kept for everything else: index, listening sockets, upstream connections
# and their temp files, logs.
RESERVED_FDS = 256
# Refused connections are logged at most this often, with the count since the last line.
REFUSAL_LOG_INTERVAL_SECONDS = 60.0


class ConnectionCap:
    """
    Counts open client connections and says whether one more may be admitted.

    @ivar limit: the most connections open at once.
    @ivar open: connections admitted and not yet released.
    @ivar refused: connections refused since start.
    """

    log = Logger()

    def __init__(
        self,
        limit: int,
        clock: IReactorTime,
        log_interval: float = REFUSAL_LOG_INTERVAL_SECONDS,
    ) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._clock = clock
        self._log_interval = log_interval
        self._last_logged: float | None = None
        self._unlogged = 0

    def admit(self) -> bool:
        """Take a place for a new connection, or count it refused; C{release} gives it back."""
        if self.open < self.limit:
            self.open += 1
            return True
        self.refused += 1
        self._unlogged += 1
        now = self._clock.seconds()
        if self._last_logged is None or now - self._last_logged >= self._log_interval:
            self.log.warn(
                "max_connections ({limit}) reached: refused {count} connection(s) since "
                "the last report ({total} since start)",
                limit=self.limit, count=self._unlogged, total=self.refused,
            )
            self._last_logged = now
            self._unlogged = 0
        return False

    def release(self) -> None:
        """Give back the place of a connection admitted earlier, once it has closed."""
        self.open -= 1


@frozen
class OpenFileLimit:
    """RLIMIT_NOFILE as found at start (C{before}) and as left (C{soft}), and its C{hard} cap."""

    before: int
    soft: int
    hard: int


def raise_open_file_limit() -> OpenFileLimit:
    """
    Raise the soft RLIMIT_NOFILE to the hard one, as far as the kernel lets us.

    Where the hard limit is unlimited, the soft one is raised to C{fs.nr_open}, the most a
    process may have.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass
    now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFileLimit(before=soft, soft=now, hard=hard)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


def fitting_cap(configured: int, open_files: int) -> int:
    """
    The connection cap to use: C{configured}, lowered to what C{open_files} descriptors
    allow after the reserve (at least 1).
    """
    if open_files == resource.RLIM_INFINITY:
        return configured
    room = (open_files - RESERVED_FDS) // FDS_PER_CONNECTION
    return max(1, min(configured, room))


__all__ = [
    "ConnectionCap", "FDS_PER_CONNECTION", "OpenFileLimit", "RESERVED_FDS",
    "fitting_cap", "raise_open_file_limit",
]
