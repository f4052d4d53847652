# -*- test-case-name: tests.test_probes -*-
"""C{/healthz} and C{/readyz}: what a load balancer, systemd or C{curl --fail} asks the proxy.

C{/healthz} (liveness) answers 200 whenever the reactor runs: a proxy that cannot answer it is
hung and should be restarted. C{/readyz} (readiness) answers 200 when the proxy can serve:
its index is open and its HTTPS port listens; 503 otherwise (starting, stopping). Both bodies
are JSON.

An offline upstream does not make the proxy unready. Its stored images are still served (the
catalogue cut down to them), which is the point of a LAN cache during a WAN outage; and every
instance behind a load balancer sees the same upstream, so taking them out of rotation would
only turn "some images cannot be fetched" into "nothing can be served". The body lists each
upstream's state, so a check that wants to alert on it can.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.web.resource import Resource
from twisted.web.server import Request

from proxy.health import UpstreamHealth


@frozen
class UpstreamState:
    """
    One upstream as C{/readyz} reports it.

    @ivar since: when its outage began (Unix time); None while online or forced offline.
    @ivar reason: why it is offline; C{""} while online.
    """

    name: str
    online: bool
    forced: bool
    since: float | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"name": self.name, "online": self.online}
        if not self.online:
            found["forced"] = self.forced
            found["reason"] = self.reason
            if self.since is not None:
                found["offline_since"] = _utc(self.since)
        return found


@frozen
class Readiness:
    """Whether the proxy can serve, and why not; see the module docstring."""

    index_open: bool
    listening: bool
    upstreams: tuple[UpstreamState, ...]

    @property
    def ready(self) -> bool:
        return self.index_open and self.listening

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not ready",
            "index_open": self.index_open,
            "listening": self.listening,
            "upstreams": [u.as_json() for u in self.upstreams],
        }


def readiness(
    index_open: bool,
    listening: bool,
    upstreams: Sequence[str],
    health: Mapping[str, UpstreamHealth],
) -> Readiness:
    """The readiness of a proxy whose upstreams (in configuration order) have C{health}."""
    states = []
    for name in upstreams:
        h = health.get(name)
        if h is None:
            states.append(UpstreamState(name, True, False, None, ""))
        else:
            states.append(UpstreamState(name, not h.offline, h.forced, h.since, h.reason))
    return Readiness(index_open, listening, tuple(states))


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _json(request: Request, code: int, body: Mapping[str, Any]) -> bytes:
    data = (json.dumps(body, indent=2) + "\n").encode("utf-8")
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    # A probe's answer is about this instant only.
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", b"%d" % (len(data),))
    return data


class Healthz(Resource):
    """C{/healthz}: 200 C{{"status": "ok"}} while the reactor turns."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class Readyz(Resource):
    """C{/readyz}: 200 when ready, 503 when not, with L{Readiness.as_json} as the body."""

    isLeaf = True

    def __init__(self, state: Callable[[], Readiness]) -> None:
        super().__init__()
        self._state = state

    def render_GET(self, request: Request) -> bytes:
        state = self._state()
        return _json(request, 200 if state.ready else 503, state.as_json())


__all__ = ["Healthz", "Readiness", "Readyz", "UpstreamState", "readiness"]
