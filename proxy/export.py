"""Answering C{GET /1.0/images/<fp>/export} as an LXD server does (PROTOCOLS.md §2.5).

A split image goes out as C{multipart/form-data}: the metadata part, then the root part, each
framed byte for byte as Go's C{mime/multipart} C{Writer.CreateFormFile} frames it (the C{lxc}
client reads the body with Go's multipart reader and hashes both parts in order).  A unified
image goes out as one C{application/octet-stream} body with C{Content-Disposition:
inline;filename=...}, which the client requires.  Every part is streamed from its
L{FileSource} by a L{FileProducer}, so a stored blob and a download still arriving are served
alike, with backpressure, and no file is ever held in memory.

The names follow LXD's C{imageExport} (lxd/images.go): the metadata part is form field
C{metadata} with file name C{meta-<fp><ext>}, the root part is C{rootfs} (containers) or
C{rootfs.img} (virtual machines) with C{<fp><ext>}, and a unified image is C{<fp><ext>}.
LXD finds C{<ext>} from the file's magic bytes (shared C{DetectCompressionFile}); here it comes
from the simplestreams ftype, which names the same formats (L{EXTENSIONS}).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import IO

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from proxy.catalogue import FILE_EXTENSIONS, Image
from proxy.streaming import FileProducer, FileSource, ProducerRelay, ProducerStopped
from proxy.web import finish_request

# The extension of each part's file name, as LXD names it.
EXTENSIONS = FILE_EXTENSIONS

METADATA_PART = "metadata"
ROOT_PART = "rootfs"
VM_ROOT_PART = "rootfs.img"

# Go's multipart.Writer: a random boundary of 30 bytes in hex, and SetBoundary's rules.
_BOUNDARY_RANDOM_BYTES = 30
_BOUNDARY_MAX_LENGTH = 70
_BOUNDARY_CHARACTERS = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=?"
)
# FormDataContentType quotes a boundary holding any of these (RFC 2045 tspecials and space).
_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?= ')


def extension(ftype: str) -> str:
    """The file name extension LXD gives an exported file of this ftype ("" if unknown)."""
    return EXTENSIONS.get(ftype, "")


@frozen
class ExportPart:
    """
    One file of an export: its form field C{name} and C{filename}, and where its bytes come
    from, now (a L{FileSource}) or once known (a L{Deferred} firing with one).
    """

    name: str
    filename: str
    source: FileSource | Deferred[FileSource]


def export_parts(
    image: Image,
    meta: FileSource | Deferred[FileSource],
    root: FileSource | Deferred[FileSource] | None,
) -> list[ExportPart]:
    """
    Name the parts of C{image}'s export as LXD does.

    @param meta: The metadata file, or for a unified image the image file.
    @param root: The root file of a split image; L{None} for a unified image.

    @raise ValueError: C{root} is given for a unified image or missing for a split one.
    """
    fingerprint = image.fingerprint
    if image.root is None:
        if root is not None:
            raise ValueError(f"image {fingerprint} is unified: it has no root part")
        filename = f"{fingerprint}{extension(image.meta.ftype)}"
        # LXD names a unified export's only file after its file name; no client reads it.
        return [ExportPart(filename, filename, meta)]
    if root is None:
        raise ValueError(f"image {fingerprint} is split: its root part is missing")
    root_name = VM_ROOT_PART if image.type == "virtual-machine" else ROOT_PART
    return [
        ExportPart(METADATA_PART, f"meta-{fingerprint}{extension(image.meta.ftype)}", meta),
        ExportPart(root_name, f"{fingerprint}{extension(image.root.ftype)}", root),
    ]


def new_boundary() -> bytes:
    """A boundary as Go's C{multipart.NewWriter} makes one: 30 random bytes in hex."""
    return os.urandom(_BOUNDARY_RANDOM_BYTES).hex().encode("ascii")


def check_boundary(boundary: bytes) -> bytes:
    """
    @return: C{boundary}, if Go's C{Writer.SetBoundary} would accept it.

    @raise ValueError: It is empty, longer than 70 bytes, or holds a character outside
        RFC 2046's set (a space only inside).
    """
    if not 1 <= len(boundary) <= _BOUNDARY_MAX_LENGTH:
        raise ValueError(f"a boundary has 1 to {_BOUNDARY_MAX_LENGTH} characters: {boundary!r}")
    for position, byte in enumerate(boundary):
        inner_space = byte == ord(" ") and position != len(boundary) - 1
        if byte not in _BOUNDARY_CHARACTERS and not inner_space:
            raise ValueError(f"invalid boundary character in {boundary!r}")
    return boundary


def form_data_content_type(boundary: bytes) -> bytes:
    """The C{Content-Type} of a form with this boundary, as Go's C{FormDataContentType}."""
    if any(byte in _TSPECIALS for byte in boundary):
        boundary = b'"' + boundary + b'"'
    return b"multipart/form-data; boundary=" + boundary


def _escape_quotes(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def part_header(boundary: bytes, index: int, part: ExportPart) -> bytes:
    """
    What C{CreateFormFile(part.name, part.filename)} writes before the part's bytes: the
    boundary line (after a CRLF ending the previous part, unless it is the first), then the
    part's headers in Go's order (sorted by name) and an empty line.
    """
    disposition = (
        f'form-data; name="{_escape_quotes(part.name)}"; '
        f'filename="{_escape_quotes(part.filename)}"'
    ).encode("utf-8")
    opening = b"--" if index == 0 else b"\r\n--"
    return (
        opening + boundary + b"\r\n"
        b"Content-Disposition: " + disposition + b"\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"\r\n"
    )


def closing_boundary(boundary: bytes) -> bytes:
    """What Go's C{Writer.Close} writes after the last part."""
    return b"\r\n--" + boundary + b"--\r\n"


async def serve_export(
    request: Request,
    parts: Sequence[ExportPart],
    *,
    clock: IReactorTime,
    boundary: bytes | None = None,
) -> None:
    """
    Answer a GET or HEAD for an image export made of C{parts} (one: unified; two: split).

    Sets C{X-Incus-Type: incus}, and for one part C{Content-Type: application/octet-stream}
    and C{Content-Disposition: inline;filename=<filename>}, for several C{Content-Type:
    multipart/form-data; boundary=<boundary>} (C{boundary} by default random, as Go's).  When
    every part's source is known (a L{FileSource}, or a L{Deferred} that has fired already)
    C{Content-Length} is exact; otherwise there is none and the body is chunked.  Either way
    the headers go out at once: on a miss the first bytes may be a while coming, and clients
    give up on headers that take 30 seconds.  HEAD sends the headers only.

    Each part's file is opened as soon as its source is known (a download's temp file may be
    renamed or deleted by the time the part's turn comes; an open descriptor stays valid) and
    streamed in order through one L{FileProducer} after another, all behind one
    L{ProducerRelay}, so that the client's backpressure holds across the parts.  A part whose
    source is a L{Deferred} has its header written once that fires.

    A L{Deferred} part is observed, never cancelled, and its result passed on unchanged; give
    each call one of its own (its failure is consumed here, as it becomes this response's).
    Sources are only read: a client that goes away stops its own response only.

    Returns once the body has been sent and the request finished; for HEAD the caller
    finishes the request.

    @raise ProxyError: Or whatever else a source had failed with when this was called: no
        header has been sent, so the caller can still answer with a status.  A source that
        fails later (a L{FileSource}'s C{failure}, a L{Deferred} that fails, a file shorter
        than promised) aborts the connection, so that the client never takes a short export
        for a whole one, and its failure is raised from here.
    @raise ProducerStopped: The client went away (or
        L{CancelledError<twisted.internet.defer.CancelledError>}, when this is cancelled
        for that reason); nothing more is written.
    @raise ValueError: No parts, or a C{boundary} Go would refuse.
    """
    if not parts:
        raise ValueError("an export has at least one part")
    if len(parts) > 1:
        boundary = new_boundary() if boundary is None else check_boundary(boundary)
    else:
        boundary = None
    export = _Export(request, parts, clock, boundary)
    try:
        await export.serve()
    finally:
        export.close()


@define(eq=False)
class _Slot:
    """One part while it is served: its source and open file once known, or its failure."""

    part: ExportPart
    source: FileSource | None = None
    failure: Failure | None = None
    file: IO[bytes] | None = None
    _waiters: list[Deferred[None]] = field(factory=list)

    @property
    def known(self) -> bool:
        return self.source is not None or self.failure is not None

    def ready(self) -> Deferred[None]:
        """
        A new L{Deferred} firing once the source (or its failure) is known, or L{wake} is
        called; cancelling it affects nothing else.
        """
        waiter: Deferred[None] = Deferred(self._waiters.remove)
        if self.known:
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter

    def settle(self, source: FileSource | None, failure: Failure | None) -> None:
        self.source, self.failure = source, failure
        self.wake()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


class _Export:
    """The state of one L{serve_export} call."""

    log = Logger()

    def __init__(
        self,
        request: Request,
        parts: Sequence[ExportPart],
        clock: IReactorTime,
        boundary: bytes | None,
    ) -> None:
        self.request = request
        self.clock = clock
        self.boundary = boundary
        self.slots = [_Slot(part) for part in parts]
        # Files are opened once the body is going to be sent, and never after close().
        self._live = False
        self._closed = False
        for slot in self.slots:
            source = slot.part.source
            if isinstance(source, Deferred):
                self._observe(slot, source)
            else:
                slot.source = source

    def _observe(self, slot: _Slot, arriving: Deferred[FileSource]) -> None:
        def arrived(source: FileSource) -> FileSource:
            self._arrived(slot, source, None)
            return source

        def failed(failure: Failure) -> None:
            self._arrived(slot, None, failure)

        # Fires at once if it has fired already: that part is then known up front.
        arriving.addCallbacks(arrived, failed)

    def _arrived(self, slot: _Slot, source: FileSource | None, failure: Failure | None) -> None:
        if self._closed:
            return
        if source is not None and self._live:
            try:
                slot.file = source.path.open("r")
            except OSError:
                source, failure = None, Failure()
        slot.settle(source, failure)

    def close(self) -> None:
        """Close the files no producer took over; ignore sources that arrive from now on."""
        self._closed = True
        for slot in self.slots:
            if slot.file is not None:
                slot.file.close()
                slot.file = None

    def _content_length(self) -> int | None:
        sizes = [slot.source.size for slot in self.slots if slot.source is not None]
        if len(sizes) < len(self.slots):
            return None
        if self.boundary is None:
            return sizes[0]
        framing = sum(
            len(part_header(self.boundary, index, slot.part))
            for index, slot in enumerate(self.slots)
        )
        return framing + sum(sizes) + len(closing_boundary(self.boundary))

    async def serve(self) -> None:
        request = self.request
        for slot in self.slots:
            failure = slot.failure if slot.source is None else slot.source.failure
            if failure is not None:
                failure.raiseException()

        request.setHeader(b"X-Incus-Type", b"incus")
        if self.boundary is None:
            [slot] = self.slots
            request.setHeader(b"Content-Type", b"application/octet-stream")
            # Unquoted, exactly as LXD writes it; the client fails without it.
            request.setHeader(
                b"Content-Disposition", b"inline;filename=" + slot.part.filename.encode("utf-8")
            )
        else:
            request.setHeader(b"Content-Type", form_data_content_type(self.boundary))
        length = self._content_length()
        if length is not None:
            request.setHeader(b"Content-Length", b"%d" % (length,))
        if request.method == b"HEAD":
            return
        if getattr(request, "channel", None) is None:
            # Gone before anything could be sent (a request whose client has gone has no channel).
            raise ProducerStopped()

        self._live = True
        for slot in self.slots:
            if slot.source is not None:
                # Before the headers: a file that cannot be opened still gets a status.
                slot.file = slot.source.path.open("r")

        relay = ProducerRelay(request)
        # Whoever waits for a source to arrive must hear that the client has gone, too.
        relay.when_stopped().addCallback(lambda _: self._wake_all())
        request.registerProducer(relay, True)
        # A transport that closes does not always stop its producer; the request hears of it.
        request.notifyFinish().addErrback(lambda _: relay.stopProducing())
        # Headers go out now rather than with the first part's bytes.
        request.write(b"")
        try:
            await self._body(relay)
        except BaseException as error:
            self._unregister(relay)
            gone = (
                relay.stopped
                or isinstance(error, ProducerStopped)
                or getattr(request, "channel", None) is None
            )
            if not gone:
                # Too late for a status: make sure the client cannot take what it got for a
                # whole export (a Content-Length it cannot reach, or no last chunk).
                self.log.debug(
                    "aborting export {uri} after {sent} bytes: {why}",
                    uri=request.uri.decode("utf-8", "replace"),
                    sent=request.sentLength,
                    why=Failure(error).getErrorMessage(),
                )
                relay.abortConnection()
            raise
        self._unregister(relay)
        finish_request(request)

    async def _body(self, relay: ProducerRelay) -> None:
        for index, slot in enumerate(self.slots):
            source = await self._source_of(slot, relay)
            if self.boundary is not None:
                relay.write(part_header(self.boundary, index, slot.part))
            file, slot.file = slot.file, None
            producer = FileProducer(source, relay, self.clock, file=file)
            await producer.done
        if self.boundary is not None:
            if relay.stopped:
                raise ProducerStopped()
            relay.write(closing_boundary(self.boundary))

    async def _source_of(self, slot: _Slot, relay: ProducerRelay) -> FileSource:
        """The part's source, once it is known; raise if it failed or the client went away."""
        if not slot.known and not relay.stopped:
            # Our own Deferred: cancelling this coroutine cancels it, never the source.
            await slot.ready()
        if relay.stopped:
            raise ProducerStopped()
        if slot.failure is not None:
            slot.failure.raiseException()
        assert slot.source is not None
        return slot.source

    def _wake_all(self) -> None:
        for slot in self.slots:
            slot.wake()

    def _unregister(self, relay: ProducerRelay) -> None:
        request = self.request
        # A request whose connection was lost has no channel to unregister from.
        if getattr(request, "channel", None) is not None and request.producer is relay:
            request.unregisterProducer()


__all__ = [
    "EXTENSIONS",
    "ExportPart",
    "check_boundary",
    "closing_boundary",
    "export_parts",
    "extension",
    "form_data_content_type",
    "new_boundary",
    "part_header",
    "serve_export",
]
