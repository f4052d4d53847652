"""Tests for proxy.health: offline detection, probing, per-file backoff, and what clients are told."""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from proxy.errors import NotFound, ProxyError, Unavailable, UpstreamFailed
from proxy.health import FORCED_RETRY_AFTER_SECONDS, FileFailures, UpstreamHealth
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


def probe_due(health: UpstreamHealth) -> bool:
    return health.probe_due


def offline(health: UpstreamHealth) -> bool:
    return health.offline


def fail_probe(health: UpstreamHealth, clock: Clock, *, background: bool = False) -> None:
    """Take the probe (a background one waits for the backoff first) and fail it."""
    if background:
        clock.advance(health.next_background_attempt())
    assert health.may_try(background=background)
    health.record_failure("connection refused", transport=True)


def test_online_at_start(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    assert not offline(health)
    assert not health.forced
    assert health.may_try()
    assert health.may_try(background=True)
    assert not probe_due(health)
    assert health.describe() == "upstream images is online"


def test_first_failure_marks_offline_and_logs_one_warning(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    assert health.offline
    assert probe_due(health)
    assert lines(logged, LogLevel.warn) == [
        "upstream images is unreachable (connection refused): marked offline, its catalogue is "
        "served as far as it is stored; one request at a time tries it again, background work "
        "after 5 s"
    ]


def test_a_5xx_is_worded_as_failing(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("503 for https://up/streams/v1/index.json", transport=False)
    assert health.offline
    assert lines(logged, LogLevel.warn)[0].startswith(
        "upstream images is failing (503 for https://up/streams/v1/index.json): marked offline"
    )


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


def test_a_client_request_probes_at_once_one_at_a_time(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    # No backoff for a client: the next request finds out whether the upstream is back.
    assert [health.may_try() for _ in range(3)] == [True, False, False]
    assert probing(health)
    assert not probe_due(health)
    clock.advance(100)
    assert not health.may_try()
    health.record_failure("connection refused", transport=True)
    assert not probing(health)
    assert probe_due(health)
    assert [health.may_try() for _ in range(2)] == [True, False]


def test_the_first_request_after_recovery_succeeds(clock: Clock) -> None:
    """A probe that failed a moment ago makes nobody wait once the upstream is back."""
    health = UpstreamHealth("images", clock)
    health.record_failure("header timeout", transport=True)
    fail_probe(health, clock)
    clock.advance(0.1)
    assert health.may_try()
    health.record_success()
    assert not offline(health)
    assert [health.may_try() for _ in range(3)] == [True, True, True]


def test_background_probes_wait_for_the_backoff(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    clock.advance(4.9)
    assert not health.may_try(background=True)
    clock.advance(0.1)
    assert health.may_try(background=True)
    assert not health.may_try()


def test_backoff_doubles_up_to_the_cap(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    waits = [health.next_background_attempt()]
    for _ in range(8):
        fail_probe(health, clock, background=True)
        waits.append(health.next_background_attempt())
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]


def test_custom_backoff(clock: Clock) -> None:
    health = UpstreamHealth("images", clock, base_backoff=1.0, max_backoff=3.0)
    health.record_failure("timeout", transport=True)
    waits = [health.next_background_attempt()]
    for _ in range(3):
        fail_probe(health, clock, background=True)
        waits.append(health.next_background_attempt())
    assert waits == [1, 2, 3, 3]


def test_failures_before_the_probe_time_do_not_move_it(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    clock.advance(2)
    health.record_failure("connection refused", transport=True)
    health.record_failure("connection refused", transport=True)
    assert health.next_background_attempt() == 3
    clock.advance(3)
    assert health.may_try(background=True)


def test_a_probe_that_never_reports_is_given_up(clock: Clock) -> None:
    health = UpstreamHealth("images", clock, probe_timeout=60.0)
    health.record_failure("connection refused", transport=True)
    assert health.may_try()
    clock.advance(59)
    assert not health.may_try()
    assert not probe_due(health)
    clock.advance(1)
    assert probe_due(health)
    assert [health.may_try() for _ in range(2)] == [True, False]


def test_a_file_answer_ends_the_probe(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    assert health.may_try()
    # A 5xx for one file: reachable, but that proves nothing about the catalogue.
    health.record_file_answer(500, "https://up/images/x/rootfs.squashfs")
    assert offline(health) and probe_due(health)
    assert health.may_try()
    health.record_file_answer(404, "https://up/images/x/rootfs.squashfs")
    assert not offline(health)


def test_a_file_5xx_while_online_changes_nothing(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_file_answer(503, "https://up/images/x/rootfs.squashfs")
    assert not offline(health)


def test_check_without_taking_the_probe(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    health.check("x", probe=False)
    health.check("x", probe=False)
    assert not probing(health)
    health.check("x")
    with pytest.raises(Unavailable) as raised:
        health.check("x", probe=False)
    assert raised.value.headers == {b"Retry-After": b"1"}
    assert raised.value.message.endswith("an attempt is in progress; x is not in the cache")


def test_success_brings_it_back_and_resets_the_backoff(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    fail_probe(health, clock, background=True)
    fail_probe(health, clock, background=True)
    assert health.next_background_attempt() == 20
    clock.advance(20)
    assert health.may_try()
    clock.advance(0.4)
    health.record_success()
    assert not offline(health)
    assert not probing(health)
    assert [health.may_try() for _ in range(3)] == [True, True, True]
    assert lines(logged, LogLevel.info) == ["upstream images is reachable again after 35 s"]
    # The next outage starts from the base backoff again, with its own warning.
    health.record_success()
    health.record_failure("TLS handshake failed", transport=True)
    assert health.next_background_attempt() == 5
    assert len(lines(logged, LogLevel.warn)) == 2
    assert len(lines(logged, LogLevel.info)) == 1


def test_success_while_online_logs_nothing(clock: Clock, logged: Logged) -> None:
    health = UpstreamHealth("images", clock)
    health.record_success()
    health.record_success()
    assert lines(logged, LogLevel.info) == []
    assert not offline(health)


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


def test_retry_after(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    assert health.retry_after() == 1
    health.record_failure("connection refused", transport=True)
    # A refused client's next request may probe as soon as the outstanding probe reports.
    assert health.may_try()
    assert health.retry_after() == 1


def test_describe(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    since = hms(START)
    assert health.describe() == (
        f"upstream images is offline since {since} (connection refused); the next request tries again"
    )
    assert health.may_try()
    assert health.describe() == (
        f"upstream images is offline since {since} (connection refused); an attempt is in progress"
    )
    health.record_failure("503 for https://up/x", transport=False)
    assert health.describe() == (
        f"upstream images is offline since {since} (503 for https://up/x); the next request tries again"
    )


def test_describe_gives_the_date_of_an_old_outage(clock: Clock) -> None:
    health = UpstreamHealth("images", clock, max_backoff=5.0)
    health.record_failure("connection refused", transport=True)
    clock.advance(2 * 24 * 3600)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(START))
    assert health.describe().startswith(f"upstream images is offline since {stamp} (connection refused)")


@pytest.mark.parametrize(
    "kwargs", [{"base_backoff": 0.0}, {"max_backoff": -1.0}, {"base_backoff": 10.0, "max_backoff": 5.0},
               {"probe_timeout": 0.0}],
)
def test_bad_backoff_settings_are_refused(clock: Clock, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        UpstreamHealth("images", clock, **kwargs)


# Per-file failures


def test_a_file_failing_once_is_tried_again_at_once(clock: Clock, logged: Logged) -> None:
    files = FileFailures(clock)
    files.failed("a", UpstreamFailed("upstream answered 500 for a"), "https://up/a")
    files.check("a")
    files.check("b")
    assert logged.lines(LogLevel.warn, "proxy.health.FileFailures") == []


def test_a_file_that_keeps_failing_is_backed_off_on_its_own(clock: Clock, logged: Logged) -> None:
    files = FileFailures(clock)
    error = UpstreamFailed("upstream answered 500 for a")
    files.failed("a", error, "https://up/a")
    files.failed("a", error, "https://up/a")
    with pytest.raises(ProxyError) as raised:
        files.check("a")
    assert raised.value.code == 502
    assert raised.value.headers == {b"Retry-After": b"5"}
    assert raised.value.message == (
        "upstream answered 500 for a; it failed 2 times in a row, next attempt in 5 s"
    )
    files.check("b")
    assert logged.lines(LogLevel.warn, "proxy.health.FileFailures") == [
        "https://up/a failed 2 times in a row (upstream answered 500 for a); its clients get "
        "that error for 5 s before it is tried again"
    ]
    waits = []
    for _ in range(8):
        clock.advance(300)
        files.check("a")
        files.failed("a", error, "https://up/a")
        with pytest.raises(ProxyError) as raised:
            files.check("a")
        waits.append(int(raised.value.headers[b"Retry-After"]))
    assert waits == [10, 20, 40, 80, 160, 300, 300, 300]


def test_a_404_stays_a_404(clock: Clock) -> None:
    files = FileFailures(clock)
    for _ in range(2):
        files.failed("a", NotFound("upstream has no a (404)"), "https://up/a")
    with pytest.raises(ProxyError) as raised:
        files.check("a")
    assert raised.value.code == 404


def test_success_forgets_the_failures(clock: Clock) -> None:
    files = FileFailures(clock)
    for _ in range(3):
        files.failed("a", UpstreamFailed("x"), "https://up/a")
    files.succeeded("a")
    files.check("a")
    assert len(files) == 0
    files.failed("a", UpstreamFailed("x"), "https://up/a")
    files.check("a")


def test_the_table_is_bounded(clock: Clock) -> None:
    files = FileFailures(clock, capacity=3)
    for key in "abcde":
        files.failed(key, UpstreamFailed("x"), f"https://up/{key}")
        files.failed(key, UpstreamFailed("x"), f"https://up/{key}")
    assert len(files) == 3
    files.check("a")
    with pytest.raises(ProxyError):
        files.check("e")


def test_a_probe_ended_without_a_verdict_lets_the_next_request_probe(clock: Clock) -> None:
    health = UpstreamHealth("images", clock)
    health.record_failure("connection refused", transport=True)
    assert health.may_try()
    assert not health.may_try()
    health.end_probe("the download could not start")
    assert offline(health)
    assert health.may_try()
