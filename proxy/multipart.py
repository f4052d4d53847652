"""Cutting a C{multipart/form-data} body into its parts while it streams: pure, no I/O.

An LXD server answers the export of a split image (PROTOCOLS.md §2.5) with a multipart body
framed as Go's C{mime/multipart} writer frames it; the LXD client reads it with Go's reader.
L{MultipartSplitter} reads it as that reader does and hands each part's bytes to a L{PartSink}
as they arrive, never holding more than a chunk and a possible delimiter's start in memory.
What the parts must be (metadata, then rootfs) is the export's business, not this module's.
"""

from __future__ import annotations

import email.message
import email.parser
import email.utils
from typing import Any, Protocol

from proxy.errors import VerificationFailed

MAX_PART_HEADER_BYTES = 16 * 1024
# Go's reader skips a preamble before the first boundary; LXD writes none.
MAX_PREAMBLE_BYTES = 16 * 1024


class MultipartError(VerificationFailed):
    """An export's multipart body is not framed as LXD frames it."""


class PartSink(Protocol):
    def start_part(self, name: str, filename: str) -> None: ...

    def part_data(self, data: bytes) -> None: ...

    def end_part(self) -> None: ...


_PREAMBLE, _HEADERS, _BODY, _AFTER_DELIMITER, _EPILOGUE = range(5)


class MultipartSplitter:
    """
    Cuts a C{multipart/form-data} body into its parts as it streams, after Go's
    C{mime/multipart} reader (which the LXD client uses): a preamble before the first
    boundary and an epilogue after the last are skipped, a delimiter is C{CRLF--boundary}
    followed by C{--} (the end) or optional blanks and a line end, and lines may end in a bare
    LF if the first boundary line does. Part bodies go to the sink as they arrive; only a tail
    that might begin a delimiter is held back.

    @raise MultipartError: from L{feed} or L{close}, when the framing is broken.
    """

    def __init__(self, boundary: bytes, sink: PartSink) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError(f"unusable multipart boundary {boundary!r}")
        self._sink = sink
        self._boundary = boundary
        self._dash_boundary = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray()
        self._state = _PREAMBLE
        self._skipped = 0
        self._header_lines: list[bytes] = []
        self._header_bytes = 0
        self.parts = 0

    @property
    def finished(self) -> bool:
        """True once the closing boundary has been read."""
        return self._state == _EPILOGUE

    def feed(self, data: bytes) -> None:
        if self._state == _EPILOGUE:
            return
        self._buffer += data
        while self._step():
            pass

    def close(self) -> None:
        """The body ended: it must have ended with the closing boundary."""
        if self._state != _EPILOGUE:
            raise MultipartError(
                "export ended before its closing boundary"
                + (f" (in part {self.parts})" if self.parts else " (no part started)")
            )

    def _line(self) -> tuple[bytes, bool] | None:
        """One whole line from the buffer, without its end, and whether it ended in CRLF."""
        end = self._buffer.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        if line.endswith(b"\r"):
            return line[:-1], True
        return line, False

    def _step(self) -> bool:
        if self._state == _BODY:
            return self._body()
        if self._state == _EPILOGUE:
            self._buffer.clear()
            return False
        found = self._line()
        if found is None:
            if self._state == _PREAMBLE and self._skipped + len(self._buffer) > MAX_PREAMBLE_BYTES:
                raise MultipartError("export does not start with its multipart boundary")
            if len(self._buffer) > MAX_PART_HEADER_BYTES:
                raise MultipartError("export has a line too long for multipart framing")
            return False
        line, crlf = found
        if self._state == _PREAMBLE:
            stripped = line.rstrip(b" \t")
            if stripped == self._dash_boundary:
                if not crlf:
                    self._delimiter = b"\n--" + self._boundary
                self._start_headers()
            elif stripped == self._dash_boundary + b"--":
                self._state = _EPILOGUE
            else:
                self._skipped += len(line) + 1
                if self._skipped > MAX_PREAMBLE_BYTES:
                    raise MultipartError("export does not start with its multipart boundary")
            return True
        if self._state == _AFTER_DELIMITER:
            if line.strip(b" \t"):
                raise MultipartError("export has data after a multipart boundary")
            self._start_headers()
            return True
        # _HEADERS
        self._header_bytes += len(line) + 2
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise MultipartError("export has a part header that is too long")
        if line:
            if line[:1] in (b" ", b"\t") and self._header_lines:
                self._header_lines[-1] += b" " + line.strip()
            else:
                self._header_lines.append(line)
            return True
        name, filename = _disposition(self._header_lines)
        self.parts += 1
        self._state = _BODY
        self._sink.start_part(name, filename)
        return True

    def _start_headers(self) -> None:
        self._state = _HEADERS
        self._header_lines = []
        self._header_bytes = 0

    def _body(self) -> bool:
        buffer = self._buffer
        delimiter = self._delimiter
        search_from = 0
        while True:
            at = buffer.find(delimiter, search_from)
            if at < 0:
                # All but a tail that may be the start of a delimiter is the part's.
                cut = len(buffer) - (len(delimiter) - 1)
                if cut > 0:
                    self._emit(cut)
                return False
            after = at + len(delimiter)
            following = bytes(buffer[after:after + 2])
            if not following or following == b"-":
                # Which it is depends on bytes not here yet.
                if at > 0:
                    self._emit(at)
                return False
            if following[:1] in (b" ", b"\t", b"\r", b"\n"):
                self._emit(at)
                del buffer[:len(delimiter)]
                self._sink.end_part()
                self._state = _AFTER_DELIMITER
                return True
            if following == b"--":
                self._emit(at)
                del buffer[:len(delimiter) + 2]
                self._sink.end_part()
                self._state = _EPILOGUE
                return True
            # The boundary followed by something else is part of the data (as Go reads it).
            search_from = at + 1

    def _emit(self, count: int) -> None:
        if count > 0:
            data = bytes(self._buffer[:count])
            del self._buffer[:count]
            self._sink.part_data(data)


def _disposition(lines: list[bytes]) -> tuple[str, str]:
    """The form name and file name of a part, from its C{Content-Disposition}."""
    headers = email.parser.BytesHeaderParser().parsebytes(b"\r\n".join(lines) + b"\r\n\r\n")
    if headers.get("Content-Disposition") is None:
        raise MultipartError("export part has no Content-Disposition")
    name = headers.get_param("name", header="content-disposition")
    filename = headers.get_filename() or ""
    return _param_text(name), filename


def _param_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return str(email.utils.collapse_rfc2231_value(value))
    return str(value)


def multipart_boundary(content_type: str | bytes | None) -> bytes | None:
    """
    The boundary of a C{multipart/form-data} content type; None for any other type (which
    the LXD client, and so this proxy, takes for a unified image).

    @raise MultipartError: multipart without a usable boundary.
    """
    if content_type is None:
        return None
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    message = email.message.Message()
    message["Content-Type"] = text
    if message.get_content_type() != "multipart/form-data":
        return None
    boundary = _param_text(message.get_param("boundary"))
    if not boundary or len(boundary) > 70:
        raise MultipartError(f"export is multipart without a usable boundary: {text!r}")
    return boundary.encode("latin-1")


__all__ = [
    "MAX_PART_HEADER_BYTES",
    "MAX_PREAMBLE_BYTES",
    "MultipartError",
    "MultipartSplitter",
    "PartSink",
    "multipart_boundary",
]
