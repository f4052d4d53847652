"""
A worker process: C{python -m proxy.worker}, started by the supervisor (L{proxy.workers}) only.

It serves the listening sockets it was handed (file descriptors named on its command line)
with the whole proxy of L{proxy.service}, in worker mode: the supervisor holds the state lock
and swept the cache directory before any worker started, and the background jobs run in the
worker that leads (L{proxy.leader}). Its log events go to standard output as JSON lines, one
per event, which the supervisor publishes in its own log (so the format of C{[log]} and
twistd's log file apply to every worker alike). It ends when its supervisor does.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
from collections.abc import Sequence
from typing import IO, Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FileLogObserver,
    LogEvent,
    eventAsJSON,
    formatEvent,
    globalLogBeginner,
)

# prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def json_line(event: LogEvent) -> str:
    # The message as text too: the supervisor shows it as written, whatever the fields were
    # (one that is not JSON cannot be formatted again on the other side).
    return eventAsJSON({**event, "log_text": formatEvent(event)}) + "\n"


def _end_with_parent() -> None:
    """A SIGTERM when the supervisor dies, however it dies (SIGKILL included)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        # Not Linux: the worker stops when its supervisor's pipes close (see main).
        pass


def _stop(reactor: Any) -> None:
    """Stop the worker as a SIGTERM does; nothing when it is stopping already."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.worker")
    parser.add_argument("--config", default=None)
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--tls", type=int, action="append", default=[])
    parser.add_argument("--plain", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    _end_with_parent()
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(out or sys.stdout, json_line)], redirectStandardIO=False,
    )

    from twisted.internet import reactor as _reactor

    from proxy.config import load_config
    from proxy.errors import ConfigError
    from proxy.leader import WorkerRole
    from proxy.service import build_service

    from twisted.internet.process import ProcessReader

    from proxy.health_share import HealthSharing

    reactor: Any = _reactor
    stream = out or sys.stdout

    def send(line: str) -> None:
        stream.write(line)
        stream.flush()

    try:
        config = load_config(args.config)
        service = build_service(
            config, reactor, WorkerRole(args.slot, tuple(args.tls), tuple(args.plain))
        )
        # Upstream health for the whole proxy: this worker's verdicts out on standard output
        # with the log lines, the others' in on standard input (proxy.health_share).
        sharing = HealthSharing(
            service.cache.health, reactor, send, gone=lambda: reactor.callWhenRunning(_stop, reactor),
        )
        sharing.setServiceParent(service)
        service.privilegedStartService()
        service.startService()
        ProcessReader(reactor, sharing, "stdin", 0)
    except (ConfigError, SystemExit) as e:
        print(f"lxd-image-proxy worker {args.slot}: {e}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
