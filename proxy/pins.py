# -*- test-case-name: tests.test_pins -*-
"""Pins: aliases whose images the proxy keeps and keeps fresh, whatever their use.

A pin is a L{PinRecord} in the index (the C{[[pin]]} entries of the configuration are pins too,
but live in the configuration). Pinning also flips the flags of the files already stored for
the image the alias resolves to, and of the older versions of it that are stored, to
C{cached = False, auto_update = True}: they are never expired or evicted. The prefetcher later
downloads what is missing and releases versions beyond C{keep_versions}.

Everything here reads the catalogue the proxy has stored for an upstream (its index and
products files as L{MetadataRecord}s with bodies in the blob store); nothing contacts an
upstream, so the admin command can pin while the WAN is down.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from proxy.blobs import BlobStore
from proxy.catalogue import CatalogueError, Image, Item, parse_images, products_paths
from proxy.index import CacheIndex, MetadataRecord, PinRecord
from proxy.metadata_store import MetadataStore
from proxy.resolve import CONTAINER, VIRTUAL_MACHINE, host_architecture, lxd_arch, resolve_alias, versions_for

INDEX_PATH = "streams/v1/index.json"
IMAGE_TYPES = (CONTAINER, VIRTUAL_MACHINE)

# (upstream, alias, arch, type), as in a PinRecord or a [[pin]] table; arch "" is the host's.
PinRef = tuple[str, str, str, str]


class PinError(Exception):
    """A pin or unpin that cannot be done; the message is one sentence for the admin."""


@frozen
class StoredCatalogue:
    """
    The catalogue of one upstream as the proxy has it stored.

    @ivar index: the index's metadata record and body.
    @ivar products: products path -> (its metadata record, its body, the images it lists), for
        every products file the index names and the proxy holds.
    """

    upstream: str
    index_record: MetadataRecord
    index_body: bytes
    products: dict[str, tuple[MetadataRecord, bytes, list[Image]]]

    @property
    def images(self) -> list[Image]:
        return [image for _r, _b, images in self.products.values() for image in images]

    def products_path_of(self, image: Image) -> str | None:
        for path, (_record, _body, images) in self.products.items():
            if image in images:
                return path
        return None


@frozen
class PinResult:
    """
    What a pin or unpin did.

    @ivar image: the image the alias resolves to in the stored catalogue, or None when the
        proxy holds no catalogue for the upstream yet (the prefetcher resolves it later).
    @ivar flipped: sha256 of the stored files whose flags were changed.
    @ivar missing: files of C{image} not stored yet (the prefetcher downloads them).
    """

    record: PinRecord
    image: Image | None
    flipped: tuple[str, ...]
    missing: tuple[Item, ...]


def load_catalogue(index: CacheIndex, store: BlobStore, upstream: str) -> StoredCatalogue | None:
    """
    The stored catalogue of C{upstream}, or None when its index is not stored (or unreadable).

    A products file that is missing or that no client would accept is left out, as the
    proxy itself would not serve it either.
    """
    bodies = MetadataStore(store, index)
    held = bodies.load(upstream, INDEX_PATH)
    if held is None:
        return None
    index_record, index_body = held
    try:
        paths = products_paths(index_body)
    except CatalogueError:
        return None
    products: dict[str, tuple[MetadataRecord, bytes, list[Image]]] = {}
    for path in paths:
        held = bodies.load(upstream, path)
        if held is None:
            continue
        record, body = held
        try:
            images = parse_images(body)
        except CatalogueError:
            continue
        products[path] = (record, body, images)
    return StoredCatalogue(upstream, index_record, index_body, products)


def normalise_ref(alias: str, arch: str, type: str) -> tuple[str, str]:
    """
    The LXD architecture name and image type of a pin, checked.

    @param arch: a stream or LXD name; empty for this machine's architecture.
    @raise PinError: an unknown architecture or image type.
    """
    if not alias:
        raise PinError("an alias to pin is needed, such as images:ubuntu/24.04.")
    if type not in IMAGE_TYPES:
        raise PinError(f"image type {type!r} is neither container nor virtual-machine.")
    try:
        return (lxd_arch(arch) if arch else host_architecture()), type
    except ValueError:
        raise PinError(f"{arch!r} is not an architecture LXD knows.") from None


def stored_versions(index: CacheIndex, images: list[Image], image: Image) -> list[Image]:
    """C{image} and its older versions (same product, arch, type, root ftype) with a stored file."""
    return [
        version
        for version in versions_for(images, image)
        if version.version <= image.version
        and any(index.get(item.sha256) is not None for item in version.files)
    ]


def _protected_by(index: CacheIndex, images: list[Image], image: Image) -> set[str]:
    return {
        item.sha256
        for version in stored_versions(index, images, image)
        for item in version.files
        if index.get(item.sha256) is not None
    }


def _resolve(catalogue: StoredCatalogue | None, upstream: str, alias: str, arch: str, type: str) -> Image | None:
    """The image a pin names in the stored catalogue; PinError if the catalogue lacks the alias."""
    if catalogue is None:
        return None
    image = resolve_alias(catalogue.images, alias, arch, type)
    if image is None:
        raise PinError(
            f"the catalogue of {upstream} has no {type} image {alias} for {arch}."
        )
    return image


def _check_upstream(index: CacheIndex, upstream: str, upstreams: Collection[str] | None) -> None:
    if upstreams is not None:
        if upstream not in upstreams:
            known = ", ".join(upstreams) or "none"
            raise PinError(f"{upstream} is not a configured upstream (configured: {known}).")
    elif index.get_metadata(upstream, INDEX_PATH) is None:
        raise PinError(f"{upstream} is not an upstream this cache has a catalogue of.")


def pin(
    index: CacheIndex,
    store: BlobStore,
    upstream: str,
    alias: str,
    arch: str,
    type: str,
    clock: IReactorTime,
    *,
    upstreams: Collection[str] | None = None,
) -> PinResult:
    """
    Pin C{upstream}:C{alias} for C{arch} (empty: this machine's) and C{type}.

    Records a L{PinRecord} (the architecture as its LXD name) and flips the stored files of the
    image the alias resolves to, and of its older stored versions, to C{cached = False,
    auto_update = True}. Pinning again is harmless.

    @param upstreams: the configured upstream names; without them, an upstream is known when
        the cache holds its catalogue.
    @raise PinError: an unknown upstream, architecture or type, or an alias that the stored
        catalogue does not have for that architecture and type. An upstream whose catalogue is
        not stored yet can be pinned: the alias is checked when the prefetcher fetches it.
    """
    architecture, type = normalise_ref(alias, arch, type)
    _check_upstream(index, upstream, upstreams)
    catalogue = load_catalogue(index, store, upstream)
    image = _resolve(catalogue, upstream, alias, architecture, type)
    record = PinRecord(
        upstream=upstream, alias=alias, type=type, arch=architecture, pinned_at=clock.seconds()
    )
    index.put_pin(record)
    flipped: list[str] = []
    missing: tuple[Item, ...] = ()
    if image is not None and catalogue is not None:
        for sha256 in sorted(_protected_by(index, catalogue.images, image)):
            current = index.get(sha256)
            if current is not None and (current.cached or not current.auto_update):
                index.set_flags(sha256, cached=False, auto_update=True)
                flipped.append(sha256)
        missing = tuple(item for item in image.files if index.get(item.sha256) is None)
    return PinResult(record=record, image=image, flipped=tuple(flipped), missing=missing)


def unpin(
    index: CacheIndex,
    store: BlobStore,
    upstream: str,
    alias: str,
    arch: str,
    type: str,
    clock: IReactorTime,
    *,
    other_pins: Iterable[PinRef] = (),
) -> PinResult:
    """
    Remove the pin of C{upstream}:C{alias} for C{arch} and C{type}.

    The stored files it protected turn C{cached = True, auto_update = False}, so they age out
    like any file fetched on demand, except those another pin (an index pin, or one of
    C{other_pins}, such as the configuration's) still protects.

    @raise PinError: there is no such pin.
    """
    architecture, type = normalise_ref(alias, arch, type)
    if not index.remove_pin(upstream, alias, type, architecture):
        raise PinError(f"{upstream}:{alias} ({type}, {architecture}) is not pinned.")
    record = PinRecord(upstream=upstream, alias=alias, type=type, arch=architecture, pinned_at=clock.seconds())
    catalogue = load_catalogue(index, store, upstream)
    image = resolve_alias(catalogue.images, alias, architecture, type) if catalogue is not None else None
    flipped: list[str] = []
    if image is not None and catalogue is not None:
        still = pinned_files(index, store, extra=other_pins)
        for sha256 in sorted(_protected_by(index, catalogue.images, image) - still):
            current = index.get(sha256)
            if current is not None and (not current.cached or current.auto_update):
                index.set_flags(sha256, cached=True, auto_update=False)
                flipped.append(sha256)
    return PinResult(record=record, image=image, flipped=tuple(flipped), missing=())


def pin_refs(index: CacheIndex, extra: Iterable[PinRef] = ()) -> list[PinRef]:
    """Every pin of the index followed by C{extra}, without duplicates, architectures named."""
    refs: dict[PinRef, None] = {}
    for record in index.pins():
        refs[(record.upstream, record.alias, record.arch or host_architecture(), record.type)] = None
    for upstream, alias, arch, type in extra:
        try:
            architecture = lxd_arch(arch) if arch else host_architecture()
        except ValueError:
            continue
        refs[(upstream, alias, architecture, type)] = None
    return list(refs)


def pinned_files(index: CacheIndex, store: BlobStore, *, extra: Iterable[PinRef] = ()) -> set[str]:
    """
    The sha256 of every stored file a pin protects.

    That is the files of the image each pin (of the index, and C{extra}) resolves to in the
    stored catalogue, with their older stored versions, and every file kept by fingerprint
    (C{cached = False, auto_update = False}: kept, never replaced).
    """
    catalogues: dict[str, StoredCatalogue | None] = {}
    protected: set[str] = set()
    for upstream, alias, arch, type in pin_refs(index, extra):
        if upstream not in catalogues:
            catalogues[upstream] = load_catalogue(index, store, upstream)
        catalogue = catalogues[upstream]
        if catalogue is None:
            continue
        image = resolve_alias(catalogue.images, alias, arch, type)
        if image is not None:
            protected |= _protected_by(index, catalogue.images, image)
    for record in index.records():
        if not record.cached and not record.auto_update:
            protected.add(record.sha256)
    return protected


def keep_files(index: CacheIndex, sha256s: Iterable[str], keep: bool) -> list[str]:
    """
    Pin (C{keep}) or release files by content: C{cached = False, auto_update = False} keeps a
    file as it is, never expired, evicted or replaced; releasing makes it C{cached} again.

    @return: the sha256 of the records changed.
    """
    changed: list[str] = []
    for sha256 in sha256s:
        record = index.get(sha256)
        if record is None:
            continue
        if keep and (record.cached or record.auto_update):
            index.set_flags(sha256, cached=False, auto_update=False)
            changed.append(sha256)
        elif not keep and not record.cached:
            index.set_flags(sha256, cached=True, auto_update=False)
            changed.append(sha256)
    return changed


__all__ = [
    "INDEX_PATH",
    "PinError",
    "PinRef",
    "PinResult",
    "StoredCatalogue",
    "keep_files",
    "load_catalogue",
    "normalise_ref",
    "pin",
    "pin_refs",
    "pinned_files",
    "stored_versions",
    "unpin",
]
