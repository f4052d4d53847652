"""
The multipart splitter on its own: Go's framing, as LXD writes an export and the LXD client
reads it, cut into parts whatever the chunking. Pure: no reactor, no files.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.multipart import MultipartError, MultipartSplitter, multipart_boundary
from tests.helpers.lxd_server import GO_BOUNDARY, go_multipart

META = bytes(range(256)) * 3
ROOTFS = b"".join(b"%08d" % i for i in range(20_000))  # 160 000 bytes


# Multipart framing, as Go writes and reads it


def test_go_framing_is_split_into_its_parts_whatever_the_chunking() -> None:
    parts = [("metadata", "meta-x.tar.xz", META), ("rootfs", "x.squashfs", ROOTFS)]
    body = go_multipart(GO_BOUNDARY, parts)
    for size in (1, 7, 64, 4096, len(body)):
        seen: list[list[Any]] = []

        class Sink:
            def start_part(self, name: str, filename: str) -> None:
                seen.append([name, filename, b""])

            def part_data(self, data: bytes) -> None:
                seen[-1][2] += data

            def end_part(self) -> None:
                seen[-1].append("ended")

        splitter = MultipartSplitter(GO_BOUNDARY.encode(), Sink())
        for i in range(0, len(body), size):
            splitter.feed(body[i:i + size])
        splitter.close()
        assert seen == [[n, f, d, "ended"] for n, f, d in parts]


def test_boundary_lookalikes_in_the_data_stay_data() -> None:
    tricky = b"x\r\n--" + GO_BOUNDARY.encode() + b"X not a boundary\r\n--" + GO_BOUNDARY.encode()[:10]
    body = b"preamble\r\n" + go_multipart(GO_BOUNDARY, [("metadata", "m", tricky)]) + b"epilogue"
    got: list[bytes] = []

    class Sink:
        def start_part(self, name: str, filename: str) -> None:
            got.append(b"")

        def part_data(self, data: bytes) -> None:
            got[-1] += data

        def end_part(self) -> None:
            pass

    splitter = MultipartSplitter(GO_BOUNDARY.encode(), Sink())
    for byte in range(len(body)):
        splitter.feed(body[byte:byte + 1])
    splitter.close()
    assert got == [tricky]


def test_lf_only_framing_is_read_as_go_reads_it() -> None:
    body = go_multipart("b", [("metadata", "m", b"abc"), ("rootfs", "r", b"def")]).replace(b"\r\n", b"\n")
    got: list[tuple[str, bytes]] = []

    class Sink:
        def start_part(self, name: str, filename: str) -> None:
            got.append((name, b""))

        def part_data(self, data: bytes) -> None:
            got[-1] = (got[-1][0], got[-1][1] + data)

        def end_part(self) -> None:
            pass

    splitter = MultipartSplitter(b"b", Sink())
    splitter.feed(body)
    splitter.close()
    assert got == [("metadata", b"abc"), ("rootfs", b"def")]


def test_content_types() -> None:
    assert multipart_boundary(f"multipart/form-data; boundary={GO_BOUNDARY}") == GO_BOUNDARY.encode()
    assert multipart_boundary(b'multipart/form-data; boundary="a b"') == b"a b"
    assert multipart_boundary("application/octet-stream") is None
    assert multipart_boundary(None) is None
    with pytest.raises(MultipartError):
        multipart_boundary("multipart/form-data")
