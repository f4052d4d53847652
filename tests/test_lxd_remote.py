"""
An upstream of protocol "lxd": its image list, kept like an upstream's index, and the
simplestreams catalogue synthesised from it, read back with the proxy's own parser.

In memory and deterministic: a L{FakeLxd} reached through the proxy's L{UpstreamClient} over
C{RequestTraversalAgent}, and a L{Clock}.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET

from proxy.catalogue import CatalogueError, parse_images, parse_products, products_paths
from proxy.errors import NotFound, UpstreamFailed
from proxy.index import ImageParts
from proxy.lxd_remote import (
    API_PATH,
    PRODUCTS_PATH,
    LxdRemote,
    RemoteImage,
    item_role,
    parse_remote_images,
    synthesise,
)
from proxy.metadata import INDEX_PATH, RETRY_AFTER_FAILURE_SECONDS, STALE_WAIT_SECONDS
from proxy.work import inline
from tests.helpers.harness import Closing
from tests.helpers.logs import Logged
from tests.helpers.lxd_server import (
    IDLE,
    LXD_URL,
    TTL,
    UPSTREAM,
    FakeImage,
    LxdHarness,
    envelope,
    sha,
)

UBUNTU = {"os": "ubuntu", "release": "noble", "architecture": "amd64", "variant": "default",
          "version": "24.04", "serial": "20240702"}


def unified(data: bytes = b"U" * 3000, **kwargs: Any) -> FakeImage:
    """An image as C{lxc publish} makes it: one tarball, no C{type} property."""
    kwargs.setdefault("properties", {"os": "alpine", "release": "3.20", "architecture": "x86_64"})
    return FakeImage(meta=data, **kwargs)


def split(meta: bytes = b"M" * 700, rootfs: bytes = b"R" * 40_000, **kwargs: Any) -> FakeImage:
    """An image an LXD server copied from a simplestreams server: C{type} is the root ftype."""
    kwargs.setdefault("properties", dict(UBUNTU, type="squashfs"))
    return FakeImage(meta=meta, rootfs=rootfs, **kwargs)


def learn(h: LxdHarness, image: FakeImage, root_ftype: str = "squashfs") -> ImageParts:
    """Record the parts of C{image} as an export download would."""
    assert image.rootfs is not None
    parts = ImageParts(
        fingerprint=image.fingerprint, upstream="lxd", meta_sha256=sha(image.meta),
        meta_size=len(image.meta), meta_ftype="lxd.tar.xz", root_sha256=sha(image.rootfs),
        root_size=len(image.rootfs), root_ftype=root_ftype,
    )
    h.index.put_parts(parts)
    return parts


@pytest.fixture
def make(tmp_path: Any, closing: Closing) -> Any:
    def make_harness(images: list[FakeImage], **kwargs: Any) -> LxdHarness:
        return closing(LxdHarness(tmp_path / str(len(closing)), images, **kwargs))

    return make_harness


def body_of(h: LxdHarness, path: str) -> bytes:
    return h.remote.read(h.call(h.remote.get(path)))


# The image list


def test_the_list_envelope_is_parsed_into_remote_images() -> None:
    image = split(aliases=("ubuntu/24.04", "noble"), created_at="2024-07-02T10:20:30.123456789+02:00")
    [remote] = parse_remote_images(envelope([image.api_json()]))
    assert remote.fingerprint == image.fingerprint
    assert remote.size == image.size
    assert (remote.type, remote.architecture, remote.arch) == ("container", "x86_64", "amd64")
    assert remote.aliases == ("ubuntu/24.04", "noble")
    assert remote.prop("type") == "squashfs" and not remote.presumed_unified
    assert remote.created_at == datetime(2024, 7, 2, 8, 20, 30, 123456, tzinfo=timezone.utc)
    assert remote.expires_at == datetime(1, 1, 1, tzinfo=timezone.utc)


def test_unusable_entries_are_skipped_and_a_bad_envelope_refused() -> None:
    good = unified()
    entries = [
        good.api_json(),
        {**unified(b"x" * 10).api_json(), "fingerprint": "abc"},
        {**unified(b"y" * 10).api_json(), "size": "10"},
        {**unified(b"z" * 10).api_json(), "public": False},
        "not an object",
    ]
    assert [i.fingerprint for i in parse_remote_images(envelope(entries))] == [good.fingerprint]
    for bad in (b"{", b"[]", json.dumps({"type": "error", "error": "Forbidden"}).encode(),
                json.dumps({"type": "sync", "metadata": {"a": 1}}).encode()):
        with pytest.raises(CatalogueError):
            parse_remote_images(bad)


# The synthesised catalogue


def test_unified_images_are_listed_at_once(make: Any) -> None:
    image = unified(aliases=("alpine/3.20",))
    h = make([image])
    index = body_of(h, INDEX_PATH)
    assert products_paths(index) == [PRODUCTS_PATH]
    products = body_of(h, PRODUCTS_PATH)
    [listed] = parse_images(products)
    assert listed.fingerprint == image.fingerprint
    assert listed.type == "container" and listed.root is None
    assert listed.aliases == ("alpine/3.20",)
    assert listed.size == image.size
    assert (listed.arch, listed.architecture) == ("x86_64", "x86_64")
    assert listed.version == "20240702_1020"
    assert listed.created_at == datetime(2024, 7, 2, 10, 20, tzinfo=timezone.utc)
    items = parse_products(products)
    assert items[listed.meta.path].sha256 == image.fingerprint
    assert item_role(listed.meta.path) == (image.fingerprint, "unified")
    # one request for both files: the list, fetched once
    assert len(h.server.list_requests()) == 1


def test_split_images_are_listed_once_their_parts_are_known(make: Any) -> None:
    container = split(aliases=("ubuntu/24.04",))
    vm = split(meta=b"V" * 700, rootfs=b"D" * 50_000, type="virtual-machine",
               properties=dict(UBUNTU, type="disk-kvm.img"), aliases=("ubuntu/24.04/vm",))
    h = make([container, vm])
    assert parse_images(body_of(h, PRODUCTS_PATH)) == []
    assert products_paths(body_of(h, INDEX_PATH)) == []
    waiting = h.call(h.remote.awaiting_parts())
    assert {i.fingerprint for i in waiting} == {container.fingerprint, vm.fingerprint}

    learn(h, container)
    learn(h, vm, "disk-kvm.img")
    # Within the TTL: the list is not asked again, the catalogue is rebuilt from the copy.
    images = {i.fingerprint: i for i in parse_images(body_of(h, PRODUCTS_PATH))}
    assert set(images) == {container.fingerprint, vm.fingerprint}
    c, v = images[container.fingerprint], images[vm.fingerprint]
    assert c.type == "container" and c.root is not None and c.root.ftype == "squashfs"
    assert (c.meta.sha256, c.meta.size) == (sha(container.meta), len(container.meta))
    assert (c.root.sha256, c.root.size) == (sha(container.rootfs or b""), 40_000)
    assert c.aliases == ("ubuntu/24.04",) and c.size == container.size
    assert (c.os, c.release, c.release_title, c.variant, c.arch) == (
        "ubuntu", "noble", "24.04", "default", "amd64",
    )
    assert v.type == "virtual-machine" and v.root is not None and v.root.ftype == "disk-kvm.img"
    assert v.aliases == ("ubuntu/24.04/vm",)
    assert c.product != v.product
    assert item_role(c.meta.path) == (container.fingerprint, "meta")
    assert item_role(c.root.path) == (container.fingerprint, "root")
    assert len(h.server.list_requests()) == 1
    assert products_paths(body_of(h, INDEX_PATH)) == [PRODUCTS_PATH]
    assert h.call(h.remote.awaiting_parts()) == []


def test_item_lookup_finds_listed_files_only(make: Any) -> None:
    image = split()
    h = make([image])
    learn(h, image)
    [listed] = parse_images(body_of(h, PRODUCTS_PATH))
    assert listed.root is not None
    item = h.call(h.remote.item(listed.root.path))
    assert item is not None and item.sha256 == sha(image.rootfs or b"")
    assert h.call(h.remote.item("images/nothing/here")) is None
    with pytest.raises(NotFound):
        h.call(h.remote.get(API_PATH))


def test_an_alias_names_its_own_image_not_the_newest(make: Any) -> None:
    """LXD aliases point at one image each; a product's aliases go to its newest image."""
    old = unified(b"1" * 100, aliases=("alpine/stable",), created_at="2024-01-01T00:00:00Z")
    mid = unified(b"2" * 100, created_at="2024-02-01T00:00:00Z")
    new = unified(b"3" * 100, aliases=("alpine/edge",), created_at="2024-03-01T00:00:00Z")
    h = make([old, mid, new])
    images = {i.fingerprint: i for i in parse_images(body_of(h, PRODUCTS_PATH))}
    assert images[new.fingerprint].aliases == ("alpine/edge",)
    assert images[mid.fingerprint].product == images[new.fingerprint].product
    assert images[old.fingerprint].aliases == ("alpine/stable",)
    assert images[old.fingerprint].product != images[new.fingerprint].product
    assert [images[f].version for f in (old.fingerprint, mid.fingerprint, new.fingerprint)] == [
        "20240101_0000", "20240201_0000", "20240301_0000",
    ]


def test_images_created_in_the_same_minute_get_distinct_dated_versions(make: Any) -> None:
    a = unified(b"a" * 100, created_at="2024-05-05T12:12:01Z")
    b = unified(b"b" * 100, created_at="2024-05-05T12:12:59Z")
    c = unified(b"c" * 100, created_at="0001-01-01T00:00:00Z", uploaded_at="2023-03-03T03:03:03Z")
    h = make([a, b, c])
    versions = {i.fingerprint: i.version for i in parse_images(body_of(h, PRODUCTS_PATH))}
    assert versions[a.fingerprint] == f"20240505_1212.{a.fingerprint[:12]}"
    assert versions[b.fingerprint] == f"20240505_1212.{b.fingerprint[:12]}"
    assert versions[c.fingerprint] == "20230303_0303"


def test_images_the_clients_cannot_use_are_not_listed(make: Any) -> None:
    strange = unified(b"s" * 10, architecture="vax")
    vm = unified(b"v" * 10, type="virtual-machine")
    h = make([strange, vm, unified()])
    assert len(parse_images(body_of(h, PRODUCTS_PATH))) == 1
    # but the LXD face sees every public image
    assert {i.fingerprint for i in h.call(h.remote.images())} == {
        strange.fingerprint, vm.fingerprint, unified().fingerprint,
    }


def test_an_image_learnt_to_be_split_is_listed_as_split(make: Any) -> None:
    """A published image is taken for unified until its export says otherwise."""
    image = split(properties={"os": "debian", "release": "12"})
    h = make([image])
    [presumed] = parse_images(body_of(h, PRODUCTS_PATH))
    assert presumed.root is None
    learn(h, image)
    [listed] = parse_images(body_of(h, PRODUCTS_PATH))
    assert listed.root is not None and listed.fingerprint == image.fingerprint


def test_incus_twins_can_be_listed() -> None:
    vm_unified = unified(b"q" * 100, type="virtual-machine")
    image = split()
    remote = parse_remote_images(envelope([vm_unified.api_json(), image.api_json()]))
    assert image.rootfs is not None
    known = {image.fingerprint: ImageParts(
        fingerprint=image.fingerprint, upstream="lxd", meta_sha256=sha(image.meta),
        meta_size=len(image.meta), meta_ftype="lxd.tar.xz", root_sha256=sha(image.rootfs),
        root_size=len(image.rootfs), root_ftype="squashfs",
    )}
    _, lxd_only = synthesise(remote, known)
    assert [i.fingerprint for i in parse_images(lxd_only, "incus")] == []
    _, both = synthesise(remote, known, ("lxd", "incus"))
    incus = {i.fingerprint: i for i in parse_images(both, "incus")}
    assert set(incus) == {vm_unified.fingerprint, image.fingerprint}
    assert incus[vm_unified.fingerprint].type == "virtual-machine"
    assert [i.fingerprint for i in parse_images(both, "lxd")] == [image.fingerprint]


def test_synthesis_is_deterministic() -> None:
    images = parse_remote_images(envelope([unified(b"%d" % i * 10).api_json() for i in range(5)]))
    assert synthesise(images, {}) == synthesise(list(reversed(images)), {})


def test_catalogue_images_and_records(make: Any) -> None:
    image = unified()
    h = make([image])
    [listed] = h.call(h.remote.catalogue_images())
    assert listed.fingerprint == image.fingerprint
    record = h.index.get_metadata("lxd", PRODUCTS_PATH)
    assert record is not None and h.store.exists(record.sha256)
    assert h.index.get_metadata("lxd", INDEX_PATH) is not None
    source = h.index.get_metadata("lxd", API_PATH)
    assert source is not None and record.checked_at == source.checked_at


# Freshness, as for a simplestreams upstream's index


def test_the_list_is_revalidated_after_the_ttl(make: Any) -> None:
    h = make([unified()])
    h.server.list_etag = b'"v1"'
    body_of(h, INDEX_PATH)
    h.clock.advance(TTL + 1)
    body_of(h, INDEX_PATH)
    # revalidated in the background, the expired copy served meanwhile
    h.settle()
    requests = h.server.list_requests()
    assert len(requests) == 2
    assert requests[1].get(b"if-none-match") == b'"v1"'


def test_a_changed_list_changes_the_catalogue(make: Any) -> None:
    h = make([unified()])
    assert len(parse_images(body_of(h, PRODUCTS_PATH))) == 1
    h.server.images.append(unified(b"N" * 500, created_at="2024-08-01T00:00:00Z"))
    assert len(parse_images(body_of(h, PRODUCTS_PATH))) == 1
    h.clock.advance(TTL + 1)
    # stale while revalidate: the expired catalogue at once, the new one next
    assert len(parse_images(body_of(h, PRODUCTS_PATH))) == 1
    h.settle()
    assert len(parse_images(body_of(h, PRODUCTS_PATH))) == 2


def test_stale_if_error_serves_the_last_catalogue_and_logs_once(make: Any, logged: Logged) -> None:
    h = make([unified()])
    good = body_of(h, PRODUCTS_PATH)
    h.server.list_status = 500
    for _ in range(3):
        h.clock.advance(TTL + 1)
        assert body_of(h, PRODUCTS_PATH) == good
        h.settle()
    warnings = logged.matching("refreshing")
    assert len(warnings) == 1 and LXD_URL in warnings[0]["url"]
    h.server.list_status = None
    h.clock.advance(RETRY_AFTER_FAILURE_SECONDS + TTL)
    body_of(h, PRODUCTS_PATH)
    h.settle()
    assert len(h.server.list_requests()) == 5


def test_without_a_copy_a_failing_list_is_an_error(make: Any) -> None:
    h = make([unified()])
    h.server.list_status = 403
    with pytest.raises(UpstreamFailed):
        h.call(h.remote.get(INDEX_PATH))


def test_an_unusable_list_keeps_the_copy(make: Any) -> None:
    h = make([unified()])
    good = body_of(h, PRODUCTS_PATH)
    h.server.override["/1.0/images?recursion=1"] = lambda request: b'{"type": "sync", "metadata": 3}'
    h.clock.advance(TTL + 1)
    assert body_of(h, PRODUCTS_PATH) == good


def test_one_refresh_for_everything_that_asks_at_once(make: Any) -> None:
    h = make([unified()])
    body_of(h, INDEX_PATH)
    h.clock.advance(TTL + 1)
    ds = [h.remote.get(p) for p in (INDEX_PATH, PRODUCTS_PATH, INDEX_PATH)]
    for coroutine in ds:
        h.call(coroutine)
    h.call(h.remote.images())
    h.settle()
    assert len(h.server.list_requests()) == 2


def test_the_catalogue_is_built_on_the_disk_worker_once_per_change(make: Any) -> None:
    h = make([unified()])
    jobs: list[str] = []

    def disk(fn: Any, *args: Any, **kwargs: Any) -> Any:
        jobs.append(getattr(fn, "__name__", ""))
        return inline(fn, *args, **kwargs)

    remote = LxdRemote(UPSTREAM, LXD_URL, h.client, h.store, h.index, h.clock, ttl=TTL,
                       idle_timeout=IDLE, disk=disk)
    for path in (INDEX_PATH, PRODUCTS_PATH, INDEX_PATH):
        h.call(remote.get(path))
    assert jobs.count("_build") == 1
    h.server.images.append(unified(b"N" * 500, created_at="2024-08-01T00:00:00Z"))
    h.clock.advance(TTL + 1)
    h.call(remote.get(PRODUCTS_PATH))
    h.settle()
    assert len(parse_images(remote.read(h.call(remote.get(PRODUCTS_PATH))))) == 2
    assert jobs.count("_build") == 2


def test_a_hanging_list_gets_the_copy_served(make: Any) -> None:
    h = make([unified()])
    good = body_of(h, PRODUCTS_PATH)
    h.server.override["/1.0/images?recursion=1"] = lambda request: NOT_DONE_YET
    h.clock.advance(TTL + 1)
    d = Deferred.fromCoroutine(h.remote.get(PRODUCTS_PATH))
    h.settle()
    h.clock.advance(STALE_WAIT_SECONDS)
    assert h.remote.read(h.run(d)) == good
    h.clock.advance(IDLE)
    h.settle()


# Offline


def test_offline_view_lists_only_what_is_stored(make: Any) -> None:
    stored = unified(b"S" * 100, created_at="2024-01-01T00:00:00Z")
    missing = unified(b"T" * 100, created_at="2024-02-01T00:00:00Z")
    h = make([stored, missing], health=True)
    body_of(h, PRODUCTS_PATH)
    partial = h.store.new_partial()
    partial.write(stored.meta)
    partial.commit(stored.fingerprint)
    assert h.health is not None
    h.health.record_failure("connection refused", transport=True)
    assert h.remote.offline
    view = h.call(h.remote.offline_view(PRODUCTS_PATH))
    assert [i.fingerprint for i in parse_images(view)] == [stored.fingerprint]
    index = h.call(h.remote.offline_view(INDEX_PATH))
    assert products_paths(index) == [PRODUCTS_PATH]


def test_remote_image_defaults() -> None:
    image = RemoteImage(fingerprint="a" * 64, size=1)
    assert image.arch is None and image.presumed_unified and image.type == "container"


def test_a_root_file_is_named_as_its_export_part_is() -> None:
    """
    A VM disk listed before any export (the synthesised catalogue) and the same file named in
    an export of the stored image carry one extension, LXD's: .qcow2 for every VM disk ftype.
    """
    from proxy.export import extension
    from proxy.lxd_remote import ROOT_FTYPES, root_filename

    fingerprint = "f" * 64
    for ftype in ROOT_FTYPES:
        assert root_filename(fingerprint, ftype) == fingerprint + extension(ftype)
    assert root_filename(fingerprint, "disk1.img") == fingerprint + ".qcow2"
    assert root_filename(fingerprint, "uefi1.img") == fingerprint + ".qcow2"
