# -*- test-case-name: tests.test_health_share -*-
"""
Upstream health seen for the whole proxy when several worker processes serve it.

Each worker learns of an upstream's health from its own requests (L{proxy.health}). So that
an upstream found offline by one worker is offline for all (the fast 503, the catalogue cut
down to what is stored, one probe at a time for the proxy) and found back by one is back for
all, every worker tells the supervisor its verdict per upstream (L{UpstreamHealth.shared}) on
the pipe its log lines already take, one JSON line, and only when it changes; the supervisor
keeps the last verdict of each worker, serves their merge (L{merge_shared}) as the proxy's in
its metrics and C{/readyz}, and writes each worker the merge of the others' on its standard
input, which the worker takes in (L{UpstreamHealth.adopt}).

Messages over the existing pipes rather than files polled under C{cache.dir}: a verdict
arrives in the time of two pipe writes instead of a poll period (a client of another worker
gets the fast answer at once), nothing touches the disk, and the supervisor has the whole
proxy's view for its metrics without reading anything. A line is sent on a change of the
offline state, the backoff or the probe; a success alone (the last-answer time moves with
every request) at most every L{LAST_SUCCESS_EVERY_SECONDS}, so the traffic is bounded by
outages, not requests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.health import UpstreamHealth, merge_shared

__all__ = [
    "HEALTH_KEY",
    "LAST_SUCCESS_EVERY_SECONDS",
    "HealthExchange",
    "HealthSharing",
    "others_view",
]

# The key of a worker's health line (and of the supervisor's answer).
HEALTH_KEY = "upstream_health"
# A last-answer time alone is worth a line this often at most (for the metric of it).
LAST_SUCCESS_EVERY_SECONDS = 5.0
# A line longer than this on a worker's standard input is not ours: dropped.
MAX_LINE = 1 << 20

Verdicts = dict[str, dict[str, Any]]


def others_view(reports: Mapping[int, Verdicts], slot: int | None) -> Verdicts:
    """By upstream, the merge of every worker's verdict but C{slot}'s (all with None)."""
    names: set[str] = set()
    for verdicts in reports.values():
        names.update(verdicts)
    return {
        name: merge_shared(v[name] for s, v in reports.items() if s != slot and name in v)
        for name in sorted(names)
    }


class HealthSharing(Service):
    """
    In a worker: tell the supervisor of changes of this worker's C{health} through C{send}
    (one line of text), take in the others' verdicts as lines arrive (L{line_received}).
    """

    log = Logger()

    def __init__(
        self, health: Mapping[str, UpstreamHealth], clock: Any, send: Callable[[str], None],
        gone: Callable[[], None] | None = None,
    ) -> None:
        self.health = dict(health)
        self.clock = clock
        self.send = send
        # Called when the supervisor's end of standard input closes: it is gone.
        self.gone = gone
        self._sent: Verdicts = {}
        self._pending: IDelayedCall | None = None
        self._buffer = b""
        # The others think an upstream offline that this worker had an answer from since.
        self._news = False

    def startService(self) -> None:
        super().startService()
        for h in self.health.values():
            if not h.forced:
                h.on_change = self._schedule

    def stopService(self) -> Any:
        for h in self.health.values():
            h.on_change = None
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        return super().stopService()

    def _schedule(self) -> None:
        # Several changes in one turn of the reactor make one line.
        if self._pending is None or not self._pending.active():
            self._pending = self.clock.callLater(0, self.publish)

    def publish(self) -> None:
        """Send this worker's verdicts if they changed enough to be worth a line."""
        self._pending = None
        now = self.clock.seconds()
        current = {name: h.shared() for name, h in self.health.items() if not h.forced}
        wait = 0.0 if self._news else self._due(current, now)
        self._news = False
        if wait is None:
            return
        if wait > 0:
            self._pending = self.clock.callLater(wait, self.publish)
            return
        self._sent = current
        self.send(json.dumps({HEALTH_KEY: current}, sort_keys=True) + "\n")

    def _due(self, current: Verdicts, now: float) -> float | None:
        """0 to send now, seconds to wait before a success-only line, None for nothing new."""
        success_only = False
        for name, state in current.items():
            sent = self._sent.get(name)
            if sent is None:
                return 0.0
            if {**state, "last_success": None} != {**sent, "last_success": None}:
                return 0.0
            if state["last_success"] != sent["last_success"]:
                success_only = True
        if not success_only:
            return None
        previous = [s["last_success"] for s in self._sent.values() if s["last_success"] is not None]
        if not previous:
            return 0.0
        return max(0.0, max(previous) + LAST_SUCCESS_EVERY_SECONDS - now)

    # -- what the supervisor writes ------------------------------------------------------

    def childDataReceived(self, name: str, data: bytes) -> None:
        """Bytes of the supervisor's lines (a L{twisted.internet.process.ProcessReader})."""
        buffered = self._buffer + data
        *lines, rest = buffered.split(b"\n")
        self._buffer = rest if len(rest) <= MAX_LINE else b""
        for line in lines:
            self.line_received(line)

    def childConnectionLost(self, name: str, reason: Failure) -> None:
        # The supervisor is gone. PR_SET_PDEATHSIG ends the worker too, but not when the
        # supervisor died before the worker had set it (a stop right after a start).
        self._buffer = b""
        if self.gone is not None:
            self.gone()

    def line_received(self, line: bytes) -> None:
        """One line from the supervisor: the merge of the other workers' verdicts."""
        try:
            views = json.loads(line)[HEALTH_KEY]
        except (ValueError, KeyError, TypeError):
            self.log.warn("ignored a line from the supervisor that is not health: {line!r}",
                          line=line[:80])
            return
        for name, view in views.items():
            health = self.health.get(name)
            if health is None or not isinstance(view, dict):
                continue
            health.adopt(view)
            since, last = view.get("since"), health.last_success_at
            if since is not None and last is not None and last > since and not health.forced:
                # An answer the others have not heard of ends their outage: at once, not
                # at the next success-only line.
                self._news = True
                if self._pending is not None and self._pending.active():
                    self._pending.cancel()
                self._schedule()


class HealthExchange:
    """
    In the supervisor: the last verdict of each worker, their merge as the proxy's C{health}
    (for its metrics and C{/readyz}), and what each worker is to be told.

    @ivar health: by upstream, the proxy's health as the workers found it.
    """

    def __init__(self, health: Mapping[str, UpstreamHealth]) -> None:
        self.health = dict(health)
        self.reports: dict[int, Verdicts] = {}

    def report(self, slot: int, verdicts: object) -> bool:
        """Worker C{slot} sent C{verdicts}; whether they were well formed and taken."""
        if not isinstance(verdicts, dict) or not all(
            isinstance(v, dict) for v in verdicts.values()
        ):
            return False
        self.reports[slot] = {
            name: v for name, v in verdicts.items() if name in self.health
        }
        self._merge()
        return True

    def forget(self, slot: int) -> None:
        """Worker C{slot} ended: its outstanding probe with it (its verdict lives on in others)."""
        self.reports.pop(slot, None)

    def _merge(self) -> None:
        for name, view in others_view(self.reports, None).items():
            self.health[name].adopt(view)

    def line_for(self, slot: int) -> bytes:
        """The line to write to worker C{slot}: the merge of every other worker's verdicts."""
        return (json.dumps({HEALTH_KEY: others_view(self.reports, slot)}, sort_keys=True)
                + "\n").encode("utf-8")
