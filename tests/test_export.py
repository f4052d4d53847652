"""
Tests for L{proxy.export}: image exports as LXD answers them.

Most tests look at the wire: a real L{Site} and C{HTTPChannel} over a
L{StringTransport} (or a transport that pauses like a TLS one), so that the
exact bytes, chunked or not, an abort (C{transport.disconnected}) and the
channel's own pause, resume and stop calls are all visible.  The multipart
framing is checked against a byte string written out by hand from Go's
C{mime/multipart} writer (C{CreatePart}, C{CreateFormFile}, C{Close}) and
read back with a multipart parser of its own, Python's C{email} package.
A few tests go through L{StubTreq}, a real HTTP client.  Time is a L{Clock}
for the producers; every loop is bounded.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, cast

import pytest
import treq
from attrs import define, frozen
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.client import ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from proxy.blobs import BlobStore
from proxy.catalogue import Image, Item
from proxy.errors import UpstreamFailed
from proxy.export import (
    EXTENSIONS,
    ExportPart,
    check_boundary,
    export_parts,
    extension,
    serve_export,
)
from proxy.fetch import Download
from proxy.streaming import (
    CHUNK_SIZE_BYTES,
    CompleteFile,
    FileSource,
    FileTruncated,
    ProducerStopped,
)
from proxy.web import AsyncResource
from tests.helpers.harness import SiteClient, Streamed
from tests.helpers.sources import FakeSource


FP = hashlib.sha256(b"an image").hexdigest()
BOUNDARY = b"3d6b6a416f9d5b7a8c2e"
# Bytes that would confuse a sloppy framer: CRLFs, a fake boundary, a lone CR.
META = b"meta\r\n--" + BOUNDARY + b"x\r\n\r" + os.urandom(3000) + b"\r\n"
ROOT = os.urandom(3 * CHUNK_SIZE_BYTES + 17)


def item(ftype: str, content: bytes) -> Item:
    return Item(
        path=f"images/ubuntu/noble/amd64/default/20240101_00:00/{ftype}",
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
        ftype=ftype,
        product="ubuntu:noble:amd64:default",
        version="20240101_00:00",
    )


def image(root_ftype: str | None = "squashfs", meta_ftype: str = "lxd.tar.xz") -> Image:
    return Image(
        fingerprint=FP,
        type="virtual-machine" if root_ftype in ("disk-kvm.img", "disk1.img", "uefi1.img")
        else "container",
        arch="amd64",
        product="ubuntu:noble:amd64:default",
        version="20240101_00:00",
        aliases=("ubuntu/noble",),
        meta=item(meta_ftype, META),
        root=item(root_ftype, ROOT) if root_ftype is not None else None,
    )


def form(boundary: bytes, meta: bytes, root: bytes) -> bytes:
    """A split export exactly as LXD's Go writer frames it, written out by hand."""
    fp = FP.encode("ascii")
    return (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="metadata"; filename="meta-' + fp + b'.tar.xz"\r\n'
        b"Content-Type: application/octet-stream\r\n"
        b"\r\n"
        + meta
        + b"\r\n--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="rootfs"; filename="' + fp + b'.squashfs"\r\n'
        b"Content-Type: application/octet-stream\r\n"
        b"\r\n"
        + root
        + b"\r\n--" + boundary + b"--\r\n"
    )


def parse_form(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    """Read a multipart body with Python's own parser: (name, filename, bytes) per part."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/form-data"
    assert message.defects == [], "a complete form, closing boundary included"
    parts = []
    for part in message.iter_parts():
        assert part.get_content_type() == "application/octet-stream"
        assert part.get_content_disposition() == "form-data"
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append(
            (
                str(part.get_param("name", header="content-disposition")),
                str(part.get_filename()),
                payload,
            )
        )
    return parts


def blob(tmp_path: object, name: str, content: bytes) -> CompleteFile:
    path = FilePath(str(tmp_path)).child(name)
    path.setContent(content)
    return CompleteFile(path, len(content))


# -- the wire --------------------------------------------------------------------------------


class ExportResource(AsyncResource):
    """Serves the parts C{make_parts} builds for each request; records how each ended."""

    isLeaf = True

    def __init__(
        self,
        make_parts: Callable[[], Sequence[ExportPart]],
        clock: Clock,
        boundary: bytes | None = BOUNDARY,
    ) -> None:
        super().__init__()
        self.make_parts = make_parts
        self.clock = clock
        self.boundary = boundary
        self.outcomes: list[BaseException | None] = []
        self.requests: list[Request] = []

    async def handle(self, request: Request) -> None:
        self.requests.append(request)
        try:
            await serve_export(
                request, self.make_parts(), clock=self.clock, boundary=self.boundary
            )
        except BaseException as error:
            self.outcomes.append(error)
            raise
        self.outcomes.append(None)


@frozen
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    # Chunked: the last chunk arrived.  Otherwise: as many bytes as Content-Length says.
    complete: bool


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body of a chunked response so far, and whether its last chunk has arrived."""
    chunks: list[bytes] = []
    while data:
        size_line, crlf, rest = data.partition(b"\r\n")
        if not crlf:
            break
        size = int(size_line, 16)
        if size == 0:
            return b"".join(chunks), rest == b"\r\n"
        chunks.append(rest[:size])
        if len(rest) < size + 2:
            break
        assert rest[size : size + 2] == b"\r\n"
        data = rest[size + 2 :]
    return b"".join(chunks), False


def parse_response(raw: bytes) -> Response:
    head, blank, rest = raw.partition(b"\r\n\r\n")
    assert blank, f"no complete head in {raw[:200]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body, complete = dechunk(rest)
    else:
        body = rest
        complete = "content-length" in headers and len(body) == int(headers["content-length"])
    return Response(int(status_line.split()[1]), headers, body, complete)


class OncePausingTransport(StringTransport):
    """
    Pauses its producer once, on the first write for which C{full} says so, and not again
    until resumed by hand: as a TLS transport does (its producer membrane ignores further
    writes while paused).
    """

    def __init__(self, full: Callable[[bytes], bool]) -> None:
        super().__init__()
        self.full = full
        self.is_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.is_paused and self.full(data):
            self.is_paused = True
            assert self.producer is not None
            self.producer.pauseProducing()

    def resume(self) -> None:
        self.is_paused = False
        assert self.producer is not None
        self.producer.resumeProducing()


@define
class Wire:
    """One client connection to a L{Site} serving an L{ExportResource}."""

    clock: Clock
    resource: ExportResource
    transport: StringTransport
    # The site's protocol: an HTTPChannel behind a wrapper that passes every attribute on.
    channel: Any

    def send(self, method: bytes = b"GET") -> None:
        path = b"/1.0/images/" + FP.encode() + b"/export"
        self.channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: proxy.test\r\n\r\n")

    def run(self, rounds: int = 20) -> None:
        """Let the producers step (each round runs every zero-delay call due)."""
        for _ in range(rounds):
            self.clock.advance(0)

    def response(self) -> Response:
        return parse_response(self.transport.value())

    def network(self) -> IPushProducer:
        """The channel as its transport sees it: the producer it pauses, resumes and stops."""
        assert self.transport.producer is not None
        return IPushProducer(self.transport.producer)

    def client_gone(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone("client went away")))


def wire(
    make_parts: Callable[[], Sequence[ExportPart]],
    *,
    boundary: bytes | None = BOUNDARY,
    transport: StringTransport | None = None,
) -> Wire:
    clock = Clock()
    resource = ExportResource(make_parts, clock, boundary)
    # The site's own timers (log dates, idle timeouts) run on a clock nobody advances.
    site = Site(resource, reactor=Clock())
    channel = site.buildProtocol(None)
    transport = transport or StringTransport()
    channel.makeConnection(transport)
    return Wire(clock, resource, transport, channel)


def outcome(w: Wire) -> BaseException | None:
    [result] = w.resource.outcomes
    return result


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ftype, ext",
    [
        ("lxd.tar.xz", ".tar.xz"),
        ("incus.tar.xz", ".tar.xz"),
        ("root.tar.xz", ".tar.xz"),
        ("squashfs", ".squashfs"),
        ("disk-kvm.img", ".qcow2"),
        ("disk1.img", ".qcow2"),
        ("uefi1.img", ".qcow2"),
        ("lxd_combined.tar.gz", ".tar.gz"),
        ("incus_combined.tar.gz", ".tar.gz"),
    ],
)
def test_extensions(ftype: str, ext: str) -> None:
    assert EXTENSIONS[ftype] == ext
    assert extension(ftype) == ext


def test_unknown_ftype_has_no_extension() -> None:
    # As LXD, whose magic-byte detection gives "" for a format it does not know.
    assert extension("root.tar.zst.unknown") == ""


def test_parts_of_split_container() -> None:
    meta: Deferred[FileSource] = Deferred()
    root: Deferred[FileSource] = Deferred()
    assert export_parts(image("squashfs"), meta, root) == [
        ExportPart("metadata", f"meta-{FP}.tar.xz", meta),
        ExportPart("rootfs", f"{FP}.squashfs", root),
    ]
    [_, rootxz] = export_parts(image("root.tar.xz"), meta, root)
    assert rootxz.filename == f"{FP}.tar.xz"


@pytest.mark.parametrize("root_ftype", ["disk-kvm.img", "disk1.img", "uefi1.img"])
def test_parts_of_split_vm(root_ftype: str) -> None:
    meta: Deferred[FileSource] = Deferred()
    root: Deferred[FileSource] = Deferred()
    [metadata, rootfs] = export_parts(image(root_ftype, "incus.tar.xz"), meta, root)
    assert metadata == ExportPart("metadata", f"meta-{FP}.tar.xz", meta)
    assert rootfs == ExportPart("rootfs.img", f"{FP}.qcow2", root)


def test_parts_of_unified() -> None:
    meta: Deferred[FileSource] = Deferred()
    [part] = export_parts(image(None, "lxd_combined.tar.gz"), meta, None)
    assert part.filename == f"{FP}.tar.gz"
    assert part.source is meta


def test_parts_must_match_the_image() -> None:
    source: Deferred[FileSource] = Deferred()
    with pytest.raises(ValueError):
        export_parts(image(None, "lxd_combined.tar.gz"), source, source)
    with pytest.raises(ValueError):
        export_parts(image("squashfs"), source, None)


@pytest.mark.parametrize(
    "boundary", [b"", b"x" * 71, b"a\x00b", b"bad\xff", b"trailing ", b"semi;colon", b'q"uote']
)
def test_boundary_go_would_refuse(boundary: bytes) -> None:
    with pytest.raises(ValueError):
        check_boundary(boundary)


@pytest.mark.parametrize("boundary", [b"x", b"x" * 70, b"inner space", b"a'()+_,-./:=?Z9"])
def test_boundary_go_accepts(boundary: bytes) -> None:
    assert check_boundary(boundary) == boundary


def test_no_parts() -> None:
    result = Deferred.fromCoroutine(serve_export(cast(Request, None), [], clock=Clock()))
    failures: list[Failure] = []
    result.addErrback(failures.append)
    [failure] = failures
    assert failure.check(ValueError)


# -- split images -----------------------------------------------------------------------------


def split_parts(tmp_path: object) -> Callable[[], list[ExportPart]]:
    meta = blob(tmp_path, "meta", META)
    root = blob(tmp_path, "root", ROOT)
    return lambda: export_parts(image("squashfs"), meta, root)


def test_split_framing_byte_exact(tmp_path: object) -> None:
    w = wire(split_parts(tmp_path))
    w.send()
    w.run()

    response = w.response()
    assert response.status == 200
    expected = form(BOUNDARY, META, ROOT)
    assert response.body == expected
    assert response.headers["content-type"] == "multipart/form-data; boundary=" + BOUNDARY.decode()
    assert response.headers["content-length"] == str(len(expected))
    assert "transfer-encoding" not in response.headers
    assert response.headers["x-incus-type"] == "incus"
    assert "content-disposition" not in response.headers
    assert parse_form(response.headers["content-type"], response.body) == [
        ("metadata", f"meta-{FP}.tar.xz", META),
        ("rootfs", f"{FP}.squashfs", ROOT),
    ]
    assert outcome(w) is None
    assert not w.transport.disconnected
    assert w.resource.requests[0].finished
    assert w.clock.getDelayedCalls() == []


def test_vm_part_name(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    root = blob(tmp_path, "root", ROOT)
    w = wire(lambda: export_parts(image("disk-kvm.img"), meta, root))
    w.send()
    w.run()
    response = w.response()
    assert parse_form(response.headers["content-type"], response.body) == [
        ("metadata", f"meta-{FP}.tar.xz", META),
        ("rootfs.img", f"{FP}.qcow2", ROOT),
    ]


def test_default_boundary_is_random_like_go(tmp_path: object) -> None:
    w = wire(split_parts(tmp_path), boundary=None)
    w.send()
    w.run()
    w.send()
    w.run()
    raw = w.transport.value()
    first, second = (
        parse_response(b"HTTP/1.1" + response) for response in raw.split(b"HTTP/1.1")[1:]
    )
    boundaries = []
    for response in (first, second):
        match = re.fullmatch(
            r"multipart/form-data; boundary=([0-9a-f]{60})", response.headers["content-type"]
        )
        assert match is not None
        boundaries.append(match.group(1).encode())
        assert response.body == form(boundaries[-1], META, ROOT)
        assert response.headers["content-length"] == str(len(response.body))
    assert boundaries[0] != boundaries[1]


def test_boundary_quoted_as_go_quotes_it(tmp_path: object) -> None:
    boundary = b"a b:c"
    w = wire(split_parts(tmp_path), boundary=boundary)
    w.send()
    w.run()
    response = w.response()
    assert response.headers["content-type"] == 'multipart/form-data; boundary="a b:c"'
    assert response.body == form(boundary, META, ROOT)
    assert [name for name, _, _ in parse_form(response.headers["content-type"], response.body)] == [
        "metadata",
        "rootfs",
    ]


def test_empty_parts(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", b"")
    root = blob(tmp_path, "root", b"")
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    w.run()
    response = w.response()
    assert response.body == form(BOUNDARY, b"", b"")
    assert response.complete


# -- unified images ---------------------------------------------------------------------------


def test_unified(tmp_path: object) -> None:
    unified = blob(tmp_path, "unified", ROOT)
    w = wire(lambda: export_parts(image(None, "incus_combined.tar.gz"), unified, None))
    w.send()
    w.run()
    response = w.response()
    assert response.status == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == f"inline;filename={FP}.tar.gz"
    assert response.headers["content-length"] == str(len(ROOT))
    assert response.headers["x-incus-type"] == "incus"
    assert response.body == ROOT
    assert outcome(w) is None


def test_unified_from_a_deferred_is_chunked(tmp_path: object) -> None:
    unified: Deferred[FileSource] = Deferred()
    w = wire(lambda: export_parts(image(None, "lxd_combined.tar.gz"), unified, None))
    w.send()
    w.run()
    response = w.response()
    assert response.status == 200
    assert response.headers["content-disposition"] == f"inline;filename={FP}.tar.gz"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert response.body == b""

    unified.callback(blob(tmp_path, "unified", ROOT))
    w.run()
    response = w.response()
    assert response.body == ROOT
    assert response.complete


# -- HEAD -------------------------------------------------------------------------------------


def test_head_split_opens_nothing(tmp_path: object) -> None:
    # Files that do not exist: a HEAD must not open (or read) them.
    missing = FilePath(str(tmp_path)).child("missing")
    meta, root = CompleteFile(missing, len(META)), CompleteFile(missing, len(ROOT))
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send(b"HEAD")
    w.run()
    response = w.response()
    assert response.status == 200
    assert response.body == b""
    assert response.headers["content-length"] == str(len(form(BOUNDARY, META, ROOT)))
    assert response.headers["content-type"] == "multipart/form-data; boundary=" + BOUNDARY.decode()
    assert response.headers["x-incus-type"] == "incus"
    assert outcome(w) is None
    assert w.clock.getDelayedCalls() == [], "no producer for HEAD"


def test_head_unified(tmp_path: object) -> None:
    unified = blob(tmp_path, "unified", ROOT)
    w = wire(lambda: export_parts(image(None, "lxd_combined.tar.gz"), unified, None))
    w.send(b"HEAD")
    response = w.response()
    assert response.headers["content-length"] == str(len(ROOT))
    assert response.headers["content-disposition"] == f"inline;filename={FP}.tar.gz"
    assert response.body == b""


def test_head_does_not_wait_for_sources(tmp_path: object) -> None:
    cancelled: list[object] = []
    root: Deferred[FileSource] = Deferred(cancelled.append)
    meta = blob(tmp_path, "meta", META)
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send(b"HEAD")
    response = w.response()
    assert response.status == 200
    assert "content-length" not in response.headers
    assert "transfer-encoding" not in response.headers, "a HEAD has no body to chunk"
    assert response.body == b""
    assert outcome(w) is None
    assert not root.called and cancelled == []
    root.callback(blob(tmp_path, "root", ROOT))
    w.run()
    assert w.response().body == b""


# -- growing sources --------------------------------------------------------------------------


def test_growing_sources(tmp_path: object) -> None:
    meta = FakeSource(FilePath(str(tmp_path)).child("meta"), len(META))
    root = FakeSource(FilePath(str(tmp_path)).child("root"), len(ROOT))
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    expected = form(BOUNDARY, META, ROOT)
    header_length = expected.index(META)
    w.send()
    w.run()

    response = w.response()
    assert response.status == 200, "headers go out before any byte is there"
    assert response.headers["content-length"] == str(len(expected))
    assert response.body == expected[:header_length]

    meta.append(META[:1000])
    w.run()
    assert w.response().body == expected[: header_length + 1000]

    root.append(ROOT[: CHUNK_SIZE_BYTES + 5])
    w.run()
    assert w.response().body == expected[: header_length + 1000], "the root waits its turn"

    meta.append(META[1000:])
    w.run()
    root_start = expected.index(ROOT)
    assert w.response().body == expected[: root_start + CHUNK_SIZE_BYTES + 5]

    root.append(ROOT[CHUNK_SIZE_BYTES + 5 :])
    w.run()
    response = w.response()
    assert response.body == expected
    assert response.complete
    assert outcome(w) is None
    assert meta.waiting == 0 and root.waiting == 0


def test_real_downloads(tmp_path: object) -> None:
    """
    Two L{Download}s fed by hand: each holds back its last byte until it is verified,
    so the export cannot pass a part's end before then.
    """
    store = BlobStore(FilePath(str(tmp_path)))
    img = image("squashfs")
    assert img.root is not None
    meta = Download("images", "https://images.test/meta", img.meta, store.new_partial())
    root = Download("images", "https://images.test/root", img.root, store.new_partial())
    w = wire(lambda: export_parts(img, meta, root))
    expected = form(BOUNDARY, META, ROOT)
    w.send()
    w.run()

    meta.data(META)
    w.run()
    assert w.response().body == expected[: expected.index(META) + len(META) - 1]

    root.data(ROOT)
    w.run()
    assert w.response().body == expected[: expected.index(META) + len(META) - 1]

    meta.succeed(meta.partial.commit(img.meta.sha256))
    w.run()
    assert w.response().body == expected[: expected.index(ROOT) + len(ROOT) - 1]
    assert w.resource.outcomes == []

    root.succeed(root.partial.commit(img.root.sha256))
    w.run()
    response = w.response()
    assert response.body == expected
    assert response.complete
    assert outcome(w) is None


# -- sources known later ----------------------------------------------------------------------


def test_deferred_sources_chunked(tmp_path: object) -> None:
    meta: Deferred[FileSource] = Deferred()
    root: Deferred[FileSource] = Deferred()
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    expected = form(BOUNDARY, META, ROOT)
    w.send()
    w.run()

    response = w.response()
    assert response.status == 200, "headers at once, before any source is known"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert response.headers["content-type"] == "multipart/form-data; boundary=" + BOUNDARY.decode()
    assert response.body == b"", "a part's header waits for its source"

    meta.callback(blob(tmp_path, "meta", META))
    w.run()
    meta_end = expected.index(META) + len(META)
    assert w.response().body == expected[:meta_end]
    assert not w.response().complete

    root.callback(blob(tmp_path, "root", ROOT))
    w.run()
    response = w.response()
    assert response.body == expected
    assert response.complete
    assert parse_form(response.headers["content-type"], response.body)[1][2] == ROOT
    assert outcome(w) is None


def test_deferred_sources_arrive_out_of_order(tmp_path: object) -> None:
    meta: Deferred[FileSource] = Deferred()
    root: Deferred[FileSource] = Deferred()
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    root.callback(blob(tmp_path, "root", ROOT))
    w.run()
    assert w.response().body == b""
    meta.callback(blob(tmp_path, "meta", META))
    w.run()
    assert w.response().body == form(BOUNDARY, META, ROOT)


def test_fired_deferreds_count_as_known(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    root = blob(tmp_path, "root", ROOT)
    w = wire(lambda: export_parts(image("squashfs"), succeed(meta), succeed(root)))
    w.send()
    w.run()
    response = w.response()
    assert response.headers["content-length"] == str(len(form(BOUNDARY, META, ROOT)))
    assert response.body == form(BOUNDARY, META, ROOT)


def test_known_part_streams_while_the_other_is_awaited(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    root: Deferred[FileSource] = Deferred()
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    expected = form(BOUNDARY, META, ROOT)
    w.send()
    w.run()
    response = w.response()
    assert "content-length" not in response.headers
    assert response.body == expected[: expected.index(META) + len(META)]
    root.callback(blob(tmp_path, "root", ROOT))
    w.run()
    assert w.response().body == expected


def test_file_opened_when_its_source_arrives(tmp_path: object) -> None:
    """
    A part's file is opened as soon as its source is known: a download that is not kept
    deletes its temp file soon after completing, long before the part's turn may come.
    """
    meta = FakeSource(FilePath(str(tmp_path)).child("meta"), len(META))
    root: Deferred[FileSource] = Deferred()
    root_path = FilePath(str(tmp_path)).child("root")
    root_path.setContent(ROOT)
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    w.run()
    root.callback(CompleteFile(root_path, len(ROOT)))
    root_path.remove()
    meta.append(META)
    w.run()
    assert w.response().body == form(BOUNDARY, META, ROOT)
    assert outcome(w) is None


# -- failures ---------------------------------------------------------------------------------


def failed_source(tmp_path: object, name: str, size: int, message: str) -> FakeSource:
    source = FakeSource(FilePath(str(tmp_path)).child(name), size)
    source.fail(UpstreamFailed(message))
    return source


@pytest.mark.parametrize("which", ["meta", "root"])
def test_failed_source_before_headers(tmp_path: object, which: str) -> None:
    good = blob(tmp_path, "good", META)
    bad = failed_source(tmp_path, "bad", len(ROOT), "upstream is down")
    meta, root = (bad, good) if which == "meta" else (good, bad)
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    w.run()
    response = w.response()
    assert response.status == 502
    assert response.body == b"upstream is down\n"
    assert "x-incus-type" not in response.headers
    assert isinstance(outcome(w), UpstreamFailed)


def test_failed_deferred_before_headers(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    w = wire(
        lambda: export_parts(image("squashfs"), meta, fail(UpstreamFailed("no such image")))
    )
    w.send()
    response = w.response()
    assert response.status == 502
    assert response.body == b"no such image\n"


def test_missing_file_before_headers(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    missing = CompleteFile(FilePath(str(tmp_path)).child("missing"), len(ROOT))
    w = wire(lambda: export_parts(image("squashfs"), meta, missing))
    w.send()
    w.run()
    assert w.response().status == 500
    assert isinstance(outcome(w), OSError)


def test_failure_in_first_part_aborts(tmp_path: object) -> None:
    meta = FakeSource(FilePath(str(tmp_path)).child("meta"), len(META))
    root = blob(tmp_path, "root", ROOT)
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    meta.append(META[:100])
    w.run()

    meta.fail(UpstreamFailed("upstream sent a bad file"))
    w.run()

    assert w.transport.disconnected, "aborted, not closed cleanly"
    response = w.response()
    assert not response.complete
    assert response.body.endswith(META[:100])
    assert isinstance(outcome(w), UpstreamFailed)
    assert w.resource.requests[0].producer is None


def test_failure_in_second_part_aborts(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    root = FakeSource(FilePath(str(tmp_path)).child("root"), len(ROOT))
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    expected = form(BOUNDARY, META, ROOT)
    w.send()
    root.append(ROOT[: CHUNK_SIZE_BYTES * 2])
    w.run()
    assert w.response().body == expected[: expected.index(ROOT) + CHUNK_SIZE_BYTES * 2]

    root.fail(UpstreamFailed("sha256 mismatch"))
    w.run()

    assert w.transport.disconnected
    response = w.response()
    assert not response.complete
    assert len(response.body) < len(expected)
    assert b"--" + BOUNDARY + b"--" not in response.body, "never the closing boundary"
    assert isinstance(outcome(w), UpstreamFailed)


def test_second_source_failing_during_first_part_aborts(tmp_path: object) -> None:
    meta = FakeSource(FilePath(str(tmp_path)).child("meta"), len(META))
    root = FakeSource(FilePath(str(tmp_path)).child("root"), len(ROOT))
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    meta.append(META[:10])
    w.run()
    root.fail(UpstreamFailed("root download failed"))
    meta.append(META[10:])
    w.run()
    assert w.transport.disconnected
    assert not w.response().complete
    assert isinstance(outcome(w), UpstreamFailed)


def test_deferred_failing_after_headers_aborts(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    root: Deferred[FileSource] = Deferred()
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    w.run()
    assert w.response().status == 200

    root.errback(UpstreamFailed("export download failed"))
    w.run()

    assert w.transport.disconnected
    response = w.response()
    assert response.headers["transfer-encoding"] == "chunked"
    assert not response.complete, "no last chunk: the client sees a broken body"
    assert isinstance(outcome(w), UpstreamFailed)
    assert root.called, "the failure is consumed, not left unhandled"


def test_unified_failure_aborts(tmp_path: object) -> None:
    unified = FakeSource(FilePath(str(tmp_path)).child("unified"), len(ROOT))
    w = wire(lambda: export_parts(image(None, "lxd_combined.tar.gz"), unified, None))
    w.send()
    unified.append(ROOT[:500])
    w.run()
    unified.fail(UpstreamFailed("upstream went away"))
    w.run()
    assert w.transport.disconnected
    response = w.response()
    assert response.body == ROOT[:500]
    assert not response.complete


class BareResource(Resource):
    """Runs L{serve_export} with nothing around it: no error mapping, no abort of its own."""

    isLeaf = True

    def __init__(self, make_parts: Callable[[], Sequence[ExportPart]], clock: Clock) -> None:
        super().__init__()
        self.make_parts = make_parts
        self.clock = clock
        self.results: list[object] = []

    def render(self, request: Request) -> int:
        serving = Deferred.fromCoroutine(
            serve_export(request, self.make_parts(), clock=self.clock, boundary=BOUNDARY)
        )
        serving.addBoth(self.results.append)
        return NOT_DONE_YET


@pytest.mark.parametrize("where", ["deferred", "file"])
def test_serve_export_aborts_by_itself(tmp_path: object, where: str) -> None:
    """The abort is serve_export's own doing, whoever calls it."""
    meta = blob(tmp_path, "meta", META)
    root: Deferred[FileSource] = Deferred()
    clock = Clock()
    resource = BareResource(lambda: export_parts(image("squashfs"), meta, root), clock)
    channel = Site(resource, reactor=Clock()).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /export HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    for _ in range(10):
        clock.advance(0)
    if where == "deferred":
        root.errback(UpstreamFailed("export download failed"))
    else:
        # A file shorter than its source says: the producer finds out while reading.
        short = FilePath(str(tmp_path)).child("short")
        short.setContent(ROOT[:100])
        root.callback(CompleteFile(short, len(ROOT)))
    for _ in range(10):
        clock.advance(0)

    assert transport.disconnected
    [failure] = resource.results
    assert isinstance(failure, Failure)
    assert failure.check(UpstreamFailed, FileTruncated)
    assert not parse_response(transport.value()).complete


# -- backpressure -----------------------------------------------------------------------------


def test_pause_stops_reads(tmp_path: object) -> None:
    w = wire(split_parts(tmp_path))
    w.send()
    request = w.resource.requests[0]
    # As the transport does when its buffer is full (the channel passes it on).
    w.network().pauseProducing()
    w.run()
    sent = request.sentLength
    assert w.clock.getDelayedCalls() == [], "no step scheduled, so no read"
    w.run()
    assert request.sentLength == sent

    w.network().resumeProducing()
    w.run()
    assert w.response().body == form(BOUNDARY, META, ROOT)


def test_one_chunk_per_resume(tmp_path: object) -> None:
    """A transport that is full after every write gets one chunk per resume, across parts."""
    w = wire(split_parts(tmp_path), transport=OncePausingTransport(lambda data: True))
    transport = w.transport
    assert isinstance(transport, OncePausingTransport)
    w.send()
    request = w.resource.requests[0]
    expected = form(BOUNDARY, META, ROOT)
    for _ in range(20):
        if w.resource.outcomes:
            break
        w.run()
        before = request.sentLength
        w.run()
        assert request.sentLength == before, "paused: nothing more"
        transport.resume()
        w.run(1)
        framing = len(expected) - len(META) - len(ROOT)
        assert request.sentLength - before <= CHUNK_SIZE_BYTES + framing
    assert w.response().body == expected
    assert outcome(w) is None


def test_pause_held_across_parts(tmp_path: object) -> None:
    """
    A TLS-like transport fills up exactly as the second part begins and says so only once:
    the second part's producer must start paused, not read its whole file into the buffer.
    """
    second_header = b"\r\n--" + BOUNDARY + b"\r\n"
    transport = OncePausingTransport(lambda data: second_header in data)
    w = wire(split_parts(tmp_path), transport=transport)
    expected = form(BOUNDARY, META, ROOT)
    w.send()
    w.run()

    body = w.response().body
    assert body == expected[: expected.index(ROOT)], "nothing of the root file yet"
    assert w.clock.getDelayedCalls() == []

    transport.resume()
    w.run()
    assert w.response().body == expected
    assert outcome(w) is None


# -- the client goes away ---------------------------------------------------------------------


def test_client_gone_during_a_part(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    root = FakeSource(FilePath(str(tmp_path)).child("root"), len(ROOT))
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    root.append(ROOT[:1000])
    w.run()
    assert root.waiting == 1

    w.client_gone()
    w.run()

    assert isinstance(outcome(w), CancelledError)
    assert root.failure is None, "the shared source goes on"
    assert root.waiting == 0, "only our own waiter was cancelled"
    sent = len(w.transport.value())
    root.append(ROOT[1000:])
    w.run()
    assert len(w.transport.value()) == sent
    assert not w.transport.disconnected, "the transport closes itself, we abort nothing"


def test_transport_stops_the_producer(tmp_path: object) -> None:
    """A real transport losing its client stops its producer before the request hears of it."""
    meta = blob(tmp_path, "meta", META)
    root = FakeSource(FilePath(str(tmp_path)).child("root"), len(ROOT))
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    root.append(ROOT[:1000])
    w.run()

    w.network().stopProducing()
    w.run()
    assert isinstance(outcome(w), ProducerStopped)
    w.client_gone()
    assert root.failure is None
    assert root.waiting == 0


def test_client_gone_while_a_source_is_awaited(tmp_path: object) -> None:
    cancelled: list[object] = []
    root: Deferred[FileSource] = Deferred(cancelled.append)
    meta = blob(tmp_path, "meta", META)
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    w.run()

    w.client_gone()

    assert isinstance(outcome(w), CancelledError)
    assert cancelled == [] and not root.called, "never cancels the (shared) source"
    sent = len(w.transport.value())
    root.callback(blob(tmp_path, "root", ROOT))
    w.run()
    assert len(w.transport.value()) == sent


def test_transport_stops_while_a_source_is_awaited(tmp_path: object) -> None:
    cancelled: list[object] = []
    root: Deferred[FileSource] = Deferred(cancelled.append)
    meta = blob(tmp_path, "meta", META)
    w = wire(lambda: export_parts(image("squashfs"), meta, root))
    w.send()
    w.run()

    w.network().stopProducing()

    assert isinstance(outcome(w), ProducerStopped)
    assert cancelled == []
    w.client_gone()
    root.callback(blob(tmp_path, "root", ROOT))
    w.run()


# -- a real HTTP client -----------------------------------------------------------------------


class Client(SiteClient):
    def __init__(self, resource: ExportResource, clock: Clock) -> None:
        super().__init__(resource, clock)
        self.resource = resource

    def get(self) -> IResponse:
        return self.request("GET", f"http://proxy.test/1.0/images/{FP}/export")


def client(make_parts: Callable[[], Sequence[ExportPart]]) -> Client:
    clock = Clock()
    return Client(ExportResource(make_parts, clock), clock)


def test_client_reads_a_split_export(tmp_path: object) -> None:
    c = client(split_parts(tmp_path))
    response = c.get()
    assert response.code == 200
    body: bytes = c.run(treq.content(response))
    assert response.length == len(body) == len(form(BOUNDARY, META, ROOT))
    [content_type] = response.headers.getRawHeaders(b"Content-Type")
    assert parse_form(content_type.decode(), body)[0] == ("metadata", f"meta-{FP}.tar.xz", META)


def test_client_gets_headers_before_sources(tmp_path: object) -> None:
    meta: Deferred[FileSource] = Deferred()
    root: Deferred[FileSource] = Deferred()
    c = client(lambda: export_parts(image("squashfs"), meta, root))
    response = c.get()
    assert response.code == 200
    assert response.length == UNKNOWN_LENGTH
    body = Streamed()
    collected = treq.collect(response, body.chunks.append)
    meta.callback(blob(tmp_path, "meta", META))
    c.settle()
    root.callback(blob(tmp_path, "root", ROOT))
    c.run(collected)
    assert body.data == form(BOUNDARY, META, ROOT)


def test_client_sees_an_aborted_export_fail(tmp_path: object) -> None:
    meta = blob(tmp_path, "meta", META)
    root = FakeSource(FilePath(str(tmp_path)).child("root"), len(ROOT))
    c = client(lambda: export_parts(image("squashfs"), meta, root))
    response = c.get()
    body = Streamed()
    collected = treq.collect(response, body.chunks.append)
    root.append(ROOT[:100_000])
    c.settle()
    root.fail(UpstreamFailed("upstream went away"))
    with pytest.raises(ResponseFailed):
        c.run(collected)
    assert len(body.data) < len(form(BOUNDARY, META, ROOT))
