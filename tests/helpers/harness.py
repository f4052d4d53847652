"""The one test harness base: a L{Clock} and in-memory connections driven in bounded loops.

L{Pump} is the driving alone (STYLE 3.5, tier 2): C{settle} advances the clock by zero and
flushes every in-memory connection (a C{RequestTraversalAgent} to an upstream, a C{StubTreq}
over the proxy's resource tree), a bounded number of rounds; C{run} does that one round at a
time until a Deferred has a result (recorded with C{addBoth}, never by polling C{.called}), and
fails if it has none within its bound.

L{CacheHarness} adds what every wired harness builds the same way: the blob store and the
index on C{tmp_path} under that clock, an upstream reached through the proxy's own
L{UpstreamClient} over C{RequestTraversalAgent}, and the C{StubTreq} client its subclass sets
as C{proxy}.

L{SiteClient} is a C{StubTreq} over one resource with the resource's clock. L{Closing} closes
at the end of a test what the test built (the C{closing} fixture of C{tests/conftest.py}).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

import treq
from attrs import define, field
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource

from proxy.blobs import BlobStore
from proxy.index import CacheIndex
from proxy.upstream import UpstreamClient, origin_of

T = TypeVar("T")

IDLE = 60.0


class Flushable(Protocol):
    """An in-memory connection that moves its pending bytes when flushed."""

    def flush(self) -> None: ...


def collect(d: "Deferred[Any]") -> list[Any]:
    """A list that gets C{d}'s result (or Failure) once it has one."""
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def outcome(results: list[Any]) -> Any:
    """The result L{collect} got, or its Failure raised."""
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class Closing:
    """What a test built that must be closed when it ends (the C{closing} fixture)."""

    def __init__(self) -> None:
        self._made: list[Closable] = []

    def __call__(self, thing: C) -> C:
        """Keep C{thing} to close at the end, and hand it back."""
        self._made.append(thing)
        return thing

    def __len__(self) -> int:
        return len(self._made)

    def close(self) -> None:
        for thing in self._made:
            thing.close()


class Pump:
    """A L{Clock} and the connections of L{connections}, driven in bounded loops."""

    # Default bounds, in rounds; a subclass may set its own (still bounded).
    settle_rounds = 200
    run_rounds = 500

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock if clock is not None else Clock()

    def connections(self) -> Iterable[Flushable]:
        """What each round flushes, in order, after advancing the clock by zero."""
        return ()

    def settle(self, rounds: int | None = None) -> None:
        """Drive the clock and the connections for a while, when there is nothing to wait for."""
        for _ in range(self.settle_rounds if rounds is None else rounds):
            self.clock.advance(0)
            for connection in self.connections():
                connection.flush()

    def run(self, d: "Deferred[T]", rounds: int | None = None) -> T:
        """Drive one round at a time until C{d} has a result; return it or raise its failure."""
        bound = self.run_rounds if rounds is None else rounds
        results = collect(d)
        for _ in range(bound):
            if results:
                break
            self.settle(1)
        assert results, f"no result after {bound} rounds"
        result: T = outcome(results)
        return result


class CacheHarness(Pump):
    """
    The cache on C{tmp_path} (L{BlobStore}, L{CacheIndex} in C{index/}) under a L{Clock},
    the resource C{upstream} at C{origin} reached through C{client} (the proxy's
    L{UpstreamClient} over C{RequestTraversalAgent}), and C{proxy}: the C{StubTreq} over the
    proxy's resource tree that the subclass builds, or C{None} when a test needs none.

    @param start: seconds the clock is advanced to before anything is built.
    """

    # The proxy's path for the upstream: requests go to C{/UPSTREAM/PATH}.
    upstream_name = "up"

    def __init__(
        self, tmp_path: Any, upstream: Resource, origin: str, *, start: float = 0.0,
        header_timeout: float = IDLE,
    ) -> None:
        super().__init__()
        if start:
            self.clock.advance(start)
        self.upstream_agent = RequestTraversalAgent(upstream)
        self.client = UpstreamClient(
            self.clock, self.upstream_agent, [origin_of(origin)], header_timeout=header_timeout
        )
        self.root = FilePath(str(tmp_path))
        self.store = BlobStore(self.root)
        self.index = CacheIndex(self.root.child("index").path, self.clock)
        # StubTreq grows its client methods at run time: typed as Any.
        self.proxy: Any = None

    def connections(self) -> Iterable[Flushable]:
        if self.proxy is None:
            return (self.upstream_agent,)
        return (self.upstream_agent, self.proxy)

    def get(self, path: str, **kwargs: Any) -> "Deferred[Any]":
        """GET C{/UPSTREAM/PATH} through C{proxy}: the response, its body not read."""
        return self.proxy.get(f"https://proxy.test/{self.upstream_name}/{path}", unbuffered=True, **kwargs)

    def fetch(self, path: str, **kwargs: Any) -> tuple[int, bytes, Any]:
        """GET C{/UPSTREAM/PATH} through C{proxy}: status, whole body, and the response."""

        async def go() -> tuple[int, bytes, Any]:
            response = await self.get(path, **kwargs)
            body = await treq.content(response)
            return response.code, body, response

        result: tuple[int, bytes, Any] = self.run(Deferred.fromCoroutine(go()))
        return result

    def temp_files(self) -> list[str]:
        return [c.basename() for c in self.store.temp_dir.children()]

    def close(self) -> None:
        self.index.close()


class SiteClient(Pump):
    """A C{StubTreq} over C{resource}, driven with the resource's clock."""

    # One connection and no upstream: a few rounds are plenty.
    settle_rounds = 10
    run_rounds = 50

    def __init__(self, resource: Resource, clock: Clock | None = None) -> None:
        super().__init__(clock)
        # StubTreq grows its client methods at run time: typed as Any.
        self.stub: Any = StubTreq(resource)

    def connections(self) -> Iterable[Flushable]:
        return (self.stub,)

    def request(self, method: str, url: str, headers: dict[str, str] | None = None) -> IResponse:
        """The response to one request, its body not read yet (C{unbuffered})."""
        response: IResponse = self.run(self.stub.request(method, url, headers=headers, unbuffered=True))
        return response

    def body(self, response: IResponse) -> bytes:
        """The whole body of C{response}."""
        data: bytes = self.run(treq.content(response))
        return data


@define
class Streamed:
    """A body collected as it arrives: C{treq.collect(response, streamed.chunks.append)}."""

    chunks: list[bytes] = field(factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)
