"""Bundles (proxy.bundle): export to one tar file, verified import, catalogue merge."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.bundle import BundleError, export_bundle, import_bundle, merge_index, merge_products
from proxy.index import CacheIndex
from proxy.pins import load_catalogue, pin
from tests.helpers.tree import Tree, build_tree
from tests.test_pins import NOW, UPSTREAM, seed_catalogue, seed_images

Cache = tuple[CacheIndex, BlobStore]


def open_cache(root: Path) -> Cache:
    return CacheIndex(str(root / "index"), Clock()), BlobStore(FilePath(str(root)))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path / "tree")


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Cache]:
    cache = open_cache(tmp_path / "source")
    yield cache
    cache[0].close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Cache]:
    cache = open_cache(tmp_path / "target")
    yield cache
    cache[0].close()


def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        out: dict[str, bytes] = {}
        for member in tar:
            f = tar.extractfile(member)
            assert f is not None
            out[member.name] = f.read()
        return out


def rewrite(path: Path, change: Callable[[dict[str, bytes]], None]) -> None:
    """Rewrite the bundle at C{path} with C{change} applied to its members."""
    content = members(path)
    change(content)
    with tarfile.open(path, "w") as tar:
        for name, data in content.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def blob_count(store: BlobStore) -> int:
    return sum(1 for _ in store.stored())


def pinned_source(source: Cache, tree: Tree) -> None:
    index, store = source
    seed_catalogue(index, store, tree)
    seed_images(index, store, tree, [tree.image("testos/2.0"), tree.image("testos/1.0")])
    pin(index, store, UPSTREAM, "testos/2.0", "amd64", "container", clock())


def test_export_writes_manifest_filtered_catalogue_and_blobs(source: Cache, tree: Tree, tmp_path: Path) -> None:
    pinned_source(source, tree)
    out = tmp_path / "seed.tar"
    report = export_bundle(*source, str(out), None, now=NOW)
    image = tree.image("testos/2.0")
    assert (report.images, report.files, report.bytes) == (1, 2, image.size)

    content = members(out)
    assert list(content)[0] == "manifest.json"
    assert set(content) == {
        "manifest.json",
        f"catalogue/{UPSTREAM}/streams/v1/index.json",
        f"catalogue/{UPSTREAM}/streams/v1/images.json",
        *(f"blobs/{f.sha256}" for f in image.files),
    }
    for f in image.files:
        assert content[f"blobs/{f.sha256}"] == tree.read(f)
    manifest = json.loads(content["manifest.json"])
    entry = manifest["upstreams"][UPSTREAM]
    assert manifest["format"] == "lxd-image-proxy-bundle" and manifest["created"] == NOW
    assert entry["pins"] == [{"alias": "testos/2.0", "arch": "x86_64", "type": "container"}]
    [exported] = entry["images"]
    assert exported["fingerprint"] == image.fingerprint and exported["pinned"] is True
    assert [(f["sha256"], f["size"]) for f in exported["files"]] == [(f.sha256, f.size) for f in image.files]

    products = json.loads(content[f"catalogue/{UPSTREAM}/streams/v1/images.json"])["products"]
    assert list(products) == [image.product]
    assert list(products[image.product]["versions"]) == [image.version]
    index_doc = json.loads(content[f"catalogue/{UPSTREAM}/streams/v1/index.json"])
    assert index_doc["index"]["images"]["products"] == [image.product]


def test_round_trip_into_an_empty_cache(source: Cache, target: Cache, tree: Tree, tmp_path: Path) -> None:
    pinned_source(source, tree)
    out = tmp_path / "seed.tar"
    export_bundle(*source, str(out), [(UPSTREAM, "testos/1.0", "amd64", "container")] +
                  [(UPSTREAM, "testos/2.0", "amd64", "container")], now=NOW)
    index, store = target

    report = import_bundle(index, store, str(out), upstreams=[UPSTREAM, "other"], now=NOW + 5)

    assert (report.images, report.files, report.new_files, report.pins) == (2, 4, 4, 1)
    assert report.catalogues == ((UPSTREAM, "stored"),)
    pinned_image, cached_image = tree.image("testos/2.0"), tree.image("testos/1.0")
    for image, flags in ((pinned_image, (False, True)), (cached_image, (True, False))):
        for f in image.files:
            record = index.get(f.sha256)
            assert record is not None
            assert (record.cached, record.auto_update) == flags
            assert record.paths == (f"{UPSTREAM}/{f.path}",) and record.stored_at == NOW + 5
            assert store.path_for(f.sha256).getContent() == tree.read(f)
    assert [(p.alias, p.arch) for p in index.pins()] == [("testos/2.0", "x86_64")]
    catalogue = load_catalogue(index, store, UPSTREAM)
    assert catalogue is not None
    assert {i.fingerprint for i in catalogue.images} == {pinned_image.fingerprint, cached_image.fingerprint}
    assert catalogue.index_record.checked_at == NOW + 5

    # Importing again changes nothing but the counts of new things.
    again = import_bundle(index, store, str(out), upstreams=[UPSTREAM])
    assert (again.new_files, again.pins) == (0, 0)


def test_import_merges_versions_into_a_stored_catalogue(
    source: Cache, target: Cache, tree: Tree, tmp_path: Path
) -> None:
    pinned_source(source, tree)
    newest = tree.image("testos/2.0")
    out = tmp_path / "seed.tar"
    export_bundle(*source, str(out), None)
    # The target's own copy of the catalogue predates the newest version.
    tree.remove_version("testos", "2.0", newest.version)
    index, store = target
    seed_catalogue(index, store, tree)
    before = load_catalogue(index, store, UPSTREAM)
    assert before is not None and newest.fingerprint not in {i.fingerprint for i in before.images}

    report = import_bundle(index, store, str(out), upstreams=[UPSTREAM])

    assert report.catalogues == ((UPSTREAM, "merged"),)
    after = load_catalogue(index, store, UPSTREAM)
    assert after is not None
    fingerprints = {i.fingerprint for i in after.images}
    assert newest.fingerprint in fingerprints
    assert {i.fingerprint for i in before.images} <= fingerprints
    # The replaced products body is gone from the store; the validators are kept.
    assert not store.exists(before.products[tree.products_file.path][0].sha256)
    assert after.index_record.checked_at == NOW


def test_a_corrupt_blob_refuses_the_whole_bundle(source: Cache, target: Cache, tree: Tree, tmp_path: Path) -> None:
    pinned_source(source, tree)
    out = tmp_path / "seed.tar"
    export_bundle(*source, str(out), None)
    root = tree.image("testos/2.0").root
    assert root is not None

    def corrupt(content: dict[str, bytes]) -> None:
        data = content[f"blobs/{root.sha256}"]
        content[f"blobs/{root.sha256}"] = bytes([data[0] ^ 1]) + data[1:]

    rewrite(out, corrupt)
    index, store = target
    with pytest.raises(BundleError, match="does not hash to its name"):
        import_bundle(index, store, str(out), upstreams=[UPSTREAM])
    assert list(index.records()) == [] and list(index.pins()) == [] and list(index.metadata_records()) == []
    assert blob_count(store) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop(next(n for n in c if n.startswith("blobs/"))), "lacks 1 of the files"),
        (lambda c: c.__setitem__("manifest.json", b"{"), "manifest is not valid JSON"),
        (lambda c: c.pop("manifest.json"), "has no manifest"),
        (lambda c: c.__setitem__("manifest.json", c["manifest.json"].replace(b'"size": ', b'"size": 1')),
         "does not list .* as its manifest does"),
        (lambda c: c.pop(f"catalogue/{UPSTREAM}/streams/v1/images.json"), "has no products file"),
    ],
)
def test_damaged_bundles_are_refused(
    source: Cache, target: Cache, tree: Tree, tmp_path: Path,
    change: Callable[[dict[str, bytes]], None], message: str,
) -> None:
    pinned_source(source, tree)
    out = tmp_path / "seed.tar"
    export_bundle(*source, str(out), None)
    rewrite(out, change)
    index, store = target
    with pytest.raises(BundleError, match=message):
        import_bundle(index, store, str(out), upstreams=[UPSTREAM])
    assert list(index.records()) == [] and blob_count(store) == 0


def test_import_refuses_an_upstream_the_target_does_not_configure(
    source: Cache, target: Cache, tree: Tree, tmp_path: Path
) -> None:
    pinned_source(source, tree)
    out = tmp_path / "seed.tar"
    export_bundle(*source, str(out), None)
    with pytest.raises(BundleError, match=f"upstream {UPSTREAM}, which this proxy does not configure"):
        import_bundle(*target, str(out), upstreams=["ubuntu"])


def test_import_of_something_else_is_refused(target: Cache, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(BundleError, match="is not a bundle"):
        import_bundle(*target, str(junk), upstreams=[UPSTREAM])
    with pytest.raises(BundleError, match="there is no bundle"):
        import_bundle(*target, str(tmp_path / "missing.tar"), upstreams=[UPSTREAM])


def test_export_errors(source: Cache, tree: Tree, tmp_path: Path) -> None:
    index, store = source
    out = str(tmp_path / "seed.tar")
    with pytest.raises(BundleError, match="no image is pinned"):
        export_bundle(index, store, out, None)
    with pytest.raises(BundleError, match="holds no catalogue of images"):
        export_bundle(index, store, out, [(UPSTREAM, "testos/1.0", "amd64", "container")])
    seed_catalogue(index, store, tree)
    with pytest.raises(BundleError, match="has no container image nosuch"):
        export_bundle(index, store, out, [(UPSTREAM, "nosuch", "amd64", "container")])
    with pytest.raises(BundleError, match="is stored in full; prefetch it first"):
        export_bundle(index, store, out, [(UPSTREAM, "testos/1.0", "amd64", "container")])
    assert not Path(out).exists()
    assert list(tmp_path.glob(".seed.tar*")) == []


def test_export_takes_the_newest_stored_version(source: Cache, tree: Tree, tmp_path: Path) -> None:
    index, store = source
    seed_catalogue(index, store, tree)
    older = [i for i in tree.images_of("testos", "2.0") if i.arch == "amd64" and i.type == "container"
             and i.version != tree.image("testos/2.0").version and i.root is not None
             and i.root.ftype == "squashfs"]
    seed_images(index, store, tree, older)
    out = tmp_path / "seed.tar"
    export_bundle(index, store, str(out), [(UPSTREAM, "testos/2.0", "amd64", "container")])
    manifest = json.loads(members(out)["manifest.json"])
    assert [i["fingerprint"] for i in manifest["upstreams"][UPSTREAM]["images"]] == [older[0].fingerprint]
    assert manifest["upstreams"][UPSTREAM]["images"][0]["pinned"] is False


def test_merge_helpers() -> None:
    target = json.dumps({"products": {"p": {"versions": {"1": {"items": {"a": {}}}}}}}).encode()
    extra = json.dumps({"products": {"p": {"versions": {"2": {"items": {"b": {}}}}}, "q": {"versions": {}}}}).encode()
    merged = merge_products(target, extra)
    assert merged is not None
    assert json.loads(merged)["products"]["p"]["versions"].keys() == {"1", "2"}
    assert "q" in json.loads(merged)["products"]
    assert merge_products(merged, extra) is None
    index = json.dumps({"index": {"i": {"path": "x.json", "products": ["p"]}}}).encode()
    more = json.dumps({"index": {"i": {"path": "x.json", "products": ["q"]}, "j": {"path": "y.json"}}}).encode()
    merged_index = merge_index(index, more)
    assert merged_index is not None
    doc = json.loads(merged_index)["index"]
    assert doc["i"]["products"] == ["p", "q"] and doc["j"]["path"] == "y.json"
    assert merge_index(merged_index, more) is None


def test_default_export_takes_images_pinned_by_flags(
    source: Cache, target: Cache, tree: Tree, tmp_path: Path
) -> None:
    """A running server's configured pins leave no pin record, only the files' flags."""
    index, store = source
    seed_catalogue(index, store, tree)
    pinned_image, kept_image, cached_image = (
        tree.image("testos/2.0"), tree.image("testos/1.0"), tree.image("testos/unified"))
    seed_images(index, store, tree, [pinned_image, kept_image, cached_image])
    for f in pinned_image.files:
        index.set_flags(f.sha256, cached=False, auto_update=True)
    for f in kept_image.files:
        index.set_flags(f.sha256, cached=False, auto_update=False)
    out = tmp_path / "seed.tar"

    report = export_bundle(index, store, str(out), None)

    assert report.images == 2
    entry = json.loads(members(out)["manifest.json"])["upstreams"][UPSTREAM]
    states = {i["fingerprint"]: (i["pinned"], i["kept"]) for i in entry["images"]}
    assert states == {pinned_image.fingerprint: (True, False), kept_image.fingerprint: (False, True)}
    assert entry["pins"] == [{"alias": "testos/2.0", "arch": "x86_64", "type": "container"}]

    tindex, tstore = target
    import_bundle(tindex, tstore, str(out), upstreams=[UPSTREAM])
    for image, flags in ((pinned_image, (False, True)), (kept_image, (False, False))):
        for f in image.files:
            record = tindex.get(f.sha256)
            assert record is not None and (record.cached, record.auto_update) == flags
    assert [(p.alias, p.arch, p.type) for p in tindex.pins()] == [("testos/2.0", "x86_64", "container")]
