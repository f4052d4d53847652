"""The test helpers themselves: the simplestreams tree, the upstream server, the certificates.

The tree is checked three ways: against itself (sizes, hashes, combined hashes), against
`proxy.catalogue` (the parser sees the images the tree says it has), and against the real `lxc`
client over HTTPS (`lxc image list` and `lxc image export`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from attrs import evolve as attrs_evolve
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, reactor as global_reactor
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorProcess, IReactorSSL, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseFailed
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from proxy.catalogue import parse_images, parse_products, products_paths
from tests.helpers.certs import make_ca
from tests.helpers.tree import (
    INDEX_PATH,
    PRODUCTS_PATH,
    ProductSpec,
    Tree,
    build_tree,
    have_qemu_img,
)
from tests.helpers.upstream import RunningUpstream, Throttle, TreeResource, start_https_upstream

reactor = cast(Any, global_reactor)

BASE = "https://upstream.test"
NATIVE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")
LXC_TIMEOUT_SECONDS = 60.0
NET_TIMEOUT_SECONDS = 20.0


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """One default tree for the read-only tests of this module."""
    return build_tree(tmp_path_factory.mktemp("tree"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the tree on its own ----------------------------------------------------------------------


def test_default_tree_shape(shared_tree: Tree) -> None:
    tree = shared_tree
    products = {(s.os, s.release) for s in tree.products}
    assert products == {("testos", "1.0"), ("testos", "2.0"), ("testos", "3.0")}
    assert {i.arch for i in tree.images} == {"amd64", "arm64"}
    assert {i.version for i in tree.images_of("testos", "2.0")} == {"20240101_0000", "20240201_0000"}
    ftypes = {i.root.ftype if i.root else None for i in tree.images}
    assert ftypes == {"squashfs", "root.tar.xz", "disk-kvm.img", None}
    assert {i.type for i in tree.images} == {"container", "virtual-machine"}
    assert len({i.fingerprint for i in tree.images}) == len(tree.images)
    assert len({f.sha256 for f in tree.files.values()}) == len(tree.files)
    # Everything stays small.
    assert all(f.size < 64 * 1024 for f in tree.files.values())


def test_files_match_their_items(shared_tree: Tree) -> None:
    tree = shared_tree
    for path, item in tree.files.items():
        assert path.startswith("images/")
        assert path.split("/")[:2] == ["images", "testos"]
        data = tree.read(item)
        assert len(data) == item.size, path
        assert sha256(data) == item.sha256, path
    for item in (tree.index, tree.products_file):
        assert sha256(tree.read(item)) == item.sha256
        assert tree.path_of(item).stat().st_size == item.size


def test_fingerprints_are_combined_hashes(shared_tree: Tree) -> None:
    for image in shared_tree.images:
        data = b"".join(shared_tree.read(f) for f in image.files)
        assert sha256(data) == image.fingerprint


def test_catalogue_json(shared_tree: Tree) -> None:
    tree = shared_tree
    index = json.loads(tree.read(INDEX_PATH))
    products = json.loads(tree.read(PRODUCTS_PATH))
    assert products_paths(tree.read(INDEX_PATH)) == [PRODUCTS_PATH]
    assert sorted(index["index"]["images"]["products"]) == sorted(products["products"])
    product = products["products"]["testos:1.0:amd64:default"]
    assert product["aliases"] == "testos/1.0,testos/1.0/default,testos/one"
    assert product["arch"] == "amd64"
    version = product["versions"]["20240101_0000"]["items"]
    meta = version["lxd.tar.xz"]
    image = tree.image("testos/1.0")
    assert meta["path"] == "images/testos/1.0/amd64/default/20240101_0000/lxd.tar.xz"
    assert meta["combined_squashfs_sha256"] == image.fingerprint
    assert meta["combined_rootxz_sha256"] == meta["combined_sha256"]
    vm = tree.image("testos/2.0", type="virtual-machine")
    vm_meta = products["products"]["testos:2.0:amd64:default"]["versions"][vm.version]["items"]
    assert vm_meta["lxd.tar.xz"]["combined_disk-kvm-img_sha256"] == vm.fingerprint
    assert vm_meta["disk.qcow2"]["ftype"] == "disk-kvm.img"


def test_deltas_are_real_vcdiffs_from_every_earlier_version(tmp_path: Path) -> None:
    spec = ProductSpec("deltaos", "1.0", arches=("amd64",), versions=("20240101_0000", "20240201_0000"),
                       rootxz=False, deltas=True)
    tree = build_tree(tmp_path / "tree", [spec])
    old, new = (tree.images_of("deltaos", "1.0", v)[0] for v in spec.versions)
    assert old.deltas == ()
    [delta] = new.deltas
    assert (delta.ftype, delta.delta_base, delta.path.rsplit("/", 1)[1]) == (
        "squashfs.vcdiff", "20240101_0000", "delta-20240101_0000.vcdiff")
    assert tree.files[delta.path] == delta and new.delta_from("20240101_0000") == delta
    # What LXD runs to rebuild the new root from the old one.
    assert old.root is not None and new.root is not None
    out = tmp_path / "patched"
    subprocess.run(["xdelta3", "-f", "-d", "-s", str(tree.path_of(old.root)), str(tree.path_of(delta)), str(out)],
                   check=True, capture_output=True)
    assert sha256(out.read_bytes()) == new.root.sha256
    # The catalogue lists it as LXD's ToLXD finds it, and it grows with a version added.
    [parsed] = [i for i in parse_images(tree.read(tree.products_file)) if i.version == new.version]
    assert [(d.path, d.sha256, d.delta_base) for d in parsed.deltas] == [(delta.path, delta.sha256, "20240101_0000")]
    [third] = tree.add_version("deltaos", "1.0", "20240301_0000")
    assert sorted(d.delta_base for d in third.deltas) == ["20240101_0000", "20240201_0000"]
    # Without the option, nothing changes.
    assert all(i.deltas == () for i in build_tree(tmp_path / "plain", [attrs_evolve(spec, deltas=False)]).images)


def test_parser_agrees_with_tree(shared_tree: Tree) -> None:
    data = shared_tree.read(PRODUCTS_PATH)
    parsed = {
        (i.fingerprint, i.type, i.arch, i.version, i.aliases, i.meta.path, i.root.path if i.root else None)
        for i in parse_images(data)
    }
    expected = {
        (i.fingerprint, i.type, i.arch, i.version, i.aliases, i.meta.path, i.root.path if i.root else None)
        for i in shared_tree.images
    }
    assert parsed == expected
    items = parse_products(data)
    assert {p: (i.sha256, i.size, i.ftype) for p, i in items.items()} == {
        p: (f.sha256, f.size, f.ftype) for p, f in shared_tree.files.items()
    }


def test_metadata_tarball(shared_tree: Tree) -> None:
    image = shared_tree.image("testos/one", arch="arm64")
    with tarfile.open(fileobj=io.BytesIO(shared_tree.read(image.meta)), mode="r:xz") as tar:
        names = tar.getnames()
        member = tar.getmember("templates")
        assert member.isdir()
        metadata = tar.extractfile("metadata.yaml")
        assert metadata is not None
        text = metadata.read().decode()
    assert sorted(names) == ["metadata.yaml", "templates"]
    assert "architecture: \"aarch64\"" in text
    assert "creation_date: 1704067200" in text
    assert "  os: \"testos\"" in text
    assert "  release: \"1.0\"" in text
    assert "  description: " in text


def test_rootfs_files(shared_tree: Tree) -> None:
    image = shared_tree.image("testos/1.0", type="container")
    assert image.root is not None and image.root.ftype == "squashfs"
    assert shared_tree.read(image.root)[:4] == b"hsqs"
    if shutil.which("unsquashfs"):
        listing = subprocess.run(
            ["unsquashfs", "-l", "-d", "", str(shared_tree.path_of(image.root))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert "/etc/os-release" in listing
    rootxz = next(
        i for i in shared_tree.images_of("testos", "1.0") if i.root and i.root.ftype == "root.tar.xz"
    )
    assert rootxz.root is not None
    with tarfile.open(fileobj=io.BytesIO(shared_tree.read(rootxz.root)), mode="r:xz") as tar:
        assert "etc/os-release" in tar.getnames()


def test_vm_disk(shared_tree: Tree) -> None:
    image = shared_tree.image("testos", type="virtual-machine")
    assert image.root is not None
    assert shared_tree.read(image.root)[:4] == b"QFI\xfb"
    if have_qemu_img():
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(shared_tree.path_of(image.root))],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert json.loads(info)["format"] == "qcow2"


def test_unified_tarball(shared_tree: Tree) -> None:
    image = shared_tree.image("testos/unified")
    assert image.root is None
    assert image.meta.ftype == "lxd_combined.tar.gz"
    assert image.fingerprint == image.meta.sha256
    raw = gzip.decompress(shared_tree.read(image.meta))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
    assert "metadata.yaml" in names
    assert "rootfs/etc/os-release" in names


def test_alias_lookup(shared_tree: Tree) -> None:
    tree = shared_tree
    newest = tree.image("testos")
    assert (newest.release, newest.version, newest.arch) == ("2.0", "20240201_0000", "amd64")
    assert newest.root is not None and newest.root.ftype == "squashfs"
    assert tree.image("testos/two", arch="arm64").arch == "arm64"
    assert tree.image("testos/2.0", type="virtual-machine").type == "virtual-machine"
    assert tree.image_by_fingerprint(newest.fingerprint) == newest
    with pytest.raises(KeyError):
        tree.image("testos/1.0", type="virtual-machine")
    with pytest.raises(KeyError):
        tree.image("nope")


def test_build_is_deterministic(tmp_path: Path) -> None:
    specs = [ProductSpec("detos", "1.0", arches=("amd64",), vm=True, incus=True)]
    one = build_tree(tmp_path / "one", specs)
    two = build_tree(tmp_path / "two", specs)
    assert one.files == two.files
    assert [i.fingerprint for i in one.images] == [i.fingerprint for i in two.images]
    assert one.index == two.index
    assert one.products_file == two.products_file


def test_incus_twin_item(tmp_path: Path) -> None:
    tree = build_tree(tmp_path, [ProductSpec("inc", "1", arches=("amd64",), incus=True)])
    data = tree.read(PRODUCTS_PATH)
    incus = parse_images(data, family="incus")
    lxd = parse_images(data)
    assert {i.fingerprint for i in incus} == {i.fingerprint for i in lxd}
    assert {i.meta.ftype for i in incus} == {"incus.tar.xz"}


def test_big_rootfs(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024
    tree = build_tree(tmp_path, [], big_rootfs_bytes=size)
    image = tree.image("bigos")
    assert image.root is not None
    assert image.root.size > size
    assert sha256(tree.read(image.root)) == image.root.sha256


def test_add_and_remove_version(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    before = tree.products_file
    new = tree.add_version("testos", "1.0", "20240301_0000")
    assert {i.arch for i in new} == {"amd64", "arm64"}
    assert tree.products_file != before
    assert tree.image("testos/one").version == "20240301_0000"
    fingerprints = {i.fingerprint for i in parse_images(tree.read(PRODUCTS_PATH))}
    assert {i.fingerprint for i in new} <= fingerprints
    assert sha256(tree.read(INDEX_PATH)) == tree.index.sha256

    old = tree.images_of("testos", "1.0", "20240101_0000")
    tree.remove_version("testos", "1.0", "20240101_0000", delete_files=True)
    fingerprints = {i.fingerprint for i in parse_images(tree.read(PRODUCTS_PATH))}
    assert not fingerprints & {i.fingerprint for i in old}
    assert not tree.path_of(old[0].meta).exists()
    with pytest.raises(ValueError):
        tree.add_version("testos", "1.0", "20240301_0000")


# -- the upstream, in memory ------------------------------------------------------------------


def stub_for(resource: TreeResource) -> StubTreq:
    return StubTreq(resource)


def get(stub: StubTreq, path: str, **kwargs: Any) -> Any:
    """Issue a request, pump it, and return the response (fails the test if none arrived)."""
    results: list[Any] = []
    method = kwargs.pop("method", "GET")
    cast(Any, stub).request(method, f"{BASE}/{path}", **kwargs).addBoth(results.append)
    stub.flush()
    assert results, f"no response for {path}"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def body(stub: StubTreq, response: Any) -> bytes | Failure:
    results: list[Any] = []
    treq.content(response).addBoth(results.append)
    stub.flush()
    assert results
    return cast("bytes | Failure", results[0])


def test_serves_files_with_headers(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root)
    stub = stub_for(resource)
    response = get(stub, INDEX_PATH, headers={"User-Agent": "LXD 5.0.2 (Linux; x86_64)"})
    assert response.code == 200
    assert body(stub, response) == shared_tree.read(INDEX_PATH)
    headers = response.headers
    # Twisted's client keeps Content-Length out of `headers` and reports it as `length`.
    assert response.length == shared_tree.index.size
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert headers.getRawHeaders("etag")[0].startswith('"')
    assert headers.getRawHeaders("last-modified")

    item = shared_tree.image("testos").root
    assert item is not None
    response = get(stub, item.path)
    assert response.headers.getRawHeaders("content-type") == ["application/octet-stream"]
    assert sha256(cast(bytes, body(stub, response))) == item.sha256

    (first, second) = resource.requests
    assert (first.method, first.path) == ("GET", INDEX_PATH)
    assert first.header("user-agent") == "LXD 5.0.2 (Linux; x86_64)"
    assert second.path == item.path
    assert resource.count(item.path) == 1
    assert resource.paths() == [INDEX_PATH, item.path]


def test_percent_encoded_paths_and_queries(tmp_path: Path) -> None:
    tree = build_tree(tmp_path, [ProductSpec("colon", "1", arches=("amd64",), versions=("20240209_13:00",))])
    resource = TreeResource(tree.root)
    stub = stub_for(resource)
    meta = tree.image("colon/1").meta
    encoded = meta.path.replace(":", "%3A")
    response = get(stub, encoded + "?x=1")
    assert response.code == 200
    assert sha256(cast(bytes, body(stub, response))) == meta.sha256
    assert resource.requests[0].path == meta.path
    assert resource.requests[0].uri.endswith("%3A00/lxd.tar.xz?x=1")


def test_head_and_conditional(shared_tree: Tree) -> None:
    stub = stub_for(TreeResource(shared_tree.root))
    response = get(stub, PRODUCTS_PATH, method="HEAD")
    assert response.code == 200
    assert body(stub, response) == b""
    etag = response.headers.getRawHeaders("etag")[0]
    last_modified = response.headers.getRawHeaders("last-modified")[0]
    assert get(stub, PRODUCTS_PATH, headers={"If-None-Match": etag}).code == 304
    assert get(stub, PRODUCTS_PATH, headers={"If-Modified-Since": last_modified}).code == 304
    assert get(stub, PRODUCTS_PATH, headers={"If-None-Match": '"other"'}).code == 200


def test_not_found_and_traversal(shared_tree: Tree) -> None:
    stub = stub_for(TreeResource(shared_tree.root))
    for path in ("nope.json", "streams/v1", "streams/v1/", "", "streams/../streams/v1/index.json",
                 "streams/%2E%2E/v1/index.json", "streams//v1/index.json"):
        assert get(stub, path).code == 404, path
    assert get(stub, INDEX_PATH, method="POST").code == 405


def test_corrupt(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root)
    stub = stub_for(resource)
    item = shared_tree.image("testos").meta
    resource.corrupt(item.path, times=1)
    data = cast(bytes, body(stub, get(stub, item.path)))
    assert len(data) == item.size
    assert sha256(data) != item.sha256
    data = cast(bytes, body(stub, get(stub, item.path)))
    assert sha256(data) == item.sha256


def test_truncate(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root, chunk_size=1000)
    stub = stub_for(resource)
    item = shared_tree.image("testos").root
    assert item is not None
    resource.truncate(item.path, 1500)
    response = get(stub, item.path)
    assert response.length == item.size
    chunks: list[bytes] = []
    results: list[Any] = []
    treq.collect(response, chunks.append).addBoth(results.append)
    stub.flush()
    assert isinstance(results[0], Failure)
    assert results[0].check(ResponseFailed)
    assert b"".join(chunks) == shared_tree.read(item)[:1500]
    resource.clear(item.path)
    assert sha256(cast(bytes, body(stub, get(stub, item.path)))) == item.sha256


def test_head_does_not_use_up_body_faults(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root)
    stub = stub_for(resource)
    item = shared_tree.image("testos").meta
    resource.corrupt(item.path, times=1)
    assert get(stub, item.path, method="HEAD").code == 200
    assert sha256(cast(bytes, body(stub, get(stub, item.path)))) != item.sha256
    assert sha256(cast(bytes, body(stub, get(stub, item.path)))) == item.sha256


def test_status_and_redirect(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root)
    stub = stub_for(resource)
    resource.status(INDEX_PATH, 503, times=2)
    assert get(stub, INDEX_PATH).code == 503
    assert get(stub, INDEX_PATH).code == 503
    assert get(stub, INDEX_PATH).code == 200
    resource.redirect(PRODUCTS_PATH, "https://mirror.test/x/images.json")
    response = get(stub, PRODUCTS_PATH, allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders("location") == ["https://mirror.test/x/images.json"]
    # Faults apply to missing files too, so a test can redirect to a path the tree lacks.
    resource.status("missing/file", 500)
    assert get(stub, "missing/file").code == 500
    assert [r.path for r in resource.requests].count(INDEX_PATH) == 3


def collecting(stub: StubTreq, response: Any) -> tuple[list[bytes], list[Any]]:
    """Start reading C{response}'s body: the chunks so far, and its end (None or a Failure)."""
    chunks: list[bytes] = []
    done: list[Any] = []
    treq.collect(response, chunks.append).addBoth(done.append)
    stub.flush()
    return chunks, done


def test_reset(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root, chunk_size=1000)
    stub = stub_for(resource)
    item = shared_tree.image("testos").root
    assert item is not None
    resource.reset(item.path, 1500, times=1)
    response = get(stub, item.path, unbuffered=True)
    assert response.length == item.size
    chunks, done = collecting(stub, response)
    assert isinstance(done[0], Failure) and done[0].check(ResponseFailed)
    assert b"".join(chunks) == shared_tree.read(item)[:1500]
    assert sha256(cast(bytes, body(stub, get(stub, item.path)))) == item.sha256


@pytest.mark.parametrize("n", [0, 1500])
def test_stall_after_n_bytes(shared_tree: Tree, n: int) -> None:
    resource = TreeResource(shared_tree.root, chunk_size=1000)
    stub = stub_for(resource)
    item = shared_tree.image("testos").root
    assert item is not None
    resource.stall(item.path, n)
    response = get(stub, item.path, unbuffered=True)
    assert response.code == 200
    chunks, done = collecting(stub, response)
    assert resource.held(item.path) == 1
    assert b"".join(chunks) == shared_tree.read(item)[:n]
    assert done == []
    resource.clear(item.path)
    stub.flush()
    assert done == [None]
    assert sha256(b"".join(chunks)) == item.sha256


def test_silence(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root)
    stub = stub_for(resource)
    resource.silence(INDEX_PATH)
    results: list[Any] = []
    cast(Any, stub).get(f"{BASE}/{INDEX_PATH}").addBoth(results.append)
    stub.flush()
    assert results == []
    assert len(resource.silenced[INDEX_PATH]) == 1
    resource.clear(INDEX_PATH)
    stub.flush()
    assert isinstance(results[0], Failure)
    assert resource.silenced == {}
    assert get(stub, INDEX_PATH).code == 200


def test_rate(shared_tree: Tree) -> None:
    clock = Clock()
    resource = TreeResource(shared_tree.root, clock=clock)
    stub = stub_for(resource)
    item = shared_tree.image("testos").root
    assert item is not None and item.size > 3000
    # 10 000 bytes a second: 1000 bytes each tenth of a second.
    resource.rate(item.path, 10_000)
    chunks, done = collecting(stub, get(stub, item.path, unbuffered=True))
    seen = [sum(map(len, chunks))]
    for _ in range(2):
        clock.advance(0.1)
        stub.flush()
        seen.append(sum(map(len, chunks)))
    assert seen == [1000, 2000, 3000]
    for _ in range(item.size // 1000 + 2):  # bounded by the ticks the body needs
        if done:
            break
        clock.advance(0.1)
        stub.flush()
    assert done == [None]
    assert sha256(b"".join(chunks)) == item.sha256
    with pytest.raises(ValueError):
        TreeResource(shared_tree.root).rate(item.path, 10_000)


def test_hold_and_release(shared_tree: Tree) -> None:
    resource = TreeResource(shared_tree.root, chunk_size=1024)
    stub = stub_for(resource)
    item = shared_tree.image("testos").root
    assert item is not None and item.size > 2048
    resource.hold(item.path)
    parked: list[object] = []
    resource.when_held(item.path).addBoth(parked.append)
    response = get(stub, item.path, unbuffered=True)
    assert response.code == 200
    chunks: list[bytes] = []
    done: list[Any] = []
    treq.collect(response, chunks.append).addBoth(done.append)
    stub.flush()
    assert parked == [None]
    assert resource.held(item.path) == 1
    assert b"".join(chunks) == shared_tree.read(item)[:1024]
    assert done == []
    resource.release(item.path)
    stub.flush()
    assert done == [None]
    assert sha256(b"".join(chunks)) == item.sha256
    assert resource.held(item.path) == 0
    assert resource.active == set()


def test_throttle_on_a_clock(shared_tree: Tree) -> None:
    clock = Clock()
    resource = TreeResource(shared_tree.root, clock=clock, throttle=Throttle(1000, 0.5))
    stub = stub_for(resource)
    item = shared_tree.image("testos").root
    assert item is not None
    response = get(stub, item.path, unbuffered=True)
    chunks: list[bytes] = []
    done: list[Any] = []
    treq.collect(response, chunks.append).addBoth(done.append)
    stub.flush()
    seen = [sum(map(len, chunks))]
    for _ in range(20):  # bounded: 4096 bytes need 5 ticks
        if done:
            break
        clock.advance(0.5)
        stub.flush()
        seen.append(sum(map(len, chunks)))
    assert done == [None]
    assert seen[:3] == [1000, 2000, 3000]
    assert sha256(b"".join(chunks)) == item.sha256


class PushRequest(DummyRequest):
    """A DummyRequest that treats its producer as a push producer and can apply backpressure."""

    def __init__(self, path: str) -> None:
        super().__init__([p.encode() for p in path.split("/")])
        self.producer: Any = None
        self.push_back = False
        self.lost = False

    def registerProducer(self, prod: Any, s: Any) -> None:
        self.producer = prod

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.push_back and self.producer is not None:
            self.producer.pauseProducing()

    def loseConnection(self) -> None:
        self.lost = True


def test_push_producer_honours_pause(shared_tree: Tree) -> None:
    item = shared_tree.image("testos").root
    assert item is not None
    resource = TreeResource(shared_tree.root, chunk_size=1000)
    request = PushRequest(item.path)
    request.push_back = True
    assert resource.render(cast(Any, request)) == NOT_DONE_YET
    assert [len(c) for c in request.written] == [1000]
    producer = request.producer
    producer.resumeProducing()
    assert [len(c) for c in request.written] == [1000, 1000]
    request.push_back = False
    producer.resumeProducing()
    assert request.finished == 1
    assert sha256(b"".join(request.written)) == item.sha256


def test_stop_producing_closes(shared_tree: Tree) -> None:
    item = shared_tree.image("testos").root
    assert item is not None
    resource = TreeResource(shared_tree.root, chunk_size=1000)
    request = PushRequest(item.path)
    request.push_back = True
    resource.render(cast(Any, request))
    producer = request.producer
    assert resource.active == {producer}
    producer.stopProducing()
    assert resource.active == set()
    assert producer.file.closed
    producer.resumeProducing()
    assert len(request.written) == 1


def test_throttle_needs_a_clock(shared_tree: Tree) -> None:
    with pytest.raises(ValueError):
        TreeResource(shared_tree.root, throttle=Throttle(10, 1.0))


# -- the upstream over loopback TLS -----------------------------------------------------------


@pytest.fixture
def upstream(shared_tree: Tree) -> Iterator[RunningUpstream]:
    running = start_https_upstream(cast(IReactorSSL, reactor), shared_tree.root, make_ca())
    yield running
    pytest_twisted.blockon(running.stop())


def https_client(upstream: RunningUpstream) -> tuple[HTTPClient, HTTPConnectionPool]:
    trust = trustRootFromCertificates([Certificate.loadPEM(upstream.ca_pem)])
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trust), pool=pool)
    return HTTPClient(agent), pool


async def bounded(d: defer.Deferred[Any], seconds: float = NET_TIMEOUT_SECONDS) -> Any:
    return await d.addTimeout(seconds, cast(IReactorTime, reactor))


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_https_upstream_serves_and_faults(shared_tree: Tree, upstream: RunningUpstream) -> None:
    client, pool = https_client(upstream)
    try:
        assert upstream.url == f"https://127.0.0.1:{upstream.port}"
        response = await bounded(client.get(f"{upstream.url}/{INDEX_PATH}"))
        assert response.code == 200
        assert await bounded(treq.content(response)) == shared_tree.read(INDEX_PATH)

        item = shared_tree.image("testos").root
        assert item is not None
        for fault in (upstream.resource.truncate, upstream.resource.reset):
            fault(item.path, 100, times=1)
            response = await bounded(client.get(f"{upstream.url}/{item.path}", unbuffered=True))
            with pytest.raises(ResponseFailed):
                await bounded(treq.content(response))
            response = await bounded(client.get(f"{upstream.url}/{item.path}"))
            assert sha256(await bounded(treq.content(response))) == item.sha256
    finally:
        await pool.closeCachedConnections()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_https_upstream_streams_a_big_file(tmp_path: Path) -> None:
    """Several MiB through TLS exercises the producer's pause/resume against a real socket."""
    tree = build_tree(tmp_path, [], big_rootfs_bytes=6 * 1024 * 1024)
    running = start_https_upstream(cast(IReactorSSL, reactor), tree.root, make_ca())
    client, pool = https_client(running)
    try:
        item = tree.image("bigos").root
        assert item is not None
        response = await bounded(client.get(f"{running.url}/{item.path}", unbuffered=True))
        digest = hashlib.sha256()
        await bounded(treq.collect(response, digest.update))
        assert digest.hexdigest() == item.sha256
    finally:
        await pool.closeCachedConnections()
        await running.stop()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_https_upstream_stop_aborts_held_requests(shared_tree: Tree) -> None:
    running = start_https_upstream(cast(IReactorSSL, reactor), shared_tree.root, make_ca())
    client, pool = https_client(running)
    try:
        item = shared_tree.image("testos").root
        assert item is not None
        running.resource.chunk_size = 1024
        running.resource.hold(item.path)
        held = running.resource.when_held(item.path)
        response = await bounded(client.get(f"{running.url}/{item.path}", unbuffered=True))
        await bounded(held)
        collected = treq.content(response)
        await bounded(running.stop())
        with pytest.raises(ResponseFailed):
            await bounded(collected)
        assert running.resource.active == set()
    finally:
        await pool.closeCachedConnections()
        await running.stop()


# -- the real lxc client ----------------------------------------------------------------------


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.done: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.done.callback(code if code is not None else -1)


async def run_lxc(conf: Path, *args: str) -> bytes:
    """Run lxc without blocking the reactor; kill it if it outlives LXC_TIMEOUT_SECONDS."""
    lxc = shutil.which("lxc")
    assert lxc is not None
    env = {"LXD_CONF": str(conf), "HOME": str(conf), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    protocol = _Collect()
    transport = cast(IReactorProcess, reactor).spawnProcess(
        protocol, lxc, [lxc, *args], env=env, path=str(conf)
    )
    timer = reactor.callLater(LXC_TIMEOUT_SECONDS, transport.signalProcess, "KILL")
    try:
        code = await protocol.done
    finally:
        if timer.active():
            timer.cancel()
    assert code == 0, f"lxc {' '.join(args)} exited {code}: {protocol.err.decode(errors='replace')}"
    return bytes(protocol.out)


needs_lxc = pytest.mark.skipif(shutil.which("lxc") is None, reason="the lxc client (lxd-client) is not installed")


async def lxc_remote(tmp_path: Path, upstream: RunningUpstream) -> Path:
    conf = tmp_path / "lxd-conf"
    (conf / "servercerts").mkdir(parents=True)
    # simplestreams "remote add" never fetches the certificate; the client pins this file and
    # uses its first DNS SAN ("localhost") as the TLS server name.
    (conf / "servercerts" / "t.crt").write_bytes(upstream.cert_pem)
    await run_lxc(conf, "remote", "add", "t", upstream.url, "--protocol", "simplestreams")
    return conf


def _sha256_dir(directory: Path) -> set[str]:
    return {sha256(p.read_bytes()) for p in directory.iterdir() if p.is_file()}


@needs_lxc
@pytest.mark.lxc
@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_lxc_lists_and_exports(tmp_path: Path, shared_tree: Tree, upstream: RunningUpstream) -> None:
    conf = await lxc_remote(tmp_path, upstream)
    listed = json.loads(await run_lxc(conf, "image", "list", "t:", "--format", "json"))
    assert {(i["fingerprint"], i["type"]) for i in listed} == {
        (i.fingerprint, i.type) for i in shared_tree.images
    }
    by_fp = {i["fingerprint"]: i for i in listed}
    for image in shared_tree.images:
        entry = by_fp[image.fingerprint]
        assert entry["properties"]["architecture"] == image.arch
        assert entry["properties"]["serial"] == image.version
        assert entry["size"] == image.size

    for alias, image_type in (
        ("testos/2.0", "container"),
        ("testos/one", "container"),
        ("testos/two", "virtual-machine"),
        ("testos/unified", "container"),
    ):
        image = shared_tree.image(alias, arch=NATIVE_ARCH, type=image_type)  # type: ignore[arg-type]
        out = tmp_path / f"export-{alias.replace('/', '_')}-{image_type}"
        out.mkdir()
        args = ["image", "export", f"t:{alias}", str(out)]
        if image_type == "virtual-machine":
            args.append("--vm")
        await run_lxc(conf, *args)
        assert _sha256_dir(out) == {f.sha256 for f in image.files}, alias
        for f in image.files:
            assert upstream.resource.count(f.path) >= 1
    agents = {r.header("user-agent") or "" for r in upstream.resource.requests}
    assert all(a.startswith("LXD ") for a in agents)


@needs_lxc
@pytest.mark.lxc
@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_lxc_sees_a_new_version(tmp_path: Path) -> None:
    tree = build_tree(tmp_path / "tree", [ProductSpec("newos", "1.0", arches=(NATIVE_ARCH,))])
    running = start_https_upstream(cast(IReactorSSL, reactor), tree.root, make_ca())
    try:
        conf = await lxc_remote(tmp_path, running)
        first = json.loads(await run_lxc(conf, "image", "list", "t:", "--format", "json"))
        assert {i["fingerprint"] for i in first} == {i.fingerprint for i in tree.images}
        tree.add_version("newos", "1.0", "20240301_1200")
        second = json.loads(await run_lxc(conf, "image", "list", "t:", "--format", "json"))
        assert {i["fingerprint"] for i in second} == {i.fingerprint for i in tree.images}
        newest = tree.image("newos/1.0", arch=NATIVE_ARCH)
        assert newest.version == "20240301_1200"
        info = await run_lxc(conf, "image", "info", "t:newos/1.0")
        assert newest.fingerprint.encode() in info
    finally:
        await running.stop()
