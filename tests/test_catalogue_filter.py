"""The offline catalogue (proxy.catalogue_filter): only what is stored is listed.

Pure tests on hand-written and generated catalogues, and one loopback test in which the real
`lxc` client lists a filtered tree and resolves aliases in it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IReactorSSL

from proxy.catalogue import CatalogueError, Item, parse_images, parse_products, products_paths
from proxy.catalogue_filter import filter_index, filter_products
from proxy.resolve import host_architecture, resolve_alias
from tests.helpers.certs import make_ca
from tests.helpers.tree import INDEX_PATH, PRODUCTS_PATH, Tree, build_tree
from tests.helpers.upstream import start_https_upstream
from tests.test_helpers_tree import lxc_remote, needs_lxc, run_lxc


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def item(tag: str, ftype: str, **extra: Any) -> dict[str, Any]:
    return {"ftype": ftype, "path": f"{tag}/{ftype}", "sha256": sha(f"{tag} {ftype}"), "size": 7, **extra}


def meta(tag: str, *roots: str, ftype: str = "lxd.tar.xz") -> dict[str, Any]:
    fields = {
        "squashfs": "combined_squashfs_sha256",
        "root.tar.xz": "combined_rootxz_sha256",
        "disk-kvm.img": "combined_disk-kvm-img_sha256",
        "disk1.img": "combined_disk1-img_sha256",
        "uefi1.img": "combined_uefi1-img_sha256",
    }
    extra = {fields[r]: sha(f"{tag} image {r}") for r in roots}
    if "root.tar.xz" in roots:
        extra["combined_sha256"] = extra["combined_rootxz_sha256"]
    entry = item(tag, "lxd.tar.xz", **extra)
    entry["ftype"] = ftype
    return entry


V1, V2 = "20240101_0000", "20240201_0000"


def products_doc() -> dict[str, Any]:
    """Two products: a with two full versions (and a delta and a manifest), b with one."""
    a1, a2, b1 = "a " + V1, "a " + V2, "b " + V1
    return {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "updated": "Mon, 01 Jan 2024 00:00:00 +0000",
        "license": "free",
        "products": {
            "a:1:amd64:default": {
                "aliases": "a/1,a",
                "arch": "amd64",
                "os": "a",
                "release": "1",
                "release_title": "One",
                "supported": True,
                "support_eol": "2030-01-01",
                "lxd_requirements": {"secureboot": "false"},
                "versions": {
                    V1: {
                        "label": "release",
                        "items": {
                            "lxd.tar.xz": meta(a1, "squashfs", "root.tar.xz", "disk-kvm.img"),
                            "incus.tar.xz": meta(a1, "squashfs", "root.tar.xz", "disk-kvm.img", ftype="incus.tar.xz"),
                            "rootfs.squashfs": item(a1, "squashfs"),
                            "rootfs.tar.xz": item(a1, "root.tar.xz"),
                            "disk.qcow2": item(a1, "disk-kvm.img"),
                            "manifest": item(a1, "manifest"),
                        },
                    },
                    V2: {
                        "items": {
                            "lxd.tar.xz": meta(a2, "squashfs", "root.tar.xz", "disk-kvm.img"),
                            "rootfs.squashfs": item(a2, "squashfs"),
                            "rootfs.tar.xz": item(a2, "root.tar.xz"),
                            "disk.qcow2": item(a2, "disk-kvm.img"),
                            "delta": item(a2, "squashfs.vcdiff", delta_base=V1),
                        },
                    },
                },
            },
            "b:1:arm64:default": {
                "aliases": "b",
                "arch": "arm64",
                "os": "b",
                "release": "1",
                "release_title": "One",
                "versions": {
                    V1: {"items": {"lxd.tar.xz": meta(b1, "squashfs"), "rootfs.squashfs": item(b1, "squashfs")}},
                },
            },
        },
    }


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def without(*drop: tuple[str, str]) -> Any:
    """A keep predicate rejecting items by (version tag, ftype)."""
    gone = {sha(f"{tag} {ftype}") for tag, ftype in drop}
    return lambda i: i.sha256 not in gone


def fingerprints(data: bytes) -> set[str]:
    return {i.fingerprint for i in parse_images(data)}


def test_keep_everything_changes_nothing_but_spacing() -> None:
    data = encode(products_doc())
    out = filter_products(data, lambda i: True)
    assert json.loads(out) == products_doc()
    assert parse_images(out) == parse_images(data)
    assert parse_images(out, "incus") == parse_images(data, "incus")


def test_keep_nothing() -> None:
    out = json.loads(filter_products(encode(products_doc()), lambda i: False))
    assert out["products"] == {}
    assert {k: v for k, v in out.items() if k != "products"} == {
        k: v for k, v in products_doc().items() if k != "products"
    }


def test_missing_root_removes_its_image_only() -> None:
    data = encode(products_doc())
    tag = "a " + V2
    out = filter_products(data, without((tag, "squashfs")))
    doc = json.loads(out)
    items = doc["products"]["a:1:amd64:default"]["versions"][V2]["items"]
    assert set(items) == {"lxd.tar.xz", "rootfs.tar.xz", "disk.qcow2", "delta"}
    # The metadata item is untouched: its hash for the removed root names nothing listed.
    assert items["lxd.tar.xz"] == products_doc()["products"]["a:1:amd64:default"]["versions"][V2]["items"]["lxd.tar.xz"]
    assert fingerprints(out) == fingerprints(data) - {sha(f"{tag} image squashfs")}
    # An alias now resolves to what is left: root.tar.xz of the newest version.
    image = resolve_alias(parse_images(out), "a", "amd64")
    assert image is not None and (image.version, image.root_ftype) == (V2, "root.tar.xz")


def test_version_without_metadata_or_roots_is_dropped() -> None:
    data = encode(products_doc())
    tag = "a " + V2
    for drop in (
        [(tag, "lxd.tar.xz")],
        [(tag, "squashfs"), (tag, "root.tar.xz"), (tag, "disk-kvm.img")],
    ):
        doc = json.loads(filter_products(data, without(*drop)))
        assert set(doc["products"]["a:1:amd64:default"]["versions"]) == {V1}
    # The last version of a product gone: the product is gone.
    doc = json.loads(filter_products(data, without(("b " + V1, "squashfs"))))
    assert set(doc["products"]) == {"a:1:amd64:default"}


def test_other_items_do_not_decide() -> None:
    data = encode(products_doc())
    a1, a2 = "a " + V1, "a " + V2
    doc = json.loads(filter_products(data, without((a1, "manifest"), (a2, "squashfs.vcdiff"))))
    versions = doc["products"]["a:1:amd64:default"]["versions"]
    assert "manifest" not in versions[V1]["items"] and "delta" not in versions[V2]["items"]
    assert len(versions[V1]["items"]) == 5 and len(versions[V2]["items"]) == 4
    # A kept delta stays; the label of a version stays.
    doc = json.loads(filter_products(data, lambda i: True))
    assert doc["products"]["a:1:amd64:default"]["versions"][V2]["items"]["delta"]["delta_base"] == V1
    assert doc["products"]["a:1:amd64:default"]["versions"][V1]["label"] == "release"


def test_root_without_a_combined_hash_is_no_image() -> None:
    doc = products_doc()
    tag = "b " + V1
    doc["products"]["b:1:arm64:default"]["versions"][V1]["items"]["disk"] = item(tag, "disk1.img")
    out = json.loads(filter_products(encode(doc), without((tag, "squashfs"))))
    assert "b:1:arm64:default" not in out["products"]


def test_unified_and_incus_metadata() -> None:
    doc = products_doc()
    tag = "u " + V1
    doc["products"]["u:1:amd64:default"] = {
        "aliases": "u", "arch": "amd64", "os": "u", "release": "1",
        "versions": {V1: {"items": {
            "lxd_combined.tar.gz": item(tag, "lxd_combined.tar.gz"),
            "incus_combined.tar.gz": item(tag, "incus_combined.tar.gz", combined_type="virtual-machine"),
        }}},
    }
    data = encode(doc)
    out = json.loads(filter_products(data, without((tag, "lxd_combined.tar.gz"))))
    assert set(out["products"]["u:1:amd64:default"]["versions"][V1]["items"]) == {"incus_combined.tar.gz"}
    filtered = filter_products(data, without((tag, "lxd_combined.tar.gz")))
    assert [i.type for i in parse_images(filtered, "incus") if i.product.startswith("u:")] == ["virtual-machine"]
    assert [i for i in parse_images(filtered) if i.product.startswith("u:")] == []
    # Incus lists a version whose incus.tar.xz is kept even when lxd.tar.xz is not (V2 has
    # no incus.tar.xz: only LXD lists it).
    doc2 = products_doc()
    doc2["products"]["a:1:amd64:default"]["versions"][V1]["items"]["incus.tar.xz"]["path"] = "other/path"
    kept = filter_products(encode(doc2), lambda i: not (i.ftype == "lxd.tar.xz" and i.version == V1))
    assert {i.version for i in parse_images(kept, "incus")} == {V1}
    assert {i.version for i in parse_images(kept) if i.product.startswith("a:")} == {V2}


def test_keep_is_asked_about_verifiable_items_only() -> None:
    doc = products_doc()
    items = doc["products"]["b:1:arm64:default"]["versions"][V1]["items"]
    items["nohash"] = {"ftype": "root.tar.xz", "path": "x/rootfs.tar.xz", "size": 3}
    items["badhash"] = {"ftype": "root.tar.xz", "path": "x/r2", "size": 3, "sha256": "ABC"}
    items["nosize"] = {"ftype": "manifest", "path": "x/m", "sha256": sha("m")}
    asked: list[Item] = []

    def keep(i: Item) -> bool:
        asked.append(i)
        return True

    out = json.loads(filter_products(encode(doc), keep))
    assert {i.path for i in asked if i.product == "b:1:arm64:default"} == {
        f"b {V1}/lxd.tar.xz", f"b {V1}/squashfs",
    }
    assert set(out["products"]["b:1:arm64:default"]["versions"][V1]["items"]) == {"lxd.tar.xz", "rootfs.squashfs"}
    first = next(i for i in asked if i.path == f"a {V1}/disk-kvm.img")
    assert first == Item(
        path=f"a {V1}/disk-kvm.img", sha256=sha(f"a {V1} disk-kvm.img"), size=7,
        ftype="disk-kvm.img", product="a:1:amd64:default", version=V1,
    )


def test_output_keeps_json_types() -> None:
    doc = products_doc()
    doc["products"]["a:1:amd64:default"]["versions"][V1]["items"]["rootfs.squashfs"]["size"] = 2**40
    doc["products"]["b:1:arm64:default"]["release_title"] = "Zwölf \u2603"
    out = filter_products(encode(doc), without(("a " + V2, "squashfs")))
    assert out.isascii()
    parsed = json.loads(out)
    product = parsed["products"]["a:1:amd64:default"]
    assert product["aliases"] == "a/1,a" and product["supported"] is True
    assert product["lxd_requirements"] == {"secureboot": "false"}
    assert product["versions"][V1]["items"]["rootfs.squashfs"]["size"] == 2**40
    assert parsed["products"]["b:1:arm64:default"]["release_title"] == "Zwölf \u2603"
    assert list(parsed) == list(doc)
    parse_products(out)


def test_bad_input() -> None:
    for data in (b"not json", b"[]", b'{"products": []}', b'{"products": {"p": {"versions": 3}}}',
                 b'{"products": {"p": {"versions": {"v": {"items": {"i": "x"}}}}}}'):
        with pytest.raises(CatalogueError):
            filter_products(data, lambda i: True)
    for data in (b"{", b'"x"', b'{"index": []}', b'{"index": {"k": 1}}'):
        with pytest.raises(CatalogueError):
            filter_index(data, {})
    assert json.loads(filter_products(b'{"format": "products:1.0"}', lambda i: True)) == {"format": "products:1.0"}


def test_filter_index() -> None:
    index: dict[str, Any] = {
        "format": "index:1.0",
        "updated": "Mon, 01 Jan 2024 00:00:00 +0000",
        "index": {
            "images": {"datatype": "image-downloads", "path": "streams/v1/images.json",
                       "format": "products:1.0", "products": ["a", "b", "c"]},
            "more": {"datatype": "image-downloads", "path": "streams/v1/more.json", "products": ["d"]},
            "unknown": {"datatype": "image-downloads", "path": "streams/v1/unknown.json", "products": ["e"]},
            "ids": {"datatype": "image-ids", "path": "streams/v1/ids.json", "products": ["x"]},
        },
    }
    out = filter_index(json.dumps(index).encode(), {
        "streams/v1/images.json": ["c", "a"],
        "streams/v1/more.json": [],
    })
    doc = json.loads(out)
    assert doc["format"] == "index:1.0" and doc["updated"] == index["updated"]
    assert doc["index"] == {
        "images": {"datatype": "image-downloads", "path": "streams/v1/images.json",
                   "format": "products:1.0", "products": ["c", "a"]},
        "ids": index["index"]["ids"],
    }
    assert products_paths(out) == ["streams/v1/images.json"]
    assert products_paths(filter_index(json.dumps(index).encode(), {})) == []


def test_filter_a_generated_tree(shared_tree: Tree) -> None:
    data = shared_tree.read(PRODUCTS_PATH)
    gone = {i.root.sha256 for i in shared_tree.images if i.root is not None and i.root.ftype == "root.tar.xz"}
    out = filter_products(data, lambda i: i.sha256 not in gone)
    assert fingerprints(out) == {
        i.fingerprint for i in shared_tree.images if i.root is None or i.root.ftype != "root.tar.xz"
    }
    assert json.loads(out)["products"].keys() == json.loads(data)["products"].keys()


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return build_tree(tmp_path_factory.mktemp("filter-tree"))


# -- the real client --------------------------------------------------------------------------

FINGERPRINT_RE = re.compile(rb"^Fingerprint: ([0-9a-f]{64})\s*$", re.MULTILINE)


def write_filtered(tree: Tree, keep: Any) -> None:
    """Replace the tree's catalogue with its filtered version (the files stay)."""
    products = filter_products(tree.read(PRODUCTS_PATH), keep)
    remaining = {PRODUCTS_PATH: list(json.loads(products)["products"])}
    index = filter_index(tree.read(INDEX_PATH), remaining)
    tree.path_of(PRODUCTS_PATH).write_bytes(products)
    tree.path_of(INDEX_PATH).write_bytes(index)


@needs_lxc
@pytest.mark.lxc
@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_lxc_lists_exactly_the_kept_images(tmp_path: Path) -> None:
    native = {"x86_64": "amd64", "aarch64": "arm64"}.get(host_architecture())
    if native is None:
        pytest.skip(f"the tree has no images for {host_architecture()}")
    other = "arm64" if native == "amd64" else "amd64"
    tree = build_tree(tmp_path / "tree")
    newest = [i for i in tree.images_of("testos", "2.0", "20240201_0000") if i.arch == native]
    gone = {i.root.sha256 for i in newest if i.root is not None and i.root.ftype in ("squashfs", "disk-kvm.img")}
    gone |= {i.meta.sha256 for i in tree.images_of("testos", "1.0") if i.arch == other}
    gone |= {i.meta.sha256 for i in tree.images_of("testos", "3.0")}
    kept_images = [i for i in tree.images if not {f.sha256 for f in i.files} & gone]
    assert 0 < len(kept_images) < len(tree.images) - 4
    write_filtered(tree, lambda i: i.sha256 not in gone)
    images = parse_images(tree.read(PRODUCTS_PATH))
    assert {i.fingerprint for i in images} == {i.fingerprint for i in kept_images}

    running = start_https_upstream(cast(IReactorSSL, global_reactor), tree.root, make_ca())
    try:
        conf = await lxc_remote(tmp_path, running)
        listed = json.loads(await run_lxc(conf, "image", "list", "t:", "--format", "json"))
        assert sorted(i["fingerprint"] for i in listed) == sorted(i.fingerprint for i in kept_images)
        # Aliases go to what is left: root.tar.xz of the newest version, the older VM.
        for args, image_type, expected in (
            (["t:testos/2.0"], "container", ("20240201_0000", "root.tar.xz")),
            (["t:testos/2.0", "--vm"], "virtual-machine", ("20240101_0000", "disk-kvm.img")),
        ):
            image = resolve_alias(images, "testos/2.0", native, image_type)
            assert image is not None and (image.version, image.root_ftype) == expected
            match = FINGERPRINT_RE.search(await run_lxc(conf, "image", "info", *args))
            assert match is not None and match.group(1).decode() == image.fingerprint
    finally:
        await running.stop()
