"""Whether an upstream, and one file of it, is worth asking: offline detection and per-file backoff.

An upstream is down only when it cannot be reached (connection refused or reset, DNS, TLS
handshake, no response headers in time) or cannot serve its catalogue (a 5xx for its metadata).
The first such failure marks it offline: its catalogue is then served cut down to what is
stored, and while one request is finding out whether it is back (the probe), every other fails
fast with a 503 instead of waiting for its own connect timeout. A client's request made while no
probe is outstanding is the next probe, so the first request after the upstream recovers
succeeds; background work (prefetch) probes no more often than the backoff allows (5 s, 10 s,
20 s ... up to 5 minutes). Any answer other than a 5xx brings the upstream back.

A 4xx or 5xx for one file, or a body that breaks off or does not verify, is that file's failure
(L{FileFailures}): its clients get the error, the next request for it tries again, and only a
file that keeps failing is backed off on its own. It says nothing about the upstream's other
files or its catalogue.

C{[upstreams.NAME] offline = true} forces the offline state for good (air-gapped sites): nothing
ever tries the upstream, and no success can end it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, ClassVar

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.errors import ProxyError, Unavailable
from proxy.upstream import NotAnUpstream, as_proxy_error
from proxy.via import UpstreamLoop

__all__ = [
    "DEFAULT_BASE_BACKOFF_SECONDS",
    "DEFAULT_MAX_BACKOFF_SECONDS",
    "DEFAULT_PROBE_TIMEOUT_SECONDS",
    "FORCED_RETRY_AFTER_SECONDS",
    "FileFailures",
    "UpstreamHealth",
    "merge_shared",
]

DEFAULT_BASE_BACKOFF_SECONDS = 5.0
DEFAULT_MAX_BACKOFF_SECONDS = 300.0
# A probe reports its outcome once the upstream's response headers arrive, which the
# connect and header timeouts bound well below this. The limit only matters if a call site
# took a probe and never reported back: the upstream must not stay offline for ever.
DEFAULT_PROBE_TIMEOUT_SECONDS = 300.0
# Forced offline has no next attempt; an hour keeps well-behaved clients from hammering.
FORCED_RETRY_AFTER_SECONDS = 3600
# Doubling beyond this many steps only overflows; every sane cap is reached long before.
_MAX_DOUBLINGS = 64
_SECONDS_PER_DAY = 24 * 60 * 60


def _positive(instance: object, attribute: object, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{getattr(attribute, 'name', 'value')} must be positive, not {value!r}")


@define
class UpstreamHealth:
    """
    The reachability of one upstream, as seen from the outcomes of the requests sent to it.

    Call sites ask L{may_try} before sending a request and report the outcome with
    L{record_success}, L{record_failure} or L{record_file_answer}. While the upstream is
    offline, L{may_try} lets one request through as the probe and refuses every other until
    that probe reports; L{retry_after} and L{describe} say what a refused client should be told.

    @ivar name: the upstream's name in the configuration, for log lines and messages.
    @ivar clock: the source of time; the backoff is measured with C{clock.seconds()}.
    @ivar forced_offline: offline by configuration: never tried, never back online.
    @ivar base_backoff: seconds from the first failure to the first background probe; doubled
        after each failed probe.
    @ivar max_backoff: the longest wait between background probes, in seconds.
    @ivar probe_timeout: seconds after which a probe that never reported is given up, so
        that another request may probe.
    """

    log: ClassVar[Logger] = Logger()

    name: str
    clock: IReactorTime
    forced_offline: bool = False
    base_backoff: float = field(
        default=DEFAULT_BASE_BACKOFF_SECONDS, kw_only=True, validator=_positive
    )
    max_backoff: float = field(default=DEFAULT_MAX_BACKOFF_SECONDS, kw_only=True, validator=_positive)
    probe_timeout: float = field(
        default=DEFAULT_PROBE_TIMEOUT_SECONDS, kw_only=True, validator=_positive
    )
    # Called after anything that may change L{shared}: how worker processes tell each other
    # (L{proxy.health_share}); None in a single process.
    on_change: Callable[[], None] | None = field(default=None, kw_only=True)

    # When the current outage began; None while online.
    _since: float | None = field(default=None, init=False)
    _reason: str = field(default="", init=False)
    # Failed probes since the outage began: the exponent of the backoff.
    _failed_probes: int = field(default=0, init=False)
    _next_probe_at: float = field(default=0.0, init=False)
    # When the outstanding probe was let through; None when no probe is outstanding.
    _probe_started_at: float | None = field(default=None, init=False)
    # When the upstream last answered anything but a 5xx; None before its first answer.
    _last_success_at: float | None = field(default=None, init=False)
    # When another worker process let its probe through (L{adopt}); None when none is out.
    _remote_probe_at: float | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_backoff < self.base_backoff:
            raise ValueError(
                f"max_backoff ({self.max_backoff:g}) is less than base_backoff ({self.base_backoff:g})"
            )

    @property
    def forced(self) -> bool:
        """Offline by configuration (C{[upstreams.NAME] offline = true})."""
        return self.forced_offline

    @property
    def offline(self) -> bool:
        """True while the upstream is forced offline or its last outcome was a failure."""
        return self.forced_offline or self._since is not None

    @property
    def since(self) -> float | None:
        """When the current outage began (clock seconds); None while online or forced offline."""
        return self._since

    @property
    def reason(self) -> str:
        """Why the upstream is offline, in one phrase; C{""} while online."""
        if self.forced_offline:
            return f"upstreams.{self.name}.offline = true"
        return self._reason

    @property
    def last_success_at(self) -> float | None:
        """When the upstream last answered anything but a 5xx (clock seconds), or None."""
        return self._last_success_at

    @property
    def probing(self) -> bool:
        """True while a probe has been let through and has not reported yet."""
        return self._probe_started_at is not None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def may_try(self, *, background: bool = False) -> bool:
        """
        Whether a request may be sent to the upstream now.

        Always while online; never when forced offline. While offline, a client's request is
        let through as the probe when no probe is outstanding, and every other call is false
        until the probe reports through L{record_success}, L{record_failure} or
        L{record_file_answer} (or has been outstanding for C{probe_timeout} seconds). A
        C{background} request (nobody waits for it) probes only once the backoff has run out.
        The caller that got true must report the outcome.
        """
        if self.forced_offline:
            return False
        if self._since is None:
            return True
        if not self._probe_free():
            return False
        if background and self.clock.seconds() < self._next_probe_at:
            return False
        self._probe_started_at = self.clock.seconds()
        self._changed()
        return True

    @property
    def probe_due(self) -> bool:
        """
        True while offline (not forced) with no probe outstanding: a client's request now
        would find out whether the upstream is back. Takes nothing, unlike L{may_try}.
        """
        return not self.forced_offline and self._since is not None and self._probe_free()

    def _probe_free(self) -> bool:
        """No probe outstanding (one that never reported is given up after C{probe_timeout})."""
        remote = self._remote_probe_at
        if remote is not None and self.clock.seconds() - remote < self.probe_timeout:
            # Another worker process is finding out: one probe for the whole proxy.
            return False
        if self._probe_started_at is None:
            return True
        waited = self.clock.seconds() - self._probe_started_at
        if waited < self.probe_timeout:
            return False
        self.log.debug(
            "probe of upstream {upstream} reported nothing in {seconds:g} s; allowing another",
            upstream=self.name, seconds=waited,
        )
        self._probe_started_at = None
        return True

    def record_failure(self, reason: str, transport: bool) -> None:
        """
        Report that a request to the upstream failed in a way that says it is down.

        @param reason: one short phrase for logs and L{describe}, e.g. C{"connection refused"}.
        @param transport: true for a connection-level failure (refused, reset, DNS, TLS, timeout),
            false for an upstream 5xx answer. Both count; the flag only changes the wording.
        """
        now = self.clock.seconds()
        kind = "unreachable" if transport else "failing"
        if self.forced_offline:
            self.log.debug(
                "upstream {upstream} (offline by configuration) {kind}: {reason}",
                upstream=self.name, kind=kind, reason=reason,
            )
            return
        self._reason = reason
        if self._since is None:
            self._since = now
            self._failed_probes = 0
            self._probe_started_at = None
            delay = self._backoff()
            self._next_probe_at = now + delay
            self.log.warn(
                "upstream {upstream} is {kind} ({reason}): marked offline, its catalogue is "
                "served as far as it is stored; one request at a time tries it again, "
                "background work after {delay:g} s",
                upstream=self.name, kind=kind, reason=reason, delay=delay,
            )
            self._changed()
            return
        if self._probe_started_at is not None or now >= self._next_probe_at:
            # The outcome of a probe (or of a request that started before the outage and
            # ended after the probe time, which tells as much). Failures that end before the
            # probe time were sent before the outage was known and do not move the schedule:
            # otherwise a burst of them would push the first probe out by minutes.
            self._failed_probes += 1
            self._probe_started_at = None
            delay = self._backoff()
            self._next_probe_at = now + delay
            self.log.debug(
                "probe of upstream {upstream} failed ({reason}); background work waits {delay:g} s",
                upstream=self.name, reason=reason, delay=delay,
            )
            self._changed()
        else:
            self.log.debug(
                "upstream {upstream} still {kind} ({reason}); background work waits {delay:g} s",
                upstream=self.name, kind=kind, reason=reason, delay=self._next_probe_at - now,
            )

    def check(self, missing: str = "", *, background: bool = False, probe: bool = True) -> None:
        """
        Raise a 503 with C{Retry-After} unless the upstream may be asked now (see L{may_try});
        C{missing} names what the cache lacks, for the message. With C{probe} false nothing is
        taken: the question is only whether a request would be let through.
        """
        if probe:
            allowed = self.may_try(background=background)
        else:
            allowed = not self.forced_offline and (self._since is None or self._probe_free())
        if allowed:
            return
        reason = self.describe() + (f"; {missing} is not in the cache" if missing else "")
        raise Unavailable(reason, headers={b"Retry-After": str(self.retry_after()).encode("ascii")})

    def record_answer(self, code: int, url: str) -> None:
        """
        The upstream answered C{url}, a file of its catalogue (index, products file, image
        list), with status C{code}: a 5xx is a failure, any other an answer.
        """
        if code >= 500:
            self.record_failure(f"{code} for {url}", transport=False)
        else:
            self.record_success()

    def record_file_answer(self, code: int, url: str) -> None:
        """
        The upstream answered C{url}, an image file, with status C{code}. It is reachable; a
        5xx is that file's failure (see L{FileFailures}) and says nothing either way about
        the rest of the upstream, but it ends a probe so that the next request may probe.
        """
        if code < 500:
            self.record_success()
        elif self._probe_started_at is not None:
            self.end_probe(f"{code} for {url}: that file's failure")

    def end_probe(self, why: str) -> None:
        """
        The request let through by L{may_try} ended without telling whether the upstream is
        back (C{why}, for the debug log): the next request may probe.
        """
        if self._probe_started_at is None:
            return
        self._probe_started_at = None
        self.log.debug(
            "probe of upstream {upstream} ended without a verdict ({why}); still offline",
            upstream=self.name, why=why,
        )
        self._changed()

    def record_error(self, error: BaseException, url: str) -> None:
        """
        A request for C{url} ended in C{error} before (or instead of) an answer. A refused
        redirect, or a 508 (L{UpstreamLoop}), is an answer (the upstream is reachable, and a
        probe must not stay "in progress" for want of one); another L{ProxyError} was reported
        where it arose; anything else (connection, TLS, timeout) means the upstream itself is
        unreachable.
        """
        if isinstance(error, (NotAnUpstream, UpstreamLoop)):
            self.record_success()
        elif not isinstance(error, ProxyError):
            self.record_failure(as_proxy_error(Failure(error), url).message, transport=True)

    def record_success(self) -> None:
        """
        Report that the upstream answered (anything but a 5xx): it is online again and the
        backoff starts from the beginning at the next outage. Forced offline stays offline.
        """
        self._last_success_at = self.clock.seconds()
        self._changed()
        if self.forced_offline:
            self.log.debug("upstream {upstream} answered but is offline by configuration",
                           upstream=self.name)
            return
        if self._since is None:
            return
        seconds = round(self.clock.seconds() - self._since)
        self._remote_probe_at = None
        self._since = None
        self._reason = ""
        self._failed_probes = 0
        self._next_probe_at = 0.0
        self._probe_started_at = None
        self.log.info(
            "upstream {upstream} is reachable again after {seconds} s",
            upstream=self.name, seconds=seconds,
        )
        self._changed()

    # -- shared between worker processes (proxy.health_share) --------------------------------

    def shared(self) -> dict[str, Any]:
        """
        What other worker processes need of this one's verdict, as JSON-able values: when the
        outage began, why, the backoff, the outstanding probe, the last answer (clock seconds;
        one machine, one clock).
        """
        return {
            "since": self._since, "reason": self._reason,
            "failed_probes": self._failed_probes, "next_probe_at": self._next_probe_at,
            "probing": self._probe_started_at, "last_success": self._last_success_at,
        }

    def adopt(self, other: Mapping[str, Any]) -> None:
        """
        Take in C{other}, the other worker processes' verdict (L{merge_shared} of their
        L{shared}): an answer later than this outage's start brings the upstream back here
        too; an outage that began after the last answer anyone had is this process's too,
        and so is another process's outstanding probe.
        """
        last = other.get("last_success")
        if last is not None and (self._last_success_at is None or last > self._last_success_at):
            self._last_success_at = last
        if self.forced_offline:
            return
        before = self.shared(), self._remote_probe_at
        if self._since is not None and self._last_success_at is not None \
                and self._last_success_at > self._since:
            self.log.debug(
                "upstream {upstream} is reachable again (another worker had an answer)",
                upstream=self.name,
            )
            self._since = None
            self._reason = ""
            self._failed_probes = 0
            self._next_probe_at = 0.0
            self._probe_started_at = None
        since = other.get("since")
        if since is not None and (self._last_success_at is None or since > self._last_success_at):
            if self._since is None:
                self.log.debug(
                    "upstream {upstream} was found offline by another worker ({reason})",
                    upstream=self.name, reason=other.get("reason", ""),
                )
                self._since = since
                self._reason = str(other.get("reason", ""))
                self._probe_started_at = None
            else:
                self._since = min(self._since, since)
            self._failed_probes = max(self._failed_probes, int(other.get("failed_probes", 0)))
            self._next_probe_at = max(self._next_probe_at, float(other.get("next_probe_at", 0.0)))
        self._remote_probe_at = other.get("probing") if self._since is not None else None
        if (self.shared(), self._remote_probe_at) != before:
            self._changed()

    def retry_after(self) -> int:
        """
        Whole seconds for a refused client's C{Retry-After}: 1 (a client's next request probes
        as soon as the outstanding probe has reported), C{FORCED_RETRY_AFTER_SECONDS} when
        forced offline.
        """
        if self.forced_offline:
            return FORCED_RETRY_AFTER_SECONDS
        return 1

    def next_background_attempt(self) -> float:
        """Seconds until background work may probe again; 0 while online."""
        if self._since is None:
            return 0.0
        return max(0.0, self._next_probe_at - self.clock.seconds())

    def describe(self) -> str:
        """
        One line for a 503 body, e.g. C{"upstream images is offline since 12:00:03
        (connection refused); an attempt is in progress"}.
        """
        if self.forced_offline:
            return f"upstream {self.name} is offline by configuration (upstreams.{self.name}.offline = true)"
        if self._since is None:
            return f"upstream {self.name} is online"
        head = f"upstream {self.name} is offline since {self._clock_time(self._since)} ({self._reason})"
        if self._probe_started_at is not None or self._remote_probe_at is not None:
            return f"{head}; an attempt is in progress"
        return f"{head}; the next request tries again"

    def _backoff(self) -> float:
        return min(self.base_backoff * 2.0 ** min(self._failed_probes, _MAX_DOUBLINGS), self.max_backoff)

    def _clock_time(self, when: float) -> str:
        """Local wall-clock time of C{when}; with the date once it is not within the last day."""
        fmt = "%H:%M:%S" if self.clock.seconds() - when < _SECONDS_PER_DAY else "%Y-%m-%d %H:%M:%S"
        return time.strftime(fmt, time.localtime(when))


def merge_shared(states: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """
    One verdict from several processes' L{UpstreamHealth.shared} states of one upstream: the
    latest answer anyone had; offline if an outage began after it (since its earliest such
    start, with the furthest backoff); a probe outstanding if anyone's is.
    """
    states = list(states)
    answers = [s["last_success"] for s in states if s.get("last_success") is not None]
    last = max(answers) if answers else None
    down = sorted(
        (s for s in states if s.get("since") is not None and (last is None or s["since"] > last)),
        key=lambda s: float(s["since"]),
    )
    merged: dict[str, Any] = {
        "since": None, "reason": "", "failed_probes": 0, "next_probe_at": 0.0,
        "probing": None, "last_success": last,
    }
    if down:
        probes = [s["probing"] for s in down if s.get("probing") is not None]
        merged.update(
            since=down[0]["since"], reason=down[0].get("reason", ""),
            failed_probes=max(int(s.get("failed_probes", 0)) for s in down),
            next_probe_at=max(float(s.get("next_probe_at", 0.0)) for s in down),
            probing=max(probes) if probes else None,
        )
    return merged


@define
class _Failing:
    """One file that failed: how often in a row, the last error, and when it may be tried."""

    count: int
    error: ProxyError
    retry_at: float


@define
class FileFailures:
    """
    The files whose last download failed for a reason of their own (a 4xx or 5xx for that
    file, a body that broke off, stalled or did not verify), and when each may be tried again.

    The first failure costs nothing: the next request for the file tries again at once, since
    most faults of one file are passing. A file that keeps failing is backed off on its own
    (C{base_backoff}, doubled per further failure, up to C{max_backoff}): meanwhile its clients
    get its last error at once, with C{Retry-After}. A success forgets it. At most C{capacity}
    files are remembered (the oldest failure is forgotten first), so a client asking for
    thousands of broken files cannot grow the table.

    @ivar clock: the source of time.
    """

    log: ClassVar[Logger] = Logger()

    clock: IReactorTime
    base_backoff: float = field(
        default=DEFAULT_BASE_BACKOFF_SECONDS, kw_only=True, validator=_positive
    )
    max_backoff: float = field(default=DEFAULT_MAX_BACKOFF_SECONDS, kw_only=True, validator=_positive)
    capacity: int = field(default=4096, kw_only=True)
    _failing: "OrderedDict[Hashable, _Failing]" = field(factory=OrderedDict, init=False)

    def check(self, key: Hashable) -> None:
        """Raise the last error of C{key}, with C{Retry-After}, while it is backed off."""
        failing = self._failing.get(key)
        if failing is None:
            return
        wait = failing.retry_at - self.clock.seconds()
        if wait <= 0:
            return
        seconds = max(1, math.ceil(wait))
        raise ProxyError(
            f"{failing.error.message}; it failed {failing.count} times in a row, "
            f"next attempt in {seconds} s",
            code=failing.error.code,
            headers={b"Retry-After": str(seconds).encode("ascii")},
        )

    def failed(self, key: Hashable, error: ProxyError, subject: str) -> None:
        """The download of C{key} (C{subject}, for the log) failed with C{error}."""
        now = self.clock.seconds()
        previous = self._failing.pop(key, None)
        count = 1 if previous is None else previous.count + 1
        delay = 0.0
        if count > 1:
            delay = min(self.base_backoff * 2.0 ** min(count - 2, _MAX_DOUBLINGS), self.max_backoff)
            self.log.warn(
                "{subject} failed {count} times in a row ({reason}); its clients get that error "
                "for {delay:g} s before it is tried again",
                subject=subject, count=count, reason=error.message, delay=delay,
            )
        self._failing[key] = _Failing(count=count, error=error, retry_at=now + delay)
        while len(self._failing) > self.capacity:
            self._failing.popitem(last=False)

    def succeeded(self, key: Hashable) -> None:
        """The download of C{key} succeeded: it is no longer failing."""
        self._failing.pop(key, None)

    def __len__(self) -> int:
        return len(self._failing)
