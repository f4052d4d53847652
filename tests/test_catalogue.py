"""Parsing simplestreams index and products files (proxy.catalogue)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from proxy.catalogue import (
    CatalogueError,
    Image,
    Item,
    parse_catalogue,
    parse_images,
    parse_products,
    products_paths,
)

# -- real-shaped examples (PROTOCOLS.md §5) ------------------------------------------------------

LINUXCONTAINERS_INDEX = b"""
{"index": {"images": {"datatype": "image-downloads", "path": "streams/v1/images.json",
  "format": "products:1.0", "products": ["almalinux:8:amd64:cloud", "alpine:3.19:amd64:default"]}},
 "format": "index:1.0"}
"""

UBUNTU_INDEX = b"""
{"index": {
  "com.ubuntu.cloud:released:aws": {"datatype": "image-ids",
    "path": "streams/v1/com.ubuntu.cloud:released:aws.json", "format": "products:1.0",
    "products": ["com.ubuntu.cloud:server:14.04:amd64"]},
  "com.ubuntu.cloud:released:download": {"datatype": "image-downloads",
   "path": "streams/v1/com.ubuntu.cloud:released:download.json", "format": "products:1.0",
   "updated": "Tue, 24 Feb 2015 10:16:54 +0000", "products": ["com.ubuntu.cloud:server:14.04:amd64"]}},
 "updated": "Tue, 24 Feb 2015 14:14:24 +0000", "format": "index:1.0"}
"""

DEBIAN_PRODUCTS = b"""
{"content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
 "products": {"debian:buster:amd64:default": {
   "aliases": "debian/buster/default,debian/buster/default/amd64,debian/buster,debian/buster/amd64",
   "arch": "amd64", "os": "Debian", "release": "buster", "release_title": "buster",
   "versions": {"20200304_22:10": {"items": {
     "lxd.tar.xz": {"ftype": "lxd.tar.xz", "size": 560,
       "path": "images/debian/buster/amd64/default/20200304_22:10/lxd.tar.xz",
       "sha256": "d96e64e86fe314b41717a270e394fc644bddf23ebbdee870a8dec034435a47af",
       "combined_squashfs_sha256": "deae1ebaa83fa743ba9c33e942f045f45fd22430c15eb22b65af71a00b106005",
       "combined_rootxz_sha256": "a777b01321f0781cd2d8d17ec5d487efb316ed012c24657d57900a2d9ffd9fd9",
       "combined_sha256": "a777b01321f0781cd2d8d17ec5d487efb316ed012c24657d57900a2d9ffd9fd9"},
     "rootfs.squashfs": {"ftype": "squashfs", "size": 361897984,
       "path": "images/debian/buster/amd64/default/20200304_22:10/rootfs.squashfs",
       "sha256": "da076d1d6b0944a68ecdb86ff3711999f1a2d23645b3a457e99b02908a77852b"},
     "rootfs.tar.xz": {"ftype": "root.tar.xz", "size": 258840276,
       "path": "images/debian/buster/amd64/default/20200304_22:10/rootfs.tar.xz",
       "sha256": "b860abfe6385289ead913bdb0e1cb8a3df92be8e5636bed00ace175258a51b6a"}}}}}}}
"""

UBUNTU_PRODUCTS = b"""
{"content_id": "com.ubuntu.cloud:released:download", "creator": "climdb-download-streams-export",
 "datatype": "image-downloads", "format": "products:1.0",
 "license": "https://ubuntu.com/legal/intellectual-property-policy",
 "products": {"com.ubuntu.cloud:server:20.10:amd64": {
   "aliases": "20.10,g,groovy", "arch": "amd64", "os": "ubuntu", "release": "groovy",
   "release_codename": "Groovy Gorilla", "release_title": "20.10", "support_eol": "2021-07-22",
   "supported": false, "version": "20.10",
   "versions": {"20210720": {"label": "release", "pubname": "ubuntu-groovy-20.10-amd64-server-20210720",
     "items": {
      "lxd.tar.xz": {"ftype": "lxd.tar.xz", "size": 816,
        "path": "server/releases/groovy/release-20210720/ubuntu-20.10-server-cloudimg-amd64-lxd.tar.xz",
        "sha256": "9331c237b451de2fff00da8877daa333e6113a07cb9a158862951cc31a4df49d",
        "md5": "9d6136ba6967acc7392e4c7d0fa1ca45",
        "combined_disk-kvm-img_sha256": "f73dd8e169a045368776555ba01f1c76d5d93805bb400d174b2c027230e32662",
        "combined_disk1-img_sha256": "86e9b492d2c52203583ddab9073e08ed892baeffac6068e558a2cd7e218a96a2",
        "combined_rootxz_sha256": "2c45f5b8f95c78221b602929eac21093bc56a71e6e34ca1417b7cfb11feed9fa",
        "combined_sha256": "2c45f5b8f95c78221b602929eac21093bc56a71e6e34ca1417b7cfb11feed9fa",
        "combined_squashfs_sha256": "96234c60d65202ed8ce934f05311f3ec41db78fae4d5662c05ea390bedddcc62"},
      "squashfs": {"ftype": "squashfs", "size": 391643136,
        "path": "server/releases/groovy/release-20210720/ubuntu-20.10-server-cloudimg-amd64.squashfs",
        "sha256": "ee001f5b0245e0a05b55492b9acaf1ed0bf24caeb5c295fb95ec63f66ee6f0a8"},
      "disk-kvm.img": {"ftype": "disk-kvm.img", "size": 555286528,
        "path": "server/releases/groovy/release-20210720/ubuntu-20.10-server-cloudimg-amd64-disk-kvm.img",
        "sha256": "a6668ec789a892df9c89856259114528c74e751dbfe2755f14dbdc008a3890b2"},
      "disk1.img": {"ftype": "disk1.img", "size": 576126976,
        "path": "server/releases/groovy/release-20210720/ubuntu-20.10-server-cloudimg-amd64.img",
        "sha256": "9d4933b1118b7d3e9a45cba0e87ff0b4cea2da3538327c15f0750976398326f2"},
      "root.tar.xz": {"ftype": "root.tar.xz", "size": 344402400,
        "path": "server/releases/groovy/release-20210720/ubuntu-20.10-server-cloudimg-amd64-root.tar.xz",
        "sha256": "ba52b0a6b59d3768458364ffa91c2fc8e67f2a9cc29b1d1d3792cc4163138b25"}}}}}},
 "updated": "Thu, 22 Aug 2024 03:28:23 +0000"}
"""

DEBIAN_BASE = "images/debian/buster/amd64/default/20200304_22:10/"
GROOVY_BASE = "server/releases/groovy/release-20210720/ubuntu-20.10-server-cloudimg-amd64"


def h(c: str) -> str:
    """A valid sha256 made of one repeated hex digit."""
    return c * 64


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def products_doc(
    items: dict[str, Any],
    version_key: str = "20240101_0000",
    arch: str = "amd64",
    **product: Any,
) -> dict[str, Any]:
    """A products file with one product and one version holding `items`."""
    return {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "products": {
            f"testos:1.0:{arch}:default": {
                "aliases": "testos/1.0,testos/one",
                "arch": arch,
                "os": "testos",
                "release": "1.0",
                "release_title": "1.0",
                "versions": {version_key: {"items": items}},
                **product,
            }
        },
    }


def item(ftype: str, name: str, sha: str, size: int = 10, **extra: Any) -> dict[str, Any]:
    return {"ftype": ftype, "path": f"images/testos/{name}", "sha256": sha, "size": size, **extra}


def split_items(**meta_extra: Any) -> dict[str, Any]:
    return {
        "lxd.tar.xz": item("lxd.tar.xz", "lxd.tar.xz", h("1"), 5, **meta_extra),
        "rootfs.squashfs": item("squashfs", "rootfs.squashfs", h("2"), 100),
        "rootfs.tar.xz": item("root.tar.xz", "rootfs.tar.xz", h("3"), 90),
    }


# -- products_paths ---------------------------------------------------------------------------


def test_products_paths_linuxcontainers() -> None:
    assert products_paths(LINUXCONTAINERS_INDEX) == ["streams/v1/images.json"]


def test_products_paths_ubuntu_skips_image_ids() -> None:
    assert products_paths(UBUNTU_INDEX) == ["streams/v1/com.ubuntu.cloud:released:download.json"]


def test_products_paths_rules() -> None:
    index = {
        "format": "index:1.0",
        "index": {
            "a": {"datatype": "image-downloads", "path": "streams/v1/a.json", "products": ["x"]},
            "empty": {"datatype": "image-downloads", "path": "streams/v1/e.json", "products": []},
            "missing": {"datatype": "image-downloads", "path": "streams/v1/m.json"},
            "nulled": {"datatype": "image-downloads", "path": "streams/v1/n.json", "products": None},
            "other": {"datatype": "content-download", "path": "streams/v1/c.json", "products": ["x"]},
            "case": {"datatype": "Image-Downloads", "path": "streams/v1/k.json", "products": ["x"]},
            "b": {"datatype": "image-downloads", "path": "streams/v1/b.json", "products": ["y"]},
            "again": {"datatype": "image-downloads", "path": "streams/v1/a.json", "products": ["z"]},
        },
    }
    assert products_paths(encode(index)) == ["streams/v1/a.json", "streams/v1/b.json"]


def test_products_paths_without_index_is_empty() -> None:
    assert products_paths(b'{"format": "index:1.0"}') == []
    assert products_paths(b'{"index": null}') == []
    assert products_paths(b'{"index": {}}') == []


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid JSON"),
        (b"[]", "index: expected object, got array"),
        (b'"x"', "index: expected object, got string"),
        (b'{"index": []}', "index.index: expected object, got array"),
        (b'{"index": {"a": 1}}', "index.index['a']: expected object, got number"),
        (b'{"format": 1, "index": {}}', "index.format: expected string, got number"),
        (
            b'{"index": {"a": {"datatype": "image-downloads", "path": "p", "products": "x"}}}',
            "index.index['a'].products: expected array, got string",
        ),
        (
            b'{"index": {"a": {"datatype": "image-downloads", "path": "p", "products": [1]}}}',
            "index.index['a'].products[0]: expected string, got number",
        ),
        (
            b'{"index": {"a": {"datatype": "image-downloads", "path": 3, "products": ["x"]}}}',
            "index.index['a'].path: expected string, got number",
        ),
        (
            b'{"index": {"a": {"datatype": true, "path": "p", "products": ["x"]}}}',
            "index.index['a'].datatype: expected string, got boolean",
        ),
        (
            b'{"index": {"a": {"datatype": "image-downloads", "products": ["x"]}}}',
            "image-downloads entry has no path",
        ),
    ],
)
def test_products_paths_malformed(data: bytes, message: str) -> None:
    with pytest.raises(CatalogueError, match=_literal(message)):
        products_paths(data)


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_catalogue_error_is_a_value_error() -> None:
    assert issubclass(CatalogueError, ValueError)


# -- parse_products ---------------------------------------------------------------------------


def test_parse_products_linuxcontainers() -> None:
    items = parse_products(DEBIAN_PRODUCTS)
    assert items == {
        DEBIAN_BASE + "lxd.tar.xz": Item(
            path=DEBIAN_BASE + "lxd.tar.xz",
            sha256="d96e64e86fe314b41717a270e394fc644bddf23ebbdee870a8dec034435a47af",
            size=560,
            ftype="lxd.tar.xz",
            product="debian:buster:amd64:default",
            version="20200304_22:10",
        ),
        DEBIAN_BASE + "rootfs.squashfs": Item(
            path=DEBIAN_BASE + "rootfs.squashfs",
            sha256="da076d1d6b0944a68ecdb86ff3711999f1a2d23645b3a457e99b02908a77852b",
            size=361897984,
            ftype="squashfs",
            product="debian:buster:amd64:default",
            version="20200304_22:10",
        ),
        DEBIAN_BASE + "rootfs.tar.xz": Item(
            path=DEBIAN_BASE + "rootfs.tar.xz",
            sha256="b860abfe6385289ead913bdb0e1cb8a3df92be8e5636bed00ace175258a51b6a",
            size=258840276,
            ftype="root.tar.xz",
            product="debian:buster:amd64:default",
            version="20200304_22:10",
        ),
    }


def test_parse_products_ubuntu() -> None:
    items = parse_products(UBUNTU_PRODUCTS)
    assert sorted(items) == sorted(
        [
            GROOVY_BASE + "-lxd.tar.xz",
            GROOVY_BASE + ".squashfs",
            GROOVY_BASE + "-disk-kvm.img",
            GROOVY_BASE + ".img",
            GROOVY_BASE + "-root.tar.xz",
        ]
    )
    disk1 = items[GROOVY_BASE + ".img"]
    assert disk1.ftype == "disk1.img"
    assert disk1.size == 576126976
    assert disk1.sha256 == "9d4933b1118b7d3e9a45cba0e87ff0b4cea2da3538327c15f0750976398326f2"
    assert disk1.product == "com.ubuntu.cloud:server:20.10:amd64"
    assert disk1.version == "20210720"


def test_parse_products_skips_items_that_cannot_verify() -> None:
    items = {
        "ok": item("squashfs", "ok", h("a")),
        "nosha": {"ftype": "squashfs", "path": "images/testos/nosha", "size": 1},
        "emptysha": item("squashfs", "emptysha", ""),
        "nullsha": item("squashfs", "nullsha", h("b")) | {"sha256": None},
        "upper": item("squashfs", "upper", "A" * 64),
        "short": item("squashfs", "short", "a" * 63),
        "nosize": {"ftype": "squashfs", "path": "images/testos/nosize", "sha256": h("c")},
        "nullsize": item("squashfs", "nullsize", h("d")) | {"size": None},
        "nopath": {"ftype": "squashfs", "sha256": h("e"), "size": 1},
    }
    assert list(parse_products(encode(products_doc(items)))) == ["images/testos/ok"]


def test_parse_products_zero_size_is_fine() -> None:
    items = parse_products(encode(products_doc({"e": item("manifest", "empty", h("e"), 0)})))
    assert items["images/testos/empty"].size == 0


def test_parse_products_keeps_every_ftype_and_unlisted_products() -> None:
    """Any item may be requested (manifests, deltas), even of products no client lists."""
    doc = products_doc(
        {
            "manifest": item("manifest", "manifest", h("a")),
            "delta": item("squashfs.vcdiff", "delta", h("b"), delta_base="20231201_0000"),
        },
        version_key="latest",
        arch="sparc",
    )
    assert sorted(parse_products(encode(doc))) == ["images/testos/delta", "images/testos/manifest"]


def test_parse_products_same_path_twice() -> None:
    """linuxcontainers lists one metadata file under both lxd.tar.xz and incus.tar.xz."""
    items = {
        "incus.tar.xz": item("incus.tar.xz", "meta.tar.xz", h("1")),
        "lxd.tar.xz": item("lxd.tar.xz", "meta.tar.xz", h("1")),
    }
    parsed = parse_products(encode(products_doc(items)))
    assert list(parsed) == ["images/testos/meta.tar.xz"]
    assert parsed["images/testos/meta.tar.xz"].ftype == "incus.tar.xz"


def test_parse_products_tolerates_nulls_and_unknown_fields() -> None:
    doc = products_doc(
        {"a": item("squashfs", "a", h("a"), md5=None, extra={"nested": [1, 2]})},
        aliases=None,
        release_title=None,
        supported=None,
        requirements=None,
        unknown_field=[1, 2, 3],
    )
    doc["products"]["other"] = None
    doc["products"]["testos:1.0:amd64:default"]["versions"]["20240102"] = None
    assert list(parse_products(encode(doc))) == ["images/testos/a"]


def _mutated(path: list[str | int], value: Any) -> bytes:
    doc = products_doc(split_items(), requirements={"secureboot": "false"})
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return encode(doc)


PRODUCT = ["products", "testos:1.0:amd64:default"]
VERSION = [*PRODUCT, "versions", "20240101_0000"]
SQUASHFS = [*VERSION, "items", "rootfs.squashfs"]
META = [*VERSION, "items", "lxd.tar.xz"]


@pytest.mark.parametrize(
    "path, value, message",
    [
        ([*SQUASHFS, "size"], "100", "items['rootfs.squashfs'].size: expected integer, got string"),
        ([*SQUASHFS, "size"], 100.0, "items['rootfs.squashfs'].size: expected integer, got number"),
        ([*SQUASHFS, "size"], 1e3, "items['rootfs.squashfs'].size: expected integer, got number"),
        ([*SQUASHFS, "size"], True, "items['rootfs.squashfs'].size: expected integer, got boolean"),
        ([*SQUASHFS, "size"], -1, "items['rootfs.squashfs'].size: negative size -1"),
        ([*SQUASHFS, "sha256"], 7, "items['rootfs.squashfs'].sha256: expected string, got number"),
        ([*SQUASHFS, "path"], ["a"], "items['rootfs.squashfs'].path: expected string, got array"),
        ([*SQUASHFS, "ftype"], {}, "items['rootfs.squashfs'].ftype: expected string, got object"),
        ([*SQUASHFS, "md5"], 1, "items['rootfs.squashfs'].md5: expected string, got number"),
        ([*META, "combined_squashfs_sha256"], 1, "combined_squashfs_sha256: expected string"),
        ([*VERSION, "items", "x"], "nope", "items['x']: expected object, got string"),
        ([*VERSION, "items"], [], "['20240101_0000'].items: expected object, got array"),
        ([*VERSION, "label"], 1, "['20240101_0000'].label: expected string, got number"),
        ([*PRODUCT, "versions"], [], "versions: expected object, got array"),
        ([*PRODUCT, "aliases"], ["a", "b"], "aliases: expected string, got array"),
        ([*PRODUCT, "arch"], 64, "arch: expected string, got number"),
        ([*PRODUCT, "supported"], "yes", "supported: expected boolean, got string"),
        ([*PRODUCT, "requirements", "secureboot"], False, "requirements['secureboot']: expected string"),
        ([*PRODUCT, "lxd_requirements"], ["x"], "lxd_requirements: expected object, got array"),
        (["products"], [], "products: expected object, got array"),
        (["products", "x"], "y", "products['x']: expected object, got string"),
        (["content_id"], 3, "products file.content_id: expected string, got number"),
    ],
)
def test_parse_products_wrong_types(path: list[str | int], value: Any, message: str) -> None:
    data = _mutated(path, value)
    with pytest.raises(CatalogueError, match=_literal(message)):
        parse_products(data)
    # The same file is no better for listing images.
    with pytest.raises(CatalogueError):
        parse_images(data)


@pytest.mark.parametrize("data", [b"", b"{]", b"null", b"[]", b"42", b"\x00\x01"])
def test_parse_products_malformed_documents(data: bytes) -> None:
    with pytest.raises(CatalogueError):
        parse_products(data)


def test_parse_products_empty_file_has_no_items() -> None:
    assert parse_products(b"{}") == {}
    assert parse_products(b'{"products": {}}') == {}


# -- parse_images -----------------------------------------------------------------------------


def test_parse_images_linuxcontainers() -> None:
    images = parse_images(DEBIAN_PRODUCTS)
    by_type = {image.root_ftype: image for image in images}
    assert sorted(by_type) == ["root.tar.xz", "squashfs"]
    squashfs = by_type["squashfs"]
    assert squashfs.fingerprint == "deae1ebaa83fa743ba9c33e942f045f45fd22430c15eb22b65af71a00b106005"
    assert squashfs.type == "container"
    assert squashfs.arch == "amd64"
    assert squashfs.architecture == "x86_64"
    assert squashfs.product == "debian:buster:amd64:default"
    assert squashfs.version == "20200304_22:10"
    assert squashfs.aliases == (
        "debian/buster/default",
        "debian/buster/default/amd64",
        "debian/buster",
        "debian/buster/amd64",
    )
    assert squashfs.meta.path == DEBIAN_BASE + "lxd.tar.xz"
    assert squashfs.root is not None and squashfs.root.path == DEBIAN_BASE + "rootfs.squashfs"
    assert squashfs.size == 560 + 361897984
    assert squashfs.os == "Debian"
    assert squashfs.release == "buster"
    assert squashfs.release_title == "buster"
    # "20200304_22:10" is not YYYYMMDD_HHMM, so only the date counts.
    assert squashfs.created_at == datetime(2020, 3, 4, tzinfo=timezone.utc)
    assert squashfs.expires_at == datetime(1970, 1, 1, tzinfo=timezone.utc)
    rootxz = by_type["root.tar.xz"]
    assert rootxz.fingerprint == "a777b01321f0781cd2d8d17ec5d487efb316ed012c24657d57900a2d9ffd9fd9"
    assert rootxz.type == "container"
    assert rootxz.meta == squashfs.meta


def test_parse_images_ubuntu() -> None:
    images = {image.root_ftype: image for image in parse_images(UBUNTU_PRODUCTS)}
    assert {ftype: (image.fingerprint, image.type) for ftype, image in images.items()} == {
        "squashfs": (
            "96234c60d65202ed8ce934f05311f3ec41db78fae4d5662c05ea390bedddcc62",
            "container",
        ),
        "root.tar.xz": (
            "2c45f5b8f95c78221b602929eac21093bc56a71e6e34ca1417b7cfb11feed9fa",
            "container",
        ),
        "disk-kvm.img": (
            "f73dd8e169a045368776555ba01f1c76d5d93805bb400d174b2c027230e32662",
            "virtual-machine",
        ),
        "disk1.img": (
            "86e9b492d2c52203583ddab9073e08ed892baeffac6068e558a2cd7e218a96a2",
            "virtual-machine",
        ),
    }
    kvm = images["disk-kvm.img"]
    assert kvm.aliases == ("20.10", "g", "groovy")
    assert kvm.meta.path == GROOVY_BASE + "-lxd.tar.xz"
    assert kvm.root is not None and kvm.root.path == GROOVY_BASE + "-disk-kvm.img"
    assert kvm.label == "release"
    assert kvm.os_version == "20.10"
    assert kvm.variant == ""
    assert kvm.created_at == datetime(2021, 7, 20, tzinfo=timezone.utc)
    assert kvm.expires_at == datetime(2021, 7, 22, tzinfo=timezone.utc)


def test_parse_images_every_root_ftype() -> None:
    meta = item("lxd.tar.xz", "lxd.tar.xz", h("0")) | {
        "combined_squashfs_sha256": h("a"),
        "combined_rootxz_sha256": h("b"),
        "combined_disk-kvm-img_sha256": h("c"),
        "combined_disk1-img_sha256": h("d"),
        "combined_uefi1-img_sha256": h("e"),
    }
    items = {
        "lxd.tar.xz": meta,
        "squashfs": item("squashfs", "s", h("1")),
        "root.tar.xz": item("root.tar.xz", "r", h("2")),
        "disk-kvm.img": item("disk-kvm.img", "k", h("3")),
        "disk1.img": item("disk1.img", "d", h("4")),
        "uefi1.img": item("uefi1.img", "u", h("5")),
        "manifest": item("manifest", "m", h("6")),
        "tar.gz": item("tar.gz", "t", h("7")),
        "delta": item("squashfs.vcdiff", "v", h("8"), delta_base="20231201"),
    }
    images = parse_images(encode(products_doc(items)))
    assert [(i.root_ftype, i.fingerprint, i.type) for i in images] == [
        ("squashfs", h("a"), "container"),
        ("root.tar.xz", h("b"), "container"),
        ("disk-kvm.img", h("c"), "virtual-machine"),
        ("disk1.img", h("d"), "virtual-machine"),
        ("uefi1.img", h("e"), "virtual-machine"),
    ]


def test_parse_images_rootxz_falls_back_to_legacy_combined_sha256() -> None:
    legacy = parse_images(encode(products_doc(split_items(combined_sha256=h("f")))))
    assert [(i.root_ftype, i.fingerprint) for i in legacy] == [("root.tar.xz", h("f"))]
    preferred = parse_images(
        encode(products_doc(split_items(combined_sha256=h("f"), combined_rootxz_sha256=h("e"))))
    )
    assert [(i.root_ftype, i.fingerprint) for i in preferred] == [("root.tar.xz", h("e"))]


def test_parse_images_drops_pairs_without_combined_hash() -> None:
    assert parse_images(encode(products_doc(split_items()))) == []
    empty = parse_images(encode(products_doc(split_items(combined_squashfs_sha256=""))))
    assert empty == []


def test_parse_images_drops_pairs_whose_files_cannot_verify() -> None:
    items = split_items(combined_squashfs_sha256=h("a"), combined_rootxz_sha256=h("b"))
    del items["rootfs.squashfs"]["sha256"]
    assert [i.root_ftype for i in parse_images(encode(products_doc(items)))] == ["root.tar.xz"]
    del items["lxd.tar.xz"]["size"]
    assert parse_images(encode(products_doc(items))) == []


def test_parse_images_without_metadata_item() -> None:
    items = split_items(combined_squashfs_sha256=h("a"))
    del items["lxd.tar.xz"]
    assert parse_images(encode(products_doc(items))) == []


def test_parse_images_unified() -> None:
    items = {"lxd_combined.tar.gz": item("lxd_combined.tar.gz", "lxd_combined.tar.gz", h("9"), 42)}
    (image,) = parse_images(encode(products_doc(items)))
    assert image.fingerprint == h("9")
    assert image.type == "container"
    assert image.root is None
    assert image.root_ftype == "tar.gz"
    assert image.meta.path == "images/testos/lxd_combined.tar.gz"
    assert image.size == 42
    # Unified images are per family.
    assert parse_images(encode(products_doc(items)), family="incus") == []


def test_parse_images_incus_family() -> None:
    combined = {"combined_squashfs_sha256": h("a"), "combined_rootxz_sha256": h("b")}
    items = {
        "incus.tar.xz": item("incus.tar.xz", "meta.tar.xz", h("1")) | combined,
        "lxd.tar.xz": item("lxd.tar.xz", "meta.tar.xz", h("1")) | combined,
        "root.squashfs": item("squashfs", "rootfs.squashfs", h("2")),
        "incus_combined.tar.gz": item(
            "incus_combined.tar.gz", "vm.tar.gz", h("7"), combined_type="virtual-machine"
        ),
        "lxd_combined.tar.gz": item(
            "lxd_combined.tar.gz", "c.tar.gz", h("8"), combined_type="virtual-machine"
        ),
    }
    data = encode(products_doc(items))
    lxd = parse_images(data)
    assert [(i.fingerprint, i.type, i.meta.ftype) for i in lxd] == [
        (h("a"), "container", "lxd.tar.xz"),
        (h("8"), "container", "lxd_combined.tar.gz"),  # LXD ignores combined_type
    ]
    incus = parse_images(data, family="incus")
    assert [(i.fingerprint, i.type, i.meta.ftype) for i in incus] == [
        (h("a"), "container", "incus.tar.xz"),
        (h("7"), "virtual-machine", "incus_combined.tar.gz"),
    ]


def test_parse_images_one_image_per_fingerprint_in_a_version() -> None:
    combined = {"combined_squashfs_sha256": h("a")}
    items = {
        "lxd.tar.xz": item("lxd.tar.xz", "meta.tar.xz", h("1")) | combined,
        "lxd-again.tar.xz": item("lxd.tar.xz", "meta.tar.xz", h("1")) | combined,
        "root.squashfs": item("squashfs", "rootfs.squashfs", h("2")),
    }
    assert len(parse_images(encode(products_doc(items)))) == 1


@pytest.mark.parametrize(
    "version, created",
    [
        ("20240505_1212", datetime(2024, 5, 5, 12, 12, tzinfo=timezone.utc)),
        ("20240505_0007", datetime(2024, 5, 5, 0, 7, tzinfo=timezone.utc)),
        # LXD's Go layout reads a 12-hour clock: 13:12 fails it and the date alone is used.
        ("20240505_1312", datetime(2024, 5, 5, tzinfo=timezone.utc)),
        ("20240209_13:00", datetime(2024, 2, 9, tzinfo=timezone.utc)),
        ("20240622", datetime(2024, 6, 22, tzinfo=timezone.utc)),
        ("20240523.1", datetime(2024, 5, 23, tzinfo=timezone.utc)),
        ("20240523_9999", datetime(2024, 5, 23, tzinfo=timezone.utc)),
        ("2024052", None),
        ("latest-build", None),
        ("20241340", None),
        ("", None),
    ],
)
def test_parse_images_version_keys(version: str, created: datetime | None) -> None:
    data = encode(products_doc(split_items(combined_squashfs_sha256=h("a")), version_key=version))
    images = parse_images(data)
    if created is None:
        assert images == []
        # Items of skipped versions can still be served.
        assert len(parse_products(data)) == 3
    else:
        assert [i.created_at for i in images] == [created]


@pytest.mark.parametrize(
    "arch, canonical",
    [
        ("amd64", "x86_64"),
        ("x86_64", "x86_64"),
        ("arm64", "aarch64"),
        ("armhf", "armv7l"),
        ("i386", "i686"),
        ("ppc64el", "ppc64le"),
        ("s390x", "s390x"),
        ("riscv64", "riscv64"),
        ("loong64", "loongarch64"),
        ("sparc", None),
        ("", None),
    ],
)
def test_parse_images_architectures(arch: str, canonical: str | None) -> None:
    images = parse_images(encode(products_doc(split_items(combined_squashfs_sha256=h("a")), arch=arch)))
    assert [i.architecture for i in images] == ([] if canonical is None else [canonical])


def test_parse_images_incus_reads_only_the_day() -> None:
    combined = {"combined_squashfs_sha256": h("a")}
    items = {
        "incus.tar.xz": item("incus.tar.xz", "m", h("1")) | combined,
        "s": item("squashfs", "s", h("2")),
    }
    data = encode(products_doc(items, version_key="20240505_1212"))
    (image,) = parse_images(data, family="incus")
    assert image.created_at == datetime(2024, 5, 5, tzinfo=timezone.utc)


def test_parse_images_properties() -> None:
    doc = products_doc(
        split_items(combined_squashfs_sha256=h("a")),
        variant="cloud",
        support_eol="2030-04-30",
        version="1.0",
        requirements={"secureboot": "false", "nesting": "true"},
    )
    (image,) = parse_images(encode(doc))
    assert image.variant == "cloud"
    assert image.os_version == "1.0"
    assert image.expires_at == datetime(2030, 4, 30, tzinfo=timezone.utc)
    assert image.requirements == (("nesting", "true"), ("secureboot", "false"))


def test_parse_images_requirements_per_family() -> None:
    doc = products_doc(
        split_items(combined_squashfs_sha256=h("a")),
        requirements={"cgroup": "v1"},
        lxd_requirements={"secureboot": "false"},
    )
    (lxd,) = parse_images(encode(doc))
    assert lxd.requirements == (("secureboot", "false"),)
    incus_doc = products_doc(
        {
            "incus.tar.xz": item("incus.tar.xz", "m", h("1"), combined_squashfs_sha256=h("a")),
            "s": item("squashfs", "s", h("2")),
        },
        requirements={"cgroup": "v1"},
        lxd_requirements={"secureboot": "false"},
    )
    (incus,) = parse_images(encode(incus_doc), family="incus")
    assert incus.requirements == (("cgroup", "v1"),)
    # For LXD an lxd_requirements field that is there but empty still replaces requirements.
    empty = products_doc(
        split_items(combined_squashfs_sha256=h("a")), requirements={"cgroup": "v1"}, lxd_requirements={},
    )
    assert parse_images(encode(empty))[0].requirements == ()


def test_parse_images_bad_eol_is_epoch() -> None:
    doc = products_doc(split_items(combined_squashfs_sha256=h("a")), support_eol="soon")
    (image,) = parse_images(encode(doc))
    assert image.expires_at == datetime(1970, 1, 1, tzinfo=timezone.utc)


def test_parse_images_aliases() -> None:
    with_none = products_doc(split_items(combined_squashfs_sha256=h("a")), aliases="")
    assert parse_images(encode(with_none))[0].aliases == ()
    one = products_doc(split_items(combined_squashfs_sha256=h("a")), aliases="only")
    assert parse_images(encode(one))[0].aliases == ("only",)


def test_parse_catalogue_matches_the_two_functions() -> None:
    catalogue = parse_catalogue(UBUNTU_PRODUCTS)
    assert catalogue.items == parse_products(UBUNTU_PRODUCTS)
    assert catalogue.images == parse_images(UBUNTU_PRODUCTS)
    assert all(isinstance(i, Image) for i in catalogue.images)


def test_values_are_frozen_and_hashable() -> None:
    (image, *_rest) = parse_images(DEBIAN_PRODUCTS)
    assert len({image, image}) == 1
    with pytest.raises(AttributeError):
        image.fingerprint = "x"  # type: ignore[misc]


# -- size -------------------------------------------------------------------------------------


def _big_products(target_bytes: int) -> bytes:
    """A products file of about `target_bytes`, shaped like Ubuntu's: many products and versions."""
    products: dict[str, Any] = {}
    counter = 0
    size = 0
    p = 0
    while size < target_bytes:
        versions: dict[str, Any] = {}
        for v in range(20):
            base = f"server/releases/r{p}/release-2024{v:04d}/ubuntu-{p}-server-cloudimg-amd64"
            items: dict[str, Any] = {}
            for name, ftype in (
                ("lxd.tar.xz", "lxd.tar.xz"),
                ("squashfs", "squashfs"),
                ("root.tar.xz", "root.tar.xz"),
                ("disk-kvm.img", "disk-kvm.img"),
                ("disk1.img", "disk1.img"),
                ("manifest", "manifest"),
            ):
                counter += 1
                items[name] = {
                    "ftype": ftype,
                    "path": f"{base}.{name}",
                    "sha256": f"{counter:064x}",
                    "md5": f"{counter:032x}",
                    "size": counter * 1000,
                }
            items["lxd.tar.xz"].update(
                {
                    "combined_squashfs_sha256": f"{counter + 1:064x}",
                    "combined_rootxz_sha256": f"{counter + 2:064x}",
                    "combined_sha256": f"{counter + 2:064x}",
                    "combined_disk-kvm-img_sha256": f"{counter + 3:064x}",
                    "combined_disk1-img_sha256": f"{counter + 4:064x}",
                }
            )
            versions[f"2024{v + 101:04d}"] = {"label": "release", "items": items}
            size += 2200
        products[f"com.ubuntu.cloud:server:{p}:amd64"] = {
            "aliases": f"{p},p{p}",
            "arch": "amd64",
            "os": "ubuntu",
            "release": f"r{p}",
            "release_title": f"{p}",
            "supported": True,
            "versions": versions,
        }
        p += 1
    return encode({"content_id": "big", "datatype": "image-downloads", "products": products})


def test_parse_30mb_products_file_quickly() -> None:
    data = _big_products(30 * 1024 * 1024)
    assert len(data) > 25 * 1024 * 1024
    start = time.perf_counter()
    catalogue = parse_catalogue(data)
    elapsed = time.perf_counter() - start
    assert len(catalogue.items) > 60_000
    assert len(catalogue.images) == len(catalogue.items) // 6 * 4
    # Generous: a few tenths of a second is typical; this only catches quadratic behaviour.
    assert elapsed < 10.0, f"parsing {len(data)} bytes took {elapsed:.1f}s"


# -- deltas -------------------------------------------------------------------------------------


def test_parse_images_lists_the_deltas_of_a_root_from_listed_versions() -> None:
    """As LXD's ToLXD: `<root ftype>.vcdiff` items of the same version, based on a listed version."""
    doc = products_doc(split_items(combined_squashfs_sha256=h("a"), combined_rootxz_sha256=h("b")))
    versions = doc["products"]["testos:1.0:amd64:default"]["versions"]
    versions["20240101_0000"]["items"].update({
        "root.20231201_0000.vcdiff": item(
            "squashfs.vcdiff", "d1.vcdiff", h("4"), delta_base="20231201_0000"),
        "root.20231101_0000.vcdiff": item(
            "squashfs.vcdiff", "d0.vcdiff", h("5"), delta_base="20231101_0000"),
        "root.gone.vcdiff": item("squashfs.vcdiff", "gone.vcdiff", h("6"), delta_base="20230101_0000"),
        "disk.20231201_0000.vcdiff": item(
            "disk-kvm.img.vcdiff", "k1.vcdiff", h("7"), delta_base="20231201_0000"),
    })
    for older in ("20231201_0000", "20231101_0000"):
        versions[older] = {"items": {"lxd.tar.xz": item("lxd.tar.xz", f"{older}.tar.xz", h("8"))}}
    images = {i.root_ftype: i for i in parse_images(encode(doc)) if i.version == "20240101_0000"}
    deltas = images["squashfs"].deltas
    assert [(d.path, d.delta_base, d.ftype) for d in deltas] == [
        ("images/testos/d1.vcdiff", "20231201_0000", "squashfs.vcdiff"),
        ("images/testos/d0.vcdiff", "20231101_0000", "squashfs.vcdiff"),
    ]
    # A root.tar.xz has no deltas; the disk-kvm.img delta belongs to no image of this version.
    assert images["root.tar.xz"].deltas == ()
    # Every delta stays a plain item a client may ask for, its base kept.
    items = parse_products(encode(doc))
    assert items["images/testos/gone.vcdiff"].delta_base == "20230101_0000"
    assert items["images/testos/lxd.tar.xz"].delta_base == ""
