"""The offline catalogue: an upstream's metadata cut down to the images the proxy can serve.

While an upstream is offline the proxy serves its index and products files filtered to what is
stored, so that the clients list only images they can download and resolve each alias to the
newest one that is actually here (PROTOCOLS.md §1.5-1.6: they pick among the images listed).

`filter_products` removes every item that is not kept and then every version left without a
complete image (a metadata item with a root item its combined hash names, or a unified item), so
a version whose squashfs is stored but whose VM disk is not still offers its container image.
The metadata item itself is never changed: its combined hashes are the fingerprints of the
images that remain, and a hash for a root that is gone names nothing the client can see.
Everything else, down to the spelling of sizes and aliases, is passed through as decoded.
"""

from __future__ import annotations


import re
from collections.abc import Callable, Mapping
from typing import Any

from proxy import jsonsteps
from proxy.catalogue import (
    COMBINED_HASH_FIELDS,
    IMAGE_DOWNLOADS,
    LEGACY_ROOTXZ_FIELD,
    META_FTYPE,
    UNIFIED_FTYPE,
    CatalogueError,
    Item,
)

META_FTYPES = frozenset(META_FTYPE.values())
UNIFIED_FTYPES = frozenset(UNIFIED_FTYPE.values())

# Only an item a client can verify can be stored, so only such an item can be kept.
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")


def _decode(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = jsonsteps.loads(data)
    except ValueError as e:
        raise CatalogueError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CatalogueError(f"{what}: expected an object")
    return doc


def _encode(doc: Mapping[str, Any]) -> bytes:
    # ASCII escapes keep any string the input held (even a lone surrogate) encodable.
    return jsonsteps.dumps(doc).encode("ascii")


def _object(value: object, where: str) -> dict[str, Any]:
    """A JSON object, or {} for null/absent; anything else is a file no client would take."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CatalogueError(f"{where}: expected an object")
    return value


def _item(fields: Mapping[str, Any], product: str, version: str) -> Item | None:
    """The `Item` a client would verify, or None when it lacks a usable path, sha256 or size."""
    path = fields.get("path")
    sha256 = fields.get("sha256")
    size = fields.get("size")
    ftype = fields.get("ftype")
    if not isinstance(path, str) or not path:
        return None
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return None
    return Item(
        path=path,
        sha256=sha256,
        size=size,
        ftype=ftype if isinstance(ftype, str) else "",
        product=product,
        version=version,
    )


def _fingerprint(meta: Mapping[str, Any], root_ftype: str) -> str:
    value = meta.get(COMBINED_HASH_FIELDS[root_ftype])
    if not value and root_ftype == "root.tar.xz":
        value = meta.get(LEGACY_ROOTXZ_FIELD)
    return value if isinstance(value, str) else ""


def _has_image(items: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a client of either family would list an image from these items."""
    entries = list(items.values())
    for fields in entries:
        ftype = fields.get("ftype")
        if ftype in UNIFIED_FTYPES:
            return True
        if ftype in META_FTYPES:
            for root in entries:
                root_ftype = root.get("ftype")
                if isinstance(root_ftype, str) and root_ftype in COMBINED_HASH_FIELDS:
                    if _fingerprint(fields, root_ftype):
                        return True
    return False


def filter_products(data: bytes, keep: Callable[[Item], bool]) -> bytes:
    """A products file reduced to what `keep` accepts (see `filter_catalogue`)."""
    return filter_catalogue(data, keep)[0]


def filter_catalogue(data: bytes, keep: Callable[[Item], bool]) -> tuple[bytes, list[str]]:
    """A products file reduced to what `keep` accepts, and the ids of the products left in it
    (in document order), as `filter_index` wants them.

    `keep` is asked about every item that has a path, a lowercase hex sha256 and a size (no
    other item can be stored); items it rejects, and items that lack those, are removed from
    their version. A version left without a complete image is removed, and so is a product left
    without versions. Products, versions and kept items keep every field as it was, in order.

    Raises `CatalogueError` when `data` is not JSON or its products, versions or items are not
    objects.
    """
    doc = _decode(data, "products file")
    products = _object(doc.get("products"), "products")
    remaining_products: dict[str, Any] = {}
    for product_id, raw_product in products.items():
        product = _object(raw_product, f"products[{product_id!r}]")
        versions = _object(product.get("versions"), f"products[{product_id!r}].versions")
        remaining_versions: dict[str, Any] = {}
        for version_key, raw_version in versions.items():
            vwhere = f"products[{product_id!r}].versions[{version_key!r}]"
            version = _object(raw_version, vwhere)
            items = _object(version.get("items"), f"{vwhere}.items")
            kept: dict[str, Any] = {}
            for item_key, raw_item in items.items():
                fields = _object(raw_item, f"{vwhere}.items[{item_key!r}]")
                item = _item(fields, product_id, version_key)
                if item is not None and keep(item):
                    kept[item_key] = raw_item
            if _has_image(kept):
                remaining_versions[version_key] = {**version, "items": kept}
        if remaining_versions:
            remaining_products[product_id] = {**product, "versions": remaining_versions}
    if "products" in doc:
        doc["products"] = remaining_products
    body = _encode(doc)
    left = list(remaining_products)
    # The filtered document shares only leaves (kept items) with the decoded one: free both
    # in steps.
    jsonsteps.release(products)
    jsonsteps.release(doc)
    return body, left


def filter_index(data: bytes, products_by_path: Mapping[str, list[str]]) -> bytes:
    """The index with each image-downloads entry listing the products left in its file.

    `products_by_path` maps a products file path, as the index writes it, to the product ids
    that remain in it (see `filter_products`). An image-downloads entry whose path is not in
    the mapping, or has no products left, is removed: the clients would fetch that file only to
    find nothing, or fail. Entries of other datatypes are left alone (the clients ignore them).

    Raises `CatalogueError` when `data` is not JSON or its index or entries are not objects.
    """
    doc = _decode(data, "index")
    entries = _object(doc.get("index"), "index.index")
    remaining: dict[str, Any] = {}
    for key, raw in entries.items():
        entry = _object(raw, f"index.index[{key!r}]")
        if entry.get("datatype") != IMAGE_DOWNLOADS:
            remaining[key] = raw
            continue
        path = entry.get("path")
        products = products_by_path.get(path, []) if isinstance(path, str) else []
        if products:
            remaining[key] = {**entry, "products": list(products)}
    if "index" in doc:
        doc["index"] = remaining
    return _encode(doc)
