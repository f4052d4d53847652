"""
Generated requests to both faces: whatever the path and the headers, no 5xx, no traceback, and
no upstream request for anything the catalogue does not name.

Requests are raw bytes written to an C{HTTPChannel} of a L{Site} over the proxy's resources
(L{FaceHarness}: the simplestreams face, the LXD face and URL import, in front of a scripted
upstream that records every request, on a L{Clock}), so that a path reaches the proxy exactly
as generated: percent-encodings, dot segments and raw bytes are not cleaned up by a client
library on the way. Paths start from the catalogue's own (files, images, aliases) and are cut,
extended, encoded and salted with dot segments, separators, NUL, overlong UTF-8 and other text.

No upstream fault is injected, so a 502, 503 or 504 would be the proxy's own failure too. The
examples are derandomized and bounded (the profile of C{tests/conftest.py}): the same ones
every run; C{HYPOTHESIS_PROFILE=explore} looks further.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from tests.faults.wire import parse
from tests.helpers.faces import INCUS_UA, LXD_UA, FaceHarness, face_tree
from tests.helpers.invariants import assert_only_catalogue
from tests.helpers.logs import Logged

# Rounds of the harness's clock and connections for one answer: a miss is a few dozen.
ANSWER_ROUNDS = 300

FILES, IMAGES = face_tree()
FINGERPRINTS = [image.fingerprint for image in IMAGES]
KNOWN_PATHS = (
    ["/", "/up", "/up/", "/1.0", "/1.0/", "/1.0/images", "/1.0/images?recursion=1",
     "/1.0/images/aliases", "/1.0/images/aliases?recursion=1", "/import/up/testos/2.0",
     "/import/up/uni/1.0", "/nope/streams/v1/index.json"]
    + [f"/up/{path}" for path in FILES]
    + [f"/1.0/images/{fp}" for fp in FINGERPRINTS]
    + [f"/1.0/images/{fp[:12]}/export" for fp in FINGERPRINTS]
    + ["/1.0/images/aliases/testos/2.0", "/1.0/images/aliases/testos%2F2.0/vm"]
)
# Pieces that a path may be salted with, as they would appear on the wire.
SALT = [
    "/./", "/../", "//", "/%2e%2e/", "/%2E%2e/", "%2f", "%2F..%2F", "/%252e%252e/", "%25",
    "\\..\\", "%5c", "%00", "%c0%ae%c0%ae/", "%c0%af", "%e0%80%ae", "%ff", "?", "?recursion=1",
    "?project=other", "#frag", ";", "%3A", ":", "~", "..", ".",
]
# Bytes that cannot stand in a request line as they are.
UNSAFE_IN_PATH = " \r\n\t"

text = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FFF, exclude_characters="\r\n"), max_size=12)


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    path = draw(st.sampled_from(KNOWN_PATHS))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(path)))
        change = draw(st.sampled_from(["cut", "salt", "text", "encode"]))
        if change == "cut":
            path = path[:at]
        elif change == "salt":
            path = path[:at] + draw(st.sampled_from(SALT)) + path[at:]
        elif change == "text":
            path = path[:at] + draw(text) + path[at:]
        elif at < len(path):
            path = path[:at] + quote(path[at], safe="") + path[at + 1:]
    # What a client cannot send as it is goes percent-encoded; everything else goes raw,
    # non-ASCII text as UTF-8.
    wire = "".join(quote(c, safe="") if c in UNSAFE_IN_PATH else c for c in path)
    return wire.encode("utf-8", "surrogatepass")


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
HEADERS = {
    b"Range": st.one_of(
        st.sampled_from(["bytes=0-10", "bytes=-5", "bytes=5-", "bytes=0-0,5-9", "bytes=9-1",
                         "bytes=0-99999999999", "items=0-1", "bytes="]),
        header_text,
    ),
    b"If-None-Match": st.one_of(
        st.sampled_from(["*", '"x"', 'W/"x"'] + [f'"{fp}"' for fp in FINGERPRINTS[:3]]),
        header_text,
    ),
    b"If-Modified-Since": st.one_of(
        st.sampled_from(["Mon, 01 Jan 2024 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 GMT",
                         "Fri, 31 Dec 9999 23:59:59 GMT", "yesterday"]),
        header_text,
    ),
    b"If-Range": header_text,
    b"User-Agent": st.one_of(
        st.sampled_from([LXD_UA, INCUS_UA]).flatmap(
            lambda ua: st.sampled_from(["x86_64", "aarch64", "riscv64", "", "(;"]).map(
                lambda arch: ua.format(arch=arch)
            )
        ),
        header_text,
    ),
    b"Accept": st.one_of(st.sampled_from(["*/*", "application/json", "text/html"]), header_text),
    b"Accept-Encoding": st.sampled_from(["gzip", "identity", "br;q=0"]),
}


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET"] * 6 + [b"HEAD"] * 2 + [b"POST", b"OPTIONS", b"DELETE"]))
    names = draw(st.lists(st.sampled_from(sorted(HEADERS)), unique=True, max_size=4))
    head = [method + b" " + draw(paths()) + b" HTTP/1.1", b"Host: proxy.test:8443"]
    head += [name + b": " + draw(HEADERS[name]).encode("latin-1") for name in names]
    head += [b"Connection: close", b"", b""]
    return b"\r\n".join(head)


def answer(h: FaceHarness, site: Site, raw: bytes) -> bytes:
    """Everything the proxy writes back to one connection carrying C{raw}, until it closes it."""
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
    )
    channel = site.buildProtocol(transport.getPeer())
    assert channel is not None
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    for _ in range(ANSWER_ROUNDS):
        if transport.disconnecting:
            break
        h.settle(1)
    assert transport.disconnecting, (raw, transport.value()[:300])
    channel.connectionLost(Failure(ConnectionDone()))
    return transport.value()


def test_generated_requests_to_both_faces(tmp_path: Path, logged: Logged) -> None:
    h = FaceHarness(tmp_path)
    site = Site(h.root_resource)
    site.displayTracebacks = False
    try:
        examples: list[Any] = []

        # One harness for every example: the cache it fills is part of what is tested.
        @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(raw=requests())
        def check(raw: bytes) -> None:
            before = len(logged)
            got = parse(answer(h, site, raw), head=raw.startswith(b"HEAD "))
            examples.append(raw)
            assert got.responses, raw
            code = got.codes[0]
            assert code < 500, (raw, got.responses[0])
            failures = [e.get("log_format") for e in logged[before:] if "log_failure" in e]
            assert failures == [], (raw, failures)
            assert_only_catalogue((path for _, path, _ in h.upstream.requests), FILES)

        check()
        assert len(examples) >= settings().max_examples // 2
    finally:
        h.close()
