# -*- test-case-name: tests.test_cli -*-
"""What the admin command shows and names: the stored images of a cache, and references to them.

L{open_cache} opens the index (LMDB allows several processes) and the blob store of a cache the
server may be running on, without the server's state lock. L{inventory} reads them, with the
stored catalogues and the pins, into L{Entry} rows; L{parse_ref} and L{one_entry} find the rows
an C{UPSTREAM:ALIAS} or a fingerprint names. Nothing here contacts an upstream or prints.
"""

from __future__ import annotations

import os
import re
from typing import cast

import attrs
import lmdb
from attrs import define, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.catalogue import Image
from proxy.config import Config
from proxy.index import CacheIndex, FileRecord, IndexFormatError
from proxy.pins import PinError, PinRef, StoredCatalogue, load_catalogue, normalise_ref, pin_refs
from proxy.resolve import resolve_alias

_HEX = re.compile(r"[0-9a-f]{1,64}")


class InventoryError(Exception):
    """A cache that cannot be opened or a reference that names nothing; the message is one
    sentence for the admin."""


# -- the cache ------------------------------------------------------------------------------


@define
class Cache:
    """The configuration, index and blob store one command works on."""

    config: Config
    index: CacheIndex
    store: BlobStore
    clock: IReactorTime

    @property
    def upstream_names(self) -> list[str]:
        return [u.name for u in self.config.upstreams]

    def config_pins(self) -> list[PinRef]:
        return [(p.upstream, p.alias, p.arch, p.type) for p in self.config.pins]

    def close(self) -> None:
        self.index.close()


def _wall_clock() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


def open_cache(config: Config, clock: IReactorTime | None = None) -> Cache:
    """Open the index at C{<cache.dir>/index} and the blob store at C{<cache.dir>}."""
    root = config.cache.dir
    try:
        store = BlobStore(FilePath(root))
        index = CacheIndex(os.path.join(root, "index"), clock or _wall_clock())
    except OSError as e:
        raise InventoryError(f"cannot open the cache at {root}: {e.strerror or e}.") from None
    except (lmdb.Error, IndexFormatError) as e:
        raise InventoryError(f"cannot open the cache index at {root}: {e}.") from None
    return Cache(config, index, store, clock or _wall_clock())


# -- references -----------------------------------------------------------------------------


@frozen
class AliasRef:
    upstream: str
    alias: str


@frozen
class FingerprintRef:
    prefix: str


Ref = AliasRef | FingerprintRef


def parse_ref(text: str) -> Ref:
    """C{upstream:alias}, or a fingerprint (or a prefix of one)."""
    if ":" in text:
        upstream, _, alias = text.partition(":")
        if not upstream or not alias:
            raise InventoryError(f"{text!r} is not UPSTREAM:ALIAS, such as images:ubuntu/24.04.")
        return AliasRef(upstream, alias)
    if _HEX.fullmatch(text.lower()):
        return FingerprintRef(text.lower())
    raise InventoryError(f"{text!r} is neither UPSTREAM:ALIAS (such as images:ubuntu/24.04) nor a fingerprint.")


def check_upstream(cache: Cache, upstream: str) -> None:
    """Raise L{InventoryError} unless C{upstream} is configured."""
    if upstream not in cache.upstream_names:
        known = ", ".join(cache.upstream_names) or "none"
        raise InventoryError(f"{upstream} is not a configured upstream (configured: {known}).")


# -- inventory ------------------------------------------------------------------------------


@define
class Entry:
    """
    One row of C{list}: an image whose files are all stored, a pinned image not (fully)
    stored yet, or a stored file that no stored catalogue lists (then C{image} is None and
    C{fingerprint} is the file's sha256).
    """

    upstream: str
    aliases: tuple[str, ...]
    fingerprint: str
    type: str
    architecture: str
    product: str
    version: str
    size: int
    records: list[FileRecord]
    image: Image | None = None
    pins: list[PinRef] = attrs.field(factory=list)
    missing: int = 0

    @property
    def stored(self) -> bool:
        return self.missing == 0 and bool(self.records)

    @property
    def own_records(self) -> list[FileRecord]:
        """The records that say what this image is: its root file's (the metadata file of a
        split image may be shared with the other type's image), or the one file's."""
        if self.image is not None and self.image.root is not None:
            own = [r for r in self.records if r.sha256 == self.image.root.sha256]
            if own:
                return own
        return self.records

    @property
    def status(self) -> str:
        if not self.stored:
            if self.pins:
                return "pinned, not stored"
            return "partly stored" if self.records else "not stored"
        records = self.own_records
        if any(not r.cached and r.auto_update for r in records) or self.pins:
            return "pinned"
        if any(not r.cached for r in records):
            return "kept"
        return "cached"

    @property
    def uses(self) -> int:
        return max((r.use_count for r in self.records), default=0)

    @property
    def last_used_at(self) -> float | None:
        if self.uses == 0:
            return None
        return max(r.last_used_at for r in self.records)

    @property
    def alias(self) -> str:
        if self.pins:
            return self.pins[0][1]
        return self.aliases[0] if self.aliases else ""

    @property
    def kind(self) -> str:
        return "file" if self.image is None else "image"


@define
class Inventory:
    entries: list[Entry]
    catalogues: dict[str, StoredCatalogue | None]


def _upstream_names(cache: Cache) -> list[str]:
    names = dict.fromkeys(cache.upstream_names)
    for meta in cache.index.metadata_records():
        names.setdefault(meta.upstream)
    for record in cache.index.records():
        names.setdefault(record.upstream)
    return list(names)


def inventory(cache: Cache) -> Inventory:
    """Every stored image (from the stored catalogues and the stored files), then the rest."""
    index, store = cache.index, cache.store
    catalogues = {name: load_catalogue(index, store, name) for name in _upstream_names(cache)}
    refs = pin_refs(index, cache.config_pins())
    entries: list[Entry] = []
    covered: set[str] = set()
    seen: set[tuple[str, str]] = set()
    resolved_pins: dict[tuple[str, str], list[PinRef]] = {}
    for ref in refs:
        catalogue = catalogues.get(ref[0])
        image = resolve_alias(catalogue.images, ref[1], ref[2], ref[3]) if catalogue is not None else None
        key = (ref[0], image.fingerprint if image is not None else f"unresolved:{ref[1]}:{ref[2]}:{ref[3]}")
        resolved_pins.setdefault(key, []).append(ref)
    for upstream, catalogue in catalogues.items():
        if catalogue is None:
            continue
        for image in catalogue.images:
            key = (upstream, image.fingerprint)
            if key in seen:
                continue
            records = [index.get(item.sha256) for item in image.files]
            present = [r for r in records if r is not None]
            pins_here = resolved_pins.get(key, [])
            if len(present) < len(records) and not pins_here:
                continue
            seen.add(key)
            if len(present) == len(records):
                # Its stored deltas are part of it (not stray files): listed, used and
                # removed with it.
                present += [r for r in (index.get(d.sha256) for d in image.deltas) if r is not None]
                covered.update(r.sha256 for r in present)
            entries.append(Entry(
                upstream=upstream, aliases=image.aliases, fingerprint=image.fingerprint, type=image.type,
                architecture=image.architecture, product=image.product, version=image.version,
                size=image.size, records=present, image=image, pins=pins_here,
                missing=len(records) - len(present),
            ))
    for (upstream, pin_key), pins_here in resolved_pins.items():
        if pin_key.startswith("unresolved:"):
            _u, alias, arch, type = pins_here[0]
            entries.append(Entry(
                upstream=upstream, aliases=(alias,), fingerprint="", type=type, architecture=arch,
                product="", version="", size=0, records=[], pins=pins_here, missing=1,
            ))
    for record in index.records():
        if record.sha256 in covered:
            continue
        entries.append(Entry(
            upstream=record.upstream, aliases=(), fingerprint=record.sha256, type="", architecture="",
            product=record.product, version=record.version, size=record.size, records=[record],
        ))
    return Inventory(entries, catalogues)


def find_entries(cache: Cache, inv: Inventory, ref: Ref, arch: str, type: str) -> list[Entry]:
    """The entries a reference names: the image an alias resolves to, or a fingerprint's."""
    if isinstance(ref, FingerprintRef):
        return [e for e in inv.entries if e.fingerprint and e.fingerprint.startswith(ref.prefix)]
    check_upstream(cache, ref.upstream)
    try:
        architecture, type = normalise_ref(ref.alias, arch, type)
    except PinError as e:
        raise InventoryError(str(e)) from None
    stored = [e for e in inv.entries if e.upstream == ref.upstream and e.image is not None and e.stored]
    image = resolve_alias([e.image for e in stored if e.image is not None], ref.alias, architecture, type)
    if image is not None:
        return [e for e in stored if e.image == image]
    catalogue = inv.catalogues.get(ref.upstream)
    if catalogue is not None:
        newest = resolve_alias(catalogue.images, ref.alias, architecture, type)
        if newest is not None:
            pending = [e for e in inv.entries if e.upstream == ref.upstream and e.fingerprint == newest.fingerprint]
            if pending:
                return pending
            return [catalogue_entry(cache, ref.upstream, newest)]
    return [e for e in inv.entries if e.upstream == ref.upstream and not e.stored and ref.alias in e.aliases
            and e.architecture == architecture and e.type == type]


def catalogue_entry(cache: Cache, upstream: str, image: Image) -> Entry:
    """An entry for a catalogue image, whatever of it is stored."""
    records = [r for r in (cache.index.get(i.sha256) for i in image.files) if r is not None]
    return Entry(
        upstream=upstream, aliases=image.aliases, fingerprint=image.fingerprint, type=image.type,
        architecture=image.architecture, product=image.product, version=image.version, size=image.size,
        records=records, image=image, missing=len(image.files) - len(records),
    )


def one_entry(cache: Cache, inv: Inventory, text: str, arch: str, type: str) -> Entry:
    ref = parse_ref(text)
    found = find_entries(cache, inv, ref, arch, type)
    if not found:
        if isinstance(ref, FingerprintRef):
            raise InventoryError(f"no stored image or file has a fingerprint starting with {ref.prefix}.")
        if inv.catalogues.get(ref.upstream) is None:
            raise InventoryError(f"the cache holds no catalogue of {ref.upstream} yet, and no image of {ref.alias}.")
        architecture = normalise_ref(ref.alias, arch, type)[0]
        raise InventoryError(f"the stored catalogue of {ref.upstream} has no {type} image {ref.alias} for {architecture}.")
    if len(found) > 1:
        raise InventoryError(f"{text} matches {len(found)} images; give more of the fingerprint.")
    return found[0]
