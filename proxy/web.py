"""The HTTP edge: async resources, error rendering and serving files.

L{AsyncResource} turns an C{async def handle(request)} into a
C{twisted.web} resource: it is the one place where a L{ProxyError} becomes a
response and where the client going away cancels the work done for it.
L{serve_file} answers a GET or HEAD for a L{FileSource} with validators,
conditional requests and single byte ranges.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.errors import BadRequest, MethodNotAllowed, ProxyError, RangeNotSatisfiable
from proxy.config import DEFAULT_SEND_TIMEOUT_SECONDS
from proxy.streaming import FileSource, ProducerStopped, abort_connection, file_producer

INTERNAL_ERROR_MESSAGE = "internal error"


def _text(value: bytes | None) -> str:
    """A request line part for a log message: bytes as text, never C{b'...'}."""
    return "" if value is None else value.decode("utf-8", "replace")


def finish_request(request: Request) -> None:
    """
    Finish C{request} unless it is finished already or its client is gone.

    C{Request.finish} raises after a disconnect and warns when called twice;
    neither is worth more than silence here, because C{notifyFinish} (called
    at the start of handling) already tells whoever cares.
    """
    if request.finished:
        return
    try:
        request.finish()
    except RuntimeError:
        pass


def relative_path(raw: bytes, prefix_segments: int) -> str:
    """
    Turn the raw request path into a clean path relative to the upstream's root.

    Segments are percent-decoded (the client may encode C{:} and C{/}), empty and C{.} segments
    dropped; C{..}, NUL and undecodable bytes are refused with L{BadRequest}.
    """
    segments = raw.split(b"/")[1 + prefix_segments:]
    decoded = unquote_to_bytes(b"/".join(segments))
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request path is not valid UTF-8")
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == ".." or "\x00" in part or "\\" in part:
            raise BadRequest("request path may not contain '..', backslashes or NUL")
        parts.append(part)
    return "/".join(parts)


@define
class _Exchange:
    """What L{AsyncResource} knows about one request while handling it."""

    request: Request
    client_gone: bool = False


class AsyncResource(Resource):
    """
    A resource whose subclasses implement C{async def handle(request)}.

    C{handle} may write the response itself (and finish it, or leave
    finishing to us) or return C{bytes} to send as the whole body.  A
    L{ProxyError} it raises becomes a response through L{render_error}; any
    other exception is logged and answered with a plain 500.  When the client
    goes away the coroutine is cancelled, so whatever it awaits sees
    L{CancelledError<twisted.internet.defer.CancelledError>} (or, from
    L{serve_file}, L{ProducerStopped} when the transport stopped the
    producer first); nothing is written after that, and neither is logged
    as an error.

    @cvar allowed_methods: The methods C{handle} is called for; others get a
        405 with an C{Allow} header.
    """

    log = Logger()
    allowed_methods: Sequence[bytes] = (b"GET", b"HEAD")

    async def handle(self, request: Request) -> bytes | None:
        raise NotImplementedError(f"{type(self).__name__} must implement handle()")

    def render_error(self, request: Request, error: ProxyError) -> None:
        """
        Write the response for C{error}; headers have not been sent yet.

        The default is the status code and the message as one line of plain
        text.  Override to render another format; the request is finished by
        the caller.
        """
        message = " ".join(error.message.splitlines())
        body = f"{message}\n".encode("utf-8")
        request.setResponseCode(error.code)
        for name, value in error.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)

    def render(self, request: Request) -> int:
        # notifyFinish first: called after the connection has gone, it would
        # never fire.
        finished = request.notifyFinish()
        exchange = _Exchange(request)
        work = Deferred.fromCoroutine(self._respond(exchange))

        def finished_or_gone(result: object) -> None:
            if isinstance(result, Failure):
                exchange.client_gone = True
                work.cancel()

        # Added after the coroutine has started, so that a response finished
        # synchronously has a Deferred to (not) cancel.
        finished.addBoth(finished_or_gone)
        return NOT_DONE_YET

    async def _respond(self, exchange: _Exchange) -> None:
        request = exchange.request
        try:
            if request.method not in self.allowed_methods:
                request.setHeader(b"Allow", b", ".join(self.allowed_methods))
                raise MethodNotAllowed("method not allowed")
            body = await self.handle(request)
        except Exception as error:
            self._failed(exchange, error)
            return
        if exchange.client_gone or request.finished:
            return
        if body is not None:
            if not request.startedWriting and not request.responseHeaders.hasHeader(
                b"Content-Length"
            ):
                request.setHeader(b"Content-Length", b"%d" % (len(body),))
            request.write(body)
        finish_request(request)

    def _failed(self, exchange: _Exchange, error: Exception) -> None:
        request = exchange.request
        # A transport that loses its client stops the producer before the
        # request hears of it: ProducerStopped means the client is gone too.
        if exchange.client_gone or isinstance(error, ProducerStopped):
            self.log.debug(
                "client went away during {method} {uri}",
                method=_text(request.method),
                uri=_text(request.uri),
            )
            return
        if request.finished:
            self.log.failure(
                "error after {method} {uri} was finished",
                Failure(error),
                method=_text(request.method),
                uri=_text(request.uri),
            )
            return
        if request.startedWriting:
            # Too late for a status: make sure the client cannot mistake
            # what it got for a whole response.
            if isinstance(error, ProxyError):
                # The failure itself is logged once where it happened; this is per client.
                self.log.info(
                    "{method} {uri} aborted after the headers: {message}",
                    method=_text(request.method),
                    uri=_text(request.uri),
                    message=error.message,
                )
            else:
                self.log.failure(
                    "{method} {uri} aborted after the headers",
                    Failure(error),
                    method=_text(request.method),
                    uri=_text(request.uri),
                )
            abort_connection(request)
            return
        if isinstance(error, ProxyError):
            mapped = error
        else:
            self.log.failure(
                "error handling {method} {uri}",
                Failure(error),
                method=_text(request.method),
                uri=_text(request.uri),
            )
            mapped = ProxyError(INTERNAL_ERROR_MESSAGE, 500)
        try:
            self.render_error(request, mapped)
        except Exception:
            self.log.failure("rendering an error for {uri} failed", uri=_text(request.uri))
            abort_connection(request)
            return
        finish_request(request)


_DIGITS = re.compile(rb"[0-9]+\Z")


def _parse_byte_range(header: bytes, size: int) -> tuple[int, int] | None:
    """
    Parse a C{Range} header asking for one byte range of a C{size}-byte body.

    @return: C{(start, end)} with C{end} exclusive, or L{None} when the
        header is malformed, not in bytes or asks for several ranges: such a
        header is ignored and the whole body sent, as C{twisted.web.static}
        does.

    @raise RangeNotSatisfiable: The range lies wholly beyond the body.
    """
    unit, equals, spec = header.partition(b"=")
    if not equals or unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not _DIGITS.match(first)) or (last and not _DIGITS.match(last)):
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable("requested range not satisfiable")
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable("requested range not satisfiable")
    end = min(int(last) + 1, size) if last else size
    return start, end


def _quoted(etag: str) -> bytes:
    return b'"' + etag.encode("ascii") + b'"'


def _none_match(header: bytes, etag: bytes) -> bool:
    """Weak comparison of C{If-None-Match} against our (quoted) tag."""
    for tag in header.split(b","):
        tag = tag.strip()
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == b"*" or tag == etag:
            return True
    return False


def _not_modified_since(request: Request, last_modified: int) -> bool:
    header = request.getHeader(b"If-Modified-Since")
    if header is None:
        return False
    try:
        since = http.stringToDatetime(header.split(b";", 1)[0])
    except (ValueError, IndexError):
        # Twisted's parser raises IndexError for an empty or blank value; a date that cannot
        # be read is ignored, as RFC 9110 (13.1.3) says.
        return False
    return since >= last_modified


def _range_applies(request: Request, etag: bytes, last_modified: bytes) -> bool:
    """Whether C{If-Range}, if sent, still names this representation."""
    condition = request.getHeader(b"If-Range")
    if condition is None:
        return True
    condition = condition.strip()
    if condition.startswith((b'"', b"W/")):
        # Strong comparison: a weak tag never matches.
        return condition == etag
    return condition == last_modified


@functools.lru_cache(maxsize=256)
def _http_date(seconds: int) -> bytes:
    # The same few validators are formatted for every request of a catalogue.
    return http.datetimeToString(seconds)


def _answer_headers(
    request: Request,
    size: int,
    *,
    etag: str,
    last_modified: float,
    content_type: bytes,
    ranges: bool,
) -> tuple[int, int] | None:
    """
    Set the status and headers of an answer with a C{size}-byte body (L{serve_file}'s rules).

    @return: the byte span to send, C{(start, end)} with C{end} exclusive, or None for a 304.
    @raise RangeNotSatisfiable: with C{Content-Range: bytes */SIZE} already set.
    """
    quoted = _quoted(etag)
    modified = int(last_modified)
    modified_header = _http_date(modified)
    request.setHeader(b"ETag", quoted)

    none_match = request.getHeader(b"If-None-Match")
    if none_match is not None:
        not_modified = _none_match(none_match, quoted)
    else:
        not_modified = _not_modified_since(request, modified)
    if not_modified:
        request.setResponseCode(http.NOT_MODIFIED)
        return None

    request.setHeader(b"Last-Modified", modified_header)
    request.setHeader(b"Accept-Ranges", b"bytes" if ranges else b"none")

    start, end = 0, size
    range_header = request.getHeader(b"Range") if ranges else None
    if range_header is not None and request.method == b"GET":
        if _range_applies(request, quoted, modified_header):
            try:
                byte_range = _parse_byte_range(range_header, size)
            except RangeNotSatisfiable:
                request.setHeader(b"Content-Range", b"bytes */%d" % (size,))
                raise
            if byte_range is None:
                AsyncResource.log.debug(
                    "ignoring Range {range!r} on {uri}", range=range_header, uri=_text(request.uri)
                )
            else:
                start, end = byte_range
                request.setResponseCode(http.PARTIAL_CONTENT)
                request.setHeader(
                    b"Content-Range", b"bytes %d-%d/%d" % (start, end - 1, size)
                )

    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % (end - start,))
    return start, end


async def serve_file(
    request: Request,
    source: FileSource,
    *,
    etag: str,
    last_modified: float,
    clock: IReactorTime,
    content_type: bytes = b"application/octet-stream",
    ranges: bool = True,
) -> None:
    """
    Answer a GET or HEAD with the bytes of C{source}.

    With C{ranges=False}, C{Range} is ignored and C{Accept-Ranges: none} sent: a source
    still being downloaded is only verified as a whole, so no part of it may be handed out
    as a complete answer before that.

    Sets C{ETag} (C{etag} quoted), C{Last-Modified}, C{Accept-Ranges},
    C{Content-Type} and C{Content-Length}.  C{If-None-Match} naming C{etag}
    (or C{*}), or failing that a satisfied C{If-Modified-Since}, gives a 304
    without a body.  One byte range on a GET gives a 206, also while the
    source is still growing; a range beyond the end raises
    L{RangeNotSatisfiable} with C{Content-Range: bytes */SIZE} already set;
    several ranges or a malformed header are ignored.  HEAD sends headers only.

    Returns once the body has been sent and the request finished; for HEAD
    and 304 the caller finishes the request.

    @raise ProxyError: Or whatever the source failed with, if it had failed
        before anything was sent.  Once headers are out, a failing source
        aborts the connection and its failure is raised from here.
    @raise ProducerStopped: The client went away during the body.
    """
    if source.failure is not None:
        source.failure.raiseException()
    span = _answer_headers(
        request, source.size, etag=etag, last_modified=last_modified,
        content_type=content_type, ranges=ranges,
    )
    if span is None or request.method == b"HEAD":
        return
    start, end = span

    # With sendfile on a plain connection (proxy.streaming.SendfileProducer).
    limits = getattr(request.channel, "limits", None)
    producer = file_producer(
        source, request, clock, start, end,
        send_timeout=getattr(limits, "send_timeout", DEFAULT_SEND_TIMEOUT_SECONDS),
    )
    # Headers go out now rather than with the first chunk: on a cache miss
    # the first bytes may be a while coming, and clients give up on a
    # response whose headers take longer than 30 seconds.
    request.write(b"")
    await producer.done


def serve_bytes(
    request: Request,
    body: bytes,
    *,
    etag: str,
    last_modified: float,
    content_type: bytes = b"application/json",
) -> None:
    """
    Answer a GET or HEAD with a small body held in memory (generated metadata), with the same
    validators as L{serve_file}: C{ETag}, C{Last-Modified}, C{If-None-Match} (304) and HEAD.
    The caller finishes the request.
    """
    quoted = _quoted(etag)
    request.setHeader(b"ETag", quoted)
    none_match = request.getHeader(b"If-None-Match")
    if none_match is not None and _none_match(none_match, quoted):
        request.setResponseCode(http.NOT_MODIFIED)
        return
    request.setHeader(b"Last-Modified", http.datetimeToString(int(last_modified)))
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    if request.method != b"HEAD":
        request.write(body)



def serve_stored_bytes(
    request: Request,
    body: bytes,
    *,
    etag: str,
    last_modified: float,
    content_type: bytes = b"application/json",
) -> None:
    """
    Answer a GET or HEAD with a stored file's C{body} held in memory, exactly as L{serve_file}
    would from its blob (the same validators, 304, HEAD and single byte ranges) but with one
    write: no producer, no timers. The caller finishes the request.

    @raise RangeNotSatisfiable: as L{serve_file}.
    """
    span = _answer_headers(
        request, len(body), etag=etag, last_modified=last_modified,
        content_type=content_type, ranges=True,
    )
    if span is None or request.method == b"HEAD":
        return
    start, end = span
    request.write(body if start == 0 and end == len(body) else body[start:end])
