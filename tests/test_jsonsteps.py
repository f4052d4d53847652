"""jsonsteps decodes and encodes exactly as json does, in steps."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from proxy import jsonsteps
from tests.test_catalogue import _big_products

_LEAVES: list[Any] = [0, 1, -2.5, 1e300, "", "a\u00e9\"\\\n\t", "\ud800x", "\u2603", True, False, None]
_KEYS = ["a", "b", "", "c\u2603", '"q', "\\"]


def _document(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 5 or roll < 0.3:
        return rng.choice(_LEAVES)
    if roll < 0.65:
        return {rng.choice(_KEYS): _document(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_document(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def test_random_documents_decode_and_encode_as_json_does() -> None:
    rng = random.Random(8)
    for _ in range(2000):
        doc = _document(rng)
        for indent in (None, 2):
            text = json.dumps(doc, indent=indent)
            assert jsonsteps.loads(text) == json.loads(text)
            assert jsonsteps.loads(text.encode("utf-8")) == json.loads(text.encode("utf-8"))
        assert jsonsteps.dumps(doc) == json.dumps(doc, separators=(",", ":"))


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32", "utf-8-sig"])
def test_bytes_in_every_encoding_json_reads(encoding: str) -> None:
    data = json.dumps({"k\u2603": ["v", 1]}, ensure_ascii=False).encode(encoding)
    assert jsonsteps.loads(data) == json.loads(data)


def test_a_products_file_decodes_and_encodes_as_json_does() -> None:
    data = _big_products(300_000)
    doc = jsonsteps.loads(data)
    assert doc == json.loads(data)
    assert jsonsteps.dumps(doc) == json.dumps(doc, separators=(",", ":"))


@pytest.mark.parametrize(
    "data",
    [b"", b" ", b"{", b'{"a"}', b'{"a":1,}', b"[1,]", b"[1 2]", b'{"a":1}x', b"\xff\xfe\xfd",
     b'{"a":1 "b":2}', b"nul", b'{1:2}', "\ufeff{}"],
)
def test_what_json_refuses_is_refused(data: bytes | str) -> None:
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        jsonsteps.loads(data)


def test_keys_other_than_strings_are_encoded_by_json_rules() -> None:
    doc = {1: "a", None: [True]}
    assert jsonsteps.dumps(doc) == json.dumps(doc, separators=(",", ":"))


def test_release_empties_the_outer_levels() -> None:
    doc = json.loads(_big_products(50_000))
    products = doc["products"]
    product = next(iter(products.values()))
    versions = product["versions"]
    version = next(iter(versions.values()))
    jsonsteps.release(doc)
    assert doc == {} and products == {} and product == {} and versions == {}
    # Below the levels walked, a version is freed whole, not emptied.
    assert version["items"]
