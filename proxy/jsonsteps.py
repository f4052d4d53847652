"""JSON decoded and encoded in small steps, with the results of C{json.loads} and C{json.dumps}.

A catalogue is parsed on a worker thread, but one C{json.loads} of a 30 MB products file is a
single C call that holds the GIL, and so the reactor thread, for 0.2 s. Here the outer levels
of the document (the products, their fields, their versions) are walked member by member and
only what lies below them is left to the C decoder and encoder, a few KiB at a time; between
two steps Python may switch to the reactor thread (every C{sys.getswitchinterval()}, 5 ms).
"""

from __future__ import annotations

import json
import re
from json.decoder import JSONDecodeError
from typing import Any, Callable

__all__ = ["dumps", "loads", "release", "STEP_DEPTH"]

# Levels walked step by step: a products file's root, its products, each product's fields
# and each product's versions; a version (a few KiB) is decoded in one go.
STEP_DEPTH = 4

_decoder = json.JSONDecoder()
# The string scanner json's own decoder uses (the C one where built); not in the type stubs.
_scanstring: Callable[[str, int], tuple[str, int]] = getattr(json.decoder, "scanstring")
_encoder = json.JSONEncoder(separators=(",", ":"))
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def loads(data: bytes | str, depth: int = STEP_DEPTH) -> Any:
    """
    C{json.loads(data)}, decoded in steps.

    @raise ValueError: C{data} is not JSON (a L{JSONDecodeError}, or a L{UnicodeDecodeError}
        for bytes in no encoding JSON allows), as C{json.loads} raises.
    """
    if isinstance(data, bytes):
        # As json.loads reads bytes: UTF-8, -16 or -32, told apart by the first bytes.
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    elif data.startswith("\ufeff"):
        raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    else:
        text = data
    value, end = _value(text, _skip(text, 0), depth)
    end = _skip(text, end)
    if end != len(text):
        raise JSONDecodeError("Extra data", text, end)
    return value


def dumps(value: Any, depth: int = STEP_DEPTH) -> str:
    """C{json.dumps(value, separators=(",", ":"))} (ASCII only), encoded in steps."""
    pieces: list[str] = []
    _dump(value, depth, pieces)
    return "".join(pieces)


def release(value: Any, depth: int = STEP_DEPTH) -> None:
    """
    Empty a decoded document's outer levels member by member, so that it is freed in steps.

    Dropping the last reference to a decoded catalogue (or any large list or dict) frees
    millions of objects in one C call, which holds the GIL as long as building them did.
    Only for a document nobody else uses: its containers are left empty.
    """
    if depth <= 0:
        return
    if isinstance(value, dict):
        while value:
            release(value.popitem()[1], depth - 1)
    elif isinstance(value, list):
        while value:
            release(value.pop(), depth - 1)


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _value(text: str, index: int, depth: int) -> tuple[Any, int]:
    if depth > 0:
        if text.startswith("{", index):
            return _object(text, index + 1, depth - 1)
        if text.startswith("[", index):
            return _array(text, index + 1, depth - 1)
    return _decoder.raw_decode(text, index)


def _object(text: str, index: int, depth: int) -> tuple[dict[str, Any], int]:
    found: dict[str, Any] = {}
    index = _skip(text, index)
    if text.startswith("}", index):
        return found, index + 1
    while True:
        if not text.startswith('"', index):
            raise JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, index
            )
        key, index = _scanstring(text, index + 1)
        index = _skip(text, index)
        if not text.startswith(":", index):
            raise JSONDecodeError("Expecting ':' delimiter", text, index)
        value, index = _value(text, _skip(text, index + 1), depth)
        found[key] = value
        index = _skip(text, index)
        if text.startswith(",", index):
            index = _skip(text, index + 1)
        elif text.startswith("}", index):
            return found, index + 1
        else:
            raise JSONDecodeError("Expecting ',' delimiter", text, index)


def _array(text: str, index: int, depth: int) -> tuple[list[Any], int]:
    found: list[Any] = []
    index = _skip(text, index)
    if text.startswith("]", index):
        return found, index + 1
    while True:
        value, index = _value(text, index, depth)
        found.append(value)
        index = _skip(text, index)
        if text.startswith(",", index):
            index = _skip(text, index + 1)
        elif text.startswith("]", index):
            return found, index + 1
        else:
            raise JSONDecodeError("Expecting ',' delimiter", text, index)


def _dump(value: Any, depth: int, pieces: list[str]) -> None:
    # Keys other than strings (never in decoded JSON) are left to json's own rules for them.
    if depth > 0 and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        pieces.append("{")
        for n, (key, member) in enumerate(value.items()):
            if n:
                pieces.append(",")
            pieces.append(_encoder.encode(key))
            pieces.append(":")
            _dump(member, depth - 1, pieces)
        pieces.append("}")
    elif depth > 0 and isinstance(value, (list, tuple)):
        pieces.append("[")
        for n, member in enumerate(value):
            if n:
                pieces.append(",")
            _dump(member, depth - 1, pieces)
        pieces.append("]")
    else:
        pieces.append(_encoder.encode(value))
