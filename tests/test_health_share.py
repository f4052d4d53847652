"""
Upstream health shared between worker processes (L{proxy.health_share}): the merge rules, and
two workers' L{UpstreamHealth} wired through a supervisor's L{HealthExchange} in memory.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from proxy.errors import Unavailable
from proxy.health import UpstreamHealth, merge_shared
from proxy.health_share import (
    HEALTH_KEY,
    LAST_SUCCESS_EVERY_SECONDS,
    HealthExchange,
    HealthSharing,
    others_view,
)


def _state(**values: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "since": None, "reason": "", "failed_probes": 0, "next_probe_at": 0.0,
        "probing": None, "last_success": None,
    }
    state.update(values)
    return state


# -- the merge rules ---------------------------------------------------------------------


def test_merge_offline_after_the_last_answer_anyone_had() -> None:
    merged = merge_shared([
        _state(last_success=10.0),
        _state(since=20.0, reason="connection refused", failed_probes=2, next_probe_at=40.0,
               last_success=5.0),
        _state(since=25.0, reason="503", failed_probes=1, next_probe_at=50.0, probing=30.0),
    ])
    assert merged == _state(
        since=20.0, reason="connection refused", failed_probes=2, next_probe_at=50.0,
        probing=30.0, last_success=10.0,
    )


def test_merge_online_when_anyone_was_answered_after_the_outage_began() -> None:
    merged = merge_shared([
        _state(since=20.0, reason="connection refused", probing=21.0, last_success=5.0),
        _state(last_success=22.0),
    ])
    assert merged == _state(last_success=22.0)


def test_merge_of_nothing_is_online_and_never_answered() -> None:
    assert merge_shared([]) == _state()


def test_others_view_leaves_out_the_asking_worker() -> None:
    reports = {1: {"a": _state(since=3.0, reason="x", probing=4.0)}, 2: {"a": _state()}}
    assert others_view(reports, 1) == {"a": _state()}
    assert others_view(reports, 2)["a"]["since"] == 3.0
    assert others_view(reports, None)["a"]["probing"] == 4.0


# -- two workers and a supervisor, in memory ---------------------------------------------


# Read through a call: mypy would take a property read twice for one value.
def _due(health: UpstreamHealth) -> bool:
    return health.probe_due


def _offline(health: UpstreamHealth) -> bool:
    return health.offline


class _Proxy:
    """Workers 1 and 2 with one upstream "a", their lines carried at once by a supervisor."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.exchange = HealthExchange({"a": UpstreamHealth("a", self.clock)})
        self.health = {slot: UpstreamHealth("a", self.clock) for slot in (1, 2)}
        self.lines: dict[int, list[str]] = {1: [], 2: []}
        self.sharing = {slot: self._sharing(slot) for slot in (1, 2)}
        for sharing in self.sharing.values():
            sharing.startService()

    def _sharing(self, slot: int) -> HealthSharing:
        def send(line: str) -> None:
            self._carry(slot, line)

        return HealthSharing({"a": self.health[slot]}, self.clock, send)

    def _carry(self, slot: int, line: str) -> None:
        self.lines[slot].append(line)
        assert self.exchange.report(slot, json.loads(line)[HEALTH_KEY])
        for other in (1, 2):
            if other != slot:
                self.sharing[other].childDataReceived("stdin", self.exchange.line_for(other))

    def turn(self) -> None:
        self.clock.advance(0)
        self.clock.advance(0)


def test_offline_found_by_one_worker_is_offline_for_all_and_one_probe_at_a_time() -> None:
    proxy = _Proxy()
    one, two = proxy.health[1], proxy.health[2]
    one.record_failure("connection refused", transport=True)
    proxy.turn()
    assert two.offline and two.reason == "connection refused" and two.since == one.since
    assert proxy.exchange.health["a"].offline
    # Worker 2's next client request is the probe for the whole proxy...
    assert two.may_try()
    proxy.turn()
    # ...so worker 1's clients get the fast 503 meanwhile, and say why.
    with pytest.raises(Unavailable) as refused:
        one.check("x")
    assert "an attempt is in progress" in refused.value.message
    assert _due(one) is False
    # The probe fails: the next request, in either worker, probes.
    proxy.clock.advance(1)
    two.record_failure("connection refused", transport=True)
    proxy.turn()
    assert _due(one) and one.offline
    assert one.shared()["failed_probes"] == two.shared()["failed_probes"] == 1
    # Worker 1 probes and finds it back: back for all, and for the metrics.
    assert one.may_try()
    proxy.turn()
    assert _due(two) is False
    proxy.clock.advance(1)
    one.record_success()
    proxy.turn()
    assert _offline(two) is False and two.may_try()
    assert _offline(proxy.exchange.health["a"]) is False
    assert proxy.exchange.health["a"].last_success_at == one.last_success_at


def test_a_dead_workers_probe_ends_with_it() -> None:
    proxy = _Proxy()
    proxy.health[1].record_failure("reset", transport=True)
    proxy.turn()
    assert proxy.health[1].may_try()
    proxy.turn()
    assert not proxy.health[2].probe_due
    proxy.exchange.forget(1)
    proxy.sharing[2].childDataReceived("stdin", proxy.exchange.line_for(2))
    assert proxy.health[2].offline and proxy.health[2].probe_due


def test_a_success_alone_is_told_at_most_every_few_seconds() -> None:
    proxy = _Proxy()
    one = proxy.health[1]
    for _ in range(30):
        one.record_success()
        proxy.turn()
        proxy.clock.advance(0.1)
    # The first answer at once, the latest once the interval is over: not one line per request.
    assert len(proxy.lines[1]) == 1
    proxy.clock.advance(LAST_SUCCESS_EVERY_SECONDS)
    assert len(proxy.lines[1]) == 2
    assert proxy.exchange.health["a"].last_success_at == one.last_success_at
    # Nothing new, nothing sent.
    proxy.clock.advance(60)
    assert len(proxy.lines[1]) == 2
    assert proxy.clock.getDelayedCalls() == []


def test_an_answer_the_others_have_not_heard_of_is_told_at_once() -> None:
    clock = Clock()
    clock.advance(1000)
    health = UpstreamHealth("a", clock)
    sent: list[str] = []
    sharing = HealthSharing({"a": health}, clock, sent.append)
    sharing.startService()
    health.record_success()
    clock.advance(1)
    health.record_success()
    clock.advance(0)
    assert len(sent) == 1
    # The others found it offline before this worker's latest answer: they hear of it now.
    line = json.dumps({HEALTH_KEY: {"a": _state(since=1000.5, reason="refused")}})
    sharing.line_received(line.encode())
    clock.advance(0)
    assert _offline(health) is False and len(sent) == 2
    assert json.loads(sent[1])[HEALTH_KEY]["a"]["last_success"] == 1001.0
    sharing.stopService()


def test_an_outage_is_told_at_once_even_after_a_recent_success() -> None:
    proxy = _Proxy()
    one = proxy.health[1]
    one.record_success()
    proxy.turn()
    proxy.clock.advance(0.5)
    one.record_failure("503 for index.json", transport=False)
    proxy.turn()
    assert proxy.health[2].offline and proxy.exchange.health["a"].offline


def test_a_restarted_worker_learns_the_outage_and_the_lines_converge() -> None:
    proxy = _Proxy()
    proxy.health[1].record_failure("refused", transport=True)
    proxy.turn()
    # Worker 2 took the verdict in and told it back once; nothing goes round and round.
    assert len(proxy.lines[1]) == 1 and len(proxy.lines[2]) == 1
    fresh = UpstreamHealth("a", proxy.clock)
    sharing = HealthSharing({"a": fresh}, proxy.clock, lambda line: None)
    sharing.startService()
    sharing.childDataReceived("stdin", proxy.exchange.line_for(3)[:10])
    assert _offline(fresh) is False
    sharing.childDataReceived("stdin", proxy.exchange.line_for(3)[10:])
    assert _offline(fresh) and fresh.reason == "refused"
    sharing.stopService()


def test_forced_offline_shares_nothing_and_adopts_no_outage() -> None:
    clock = Clock()
    forced = UpstreamHealth("a", clock, forced_offline=True)
    sent: list[str] = []
    sharing = HealthSharing({"a": forced}, clock, sent.append)
    sharing.startService()
    forced.record_success()
    clock.advance(1)
    assert sent == []
    forced.adopt(_state(since=5.0, reason="x"))
    assert forced.reason == "upstreams.a.offline = true" and forced.since is None


def test_a_line_that_is_not_health_is_ignored() -> None:
    clock = Clock()
    health = UpstreamHealth("a", clock)
    sharing = HealthSharing({"a": health}, clock, lambda line: None)
    sharing.childDataReceived("stdin", b"not json\n{\"other\": 1}\n")
    assert not health.offline
    assert not HealthExchange({"a": health}).report(1, ["not", "a", "dict"])


def test_a_worker_ends_when_its_supervisors_pipe_closes() -> None:
    """PR_SET_PDEATHSIG misses a supervisor that died before the worker set it: the pipe tells."""
    ended: list[bool] = []
    sharing = HealthSharing(
        {"a": UpstreamHealth("a", Clock())}, Clock(), lambda line: None,
        gone=lambda: ended.append(True),
    )
    sharing.childConnectionLost("stdin", Failure(ConnectionDone()))
    assert ended == [True]
