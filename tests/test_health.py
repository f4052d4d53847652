"""Tests for proxy.health: offline detection, probing with backoff, and what clients are told."""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from proxy.health import FORCED_RETRY_AFTER_SECONDS, UpstreamHealth
from tests.helpers.logs import Logged

START = 1_700_000_000.0


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


def lines(logged: Logged, level: LogLevel) -> list[str]:
    return logged.lines(level, "proxy.health.UpstreamHealth")


def hms(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def probing(health: UpstreamHealth) -> bool:
    # A function rather than the property inline, so that the type checker does not carry
    # one assertion's narrowing over to the next.
    return health.probing


def fail_probe(health: UpstreamHealth, clock: Clock) -> None:
    """Wait for the next probe time, take the probe and fail it."""
    clock.advance(health.retry_after())
    assert health.may_try()
    health.record_failure("connection refused", transport=True)


def test_online_at_start(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    assert not health.offline
    assert not health.forced
    assert health.may_try()
    assert health.may_try()
    assert health.describe() == "upstream images is online"


def test_first_failure_marks_offline_and_logs_one_warning(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    assert health.offline
    assert not health.may_try()
    assert lines(logged, LogLevel.warn) == [
        "upstream images is unreachable (connection refused): marked offline, requests fail fast; "
        f"next attempt in 5 s, at {hms(START + 5)}"
    ]


def test_a_5xx_is_worded_as_failing(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("503 for https://up/streams/v1/index.json", transport=False)
    assert health.offline
    assert lines(logged, LogLevel.warn) == [
        "upstream images is failing (503 for https://up/streams/v1/index.json): marked offline, "
        f"requests fail fast; next attempt in 5 s, at {hms(START + 5)}"
    ]


def test_later_failures_log_at_debug_only(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    # Requests sent before the outage was known, ending before the probe time.
    clock.advance(1)
    health.record_failure("connection reset", transport=True)
    health.record_failure("connection reset", transport=True)
    for _ in range(3):
        fail_probe(health, clock)
    assert len(lines(logged, LogLevel.warn)) == 1
    assert len(lines(logged, LogLevel.debug)) == 5
    assert lines(logged, LogLevel.info) == []


def test_backoff_doubles_up_to_the_cap(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    waits = [health.retry_after()]
    for _ in range(8):
        fail_probe(health, clock)
        waits.append(health.retry_after())
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]


def test_custom_backoff(clock: Clock) -> None:
    health = UpstreamHealth("images", clock, base_backoff=1.0, max_backoff=3.0)
    health.record_failure("timeout", transport=True)
    waits = [health.retry_after()]
    for _ in range(3):
        fail_probe(health, clock)
        waits.append(health.retry_after())
    assert waits == [1, 2, 3, 3]


def test_probe_only_once_the_time_has_come(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    clock.advance(4.9)
    assert not health.may_try()
    clock.advance(0.1)
    assert health.may_try()


def test_one_probe_at_a_time(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    clock.advance(5)
    assert [health.may_try() for _ in range(4)] == [True, False, False, False]
    assert probing(health)
    clock.advance(100)
    assert not health.may_try()
    # The probe fails: the next one waits for the doubled backoff, from the probe's end.
    health.record_failure("connection refused", transport=True)
    assert not probing(health)
    assert not health.may_try()
    assert health.retry_after() == 10
    clock.advance(10)
    assert [health.may_try() for _ in range(3)] == [True, False, False]


def test_failures_before_the_probe_time_do_not_move_it(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    clock.advance(2)
    health.record_failure("connection refused", transport=True)
    health.record_failure("connection refused", transport=True)
    assert health.retry_after() == 3
    clock.advance(3)
    assert health.may_try()


def test_a_probe_that_never_reports_is_given_up(clock: Clock) -> None:
    health = UpstreamHealth("images", clock, probe_timeout=60.0)
    health.record_failure("connection refused", transport=True)
    clock.advance(5)
    assert health.may_try()
    clock.advance(59)
    assert not health.may_try()
    clock.advance(1)
    assert [health.may_try() for _ in range(2)] == [True, False]


def test_success_brings_it_back_and_resets_the_backoff(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    fail_probe(health, clock)
    fail_probe(health, clock)
    assert health.retry_after() == 20
    clock.advance(20)
    assert health.may_try()
    clock.advance(0.4)
    health.record_success()
    assert not health.offline
    assert not probing(health)
    assert [health.may_try() for _ in range(3)] == [True, True, True]
    assert lines(logged, LogLevel.info) == ["upstream images is reachable again after 35 s"]
    # The next outage starts from the base backoff again, with its own warning.
    health.record_success()
    health.record_failure("TLS handshake failed", transport=True)
    assert health.retry_after() == 5
    assert len(lines(logged, LogLevel.warn)) == 2
    assert len(lines(logged, LogLevel.info)) == 1


def test_success_while_online_logs_nothing(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_success()
    health.record_success()
    assert lines(logged, LogLevel.info) == []
    assert not health.offline


def test_forced_offline_never_tries(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock, forced_offline=True)
    assert health.offline
    assert health.forced
    assert not health.may_try()
    clock.advance(10 * 24 * 3600)
    assert not health.may_try()
    health.record_success()
    assert health.offline
    assert not health.may_try()
    health.record_failure("connection refused", transport=True)
    assert health.retry_after() == FORCED_RETRY_AFTER_SECONDS == 3600
    assert health.describe() == (
        "upstream images is offline by configuration (upstreams.images.offline = true)"
    )
    assert lines(logged, LogLevel.warn) == []
    assert lines(logged, LogLevel.info) == []


def test_retry_after_counts_down_in_whole_seconds(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    assert health.retry_after() == 1
    health.record_failure("connection refused", transport=True)
    assert health.retry_after() == 5
    clock.advance(0.5)
    assert health.retry_after() == 5
    clock.advance(0.5)
    assert health.retry_after() == 4
    clock.advance(3.9)
    assert health.retry_after() == 1
    # Probe time has come but nobody took it yet, then while the probe is outstanding.
    clock.advance(0.1)
    assert health.retry_after() == 1
    assert health.may_try()
    assert health.retry_after() == 1


def test_describe(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    fail_probe(health, clock)
    fail_probe(health, clock)
    since = hms(START)
    assert health.describe() == (
        f"upstream images is offline since {since} (connection refused); next attempt in 20 s"
    )
    clock.advance(20)
    assert health.may_try()
    assert health.describe() == (
        f"upstream images is offline since {since} (connection refused); an attempt is in progress"
    )
    health.record_failure("503 for https://up/x", transport=False)
    assert health.describe() == (
        f"upstream images is offline since {since} (503 for https://up/x); next attempt in 40 s"
    )


def test_describe_gives_the_date_of_an_old_outage(clock: Clock) -> None:
    health = UpstreamHealth("images", clock, max_backoff=5.0)
    health.record_failure("connection refused", transport=True)
    clock.advance(2 * 24 * 3600)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(START))
    assert health.describe() == (
        f"upstream images is offline since {stamp} (connection refused); next attempt in 1 s"
    )


@pytest.mark.parametrize(
    "kwargs", [{"base_backoff": 0.0}, {"max_backoff": -1.0}, {"base_backoff": 10.0, "max_backoff": 5.0},
               {"probe_timeout": 0.0}],
)
def test_bad_backoff_settings_are_refused(clock: Clock, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        UpstreamHealth("images", clock, **kwargs)
