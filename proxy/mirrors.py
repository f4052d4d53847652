# -*- test-case-name: tests.test_mirrors -*-
"""The mirrors of one upstream: several base URLs serving the same tree, and which to ask now.

C{urls = [...]} lists them in the order of preference. A mirror that fails (it cannot be
reached, its TLS fails, it answers a 5xx, it stalls, a body breaks off or does not verify) is
marked down with the backoff of L{proxy.health} (5 s, doubled per further failure, up to
5 minutes); the next one in the list is asked instead, at once. A mirror is tried again once
its backoff has run out, in its place in the list, so the first mirror is used again as soon as
it is back. The upstream as a whole (its L{proxy.health.UpstreamHealth}) is told of a failure
only when every mirror has failed; any answer of any mirror is an answer of the upstream.

Every byte is verified against the catalogue's sha256 whichever mirror sent it, so a download
may continue on another mirror from the bytes on disk; a validator (ETag, Last-Modified) is
only ever sent back to the mirror that gave it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy import health as _health

__all__ = ["MirrorState", "Mirrors", "base_of"]


@frozen
class MirrorState:
    """One mirror as the status page shows it."""

    url: str
    down: bool
    # Why it is down, in one phrase; "" while up.
    reason: str = ""
    # When it went down (clock seconds), and when it is tried again.
    since: float | None = None
    retry_at: float | None = None


@define
class _Mirror:
    url: str
    down_since: float | None = None
    reason: str = ""
    # Failures since it went down: the exponent of its backoff.
    failures: int = 0
    retry_at: float = 0.0


@define
class Mirrors:
    """
    The base URLs of the upstream C{name}, in order, each up or down (see the module).

    @ivar base_backoff: seconds a mirror that failed is left alone; doubled per further
        failure, up to C{max_backoff}.
    """

    log: ClassVar[Logger] = Logger()

    name: str
    urls: tuple[str, ...]
    clock: IReactorTime
    base_backoff: float = field(default=_health.DEFAULT_BASE_BACKOFF_SECONDS, kw_only=True)
    max_backoff: float = field(default=_health.DEFAULT_MAX_BACKOFF_SECONDS, kw_only=True)
    _mirrors: list[_Mirror] = field(init=False)

    def __attrs_post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"upstream {self.name}: no mirror")
        self._mirrors = [_Mirror(url) for url in self.urls]

    def order(self, *, tried: Sequence[str] = ()) -> list[str]:
        """
        The base URLs to ask now, best first, leaving out C{tried}: those up, and those down
        whose backoff has run out, in their listed order. When every mirror is down and
        backed off, all of them in order (the upstream's own health has let this request
        through as its probe).
        """
        now = self.clock.seconds()
        usable = [
            m.url for m in self._mirrors
            if m.url not in tried and (m.down_since is None or now >= m.retry_at)
        ]
        if usable or tried:
            return usable
        return [m.url for m in self._mirrors]

    def current(self) -> str:
        """The base URL a request would be sent to now."""
        return (self.order() or [self.urls[0]])[0]

    def all_down(self) -> bool:
        return all(m.down_since is not None for m in self._mirrors)

    def failed(self, url: str, reason: str) -> None:
        """The mirror at C{url} failed (C{reason}, one phrase): down, or down for longer."""
        mirror = self._find(url)
        if mirror is None:
            return
        now = self.clock.seconds()
        if mirror.down_since is None:
            mirror.down_since = now
            mirror.failures = 0
        else:
            mirror.failures += 1
        mirror.reason = reason
        delay = min(self.base_backoff * 2.0 ** min(mirror.failures, 64), self.max_backoff)
        mirror.retry_at = now + delay
        others = [m.url for m in self._mirrors if m is not mirror and m.down_since is None]
        if mirror.failures == 0:
            self.log.warn(
                "mirror {url} of upstream {upstream} failed ({reason}): marked down, tried again "
                "in {delay:g} s; {instead}", url=url, upstream=self.name, reason=reason,
                delay=delay, instead=f"asking {others[0]} instead" if others else "no mirror is up",
            )
        else:
            self.log.debug(
                "mirror {url} of upstream {upstream} still failing ({reason}); next try in "
                "{delay:g} s", url=url, upstream=self.name, reason=reason, delay=delay,
            )

    def answered(self, url: str) -> None:
        """The mirror at C{url} answered (anything but a 5xx): it is up."""
        mirror = self._find(url)
        if mirror is None or mirror.down_since is None:
            return
        seconds = round(self.clock.seconds() - mirror.down_since)
        mirror.down_since = None
        mirror.reason = ""
        mirror.failures = 0
        mirror.retry_at = 0.0
        self.log.info(
            "mirror {url} of upstream {upstream} is answering again after {seconds} s",
            url=url, upstream=self.name, seconds=seconds,
        )

    def states(self) -> tuple[MirrorState, ...]:
        return tuple(
            MirrorState(
                m.url, m.down_since is not None, m.reason, m.down_since,
                m.retry_at if m.down_since is not None else None,
            )
            for m in self._mirrors
        )

    def _find(self, url: str) -> _Mirror | None:
        for mirror in self._mirrors:
            if mirror.url == url:
                return mirror
        return None


def base_of(url: str, bases: Sequence[str]) -> str | None:
    """Which of C{bases} the URL C{url} is under, or None."""
    for base in bases:
        if url.startswith(base + "/"):
            return base
    return None
