# -*- test-case-name: tests.test_bundle -*-
"""Bundles: images and their catalogue entries in one file, to seed a proxy that cannot fetch.

A bundle is an uncompressed tar file (the images are compressed already)::

    manifest.json                             what is inside, with every file's sha256 and size
    catalogue/<upstream>/streams/v1/index.json    the index, listing only the exported products
    catalogue/<upstream>/<products path>      each products file, cut down to the exported versions
    blobs/<sha256>                            every image file

Import trusts nothing in the file: every blob is hashed while it is copied into the store and
must match the manifest, and the manifest must match the bundle's own catalogue. A bundle with
anything wrong is refused whole: blobs may already be in the store by then (they are removed
again unless something else records them), but no record is written before every blob is
verified.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Collection, Iterable
from typing import IO, Any

import attrs
from attrs import frozen

from proxy.blobs import BlobStore, DigestMismatch, is_sha256
from proxy.catalogue import CatalogueError, Image, Item, parse_products, products_paths
from proxy.catalogue_filter import filter_catalogue, filter_index
from proxy.index import CacheIndex, FileRecord, MetadataRecord, PinRecord
from proxy.metadata_store import MetadataStore
from proxy.pins import (
    INDEX_PATH,
    PinError,
    PinRef,
    StoredCatalogue,
    load_catalogue,
    normalise_ref,
    pin_refs,
)
from proxy.resolve import resolve_alias

BUNDLE_FORMAT = "lxd-image-proxy-bundle"
BUNDLE_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Bounds on what import reads into memory from a bundle it does not trust yet.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_CATALOGUE_BYTES = 512 * 1024 * 1024
COPY_CHUNK_BYTES = 1024 * 1024


class BundleError(Exception):
    """A bundle that cannot be written or read; the message is one sentence for the admin."""


@frozen
class ExportReport:
    path: str
    images: int
    files: int
    bytes: int
    # pins left out because no version of them is stored
    skipped: tuple[str, ...] = ()


@frozen
class ImportReport:
    upstreams: tuple[str, ...]
    images: int
    files: int
    bytes: int
    new_files: int
    pins: int
    # upstream -> "stored" (the bundle's catalogue became the cache's) or "merged"
    catalogues: tuple[tuple[str, str], ...] = ()


def _safe_path(path: object) -> bool:
    """A relative path with no empty, C{.} or C{..} segment: safe as a tar member name part."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\0" in path or "\\" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _catalogue_member(upstream: str, path: str) -> str:
    return f"catalogue/{upstream}/{path}"


# -- export ---------------------------------------------------------------------------------


# What an exported image is, from the most to the least kept: its files are pinned (kept and
# auto-updated), kept as they are (pinned by fingerprint), or cached (they age out).
PINNED, KEPT, CACHED = "pinned", "kept", "cached"
_RANK = {PINNED: 2, KEPT: 1, CACHED: 0}


def _stronger(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


@attrs.define
class _Chosen:
    """The images exported from one upstream: fingerprint -> (image, products path, state)."""

    catalogue: StoredCatalogue
    images: dict[str, tuple[Image, str, str]] = attrs.field(factory=dict)
    pins: list[tuple[str, str, str]] = attrs.field(factory=list)

    def add(self, image: Image, state: str) -> None:
        previous = self.images.get(image.fingerprint)
        if previous is not None:
            state = _stronger(state, previous[2])
        products_path = self.catalogue.products_path_of(image)
        assert products_path is not None
        self.images[image.fingerprint] = (image, products_path, state)

    def add_pin(self, alias: str, arch: str, type: str) -> None:
        if (alias, arch, type) not in self.pins:
            self.pins.append((alias, arch, type))


def _keeping(keep: set[tuple[str, str]]) -> Callable[[Item], bool]:
    return lambda item: (item.path, item.sha256) in keep


def _fully_stored(index: CacheIndex, store: BlobStore, image: Image) -> bool:
    return all(index.get(i.sha256) is not None and store.exists(i.sha256) for i in image.files)


def _state(index: CacheIndex, image: Image) -> str:
    """
    Whether an image is pinned, kept or cached, by its root file (or its one unified file): a
    metadata file may be pinned only because the other type's image of its version is.
    """
    own = index.get((image.root or image.meta).sha256)
    if own is None or own.cached:
        return CACHED
    return PINNED if own.auto_update else KEPT


def _stored_upstreams(index: CacheIndex) -> list[str]:
    return sorted({m.upstream for m in index.metadata_records() if m.path == INDEX_PATH})


def export_bundle(
    index: CacheIndex,
    store: BlobStore,
    out_path: str,
    refs: list[PinRef] | None = None,
    *,
    extra_pins: Iterable[PinRef] = (),
    now: float | None = None,
) -> ExportReport:
    """
    Write the images C{refs} name (upstream, alias, arch, type) to the bundle C{out_path}.

    Each ref exports the newest version of its image that is stored in full, so a pin whose
    newest version is still downloading exports the one before. Without C{refs}, every pinned
    image is exported: what each pin (of the index, and C{extra_pins}) resolves to, and every
    stored image whose files are pinned or kept (the versions C{keep_versions} holds, the
    pins of a running server's configuration). The file is written under a temp name and
    renamed into place.

    @param extra_pins: pins that are not in the index (the configuration's).
    @raise BundleError: a ref has no stored catalogue or no stored image, there is nothing to
        export, or the file cannot be written.
    """
    created = time.time() if now is None else now
    pinned = set(pin_refs(index, extra_pins))
    default = refs is None
    wanted = sorted(pinned) if refs is None else list(refs)
    catalogues: dict[str, StoredCatalogue | None] = {}
    chosen: dict[str, _Chosen] = {}
    skipped: list[str] = []

    def entry_for(upstream: str) -> _Chosen | None:
        if upstream not in catalogues:
            catalogues[upstream] = load_catalogue(index, store, upstream)
        catalogue = catalogues[upstream]
        if catalogue is None:
            return None
        return chosen.setdefault(upstream, _Chosen(catalogue))

    for upstream, alias, arch, type in wanted:
        name = f"{upstream}:{alias}"
        try:
            architecture, type = normalise_ref(alias, arch, type)
        except PinError as e:
            raise BundleError(str(e)) from None
        entry = entry_for(upstream)
        if entry is None:
            if default:
                skipped.append(name)
                continue
            raise BundleError(f"the cache holds no catalogue of {upstream}, so {name} cannot be exported.")
        images = entry.catalogue.images
        stored = [image for image in images if _fully_stored(index, store, image)]
        image = resolve_alias(stored, alias, architecture, type)
        if image is None:
            if default:
                skipped.append(name)
                continue
            if resolve_alias(images, alias, architecture, type) is None:
                raise BundleError(f"the catalogue of {upstream} has no {type} image {alias} for {architecture}.")
            raise BundleError(f"no version of {name} ({type}, {architecture}) is stored in full; prefetch it first.")
        is_pin = (upstream, alias, architecture, type) in pinned
        if is_pin:
            entry.add_pin(alias, architecture, type)
        entry.add(image, PINNED if is_pin else _state(index, image))

    if default:
        for upstream in _stored_upstreams(index):
            entry = entry_for(upstream)
            if entry is None:
                continue
            images = entry.catalogue.images
            for image in images:
                state = _state(index, image)
                if state == CACHED or not _fully_stored(index, store, image):
                    continue
                entry.add(image, state)
                if state == PINNED and image.aliases:
                    # Pinned by a pin this process does not know (a running server's
                    # configuration): the bundle carries a pin of the product's first alias,
                    # so that the images stay pinned where they are imported.
                    alias = image.aliases[0]
                    target = resolve_alias(images, alias, image.architecture, image.type)
                    if target is not None and target.product == image.product:
                        entry.add_pin(alias, image.architecture, image.type)

    chosen = {u: c for u, c in chosen.items() if c.images}
    if not chosen:
        if not skipped:
            raise BundleError("nothing to export: no image is pinned, so name the images to export.")
        raise BundleError(
            "nothing to export: no version of any pinned image is stored in full (" + ", ".join(skipped) + ")."
        )

    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created": created,
        "upstreams": {},
    }
    catalogue_files: list[tuple[str, bytes]] = []
    blobs: dict[str, int] = {}
    for upstream, entry in sorted(chosen.items()):
        catalogue = entry.catalogue
        keep_by_path: dict[str, set[tuple[str, str]]] = {}
        for image, products_path, _state_ in entry.images.values():
            keep = keep_by_path.setdefault(products_path, set())
            keep.update((item.path, item.sha256) for item in image.files)
        remaining: dict[str, list[str]] = {}
        for products_path, keep in sorted(keep_by_path.items()):
            if not _safe_path(products_path):
                raise BundleError(f"the catalogue of {upstream} names an unusable products path {products_path!r}.")
            body = catalogue.products[products_path][1]
            filtered, remaining[products_path] = filter_catalogue(body, _keeping(keep))
            catalogue_files.append((_catalogue_member(upstream, products_path), filtered))
        catalogue_files.append(
            (_catalogue_member(upstream, INDEX_PATH), filter_index(catalogue.index_body, remaining))
        )
        images_out = []
        for image, products_path, state in entry.images.values():
            files = []
            for item in image.files:
                blobs[item.sha256] = item.size
                files.append({"path": item.path, "sha256": item.sha256, "size": item.size, "ftype": item.ftype})
            images_out.append({
                "fingerprint": image.fingerprint,
                "aliases": list(image.aliases),
                "product": image.product,
                "version": image.version,
                "type": image.type,
                "architecture": image.architecture,
                "products_path": products_path,
                "pinned": state == PINNED,
                "kept": state == KEPT,
                "files": files,
            })
        manifest["upstreams"][upstream] = {
            "index": INDEX_PATH,
            "products": sorted(keep_by_path),
            "images": images_out,
            "pins": [{"alias": a, "arch": r, "type": t} for a, r, t in entry.pins],
        }

    directory = os.path.dirname(os.path.abspath(out_path))
    temp = os.path.join(directory, f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    try:
        with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"), created)
            for name, body in catalogue_files:
                _add_bytes(tar, name, body, created)
            for sha256, size in blobs.items():
                _add_blob(tar, store, sha256, size, created)
        os.replace(temp, out_path)
    except OSError as e:
        _unlink(temp)
        raise BundleError(f"cannot write the bundle {out_path}: {e.strerror or e}.") from None
    except BaseException:
        _unlink(temp)
        raise
    return ExportReport(
        path=out_path,
        images=sum(len(c.images) for c in chosen.values()),
        files=len(blobs),
        bytes=sum(blobs.values()),
        skipped=tuple(skipped),
    )


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, store: BlobStore, sha256: str, size: int, mtime: float) -> None:
    """Stream one blob into the tar: tarfile copies it in chunks, never the whole file at once."""
    try:
        f = store.open(sha256)
    except FileNotFoundError:
        raise BundleError(f"blob {sha256} went missing from the store during the export.") from None
    with f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise BundleError(
                f"blob {sha256} has {actual} bytes but its record says {size}; run lxd-image-proxy verify."
            )
        info = tarfile.TarInfo(f"blobs/{sha256}")
        info.size = size
        info.mtime = int(mtime)
        info.mode = 0o644
        tar.addfile(info, f)


# -- import ---------------------------------------------------------------------------------


@frozen
class _FileIn:
    sha256: str
    size: int
    upstream: str
    item: Item
    state: str


def _read_member(tar: tarfile.TarFile, name: str, limit: int, what: str) -> bytes:
    try:
        member = tar.getmember(name)
    except KeyError:
        raise BundleError(f"the bundle has no {what} ({name}).") from None
    if not member.isreg():
        raise BundleError(f"the bundle's {name} is not a regular file.")
    if member.size > limit:
        raise BundleError(f"the bundle's {name} is larger than {limit} bytes.")
    f = tar.extractfile(member)
    assert f is not None
    with f:
        return f.read()


def _want(condition: bool, message: str) -> None:
    if not condition:
        raise BundleError(message)


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError:
        raise BundleError("the bundle's manifest is not valid JSON.") from None
    _want(isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT,
          "the file is not an lxd-image-proxy bundle (its manifest has the wrong format).")
    _want(manifest.get("version") == BUNDLE_VERSION,
          f"the bundle has format version {manifest.get('version')!r}; this version reads {BUNDLE_VERSION}.")
    _want(isinstance(manifest.get("upstreams"), dict) and bool(manifest["upstreams"]),
          "the bundle's manifest lists no upstream.")
    return manifest


def _check_upstream(
    tar: tarfile.TarFile, upstream: str, entry: Any, files: dict[str, _FileIn]
) -> tuple[bytes, dict[str, bytes], list[dict[str, Any]], list[dict[str, str]]]:
    """Check one upstream's manifest entry against the bundle's catalogue of it."""
    _want(isinstance(entry, dict), f"the bundle's manifest entry for {upstream} is not an object.")
    products = entry.get("products")
    images = entry.get("images")
    pins = entry.get("pins", [])
    _want(isinstance(products, list) and all(_safe_path(p) for p in products),
          f"the bundle's manifest names unusable products files for {upstream}.")
    _want(isinstance(images, list) and all(isinstance(i, dict) for i in images),
          f"the bundle's manifest lists no images for {upstream}.")
    _want(isinstance(pins, list) and all(
        isinstance(p, dict) and all(isinstance(p.get(k), str) and p.get(k) for k in ("alias", "arch", "type"))
        for p in pins), f"the bundle's manifest has malformed pins for {upstream}.")
    index_body = _read_member(tar, _catalogue_member(upstream, INDEX_PATH), MAX_CATALOGUE_BYTES,
                              f"index of {upstream}")
    try:
        listed = products_paths(index_body)
    except CatalogueError as e:
        raise BundleError(f"the bundle's index of {upstream} is unusable: {e}.") from None
    bodies: dict[str, bytes] = {}
    items: dict[str, Item] = {}
    for path in products:
        _want(path in listed, f"the bundle's index of {upstream} does not list its products file {path}.")
        body = _read_member(tar, _catalogue_member(upstream, path), MAX_CATALOGUE_BYTES,
                            f"products file {path} of {upstream}")
        try:
            items.update(parse_products(body))
        except CatalogueError as e:
            raise BundleError(f"the bundle's products file {path} of {upstream} is unusable: {e}.") from None
        bodies[path] = body
    for image in images:
        state = PINNED if image.get("pinned") is True else KEPT if image.get("kept") is True else CACHED
        image_files_in = image.get("files")
        _want(isinstance(image_files_in, list) and bool(image_files_in),
              f"an image of {upstream} in the bundle's manifest lists no files.")
        for f in image_files_in:
            _want(isinstance(f, dict) and is_sha256(f.get("sha256")) and isinstance(f.get("size"), int)
                  and not isinstance(f.get("size"), bool) and f["size"] >= 0 and isinstance(f.get("path"), str),
                  f"a file of {upstream} in the bundle's manifest is malformed.")
            item = items.get(f["path"])
            _want(item is not None and item.sha256 == f["sha256"] and item.size == f["size"],
                  f"the bundle's catalogue of {upstream} does not list {f['path']} as its manifest does.")
            assert item is not None
            previous = files.get(item.sha256)
            if previous is not None:
                _want(previous.size == item.size, f"the bundle's manifest gives two sizes for {item.sha256}.")
                files[item.sha256] = attrs.evolve(previous, state=_stronger(state, previous.state))
            else:
                files[item.sha256] = _FileIn(item.sha256, item.size, upstream, item, state)
    return index_body, bodies, images, pins


def _copy_blob(tar: tarfile.TarFile, member: tarfile.TarInfo, store: BlobStore, expected: _FileIn) -> None:
    """Copy one blob into the store through a partial blob, which verifies it before commit."""
    _want(member.isreg(), f"the bundle's {member.name} is not a regular file.")
    _want(member.size == expected.size,
          f"the bundle's blob {expected.sha256} has {member.size} bytes, its manifest says {expected.size}.")
    source = tar.extractfile(member)
    assert source is not None
    partial = store.new_partial()
    try:
        with source:
            _copy(source, partial.write)
        _want(partial.size == expected.size,
              f"the bundle's blob {expected.sha256} holds {partial.size} bytes, its manifest says {expected.size}.")
        partial.commit(expected.sha256)
    except DigestMismatch:
        raise BundleError(
            f"the bundle's blob {expected.sha256} does not hash to its name: the bundle is damaged."
        ) from None
    finally:
        partial.discard()


def _copy(source: IO[bytes], sink: Any) -> None:
    while True:
        chunk = source.read(COPY_CHUNK_BYTES)
        if not chunk:
            return
        sink(chunk)


def import_bundle(
    index: CacheIndex,
    store: BlobStore,
    path: str,
    *,
    upstreams: Collection[str],
    now: float | None = None,
) -> ImportReport:
    """
    Verify the bundle C{path} and load its images and catalogue entries into the cache.

    Images that were pinned on export are stored pinned (C{cached = False, auto_update = True},
    and the bundle's pins recorded), images kept by fingerprint as kept (C{cached = False,
    auto_update = False}), the others as C{cached}. If the cache has no catalogue of an
    upstream, the bundle's becomes it; otherwise the bundle's versions are merged into the
    stored products files, so that both sets are listed.

    @param upstreams: the upstream names configured in this proxy; the bundle's must be among
        them.
    @raise BundleError: anything is wrong with the bundle; nothing is recorded then.
    """
    stamp = time.time() if now is None else now
    try:
        tar = tarfile.open(path, "r:")
    except FileNotFoundError:
        raise BundleError(f"there is no bundle {path}.") from None
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"{path} is not a bundle: {getattr(e, 'strerror', None) or e}.") from None
    with tar:
        manifest = _parse_manifest(_read_member(tar, MANIFEST_NAME, MAX_MANIFEST_BYTES, "manifest"))
        files: dict[str, _FileIn] = {}
        checked: dict[str, tuple[bytes, dict[str, bytes], list[dict[str, Any]], list[dict[str, str]]]] = {}
        for upstream, entry in manifest["upstreams"].items():
            if upstream not in upstreams:
                known = ", ".join(upstreams) or "none"
                raise BundleError(
                    f"the bundle holds images of upstream {upstream}, which this proxy does not configure"
                    f" (configured: {known})."
                )
            checked[upstream] = _check_upstream(tar, upstream, entry, files)

        # Every blob is verified before any record is written.
        committed: list[str] = []
        done: set[str] = set()
        try:
            for member in tar:
                if not member.name.startswith("blobs/"):
                    continue
                sha256 = member.name[len("blobs/"):]
                expected = files.get(sha256)
                if expected is None or sha256 in done:
                    continue
                existed = store.exists(sha256)
                _copy_blob(tar, member, store, expected)
                done.add(sha256)
                if not existed:
                    committed.append(sha256)
            missing = [sha for sha in files if sha not in done]
            _want(not missing, f"the bundle lacks {len(missing)} of the files its manifest lists"
                  f" (such as {missing[0] if missing else ''}).")
        except BundleError:
            _drop_unrecorded(index, store, committed)
            raise
        except (OSError, tarfile.TarError) as e:
            _drop_unrecorded(index, store, committed)
            raise BundleError(f"cannot read the bundle {path}: {getattr(e, 'strerror', None) or e}.") from None

    new_files = 0
    for f in files.values():
        existing = index.get(f.sha256)
        if existing is None:
            new_files += 1
            index.put(FileRecord(
                sha256=f.sha256, size=f.size, upstream=f.upstream, paths=(f"{f.upstream}/{f.item.path}",),
                product=f.item.product, version=f.item.version, stored_at=stamp, last_used_at=stamp,
                use_count=0, cached=f.state == CACHED, auto_update=f.state == PINNED,
            ))
            continue
        index.add_path(f.sha256, f.upstream, f.item.path)
        if f.state != CACHED and existing.cached:
            index.set_flags(f.sha256, cached=False, auto_update=f.state == PINNED)

    pins = 0
    known_pins = {(p.upstream, p.alias, p.type, p.arch) for p in index.pins()}
    for upstream, (_index_body, _bodies, _images, pin_entries) in checked.items():
        for p in pin_entries:
            if (upstream, p["alias"], p["type"], p["arch"]) in known_pins:
                continue
            index.put_pin(PinRecord(upstream=upstream, alias=p["alias"], type=p["type"], arch=p["arch"],
                                    pinned_at=stamp))
            pins += 1

    catalogues: list[tuple[str, str]] = []
    for upstream, (index_body, bodies, _images, _pins) in checked.items():
        catalogues.append((upstream, _merge_catalogue(index, store, upstream, index_body, bodies, stamp)))

    return ImportReport(
        upstreams=tuple(checked),
        images=sum(len(images) for _i, _b, images, _p in checked.values()),
        files=len(files),
        bytes=sum(f.size for f in files.values()),
        new_files=new_files,
        pins=pins,
        catalogues=tuple(catalogues),
    )


def _drop_unrecorded(index: CacheIndex, store: BlobStore, sha256s: Iterable[str]) -> None:
    """Remove blobs this import added that no record refers to (a refused bundle leaves none)."""
    for sha256 in sha256s:
        if index.get(sha256) is None:
            store.remove(sha256)


# -- catalogue merge ------------------------------------------------------------------------


def _replace_body(bodies: MetadataStore, record: MetadataRecord, body: bytes) -> None:
    """Keep the record's validators: the merged file stands for the upstream's until it changes."""
    bodies.put_now(
        record.upstream, record.path, body, etag=record.etag, last_modified=record.last_modified,
        fetched_at=record.fetched_at, checked_at=record.checked_at,
    )


def _merge_catalogue(
    index: CacheIndex, store: BlobStore, upstream: str, index_body: bytes, bodies: dict[str, bytes], stamp: float
) -> str:
    kept = MetadataStore(store, index)
    held_index = kept.load(upstream, INDEX_PATH)
    if held_index is None:
        for path, body in bodies.items():
            kept.put_now(upstream, path, body, fetched_at=stamp, checked_at=stamp)
        kept.put_now(upstream, INDEX_PATH, index_body, fetched_at=stamp, checked_at=stamp)
        return "stored"
    for path, body in bodies.items():
        held = kept.load(upstream, path)
        if held is None:
            kept.put_now(upstream, path, body, fetched_at=stamp, checked_at=stamp)
            continue
        record, existing = held
        merged = merge_products(existing, body)
        if merged is not None:
            _replace_body(kept, record, merged)
    index_record, current = held_index
    merged_index = merge_index(current, index_body)
    if merged_index is not None:
        _replace_body(kept, index_record, merged_index)
    return "merged"


def merge_products(target: bytes, extra: bytes) -> bytes | None:
    """
    C{target} with every product, version and item of C{extra} it lacks added; None when it
    lacks nothing. What C{target} has is kept as it is.
    """
    try:
        doc = json.loads(target)
        other = json.loads(extra)
    except ValueError:
        raise BundleError("a products file to merge is not valid JSON.") from None
    if not isinstance(doc, dict) or not isinstance(other, dict):
        raise BundleError("a products file to merge is not a JSON object.")
    products = doc.setdefault("products", {})
    changed = False
    for product_id, product in (other.get("products") or {}).items():
        mine = products.get(product_id)
        if not isinstance(mine, dict):
            products[product_id] = product
            changed = True
            continue
        versions = mine.setdefault("versions", {})
        for version_key, version in (product.get("versions") or {}).items():
            existing = versions.get(version_key)
            if not isinstance(existing, dict):
                versions[version_key] = version
                changed = True
                continue
            items = existing.setdefault("items", {})
            for item_key, item in (version.get("items") or {}).items():
                if item_key not in items:
                    items[item_key] = item
                    changed = True
    if not changed:
        return None
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def merge_index(target: bytes, extra: bytes) -> bytes | None:
    """
    C{target} with the products lists of C{extra}'s entries added (entries for products files
    it does not name added whole); None when it lacks nothing.
    """
    try:
        doc = json.loads(target)
        other = json.loads(extra)
    except ValueError:
        raise BundleError("an index to merge is not valid JSON.") from None
    if not isinstance(doc, dict) or not isinstance(other, dict):
        raise BundleError("an index to merge is not a JSON object.")
    entries = doc.setdefault("index", {})
    by_path = {e.get("path"): e for e in entries.values() if isinstance(e, dict)}
    changed = False
    for key, entry in (other.get("index") or {}).items():
        if not isinstance(entry, dict):
            continue
        mine = by_path.get(entry.get("path"))
        if mine is None:
            name = key
            while name in entries:
                name += "+bundle"
            entries[name] = entry
            changed = True
            continue
        listed = mine.setdefault("products", [])
        for product in entry.get("products") or []:
            if product not in listed:
                listed.append(product)
                changed = True
    if not changed:
        return None
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


__all__ = [
    "BUNDLE_FORMAT",
    "BundleError",
    "ExportReport",
    "ImportReport",
    "export_bundle",
    "import_bundle",
    "merge_index",
    "merge_products",
]
