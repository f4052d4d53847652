"""Pins (proxy.pins): records, the flags of stored files, and what a pin protects.

The cache is seeded directly from a generated tree: its index and products file as metadata
records, and chosen images' files as blobs with their records, as the proxy would have stored
them. The seeding helpers are shared with the bundle and command tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.index import CacheIndex, FileRecord, MetadataRecord
from proxy.pins import PinError, keep_files, load_catalogue, pin, pin_refs, pinned_files, unpin
from tests.helpers.tree import Tree, TreeImage, build_tree

UPSTREAM = "images"
NOW = 1_700_000_000.0


def put_blob(store: BlobStore, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    partial = store.new_partial()
    partial.write(data)
    partial.commit(digest)
    return digest


def seed_catalogue(index: CacheIndex, store: BlobStore, tree: Tree, upstream: str = UPSTREAM,
                   now: float = NOW) -> None:
    """Store the tree's index and products file as the proxy stores fetched metadata."""
    for item in (tree.index, tree.products_file):
        digest = put_blob(store, tree.read(item))
        index.put_metadata(MetadataRecord(
            upstream=upstream, path=item.path, sha256=digest, etag=None, last_modified=None,
            fetched_at=now, checked_at=now,
        ))


def seed_images(index: CacheIndex, store: BlobStore, tree: Tree, images: Iterable[TreeImage],
                upstream: str = UPSTREAM, now: float = NOW, use_count: int = 0) -> None:
    """Store every file of C{images} as a cached file fetched on demand."""
    for image in images:
        for item in image.files:
            digest = put_blob(store, tree.read(item))
            assert digest == item.sha256
            if index.get(digest) is not None:
                continue
            index.put(FileRecord(
                sha256=digest, size=item.size, upstream=upstream, paths=(f"{upstream}/{item.path}",),
                product=image.product, version=image.version, stored_at=now, last_used_at=now,
                use_count=use_count, cached=True, auto_update=False,
            ))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path / "tree")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[tuple[CacheIndex, BlobStore]]:
    root = tmp_path / "cache"
    store = BlobStore(FilePath(str(root)))
    index = CacheIndex(str(root / "index"), Clock())
    try:
        yield index, store
    finally:
        index.close()


def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


def flags(index: CacheIndex, image: TreeImage) -> list[tuple[bool, bool] | None]:
    out: list[tuple[bool, bool] | None] = []
    for item in image.files:
        record = index.get(item.sha256)
        out.append(None if record is None else (record.cached, record.auto_update))
    return out


PINNED = (False, True)
CACHED = (True, False)


def test_load_catalogue_reads_the_stored_metadata(cache: tuple[CacheIndex, BlobStore], tree: Tree) -> None:
    index, store = cache
    assert load_catalogue(index, store, UPSTREAM) is None
    seed_catalogue(index, store, tree)
    catalogue = load_catalogue(index, store, UPSTREAM)
    assert catalogue is not None
    assert {i.fingerprint for i in catalogue.images} == {i.fingerprint for i in tree.images}
    assert list(catalogue.products) == [tree.products_file.path]


def test_pin_flips_the_resolved_image_and_older_stored_versions(
    cache: tuple[CacheIndex, BlobStore], tree: Tree
) -> None:
    index, store = cache
    seed_catalogue(index, store, tree)
    old, new = (i for i in tree.images_of("testos", "2.0")
                if i.arch == "amd64" and i.type == "container" and i.root is not None
                and i.root.ftype == "squashfs")
    assert old.version < new.version
    other = tree.image("testos/1.0")
    seed_images(index, store, tree, [old, new, other])

    result = pin(index, store, UPSTREAM, "testos/2.0", "amd64", "container", clock())

    assert result.image is not None and result.image.fingerprint == new.fingerprint
    assert result.record.arch == "x86_64" and result.record.pinned_at == NOW
    assert flags(index, new) == [PINNED, PINNED]
    assert flags(index, old) == [PINNED, PINNED]
    assert flags(index, other) == [CACHED, CACHED]
    assert result.missing == ()
    assert [(p.upstream, p.alias, p.type, p.arch) for p in index.pins()] == [
        (UPSTREAM, "testos/2.0", "container", "x86_64")
    ]
    assert pinned_files(index, store) == {f.sha256 for f in (*old.files, *new.files)}


def test_pin_of_an_image_not_stored_yet_is_allowed(cache: tuple[CacheIndex, BlobStore], tree: Tree) -> None:
    index, store = cache
    seed_catalogue(index, store, tree)
    vm = tree.image("testos/2.0", type="virtual-machine")
    result = pin(index, store, UPSTREAM, "testos/2.0", "amd64", "virtual-machine", clock())
    assert result.image is not None and result.image.fingerprint == vm.fingerprint
    assert result.flipped == ()
    assert {i.sha256 for i in result.missing} == {f.sha256 for f in vm.files}
    assert len(list(index.pins())) == 1


def test_pin_without_a_stored_catalogue_needs_a_configured_upstream(
    cache: tuple[CacheIndex, BlobStore]
) -> None:
    index, store = cache
    with pytest.raises(PinError, match="not an upstream this cache has a catalogue of"):
        pin(index, store, UPSTREAM, "testos/2.0", "amd64", "container", clock())
    result = pin(index, store, UPSTREAM, "testos/2.0", "amd64", "container", clock(), upstreams=[UPSTREAM])
    assert result.image is None
    assert len(list(index.pins())) == 1


@pytest.mark.parametrize(
    ("upstream", "alias", "arch", "type", "message"),
    [
        ("elsewhere", "testos/2.0", "amd64", "container", "elsewhere is not a configured upstream"),
        (UPSTREAM, "nosuch/1.0", "amd64", "container", "has no container image nosuch/1.0"),
        (UPSTREAM, "testos/1.0", "amd64", "virtual-machine", "has no virtual-machine image"),
        (UPSTREAM, "testos/1.0", "sparc", "container", "'sparc' is not an architecture"),
        (UPSTREAM, "testos/1.0", "amd64", "vm", "neither container nor virtual-machine"),
    ],
)
def test_pin_errors_are_one_sentence(
    cache: tuple[CacheIndex, BlobStore], tree: Tree, upstream: str, alias: str, arch: str, type: str,
    message: str,
) -> None:
    index, store = cache
    seed_catalogue(index, store, tree)
    with pytest.raises(PinError, match=message) as caught:
        pin(index, store, upstream, alias, arch, type, clock(), upstreams=[UPSTREAM])
    text = str(caught.value)
    assert text.endswith(".") and "\n" not in text
    assert list(index.pins()) == []


def test_unpin_releases_files_no_other_pin_needs(cache: tuple[CacheIndex, BlobStore], tree: Tree) -> None:
    index, store = cache
    seed_catalogue(index, store, tree)
    container = tree.image("testos/2.0")
    vm = tree.image("testos/2.0", type="virtual-machine")
    assert container.meta == vm.meta
    seed_images(index, store, tree, [container, vm])
    pin(index, store, UPSTREAM, "testos/2.0", "amd64", "container", clock())
    pin(index, store, UPSTREAM, "testos/2.0", "amd64", "virtual-machine", clock())

    result = unpin(index, store, UPSTREAM, "testos/2.0", "x86_64", "container", clock())

    # The metadata file is shared with the VM image, which is still pinned.
    assert result.flipped == (container.root.sha256,)  # type: ignore[union-attr]
    assert flags(index, container) == [PINNED, CACHED]
    assert flags(index, vm) == [PINNED, PINNED]
    with pytest.raises(PinError, match="is not pinned"):
        unpin(index, store, UPSTREAM, "testos/2.0", "amd64", "container", clock())


def test_unpin_keeps_what_a_configured_pin_protects(cache: tuple[CacheIndex, BlobStore], tree: Tree) -> None:
    index, store = cache
    seed_catalogue(index, store, tree)
    image = tree.image("testos/1.0")
    seed_images(index, store, tree, [image])
    pin(index, store, UPSTREAM, "testos/1.0", "amd64", "container", clock())
    result = unpin(index, store, UPSTREAM, "testos/1.0", "amd64", "container", clock(),
                   other_pins=[(UPSTREAM, "testos/one", "amd64", "container")])
    assert result.flipped == ()
    assert flags(index, image) == [PINNED, PINNED]


def test_pin_refs_name_architectures(cache: tuple[CacheIndex, BlobStore], tree: Tree) -> None:
    index, store = cache
    seed_catalogue(index, store, tree)
    pin(index, store, UPSTREAM, "testos/1.0", "arm64", "container", clock())
    refs = pin_refs(index, [(UPSTREAM, "testos/1.0", "aarch64", "container"), (UPSTREAM, "x", "amd64", "container")])
    assert refs == [(UPSTREAM, "testos/1.0", "aarch64", "container"), (UPSTREAM, "x", "x86_64", "container")]


def test_keep_files_by_fingerprint(cache: tuple[CacheIndex, BlobStore], tree: Tree) -> None:
    index, store = cache
    seed_catalogue(index, store, tree)
    image = tree.image("testos/1.0")
    seed_images(index, store, tree, [image])
    shas = [f.sha256 for f in image.files]
    assert keep_files(index, shas, keep=True) == shas
    assert flags(index, image) == [(False, False), (False, False)]
    assert pinned_files(index, store) == set(shas)
    assert keep_files(index, shas, keep=False) == shas
    assert flags(index, image) == [CACHED, CACHED]
    assert pinned_files(index, store) == set()
