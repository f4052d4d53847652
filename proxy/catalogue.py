"""Pure parsing of simplestreams metadata: the index, products files, and the images they describe.

Nothing here does I/O. The rules follow what the LXD and Incus clients do with the same files
(PROTOCOLS.md §1.2-1.5): a file the clients would reject as a whole (bad JSON, a field of the wrong
type) raises `CatalogueError`; parts the clients silently ignore (other datatypes, unknown
architectures, undated versions, items without a hash) are skipped here too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from attrs import frozen

from proxy import jsonsteps

Family = Literal["lxd", "incus"]

IMAGE_DOWNLOADS = "image-downloads"

# Root ftype -> the field of the metadata item holding sha256(meta || root), which is the image
# fingerprint. root.tar.xz falls back to the legacy combined_sha256 when its own field is absent.
COMBINED_HASH_FIELDS: Mapping[str, str] = {
    "squashfs": "combined_squashfs_sha256",
    "root.tar.xz": "combined_rootxz_sha256",
    "disk-kvm.img": "combined_disk-kvm-img_sha256",
    "disk1.img": "combined_disk1-img_sha256",
    "uefi1.img": "combined_uefi1-img_sha256",
}
LEGACY_ROOTXZ_FIELD = "combined_sha256"
VM_ROOT_FTYPES = frozenset({"disk-kvm.img", "disk1.img", "uefi1.img"})
# Root ftypes a delta may rebuild: an item of ftype `<root ftype>.vcdiff` in the same version,
# naming the version it starts from in `delta_base` (LXD shared/simplestreams/products.go; LXD
# 5.0 and Incus look for squashfs deltas only, later LXD for disk-kvm.img ones too).
DELTA_ROOT_FTYPES = frozenset({"squashfs", "disk-kvm.img"})
DELTA_SUFFIX = ".vcdiff"

META_FTYPE: Mapping[str, str] = {"lxd": "lxd.tar.xz", "incus": "incus.tar.xz"}
UNIFIED_FTYPE: Mapping[str, str] = {"lxd": "lxd_combined.tar.gz", "incus": "incus_combined.tar.gz"}

# ftype -> the extension LXD gives a file of that format when it exports an image (its
# DetectCompression reads the first bytes: xz -> .tar.xz, gzip -> .tar.gz, "hsqs" -> .squashfs,
# "QFI" -> .qcow2, as every simplestreams VM disk is). An ftype not listed gets none, as LXD
# gives none to a format it does not know.
FILE_EXTENSIONS: Mapping[str, str] = {
    "lxd.tar.xz": ".tar.xz",
    "incus.tar.xz": ".tar.xz",
    "root.tar.xz": ".tar.xz",
    "squashfs": ".squashfs",
    "disk-kvm.img": ".qcow2",
    "disk1.img": ".qcow2",
    "uefi1.img": ".qcow2",
    "lxd_combined.tar.gz": ".tar.gz",
    "incus_combined.tar.gz": ".tar.gz",
}

# Stream architecture names the clients accept, mapped to the canonical name LXD reports
# (shared/osarch/architectures.go). Products with any other arch are skipped by the clients.
ARCHITECTURES: Mapping[str, str] = {
    **{name: "i686" for name in ("i686", "i386", "i586", "386", "x86", "generic_32")},
    **{name: "x86_64" for name in ("x86_64", "amd64", "generic_64")},
    **{name: "armv6l" for name in ("armv6l", "armel", "arm")},
    **{
        name: "armv7l"
        for name in ("armv7l", "armhf", "armhfp", "armv7a_hardfp", "armv7", "armv7a_vfpv3_hardfp")
    },
    "armv8l": "armv8l",
    **{name: "aarch64" for name in ("aarch64", "arm64", "arm64_generic", "aarch64_generic")},
    **{name: "ppc" for name in ("ppc", "powerpc")},
    **{name: "ppc64" for name in ("ppc64", "powerpc64")},
    **{name: "ppc64le" for name in ("ppc64le", "ppc64el")},
    "s390x": "s390x",
    "mips": "mips",
    "mipsle": "mipsle",
    "mipsel": "mipsle",
    "mips64": "mips64",
    "mips64le": "mips64le",
    "mips64el": "mips64le",
    "riscv32": "riscv32",
    "riscv64": "riscv64",
    **{name: "loongarch64" for name in ("loongarch64", "loong64")},
}

# The clients compare the lowercase hex digest with the catalogue string, so any other spelling can
# never verify; the blob store also builds paths from it, so it must be plain hex.
_SHA256_RE = re.compile(r"[0-9a-f]{64}\Z")

_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class CatalogueError(ValueError):
    """A metadata file that a client would refuse as a whole; the message names the bad field."""


@frozen
class Item:
    """One downloadable file of a products file, as a client would verify it."""

    path: str
    sha256: str
    size: int
    ftype: str
    product: str
    version: str
    delta_base: str = ""


@frozen
class Image:
    """One image a client would list: a metadata file plus a root file, or one unified file.

    `arch` is the stream's name (`amd64`), `architecture` the canonical LXD one (`x86_64`).
    `aliases` are the product's comma-separated aliases, in order. `root` is None for unified
    images. `created_at` comes from the version key, `expires_at` from `support_eol` (the Unix
    epoch when absent or unparseable, as the clients do). `deltas` are the items of the same
    version that rebuild `root` from an older version of the product (each names it in its
    `delta_base`, a version the product lists), in document order: what a refreshing client
    asks for before `root`.
    """

    fingerprint: str
    type: Literal["container", "virtual-machine"]
    arch: str
    product: str
    version: str
    aliases: tuple[str, ...]
    meta: Item
    root: Item | None
    architecture: str = ""
    os: str = ""
    release: str = ""
    release_title: str = ""
    variant: str = ""
    label: str = ""
    os_version: str = ""
    requirements: tuple[tuple[str, str], ...] = ()
    created_at: datetime = _UNIX_EPOCH
    expires_at: datetime = _UNIX_EPOCH
    deltas: tuple[Item, ...] = ()

    @property
    def size(self) -> int:
        """Total bytes of the image files, as the clients report it."""
        return self.meta.size + (self.root.size if self.root is not None else 0)

    @property
    def files(self) -> list[Item]:
        """The image's files: the metadata file, then the root file unless unified."""
        return [self.meta] if self.root is None else [self.meta, self.root]

    @property
    def root_ftype(self) -> str:
        """The `type` property clients show: the root ftype, or `tar.gz` for unified images."""
        return self.root.ftype if self.root is not None else "tar.gz"


@frozen
class Catalogue:
    """Everything parsed from one products file in a single pass."""

    items: dict[str, Item]
    images: list[Image]


def _decode(data: bytes, what: str) -> Any:
    try:
        # In steps: a products file is tens of MiB, parsed on a worker beside the reactor.
        return jsonsteps.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        # json.JSONDecodeError is a ValueError; bytes that are not UTF-8/16/32 raise
        # UnicodeDecodeError, which is one too, but say so plainly either way.
        raise CatalogueError(f"{what} is not valid JSON: {e}") from None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _wrong(where: str, expected: str, value: object) -> CatalogueError:
    return CatalogueError(f"{where}: expected {expected}, got {_type_name(value)}")


# The clients decode with Go's encoding/json into typed structs: a JSON null leaves a field at its
# zero value, any other mismatch fails the whole file. These helpers apply the same rule.


def _object(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong(where, "object", value)
    return value


def _string(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _wrong(where, "string", value)
    return value


def _integer(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(where, "integer", value)
    return value


def _check_strings(obj: Mapping[str, Any], names: Iterable[str], where: str) -> None:
    for name in names:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise _wrong(f"{where}.{name}", "string", value)


def _string_map(value: object, where: str) -> dict[str, str]:
    result = _object(value, where)
    for key, entry in result.items():
        if not isinstance(entry, str):
            raise _wrong(f"{where}[{key!r}]", "string", entry)
    return result


# ---------------------------------------------------------------------------------------------
# index.json


def products_paths(index_json: bytes) -> list[str]:
    """The products files a client fetches: `image-downloads` entries with non-empty `products`.

    Paths come back as written (relative to the remote base URL), in document order, without
    duplicates. Raises `CatalogueError` on invalid JSON, a field of the wrong type, or a wanted
    entry without a path.
    """
    doc = _decode(index_json, "index")
    if not isinstance(doc, dict):
        raise _wrong("index", "object", doc)
    _check_strings(doc, ("format", "updated"), "index")
    entries = _object(doc.get("index"), "index.index")
    paths: list[str] = []
    for key, raw in entries.items():
        where = f"index.index[{key!r}]"
        entry = _object(raw, where)
        _check_strings(entry, ("datatype", "path", "format", "updated"), where)
        products = entry.get("products")
        if products is None:
            products = []
        if not isinstance(products, list):
            raise _wrong(f"{where}.products", "array", products)
        for i, product in enumerate(products):
            if not isinstance(product, str):
                raise _wrong(f"{where}.products[{i}]", "string", product)
        if entry.get("datatype") != IMAGE_DOWNLOADS or not products:
            continue
        path = entry.get("path") or ""
        if not path:
            raise CatalogueError(f"{where}: image-downloads entry has no path")
        if path not in paths:
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# products files

_PRODUCT_STRINGS = (
    "aliases",
    "arch",
    "os",
    "release",
    "release_codename",
    "release_title",
    "support_eol",
    "version",
    "variant",
)
_VERSION_STRINGS = ("label", "pubname")
_ITEM_STRINGS = (
    "ftype",
    "path",
    "sha256",
    "md5",
    "delta_base",
    "combined_type",
    LEGACY_ROOTXZ_FIELD,
    *COMBINED_HASH_FIELDS.values(),
)


def _version_date(key: str, family: Family) -> datetime | None:
    """The creation date a client reads from a version key, or None if it skips the version.

    LXD tries `YYYYMMDD_HHMM` and falls back to the first eight characters; Incus (and older LXD)
    use only the eight-character date. Both skip keys that do not start with a date.
    """
    if len(key) < 8:
        return None
    try:
        day = datetime.strptime(key[:8], "%Y%m%d")
    except ValueError:
        return None
    if family == "lxd" and len(key) == 13 and key[8] == "_":
        try:
            parsed = datetime.strptime(key, "%Y%m%d_%H%M")
        except ValueError:
            pass
        else:
            # LXD's layout is Go's "20060102_0304", whose "03" is a 12-hour clock: an hour
            # past 12 fails it, and the client falls back to the date alone.
            if parsed.hour <= 12:
                return parsed.replace(tzinfo=timezone.utc)
    return day.replace(tzinfo=timezone.utc)


def _eol_date(value: str) -> datetime:
    if value:
        try:
            return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    return _UNIX_EPOCH


def _parse(data: bytes, family: Family, want_images: bool = True) -> Catalogue:
    """One decode and one pass over every product, version and item."""
    meta_ftype = META_FTYPE[family]
    unified_ftype = UNIFIED_FTYPE[family]

    doc = _decode(data, "products file")
    if not isinstance(doc, dict):
        raise _wrong("products file", "object", doc)
    _check_strings(doc, ("content_id", "datatype", "format", "license", "updated"), "products file")
    products = _object(doc.get("products"), "products")

    items: dict[str, Item] = {}
    images: list[Image] = []
    for product_id, raw_product in products.items():
        pwhere = f"products[{product_id!r}]"
        product = _object(raw_product, pwhere)
        _check_strings(product, _PRODUCT_STRINGS, pwhere)
        supported = product.get("supported")
        if supported is not None and not isinstance(supported, bool):
            raise _wrong(f"{pwhere}.supported", "boolean", supported)
        lxd_requirements = _string_map(product.get("lxd_requirements"), f"{pwhere}.lxd_requirements")
        requirements = _string_map(product.get("requirements"), f"{pwhere}.requirements")
        versions = _object(product.get("versions"), f"{pwhere}.versions")

        arch = product.get("arch") or ""
        architecture = ARCHITECTURES.get(arch)
        # LXD takes lxd_requirements whenever the field is there, even empty (a non-nil map).
        if family == "lxd" and product.get("lxd_requirements") is not None:
            requirements = lxd_requirements
        aliases_field = product.get("aliases") or ""
        aliases = tuple(aliases_field.split(",")) if aliases_field else ()

        for version_key, raw_version in versions.items():
            vwhere = f"{pwhere}.versions[{version_key!r}]"
            version = _object(raw_version, vwhere)
            _check_strings(version, _VERSION_STRINGS, vwhere)
            raw_items = _object(version.get("items"), f"{vwhere}.items")

            # Every item is checked and indexed, even in versions no client would list: the
            # type rules apply to the whole file, and serving a file costs nothing extra.
            version_items: list[tuple[dict[str, Any], Item | None]] = []
            for item_key, raw_item in raw_items.items():
                iwhere = f"{vwhere}.items[{item_key!r}]"
                fields = _object(raw_item, iwhere)
                _check_strings(fields, _ITEM_STRINGS, iwhere)
                size = _integer(fields.get("size"), f"{iwhere}.size")
                if size is not None and size < 0:
                    raise CatalogueError(f"{iwhere}.size: negative size {size}")
                sha256 = fields.get("sha256") or ""
                path = fields.get("path") or ""
                item: Item | None = None
                if size is not None and path and _SHA256_RE.match(sha256):
                    item = Item(
                        path=path,
                        sha256=sha256,
                        size=size,
                        ftype=fields.get("ftype") or "",
                        product=product_id,
                        version=version_key,
                        delta_base=fields.get("delta_base") or "",
                    )
                    # Linuxcontainers publishes lxd.tar.xz and incus.tar.xz as two items of one
                    # path; both describe the same file, so the first is as good as the other.
                    items.setdefault(path, item)
                version_items.append((fields, item))

            if not want_images or architecture is None:
                continue
            created_at = _version_date(version_key, family)
            if created_at is None:
                continue

            def image(
                fingerprint: str,
                image_type: Literal["container", "virtual-machine"],
                meta: Item,
                root: Item | None,
            ) -> Image:
                deltas: tuple[Item, ...] = ()
                if root is not None and root.ftype in DELTA_ROOT_FTYPES:
                    # A delta from a version the product no longer lists is dropped, as the
                    # clients drop it: nobody can hold its base any more.
                    deltas = tuple(
                        d for _f, d in version_items
                        if d is not None and d.ftype == root.ftype + DELTA_SUFFIX
                        and d.delta_base in versions and d.delta_base != version_key
                    )
                return Image(
                    fingerprint=fingerprint,
                    type=image_type,
                    arch=arch,
                    product=product_id,
                    version=version_key,
                    aliases=aliases,
                    meta=meta,
                    root=root,
                    architecture=architecture or "",
                    os=product.get("os") or "",
                    release=product.get("release") or "",
                    release_title=product.get("release_title") or "",
                    variant=product.get("variant") or "",
                    label=version.get("label") or "",
                    os_version=product.get("version") or "",
                    requirements=tuple(sorted(requirements.items())),
                    created_at=created_at,
                    expires_at=_eol_date(product.get("support_eol") or ""),
                    deltas=deltas,
                )

            seen: set[str] = set()
            for fields, item in version_items:
                if item is None:
                    continue
                if item.ftype == unified_ftype:
                    is_vm = family == "incus" and fields.get("combined_type") == "virtual-machine"
                    if item.sha256 not in seen:
                        seen.add(item.sha256)
                        images.append(
                            image(item.sha256, "virtual-machine" if is_vm else "container", item, None)
                        )
                elif item.ftype == meta_ftype:
                    for _root_fields, root in version_items:
                        if root is None or root.ftype not in COMBINED_HASH_FIELDS:
                            continue
                        fingerprint = fields.get(COMBINED_HASH_FIELDS[root.ftype]) or ""
                        if not fingerprint and root.ftype == "root.tar.xz":
                            fingerprint = fields.get(LEGACY_ROOTXZ_FIELD) or ""
                        if not fingerprint or fingerprint in seen:
                            continue
                        seen.add(fingerprint)
                        image_type: Literal["container", "virtual-machine"] = (
                            "virtual-machine" if root.ftype in VM_ROOT_FTYPES else "container"
                        )
                        images.append(image(fingerprint, image_type, item, root))
    # Nothing parsed refers to the decoded document's containers: free it in steps.
    jsonsteps.release(doc)
    return Catalogue(items=items, images=images)


def parse_catalogue(data: bytes, family: Family = "lxd") -> Catalogue:
    """Items and images of one products file, decoded once.

    `family` picks the metadata ftypes a client of that family uses (`lxd.tar.xz` and
    `lxd_combined.tar.gz`, or `incus.tar.xz` and `incus_combined.tar.gz`); it affects only the
    images, never the items. Raises `CatalogueError` as `parse_products` does.
    """
    return _parse(data, family)


def parse_products(data: bytes) -> dict[str, Item]:
    """Map each item `path` of a products file to its `Item`.

    Items without `path`, `size` or a lowercase hex `sha256` are left out: no client can verify
    them. Raises `CatalogueError` on invalid JSON or on any known field of the wrong type (the
    clients refuse the whole file then).
    """
    return _parse(data, "lxd", want_images=False).items


def parse_images(data: bytes, family: Family = "lxd") -> list[Image]:
    """The images a client of `family` would list from a products file, in document order.

    Follows PROTOCOLS.md §1.5: a metadata item pairs with every root item of the same version,
    the fingerprint being the metadata item's combined hash for that root ftype (pairs without it
    are dropped); a unified item is an image of its own whose fingerprint is its sha256. Products
    with an unknown architecture and versions whose key does not start with a date are skipped,
    as are images whose files lack a hash or size. Raises `CatalogueError` as `parse_products`.
    """
    return _parse(data, family).images
