"""
Small metadata bodies answered from memory (L{proxy.metadata_memory}): the same answer as the
streaming path, byte for byte and header for header, for GET, HEAD, 304 and ranges; bodies
over the bound stream; the LRU's bound; a replaced catalogue served at once.

Two faces over one cache: C{fast} answers from a L{MetadataMemory}, C{streamed} from one whose
bound is 0 (so every body takes the blob and producer path, as before).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import attrs
import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, execute

from proxy.config import UpstreamConfig
from proxy.downloads import Fetcher
from proxy.files import CacheFiles
from proxy.metadata import UpstreamMetadata
from proxy.metadata_memory import MetadataMemory, load_small
from proxy.metadata_store import MetadataStore
from proxy.simplestreams import RootResource, UpstreamResource
from tests.helpers.harness import CacheHarness, Closing
from tests.helpers.scripted import BASE_URL, ScriptedUpstream, sha, simple_tree

T = TypeVar("T")
TTL = 300.0
INDEX = "streams/v1/index.json"
IMAGES = "streams/v1/images.json"


class Harness(CacheHarness):
    def __init__(self, tmp_path: Any) -> None:
        self.files = simple_tree()
        self.upstream = ScriptedUpstream(self.files)
        super().__init__(tmp_path, self.upstream, BASE_URL)
        fetcher = Fetcher(
            self.client, self.store, self.index, self.clock, [UpstreamConfig("up", BASE_URL)], 60.0
        )
        self.metadata = UpstreamMetadata(
            "up", BASE_URL, self.client, self.store, self.index, self.clock, ttl=TTL, idle_timeout=60.0
        )
        cache_files = CacheFiles(self.store, self.index, fetcher, self.clock)
        self.memory = MetadataMemory()
        # Every blocking read the memory path asks for, by function.
        self.disk_calls: list[Callable[..., Any]] = []

        def disk(fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
            self.disk_calls.append(fn)
            return execute(fn, *args, **kwargs)

        fast = UpstreamResource(
            self.metadata, cache_files, self.store, self.clock, disk=disk, memory=self.memory
        )
        streamed = UpstreamResource(
            self.metadata, cache_files, self.store, self.clock, memory=MetadataMemory(max_body=0)
        )
        self.proxy = StubTreq(RootResource({"up": fast, "streamed": streamed}, "banner\n"))

    def answer(self, name: str, path: str, method: str = "GET", **headers: str) -> tuple[int, bytes, dict[bytes, list[bytes]]]:
        async def go() -> tuple[int, bytes, dict[bytes, list[bytes]]]:
            response = await self.proxy.request(
                method, f"https://proxy.test/{name}/{path}", unbuffered=True,
                headers={k.replace("_", "-"): [v] for k, v in headers.items()},
            )
            body = await treq.content(response)
            raw = {k.lower(): v for k, v in response.headers.getAllRawHeaders() if k.lower() != b"date"}
            return response.code, body, raw

        result: tuple[int, bytes, dict[bytes, list[bytes]]] = self.run(Deferred.fromCoroutine(go()))
        return result


@pytest.fixture
def h(tmp_path: Any, closing: Closing) -> Harness:
    harness = closing(Harness(tmp_path))
    # Fetched once (through the face without memory), so that both faces answer the same
    # stored copy and the memory is still empty.
    assert harness.answer("streamed", IMAGES)[0] == 200
    assert len(harness.memory) == 0
    return harness


@pytest.mark.parametrize(
    "method, headers",
    [
        ("GET", {}),
        ("HEAD", {}),
        ("GET", {"Range": "bytes=5-20"}),
        ("GET", {"Range": "bytes=-7"}),
        ("GET", {"Range": "bytes=5-20,30-40"}),
        ("GET", {"Range": "bytes=999999-"}),
        ("GET", {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}),
        ("GET", {"If-Modified-Since": "Fri, 01 Jan 1971 00:00:00 GMT"}),
    ],
)
@pytest.mark.parametrize("path", [INDEX, IMAGES])
def test_memory_answer_is_the_streamed_answer(
    h: Harness, path: str, method: str, headers: dict[str, str]
) -> None:
    streamed = h.answer("streamed", path, method, **headers)
    fast = h.answer("up", path, method, **headers)
    assert fast == streamed
    assert h.memory.get(sha(h.files[path])) == h.files[path]


def test_memory_answer_has_the_validators(h: Harness) -> None:
    code, body, headers = h.answer("up", IMAGES)
    digest = sha(h.files[IMAGES])
    assert (code, body) == (200, h.files[IMAGES])
    assert headers[b"etag"] == [f'"{digest}"'.encode()]
    assert headers[b"content-type"] == [b"application/json"]
    assert headers[b"accept-ranges"] == [b"bytes"]
    assert b"last-modified" in headers
    code, body, headers = h.answer("up", IMAGES, If_None_Match=f'"{digest}"')
    assert (code, body) == (304, b"")
    code, body, headers = h.answer("up", IMAGES, Range="bytes=0-9")
    assert (code, body) == (206, h.files[IMAGES][:10])
    assert headers[b"content-range"] == [b"bytes 0-9/%d" % len(h.files[IMAGES])]
    code, body, headers = h.answer("up", IMAGES, "HEAD")
    assert (code, body) == (200, b"")


def test_a_body_is_read_once_on_the_disk_worker(h: Harness) -> None:
    for _ in range(3):
        assert h.answer("up", IMAGES)[1] == h.files[IMAGES]
    assert h.disk_calls.count(load_small) == 1


def test_a_body_over_the_bound_streams(h: Harness) -> None:
    h.memory.max_body = 16
    for _ in range(2):
        streamed = h.answer("streamed", IMAGES)
        assert h.answer("up", IMAGES) == streamed
        assert streamed[1] == h.files[IMAGES]
    digest = sha(h.files[IMAGES])
    assert h.memory.get(digest) is None
    assert h.memory.too_big(digest)
    # Known to be too big: not read again.
    assert h.disk_calls.count(load_small) == 1


def test_a_replaced_catalogue_is_served_at_once(h: Harness) -> None:
    old = h.files[IMAGES]
    assert h.answer("up", IMAGES)[1] == old
    new = old.replace(b'"release_title": "1.0"', b'"release_title": "1.x"')
    assert new != old
    h.files[IMAGES] = new
    h.clock.advance(TTL + 1)
    # The expired copy, then its refresh in the background.
    assert h.answer("up", IMAGES)[1] == old
    h.settle()
    code, body, headers = h.answer("up", IMAGES)
    assert (code, body) == (200, new)
    assert headers[b"etag"] == [f'"{sha(new)}"'.encode()]
    assert h.memory.get(sha(new)) == new


def test_the_lru_keeps_its_bound() -> None:
    memory = MetadataMemory(max_body=10, max_total=25)
    memory.put("a", b"a" * 10)
    memory.put("b", b"b" * 10)
    assert memory.get("a") == b"a" * 10  # now the most recently used
    memory.put("c", b"c" * 10)
    assert memory.total == 20
    assert (memory.get("a"), memory.get("b"), memory.get("c")) == (b"a" * 10, None, b"c" * 10)
    memory.put("big", b"x" * 11)
    assert memory.get("big") is None and memory.too_big("big")
    memory.put("unread", None)
    assert memory.too_big("unread")
    assert len(memory) == 2


def test_stored_records_follow_every_index_write(h: Harness) -> None:
    bodies = MetadataStore(h.store, h.index)
    first = bodies.stored("up", IMAGES)
    assert first is not None
    assert bodies.stored("up", IMAGES) is first
    h.index.put_metadata(attrs.evolve(first, checked_at=first.checked_at + 1))
    second = bodies.stored("up", IMAGES)
    assert second is not None and second.checked_at == first.checked_at + 1
    h.index.remove_metadata("up", IMAGES)
    assert bodies.stored("up", IMAGES) is None
