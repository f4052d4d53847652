"""HTTP/1.1 as bytes on the wire: requests written out, and responses split apart."""

from __future__ import annotations

from attrs import frozen


def request(target: str, *, close: bool = True, extra: bytes = b"", method: str = "GET") -> bytes:
    """A request for C{target} with a Host header, C{extra} header lines, and C{Connection: close}."""
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n".encode() + extra
    return head + (b"Connection: close\r\n" if close else b"") + b"\r\n"


@frozen
class Answer:
    """What came back on one connection: the responses in order, and any bytes left over."""

    responses: list[tuple[int, dict[bytes, bytes], bytes]]
    rest: bytes

    @property
    def codes(self) -> list[int]:
        return [code for code, _, _ in self.responses]


def parse(data: bytes, *, head: bool = False) -> Answer:
    """
    Split HTTP/1.1 responses, each with a Content-Length (the proxy's always have one here).

    @param head: the responses answer HEAD requests: no body, whatever the length says.
    """
    responses: list[tuple[int, dict[bytes, bytes], bytes]] = []
    while data.startswith(b"HTTP/1."):
        top, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            break
        lines = top.split(b"\r\n")
        code = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        assert b"transfer-encoding" not in headers, headers
        length = 0 if head or code in (204, 304) else int(headers.get(b"content-length", b"0"))
        if len(rest) < length:
            break
        responses.append((code, headers, rest[:length]))
        data = rest[length:]
    return Answer(responses, data)
