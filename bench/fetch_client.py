"""One HTTPS download in its own process, timed; prints one JSON line when done.

Run by `serve_bench.py`, not by hand:

    python3 bench/fetch_client.py --port PORT --path /up/x --server-name localhost --cafile CA
        [--rate BYTES_PER_SECOND --rcvbuf BYTES] [--sha256 HEX] [--max-seconds S] [--start-at T]

It only ever connects to 127.0.0.1. A plain socket with HTTP/1.1 by hand, so that a slow reader
can shrink its receive buffer before connecting and read a few KiB at a time: then the server's
socket fills up at once and stays full, which is what makes the proxy pause its producer.

A fast client (`--rate 0`) reads as fast as TLS goes. A slow one reads `--chunk` bytes then sleeps
to keep to `--rate`, until the body ends, `--max-seconds` pass, or SIGTERM (the benchmark stops the
slow readers once the fast ones are done); it then reports how far it got.
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

HOST = "127.0.0.1"
FAST_BUFFER_BYTES = 1 << 20


class Stop(Exception):
    """SIGTERM or --max-seconds: stop reading and report."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise Stop()


def _read_headers(sock: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
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
    result["late"] = max(0.0, -delay) if args.start_at else 0.0
    deadline = time.monotonic() + args.max_seconds
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if args.rcvbuf:
        # Before connect, or the window is already negotiated.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    sock.settimeout(args.max_seconds)
    digest = hashlib.sha256() if args.sha256 or args.report_sha256 else None
    received = 0
    # The longest wait for body bytes: how long the server stalled this client at worst.
    max_gap = 0.0
    try:
        sock.connect((HOST, args.port))
        tls = context.wrap_socket(sock, server_hostname=args.server_name)
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
        if digest is not None:
            digest.update(body)
        received = len(body)
        last = time.monotonic()
        if args.rate:
            started = time.monotonic()
            while length is None or received < length:
                if time.monotonic() > deadline:
                    raise Stop()
                got = tls.recv(args.chunk)
                if not got:
                    break
                now = time.monotonic()
                max_gap, last = max(max_gap, now - last), now
                received += len(got)
                if digest is not None:
                    digest.update(got)
                # Sleep until the average rate is back down to --rate.
                ahead = received / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        else:
            buffer = bytearray(FAST_BUFFER_BYTES)
            view = memoryview(buffer)
            while length is None or received < length:
                n = tls.recv_into(view)
                if not n:
                    break
                now = time.monotonic()
                max_gap, last = max(max_gap, now - last), now
                received += n
                if digest is not None:
                    digest.update(view[:n])
                if time.monotonic() > deadline:
                    raise Stop()
        result["complete"] = length is not None and received == length
        if digest is not None:
            result["sha256_ok"] = digest.hexdigest() == args.sha256
    except Stop:
        result["stopped"] = True
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        result["bytes"] = received
        result["max_gap"] = max_gap
        if digest is not None and args.report_sha256:
            # What a reader stopped early got: the benchmark compares it with the file's prefix.
            result["sha256"] = digest.hexdigest()
        result["t_end"] = time.time()
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
