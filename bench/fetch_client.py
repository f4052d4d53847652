"""One HTTPS (or plain HTTP) download in its own process, timed; prints one JSON line when done.

Run by `serve_bench.py` and `export_bench.py`, not by hand:

    python3 bench/fetch_client.py --port PORT --path /up/x --server-name localhost --cafile CA
        [--rate BYTES_PER_SECOND --rcvbuf BYTES] [--sha256 HEX] [--max-seconds S] [--start-at T]
        [--multipart] [--plain]

It only ever connects to 127.0.0.1. A plain socket with HTTP/1.1 by hand, so that a slow reader
can shrink its receive buffer before connecting and read a few KiB at a time: then the server's
socket fills up at once and stays full, which is what makes the proxy pause its producer.

A fast client (`--rate 0`) reads as fast as TLS goes. A slow one reads `--chunk` bytes then sleeps
to keep to `--rate`, until the body ends, `--max-seconds` pass, or SIGTERM (the benchmark stops the
slow readers once the fast ones are done); it then reports how far it got.

With `--multipart` the body is an LXD image export (`multipart/form-data`, framed as Go's
`mime/multipart` writes it): the parts are found as the bytes arrive, and what is hashed (for
`--sha256` and `--report-sha256`) is the parts' contents in order, metadata then rootfs, whose
sha256 is the image's fingerprint. The result then also lists the parts (name, file name, size),
the bytes of part contents hashed so far and whether the closing boundary was seen.

With `--plain` the same request goes over plain HTTP (no TLS), as LXD's first attempt at an
image file does. `t_first` is when the first byte of the body arrived.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import socket
import ssl
import sys
import time
from types import FrameType
from typing import Any, Protocol

HOST = "127.0.0.1"
FAST_BUFFER_BYTES = 1 << 20
FORM_FEED_BYTES = 256 << 10


class Stop(Exception):
    """SIGTERM or --max-seconds: stop reading and report."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise Stop()


class _Digest(Protocol):
    def update(self, data: Any, /) -> None: ...


class MultipartBody:
    """
    The parts of a `multipart/form-data` body fed a chunk at a time; part contents go to `digest`.

    Minimal and strict, for the framing Go's `multipart.Writer` produces: `--B CRLF headers CRLF
    CRLF content` for the first part, `CRLF --B CRLF headers CRLF CRLF content` for the next, and
    `CRLF --B -- CRLF` at the end. Written for speed on large parts: a chunk is searched in place
    for the delimiter, and only the few bytes at its end that could start one are carried over.
    """

    HEADERS_MAX_BYTES = 16384

    def __init__(self, boundary: bytes, digest: _Digest | None) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.digest = digest
        # The body is read as if it started with CRLF, so every boundary line is one delimiter.
        self._carry = b"\r\n"
        self._state = "preamble"  # -> after -> headers -> content -> after ... -> closed
        self.parts: list[dict[str, Any]] = []
        self.content_bytes = 0
        self.epilogue = b""

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def feed(self, data: bytes | bytearray, n: int) -> None:
        """Take the first `n` bytes of `data` (a reused receive buffer is fine)."""
        if self._carry:
            data, n, self._carry = self._carry + bytes(data[:n]), len(self._carry) + n, b""
        delimiter = self.delimiter
        pos = 0
        while pos < n:
            state = self._state
            if state in ("preamble", "content"):
                found = data.find(delimiter, pos, n)
                if found >= 0:
                    self._content(data, pos, found)
                    pos = found + len(delimiter)
                    self._state = "after"
                    continue
                # Keep back the longest end of the chunk that may begin a delimiter.
                keep = 0
                window = max(pos, n - len(delimiter) + 1)
                if data.find(b"\r", window, n) >= 0:
                    for size in range(n - window, 0, -1):
                        if data[n - size:n] == delimiter[:size]:
                            keep = size
                            break
                self._content(data, pos, n - keep)
                self._carry = bytes(data[n - keep:n])
                return
            if state == "after":
                if n - pos < 2:
                    self._carry = bytes(data[pos:n])
                    return
                two = bytes(data[pos:pos + 2])
                pos += 2
                if two == b"--":
                    self._state = "closed"
                elif two == b"\r\n":
                    self._state = "headers"
                else:
                    raise ValueError(f"bad bytes after a boundary: {two!r}")
                continue
            if state == "headers":
                end = data.find(b"\r\n\r\n", pos, n)
                if end < 0:
                    if n - pos > self.HEADERS_MAX_BYTES:
                        raise ValueError("part headers too long")
                    self._carry = bytes(data[pos:n])
                    return
                self.parts.append(self._part(bytes(data[pos:end]).decode("utf-8")))
                pos = end + 4
                self._state = "content"
                continue
            # closed: Go's writer ends with CRLF; anything else is kept to be reported.
            self.epilogue = (self.epilogue + bytes(data[pos:n]))[:64]
            return

    def _content(self, data: bytes | bytearray, start: int, end: int) -> None:
        if end <= start:
            return
        if self._state == "preamble":
            raise ValueError(f"{end - start} bytes before the first boundary")
        self.parts[-1]["size"] += end - start
        self.content_bytes += end - start
        if self.digest is not None:
            with memoryview(data) as view:
                self.digest.update(view[start:end])

    @staticmethod
    def _part(head: str) -> dict[str, Any]:
        part: dict[str, Any] = {"name": "", "filename": "", "size": 0}
        for line in head.split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                for param in value.split(";")[1:]:
                    k, _, v = param.strip().partition("=")
                    if k in ("name", "filename"):
                        part[k] = v.strip('"')
        return part


def _boundary(content_type: str) -> bytes:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise ValueError(f"not a form: {content_type!r}")
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"').encode("ascii")
    raise ValueError(f"no boundary in {content_type!r}")


def _read_headers(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    # Headers are small; 64 KiB of them means a broken server, not a slow one.
    while b"\r\n\r\n" not in data and len(data) < 65536:
        got = sock.recv(16384)
        if not got:
            raise ConnectionError("connection closed before the response headers ended")
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def fetch(args: argparse.Namespace) -> dict[str, object]:
    result: dict[str, object] = {"t_start": time.time(), "status": 0, "bytes": 0, "length": None,
                                 "complete": False, "stopped": False, "error": ""}
    context = ssl.create_default_context(cafile=args.cafile)
    # Every client of a phase starts at the same instant, once all the interpreters are up.
    delay = args.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    result["t_start"] = time.time()
    cpu_start = time.process_time()
    result["late"] = max(0.0, -delay) if args.start_at else 0.0
    deadline = time.monotonic() + args.max_seconds
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if args.rcvbuf:
        # Before connect, or the window is already negotiated.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    sock.settimeout(args.max_seconds)
    digest = hashlib.sha256() if args.sha256 or args.report_sha256 else None
    # With --multipart the digest is fed the parts' contents, not the body.
    form: MultipartBody | None = None
    received = 0
    # The longest wait for body bytes: how long the server stalled this client at worst.
    max_gap = 0.0
    try:
        sock.connect((HOST, args.port))
        tls = sock if args.plain else context.wrap_socket(sock, server_hostname=args.server_name)
        request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.server_name}:{args.port}\r\n"
            "User-Agent: lxd-image-proxy-bench\r\nConnection: close\r\n\r\n"
        )
        tls.sendall(request.encode())
        status, headers, body = _read_headers(tls)
        result["t_headers"] = time.time()
        result["status"] = status
        length = int(headers["content-length"]) if "content-length" in headers else None
        result["length"] = length
        if args.multipart and status == 200:
            if "chunked" in headers.get("transfer-encoding", ""):
                raise ValueError("a chunked export: not parsed by this client")
            form = MultipartBody(_boundary(headers.get("content-type", "")), digest)
            form.feed(body, len(body))
        elif digest is not None:
            digest.update(body)
        received = len(body)
        if body:
            result["t_first"] = result["t_headers"]
        last = time.monotonic()
        if args.rate:
            started = time.monotonic()
            while length is None or received < length:
                if time.monotonic() > deadline:
                    raise Stop()
                got = tls.recv(args.chunk)
                if not got:
                    break
                if "t_first" not in result:
                    result["t_first"] = time.time()
                now = time.monotonic()
                max_gap, last = max(max_gap, now - last), now
                received += len(got)
                if form is not None:
                    form.feed(got, len(got))
                elif digest is not None:
                    digest.update(got)
                # Sleep until the average rate is back down to --rate.
                ahead = received / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        else:
            buffer = bytearray(FAST_BUFFER_BYTES)
            view = memoryview(buffer)
            # A form is parsed FORM_FEED_BYTES at a time (a TLS read returns one 16 KiB record at
            # most), so that its per-call cost stays well below that of TLS and hashing.
            filled = 0
            while length is None or received < length:
                n = tls.recv_into(view[filled:])
                if not n:
                    break
                if "t_first" not in result:
                    result["t_first"] = time.time()
                now = time.monotonic()
                max_gap, last = max(max_gap, now - last), now
                received += n
                if form is not None:
                    filled += n
                    if filled >= FORM_FEED_BYTES:
                        form.feed(buffer, filled)
                        filled = 0
                elif digest is not None:
                    digest.update(view[:n])
                if time.monotonic() > deadline:
                    raise Stop()
            if form is not None and filled:
                form.feed(buffer, filled)
        result["complete"] = length is not None and received == length
        if form is not None:
            # A form is whole once its closing boundary and Go's final CRLF are in.
            result["complete"] = (
                (length is None or received == length) and form.closed and form.epilogue == b"\r\n"
            )
        if digest is not None:
            result["sha256_ok"] = digest.hexdigest() == args.sha256
    except Stop:
        result["stopped"] = True
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["bytes"] = received
        result["max_gap"] = max_gap
        if form is not None:
            result["parts"] = form.parts
            result["content_bytes"] = form.content_bytes
            result["form_closed"] = form.closed
        if digest is not None and args.report_sha256:
            # What a reader stopped early got: the benchmark compares it with the file's prefix.
            result["sha256"] = digest.hexdigest()
        result["t_end"] = time.time()
        # The client's CPU time from its request on: TLS, hashing, parsing.
        result["cpu_s"] = time.process_time() - cpu_start
        sock.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--server-name", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="bytes per second; 0: as fast as possible")
    parser.add_argument("--chunk", type=int, default=4096, help="read size of a slow reader")
    parser.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF before connecting; 0: default")
    parser.add_argument("--sha256", default="", help="verify the body against this digest")
    parser.add_argument("--report-sha256", action="store_true",
                        help="report the sha256 of the bytes read, however many")
    parser.add_argument("--multipart", action="store_true",
                        help="the body is an image export: hash the parts' contents, report the parts")
    parser.add_argument("--plain", action="store_true", help="plain HTTP, no TLS (--cafile unused)")
    parser.add_argument("--max-seconds", type=float, default=240.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start at")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    outcome = fetch(args)
    # The benchmark may stop us right after we finish: ignore a late SIGTERM while reporting.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.write(json.dumps(outcome) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
