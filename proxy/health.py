"""Whether an upstream is worth asking: offline detection, fail-fast and probing with backoff.

When an upstream is unreachable (connection refused or reset, DNS, TLS handshake, timeout) or
failing (5xx), every request that tried it would otherwise wait for its own connect timeout. So
the first such failure marks the upstream offline: requests then fail fast (503 with
C{Retry-After}, or the offline catalogue), and exactly one request at a time is let through as a
probe once the backoff has run out (5 s, 10 s, 20 s ... up to 5 minutes). Any success brings the
upstream back. Which outcomes count is the call sites' decision: a 404 is an answer, not a fault.

C{[upstreams.NAME] offline = true} forces the offline state for good (air-gapped sites): nothing
ever tries the upstream, and no success can end it.
"""

from __future__ import annotations

import math
import time
from typing import ClassVar

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.errors import ProxyError, Unavailable
from proxy.upstream import NotAnUpstream, as_proxy_error

__all__ = [
    "DEFAULT_BASE_BACKOFF_SECONDS",
    "DEFAULT_MAX_BACKOFF_SECONDS",
    "DEFAULT_PROBE_TIMEOUT_SECONDS",
    "FORCED_RETRY_AFTER_SECONDS",
    "UpstreamHealth",
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
    L{record_success} or L{record_failure}. While the upstream is offline, L{may_try} lets one
    request through once the next probe time has come and then refuses every other until that
    probe reports; L{retry_after} and L{describe} say what a refused client should be told.

    @ivar name: the upstream's name in the configuration, for log lines and messages.
    @ivar clock: the source of time; the backoff is measured with C{clock.seconds()}.
    @ivar forced_offline: offline by configuration: never tried, never back online.
    @ivar base_backoff: seconds from the first failure to the first probe; doubled after each
        failed probe.
    @ivar max_backoff: the longest wait between probes, in seconds.
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

    # When the current outage began; None while online.
    _since: float | None = field(default=None, init=False)
    _reason: str = field(default="", init=False)
    # Failed probes since the outage began: the exponent of the backoff.
    _failed_probes: int = field(default=0, init=False)
    _next_probe_at: float = field(default=0.0, init=False)
    # When the outstanding probe was let through; None when no probe is outstanding.
    _probe_started_at: float | None = field(default=None, init=False)

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
    def probing(self) -> bool:
        """True while a probe has been let through and has not reported yet."""
        return self._probe_started_at is not None

    def may_try(self) -> bool:
        """
        Whether a request may be sent to the upstream now.

        Always while online; never when forced offline. While offline, true once the next probe
        time has come, and that call takes the probe: every other call is false until the
        probe reports through L{record_success} or L{record_failure} (or has been outstanding
        for C{probe_timeout} seconds). The caller that got true must report the outcome.
        """
        if self.forced_offline:
            return False
        if self._since is None:
            return True
        now = self.clock.seconds()
        if self._probe_started_at is not None:
            if now - self._probe_started_at < self.probe_timeout:
                return False
            self.log.debug(
                "probe of upstream {upstream} reported nothing in {seconds:g} s; allowing another",
                upstream=self.name, seconds=now - self._probe_started_at,
            )
            self._probe_started_at = None
        if now < self._next_probe_at:
            return False
        self._probe_started_at = now
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
                "upstream {upstream} is {kind} ({reason}): marked offline, requests fail fast; "
                "next attempt in {delay:g} s, at {next_at}",
                upstream=self.name, kind=kind, reason=reason, delay=delay,
                next_at=self._clock_time(self._next_probe_at),
            )
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
                "probe of upstream {upstream} failed ({reason}); next attempt in {delay:g} s",
                upstream=self.name, reason=reason, delay=delay,
            )
        else:
            self.log.debug(
                "upstream {upstream} still {kind} ({reason}); next attempt in {delay:g} s",
                upstream=self.name, kind=kind, reason=reason, delay=self._next_probe_at - now,
            )

    def check(self, missing: str = "") -> None:
        """
        Raise a 503 with C{Retry-After} unless the upstream may be asked now (online, or due
        for a probe); C{missing} names what the cache lacks, for the message.
        """
        if self.may_try():
            return
        reason = self.describe() + (f"; {missing} is not in the cache" if missing else "")
        raise Unavailable(reason, headers={b"Retry-After": str(self.retry_after()).encode("ascii")})

    def record_answer(self, code: int, url: str) -> None:
        """The upstream answered C{url} with status C{code}: a 5xx is a failure, any other an answer."""
        if code >= 500:
            self.record_failure(f"{code} for {url}", transport=False)
        else:
            self.record_success()

    def record_error(self, error: BaseException, url: str) -> None:
        """
        A request for C{url} ended in C{error} before (or instead of) an answer. A refused
        redirect is an answer (the upstream is reachable, and a probe must not stay "in
        progress" for want of one); another L{ProxyError} was reported where it arose; anything
        else (connection, TLS, timeout) means the upstream itself is unreachable.
        """
        if isinstance(error, NotAnUpstream):
            self.record_success()
        elif not isinstance(error, ProxyError):
            self.record_failure(as_proxy_error(Failure(error), url).message, transport=True)

    def record_success(self) -> None:
        """
        Report that the upstream answered (anything but a 5xx): it is online again and the
        backoff starts from the beginning at the next outage. Forced offline stays offline.
        """
        if self.forced_offline:
            self.log.debug("upstream {upstream} answered but is offline by configuration",
                           upstream=self.name)
            return
        if self._since is None:
            return
        seconds = round(self.clock.seconds() - self._since)
        self._since = None
        self._reason = ""
        self._failed_probes = 0
        self._next_probe_at = 0.0
        self._probe_started_at = None
        self.log.info(
            "upstream {upstream} is reachable again after {seconds} s",
            upstream=self.name, seconds=seconds,
        )

    def retry_after(self) -> int:
        """
        Whole seconds until the next probe, at least 1, for a 503's C{Retry-After}; 1 while a
        probe is outstanding or the upstream is online, C{FORCED_RETRY_AFTER_SECONDS} when forced.
        """
        if self.forced_offline:
            return FORCED_RETRY_AFTER_SECONDS
        if self._since is None or self._probe_started_at is not None:
            return 1
        return max(1, math.ceil(self._next_probe_at - self.clock.seconds()))

    def describe(self) -> str:
        """
        One line for a 503 body, e.g. C{"upstream images is offline since 12:00:03
        (connection refused); next attempt in 20 s"}.
        """
        if self.forced_offline:
            return f"upstream {self.name} is offline by configuration (upstreams.{self.name}.offline = true)"
        if self._since is None:
            return f"upstream {self.name} is online"
        head = f"upstream {self.name} is offline since {self._clock_time(self._since)} ({self._reason})"
        if self._probe_started_at is not None:
            return f"{head}; an attempt is in progress"
        return f"{head}; next attempt in {self.retry_after()} s"

    def _backoff(self) -> float:
        return min(self.base_backoff * 2.0 ** min(self._failed_probes, _MAX_DOUBLINGS), self.max_backoff)

    def _clock_time(self, when: float) -> str:
        """Local wall-clock time of C{when}; with the date once it is not within the last day."""
        fmt = "%H:%M:%S" if self.clock.seconds() - when < _SECONDS_PER_DAY else "%Y-%m-%d %H:%M:%S"
        return time.strftime(fmt, time.localtime(when))
