"""
The access log: one event per request with face, cache outcome, status, bytes, duration and
client, in place of Twisted's combined-log line; and how it reads in the text and JSON logs.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from attrs import define
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.access_log import ACCESS_FORMAT, TEXT_FORMAT, AccessNote, log_access
from proxy.channel import HeadLimits, ProxyChannel, ProxySite
from proxy.logs import json_observer
from proxy.simplestreams import RootResource
from tests.helpers.certs import make_ca
from tests.helpers.logs import Logged
from tests.helpers.proxy_process import https_client
from tests.helpers.running_proxy import start_proxy
from tests.helpers.tree import build_tree
from tests.helpers.upstream import start_https_upstream

reactor: Any = _reactor
PEER = IPv4Address("TCP", "192.0.2.7", 40000)
# A timestamp as twistd's text observer writes one, and as Twisted's combined log line does.
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
CLF_TIME = re.compile(r"\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d")


class Held(Resource):
    """Answers C{/NAME/held} only when the test says so, anything else at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        if request.path.endswith(b"/held"):
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"twelve bytes"


class Conn:
    """One plain connection to a L{ProxySite} over the proxy's root, with C{images} and C{1.0}."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.held = Held()
        root = RootResource({"images": self.held}, "banner\n", {"1.0": Held()})
        self.site = ProxySite(root, HeadLimits(), self.clock)
        self.channel = cast(ProxyChannel, self.site.buildProtocol(PEER))
        self.transport = StringTransport(peerAddress=PEER)
        self.channel.makeConnection(self.transport)

    def get(self, path: bytes, method: bytes = b"GET", agent: bytes = b"LXD 5.21") -> None:
        self.channel.dataReceived(
            method + b" " + path + b" HTTP/1.1\r\nHost: proxy\r\nUser-Agent: " + agent + b"\r\n\r\n"
        )


def access_events(logged: Logged) -> list[LogEvent]:
    return [e for e in logged if e.get("log_namespace") == "proxy.access"]


def test_one_event_per_request_with_its_fields(logged: Logged) -> None:
    conn = Conn()
    conn.get(b"/images/streams/v1/index.json")
    [event] = access_events(logged)
    assert {k: event[k] for k in (
        "client", "method", "path", "status", "bytes", "duration", "face", "cache", "end",
        "user_agent",
    )} == {
        "client": "192.0.2.7", "method": "GET", "path": "/images/streams/v1/index.json",
        "status": 200, "bytes": 12, "duration": 0.0, "face": "images", "cache": "-",
        "end": "done", "user_agent": "LXD 5.21",
    }
    assert event["log_format"] == TEXT_FORMAT
    # The line is ACCESS_FORMAT with the event's fields, whoever formats it.
    assert formatEvent(event) == event["text"] == ACCESS_FORMAT.format(**event)
    assert event["text"] == '192.0.2.7 "GET /images/streams/v1/index.json" 200 12 bytes 0.000s face=images cache=- via=plain done'


def test_the_combined_log_line_is_gone(logged: Logged) -> None:
    conn = Conn()
    conn.get(b"/")
    texts = logged.texts()
    assert len(access_events(logged)) == 1
    # Twisted's Site would log '"GET / HTTP/1.1" 200 ...' with a date of its own.
    assert not [t for t in texts if CLF_TIME.search(t) or "HTTP/1.1" in t]


@pytest.mark.parametrize(("path", "face"), [
    (b"/", "root"), (b"/images/x", "images"), (b"/1.0/images", "lxd"), (b"/nowhere/x", "-"),
])
def test_the_face_is_named(logged: Logged, path: bytes, face: str) -> None:
    Conn().get(path)
    [event] = access_events(logged)
    assert event["face"] == face


def test_duration_counts_from_the_request_to_the_end_of_its_response(logged: Logged) -> None:
    conn = Conn()
    conn.get(b"/images/held")
    assert access_events(logged) == []
    conn.clock.advance(2.5)
    [request] = conn.held.waiting
    request.write(b"abc")
    request.finish()
    [event] = access_events(logged)
    assert (event["status"], event["bytes"], event["duration"], event["end"]) == (200, 3, 2.5, "done")


def test_a_response_cut_short_is_logged_once_as_aborted(logged: Logged) -> None:
    conn = Conn()
    conn.get(b"/images/held")
    conn.get(b"/images/held")  # pipelined: queued behind the first
    conn.clock.advance(1)
    first = conn.held.waiting[0]
    first.write(b"partial")
    conn.channel.connectionLost(Failure(ConnectionError("reset")))
    [event] = access_events(logged)
    # Only the request being answered had started; the queued one never got a response.
    assert (event["status"], event["bytes"], event["duration"], event["end"]) == (200, 7, 1.0, "aborted")


def test_a_client_gone_before_any_header_has_no_status(logged: Logged) -> None:
    conn = Conn()
    conn.get(b"/images/held")
    conn.channel.connectionLost(Failure(ConnectionError("reset")))
    [event] = access_events(logged)
    assert (event["status"], event["bytes"], event["end"]) == (0, 0, "aborted")


def test_a_refused_request_target_is_logged(logged: Logged) -> None:
    conn = Conn()
    conn.get(b"example.org:443", method=b"CONNECT")
    [event] = access_events(logged)
    assert (event["method"], event["status"], event["face"]) == ("CONNECT", 405, "-")


def test_bytes_a_client_sends_are_escaped(logged: Logged) -> None:
    conn = Conn()
    conn.get(b"/", agent=b"LXD\xff\x1b[2J")
    [event] = access_events(logged)
    assert event["user_agent"] == "LXD\\xff\\x1b[2J"


@define
class _Finished:
    """What L{log_access} reads of a request, for a request made outside any connection."""

    method: bytes = b"GET"
    uri: bytes = b"/images/f"
    code: int = 200
    sentLength: int = 5
    startedWriting: int = 1

    def getClientAddress(self) -> IPv4Address:
        return PEER

    def getHeader(self, name: bytes) -> bytes | None:
        return None


def _access_event() -> LogEvent:
    note = AccessNote(face="images", cache="hit", via="tls", started=10.0)
    request = cast(IRequest, _Finished())
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        log_access(request, note, 10.25, complete=True)
        # Once only, whatever calls it again.
        log_access(request, note, 11.0, complete=False)
    finally:
        globalLogPublisher.removeObserver(observer)
    [event] = [e for e in events if e.get("log_namespace") == "proxy.access"]
    return event


def test_text_line_has_one_timestamp() -> None:
    event = _access_event()
    out = io.StringIO()
    textFileLogObserver(out)(event)
    line = out.getvalue()
    assert line.count("\n") == 1
    assert len(ISO_TIME.findall(line)) == 1 and not CLF_TIME.search(line)
    assert line.rstrip("\n").endswith(
        '[proxy.access#info] 192.0.2.7 "GET /images/f" 200 5 bytes 0.250s face=images cache=hit via=tls done'
    )
    assert (formatEventAsClassicLogText(event) or "").count("proxy.access") == 1


def test_json_line_carries_the_fields() -> None:
    event = _access_event()
    out = io.StringIO()
    json_observer(out)(event)
    line = out.getvalue()
    # JSON Lines: one object per line, no record separator in front.
    assert line.endswith("\n") and line.count("\n") == 1 and line[0] == "{"
    parsed = json.loads(line)
    assert {k: parsed[k] for k in ("face", "cache", "via", "status", "bytes", "duration", "client")} == {
        "face": "images", "cache": "hit", "via": "tls", "status": 200, "bytes": 5, "duration": 0.25,
        "client": "192.0.2.7",
    }
    assert parsed["log_namespace"] == "proxy.access"
    assert parsed["log_level"]["name"] == "info"
    assert parsed["text"] == '192.0.2.7 "GET /images/f" 200 5 bytes 0.250s face=images cache=hit via=tls done'
    assert isinstance(parsed["log_time"], float)


# -- hit, miss and joined, through a real proxy -------------------------------------------------


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_miss_joined_and_hit_on_a_real_proxy(tmp_path: Path, logged: Logged) -> None:
    tree = build_tree(tmp_path / "tree")
    image = tree.image("testos/1.0")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = await start_proxy(reactor, tmp_path / "state", {"up": (upstream.url, ca.cert_pem)})
    client = https_client(proxy.cert_pem)
    url = f"{proxy.url('up')}/{image.meta.path}"
    try:
        upstream.resource.stall(image.meta.path, 10)
        first = await client.get(url, unbuffered=True).addTimeout(30, reactor)
        second = await client.get(url, unbuffered=True).addTimeout(30, reactor)
        upstream.resource.release(image.meta.path)
        for response in (first, second):
            body = await treq.content(response).addTimeout(30, reactor)
            assert hashlib.sha256(body).hexdigest() == image.meta.sha256
        third = await client.get(url).addTimeout(30, reactor)
        await treq.content(third)
        files = [e for e in access_events(logged) if e["path"].endswith(image.meta.path)]
        # The two followers of one download end in either order; the hit comes after both.
        assert sorted(e["cache"] for e in files[:2]) == ["joined", "miss"]
        assert files[2]["cache"] == "hit"
        assert [(e["face"], e["status"], e["bytes"], e["end"]) for e in files] == [
            ("up", 200, image.meta.size, "done")
        ] * 3
        assert {e["client"] for e in files} == {"127.0.0.1"}
        # No connection to the upstream was announced (Twisted's pool logs each at info; the
        # test's own client, a plain pool, still does).
        announced = logged.matching("Starting factory") + logged.matching("Stopping factory")
        clients = [e for e in announced if "ClientFactory" in e.get("log_namespace", "")]
        assert clients != []
        assert [e["log_namespace"] for e in clients if e["log_namespace"].startswith("proxy.")] == []
        assert proxy.cache.client._pool._factory.noisy is False
    finally:
        await proxy.stop()
        await upstream.stop()
