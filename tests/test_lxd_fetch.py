"""
Export downloads from an upstream of protocol "lxd": one per image, split into its files while
streaming, committed only when sha256(meta ‖ rootfs) is the fingerprint.

In memory and deterministic: a L{FakeLxd} framing its exports as LXD does (Go's multipart
writer), reached through the proxy's L{UpstreamClient} over C{RequestTraversalAgent}; a
L{Clock}; the simplestreams face through C{StubTreq}.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from proxy.catalogue import Item, parse_images
from proxy.config import CacheConfig, Config, PinConfig, ServerConfig, UpstreamConfig
from proxy.errors import NotFound, ProxyError, UpstreamFailed
from proxy.index import ImageParts
from proxy.lxd_fetch import ExportDownload, ItemDownload, PartSource, WrongShape
from proxy.lxd_remote import (
    PRODUCTS_PATH,
    RemoteImage,
    image_item_path,
    meta_filename,
    parse_remote_images,
    root_filename,
)
from proxy.prefetch import PinnedPartsLearner, Prefetcher
from proxy.streaming import FileSource
from proxy.upstream import VerificationFailed
from tests.helpers.harness import Closing
from tests.helpers.logs import Logged
from tests.helpers.lxd_server import (
    GO_BOUNDARY,
    IDLE,
    LXD_URL,
    UPSTREAM,
    FakeImage,
    LxdHarness,
    envelope,
    go_multipart,
    sha,
)

META = bytes(range(256)) * 3
ROOTFS = b"".join(b"%08d" % i for i in range(20_000))  # 160 000 bytes


def split_image(**kwargs: Any) -> FakeImage:
    kwargs.setdefault("properties", {"os": "ubuntu", "release": "noble", "type": "squashfs"})
    kwargs.setdefault("aliases", ("ubuntu/24.04",))
    return FakeImage(meta=META, rootfs=ROOTFS, **kwargs)


def unified_image() -> FakeImage:
    return FakeImage(meta=b"unified tarball " * 5000, properties={"os": "alpine", "release": "3.20"})


@pytest.fixture
def make(tmp_path: Any, closing: Closing) -> Any:
    def make_harness(images: list[FakeImage], **kwargs: Any) -> LxdHarness:
        return closing(LxdHarness(tmp_path / str(len(closing)), images, **kwargs))

    return make_harness


def remote(image: FakeImage) -> RemoteImage:
    [parsed] = parse_remote_images(envelope([image.api_json()]))
    return parsed


def start(h: LxdHarness, image: FakeImage, **kwargs: Any) -> ExportDownload:
    return h.fetcher.get_image(UPSTREAM, remote(image), **kwargs)


def as_file_sources(part: PartSource, view: ItemDownload) -> list[FileSource]:
    """Checked by mypy: both are what the faces stream from."""
    return [part, view]


def fired(d: "Deferred[Any]") -> bool:
    # A function, so that mypy does not take an attribute checked once for a constant.
    return d.called


def in_background(download: ExportDownload) -> bool:
    return download.background


def read(source: PartSource) -> bytes:
    return source.path.getContent()[:source.available()]


def outcome(h: LxdHarness, d: "Deferred[Any]") -> Any:
    """The result or the Failure of C{d}, once everything settled."""
    results: list[Any] = []
    d.addBoth(results.append)
    h.settle()
    assert results, "it did not complete"
    return results[0]


def assert_nothing_stored(h: LxdHarness, image: FakeImage) -> None:
    assert h.index.get_parts(image.fingerprint) is None
    for data in (image.meta, image.rootfs or b""):
        assert not h.store.exists(sha(data))
        assert h.index.get(sha(data)) is None
    assert h.temp_files() == []
    assert h.fetcher.in_flight() == {}


# Split exports


def test_a_split_export_is_stored_as_two_files_and_its_parts_learnt(make: Any) -> None:
    image = split_image()
    h = make([image])
    download = start(h, image)
    parts = h.run(download.when_done())
    assert parts == ImageParts(
        fingerprint=image.fingerprint, upstream=UPSTREAM, meta_sha256=sha(META), meta_size=len(META),
        meta_ftype="lxd.tar.xz", root_sha256=sha(ROOTFS), root_size=len(ROOTFS), root_ftype="squashfs",
    )
    assert h.index.get_parts(image.fingerprint) == parts
    assert list(h.index.parts()) == [parts]
    for data, name in ((META, meta_filename(image.fingerprint)),
                       (ROOTFS, root_filename(image.fingerprint, "squashfs"))):
        assert h.store.path_for(sha(data)).getContent() == data
        record = h.index.get(sha(data))
        assert record is not None and record.cached and not record.auto_update
        assert record.paths == (f"{UPSTREAM}/{image_item_path(image.fingerprint, name)}",)
        assert record.size == len(data)
    assert h.temp_files() == []
    assert h.fetcher.in_flight() == {}
    assert download.stored and download.kind == "split"
    assert h.index.stats().bytes_from_upstream >= image.size


def test_a_vm_export_is_listed_with_a_vm_disk(make: Any) -> None:
    image = split_image(
        type="virtual-machine", properties={"os": "ubuntu", "release": "noble"}, root_ext=".qcow2",
    )
    h = make([image])
    parts = h.run(start(h, image).when_done())
    assert parts.root_ftype == "disk-kvm.img"
    [listed] = parse_images(h.remote.read(h.call(h.remote.get(PRODUCTS_PATH))))
    assert listed.type == "virtual-machine" and listed.fingerprint == image.fingerprint


def test_concurrent_requests_share_one_export(make: Any) -> None:
    image = split_image()
    h = make([image])
    h.server.hold_exports = True
    first = start(h, image)
    assert start(h, image) is first
    h.settle()
    assert h.server.exports_requested(image.fingerprint) == 1
    assert set(h.fetcher.in_flight()) == {image.fingerprint}
    held = h.server.held[image.fingerprint][0]
    held.write_until(len(held.body))
    held.finish()
    h.run(first.when_done())
    assert h.server.exports_requested(image.fingerprint) == 1


def test_sources_follow_the_growing_export(make: Any) -> None:
    image = split_image()
    h = make([image])
    h.server.hold_exports = True
    download = start(h, image)
    meta_d, root_d = download.meta, download.root
    h.settle()
    held = h.server.held[image.fingerprint][0]
    body = held.body
    meta_end = body.index(META) + len(META)
    root_start = body.index(ROOTFS)

    held.write_until(meta_end - 10)
    h.settle()
    assert not meta_d.called and not root_d.called
    held.write_until(root_start + 1000, meta_end - 10)
    h.settle()
    meta = outcome(h, meta_d)
    assert isinstance(meta, PartSource) and meta.size == len(META)
    # The metadata is small and whole at once; it is verified with the rootfs.
    assert read(meta) == META
    root = outcome(h, root_d)
    assert isinstance(root, PartSource)
    assert root.size == image.size - len(META)
    # All but what might begin the closing delimiter has been written out already.
    got = read(root)
    assert 1000 - 100 < len(got) <= 1000 and got == ROOTFS[:len(got)]

    waiting = root.wait()
    assert not fired(waiting)
    # All but the line end after the closing boundary: the rootfs part has ended.
    held.write_until(len(body) - 2, root_start + 1000)
    h.settle()
    assert fired(waiting)
    # Its last byte waits for the verdict on the whole export, at the end of the body.
    assert root.available() == len(ROOTFS) - 1
    assert read(root) == ROOTFS[:-1]
    held.write_until(len(body), len(body) - 2)
    held.finish()
    h.run(download.when_done())
    assert root.available() == len(ROOTFS) and root.failure is None
    assert root.path == h.store.path_for(sha(ROOTFS))
    assert read(root) == ROOTFS
    # a late follower gets the stored files
    late = h.run(download.root)
    assert late.path.getContent() == ROOTFS


def test_a_listed_file_is_released_once_its_own_hash_is_right(make: Any) -> None:
    image = split_image()
    h = make([image])
    parts = h.run(start(h, image).when_done())
    for data in (META, ROOTFS):
        h.index.remove(sha(data))
        h.store.remove(sha(data))
    h.server.hold_exports = True
    meta_item = Item(image_item_path(image.fingerprint, meta_filename(image.fingerprint)),
                     parts.meta_sha256, parts.meta_size, "lxd.tar.xz", "p", "v")
    root_item = Item(image_item_path(image.fingerprint, root_filename(image.fingerprint, "squashfs")),
                     sha(ROOTFS), len(ROOTFS), "squashfs", "p", "v")
    meta = h.fetcher.get(UPSTREAM, meta_item)
    root = h.fetcher.get(UPSTREAM, root_item)
    assert root.export is meta.export
    streaming = meta.when_streaming()
    h.settle()
    held = h.server.held[image.fingerprint][0]
    held.write_until(held.body.index(ROOTFS) + 1000)
    h.settle()
    assert streaming.called
    assert meta.available() == len(META) and meta.path.getContent() == META
    assert 0 < root.available() <= 1000
    held.write_until(len(held.body), held.body.index(ROOTFS) + 1000)
    held.finish()
    assert h.run(root.when_done()) == h.store.path_for(sha(ROOTFS))
    assert root.available() == root.size == len(ROOTFS) and root.stored


def test_a_listed_file_with_another_hash_fails_its_followers(make: Any) -> None:
    image = split_image()
    h = make([image])
    h.index.put_parts(ImageParts(
        fingerprint=image.fingerprint, upstream=UPSTREAM, meta_sha256=sha(META), meta_size=len(META),
        meta_ftype="lxd.tar.xz", root_sha256=sha(ROOTFS), root_size=len(ROOTFS), root_ftype="squashfs",
    ))
    wrong = Item(image_item_path(image.fingerprint, meta_filename(image.fingerprint)),
                 "0" * 64, len(META), "lxd.tar.xz", "p", "v")
    view = h.fetcher.get(UPSTREAM, wrong)
    result = outcome(h, view.when_done())
    assert isinstance(result, Failure) and result.check(VerificationFailed)
    assert view.available() < len(META)
    # the export itself was good, and is stored
    assert h.store.exists(sha(META)) and h.store.exists(sha(ROOTFS))


def test_an_item_of_an_image_whose_parts_are_unknown_is_not_found(make: Any) -> None:
    image = split_image()
    h = make([image])
    item = Item(image_item_path(image.fingerprint, meta_filename(image.fingerprint)),
                sha(META), len(META), "lxd.tar.xz", "p", "v")
    with pytest.raises(NotFound):
        h.fetcher.get(UPSTREAM, item)
    with pytest.raises(NotFound):
        h.fetcher.get(UPSTREAM, Item("images/x", sha(META), 1, "lxd.tar.xz", "p", "v"))


# Unified exports


def test_a_unified_export_is_one_file(make: Any) -> None:
    image = unified_image()
    h = make([image])
    download = start(h, image)
    source = outcome(h, download.unified)
    assert isinstance(source, PartSource)
    parts = h.run(download.when_done())
    assert parts.unified and parts.meta_sha256 == image.fingerprint and parts.size == image.size
    assert h.store.path_for(image.fingerprint).getContent() == image.meta
    assert source.available() == image.size and source.path == h.store.path_for(image.fingerprint)
    assert isinstance(outcome(h, download.meta), Failure)
    assert outcome(h, download.root).check(WrongShape)
    assert h.temp_files() == []


def test_an_export_of_another_shape_than_listed_teaches_the_right_one(make: Any) -> None:
    """A published image is listed as unified until its export turns out split."""
    image = split_image(properties={"os": "debian", "release": "12"})
    h = make([image])
    [presumed] = h.call(h.remote.catalogue_images())
    assert presumed.root is None
    code, _, _ = h.fetch(presumed.meta.path)
    assert code == 502
    h.settle()
    assert h.index.get_parts(image.fingerprint) is not None
    [listed] = h.call(h.remote.catalogue_images())
    assert listed.root is not None


# Failures: nothing committed, everyone told


def test_a_wrong_combined_hash_commits_nothing(make: Any, logged: Logged) -> None:
    image = split_image()
    h = make([image])
    _, body = image.export()
    h.server.export_override[image.fingerprint] = (
        f"multipart/form-data; boundary={GO_BOUNDARY}".encode(), body.replace(ROOTFS[:8], b"XXXXXXXX", 1),
    )
    h.server.hold_exports = True
    download = start(h, image)
    meta_d, root_d = download.meta, download.root
    h.settle()
    held = h.server.held[image.fingerprint][0]
    held.write_until(len(held.body))
    held.finish()
    result = outcome(h, download.when_done())
    assert isinstance(result, Failure) and result.check(VerificationFailed)
    assert "not the fingerprint" in result.getErrorMessage()
    meta, root = outcome(h, meta_d), outcome(h, root_d)
    assert isinstance(meta, PartSource) and isinstance(root, PartSource)
    assert meta.failure is result and root.failure is result
    assert root.available() < root.size
    # asked now, they fail at once
    assert outcome(h, download.root) is result
    assert_nothing_stored(h, image)
    failures = logged.matching("failed")
    assert failures and failures[0]["url"] == f"{LXD_URL}/1.0/images/{image.fingerprint}/export"


def test_a_short_body_commits_nothing_and_fails_every_follower(make: Any) -> None:
    image = split_image()
    h = make([image])
    h.server.hold_exports = True
    download = start(h, image)
    root_d = download.root
    h.settle()
    held = h.server.held[image.fingerprint][0]
    held.write_until(held.body.index(ROOTFS) + 5000)
    h.settle()
    root = outcome(h, root_d)
    waiting = root.wait()
    held.break_connection()
    h.settle()
    assert waiting.called
    assert root.failure is not None
    assert isinstance(outcome(h, download.when_done()), Failure)
    assert isinstance(outcome(h, download.meta), Failure)
    assert_nothing_stored(h, image)


@pytest.mark.parametrize("body, message", ids=[
    "rootfs first", "unknown second part", "no rootfs", "three parts", "no closing boundary", "garbage",
    "longer rootfs",
], argvalues=[
    (go_multipart(GO_BOUNDARY, [("rootfs", "r", ROOTFS), ("metadata", "m", META)]), "not 'metadata'"),
    (go_multipart(GO_BOUNDARY, [("metadata", "m", META), ("other", "r", ROOTFS)]), "not 'rootfs'"),
    (go_multipart(GO_BOUNDARY, [("metadata", "m", META)]), "no rootfs part"),
    (go_multipart(GO_BOUNDARY, [("metadata", "m", META), ("rootfs", "r", ROOTFS), ("x", "x", b"")]),
     "more than two parts"),
    (go_multipart(GO_BOUNDARY, [("metadata", "m", META), ("rootfs", "r", ROOTFS)])[:-10], "closing boundary"),
    (b"garbage" * 5000, "does not start"),
    (go_multipart(GO_BOUNDARY, [("metadata", "m", META), ("rootfs", "r", ROOTFS + b"!")]), "larger"),
])
def test_a_broken_multipart_commits_nothing(make: Any, body: bytes, message: str) -> None:
    image = split_image()
    h = make([image])
    h.server.export_override[image.fingerprint] = (
        f"multipart/form-data; boundary={GO_BOUNDARY}".encode(), body,
    )
    result = outcome(h, start(h, image).when_done())
    assert isinstance(result, Failure) and result.check(VerificationFailed), result
    assert message in result.getErrorMessage()
    assert_nothing_stored(h, image)


def test_a_unified_export_of_the_wrong_size_commits_nothing(make: Any) -> None:
    image = unified_image()
    h = make([image])
    h.server.export_override[image.fingerprint] = (b"application/octet-stream", image.meta[:-1])
    result = outcome(h, start(h, image).when_done())
    assert isinstance(result, Failure) and "announced" in result.getErrorMessage()
    assert_nothing_stored(h, image)


def test_a_stalled_export_times_out(make: Any) -> None:
    image = split_image()
    h = make([image])
    h.server.hold_exports = True
    download = start(h, image)
    h.settle()
    held = h.server.held[image.fingerprint][0]
    held.write_until(100)
    h.settle()
    h.clock.advance(IDLE + 1)
    result = outcome(h, download.when_done())
    assert isinstance(result, Failure) and "sent nothing" in result.getErrorMessage()
    assert_nothing_stored(h, image)


def test_upstream_errors_are_reported_with_lxds_message(make: Any) -> None:
    image = split_image()
    h = make([image], health=True)
    h.server.images.clear()
    result = outcome(h, start(h, image).when_done())
    assert result.check(NotFound) and "not found" in result.getErrorMessage()
    h.server.images.append(image)
    h.server.export_status[image.fingerprint] = 500
    result = outcome(h, start(h, image).when_done())
    assert result.check(UpstreamFailed) and "scripted export failure" in result.getErrorMessage()
    # One image's failures: the upstream stays online, and an image that keeps failing (the
    # 404, then the 500) is backed off on its own.
    assert h.health is not None and not h.health.offline
    with pytest.raises(ProxyError) as raised:
        start(h, image)
    assert raised.value.code == 502 and b"Retry-After" in raised.value.headers
    assert_nothing_stored(h, image)


# Background downloads and room


def test_background_downloads_give_way_to_clients(make: Any) -> None:
    image = split_image()
    h = make([image])
    h.server.hold_exports = True
    download = start(h, image, background=True)
    assert in_background(download) and h.fetcher.client_downloads() == 0
    assert start(h, image, background=True) is download and in_background(download)
    assert start(h, image) is download
    assert not in_background(download) and h.fetcher.client_downloads() == 1
    h.settle()
    held = h.server.held[image.fingerprint][0]
    held.write_until(len(held.body))
    held.finish()
    h.run(download.when_done())
    assert h.fetcher.client_downloads() == 0


def test_without_room_the_export_is_streamed_but_not_kept(make: Any) -> None:
    asked: list[int] = []

    def no_room(size: int) -> bool:
        asked.append(size)
        return False

    image = split_image()
    h = make([image], make_room=no_room)
    h.server.hold_exports = True
    download = start(h, image)
    root_d = download.root
    h.settle()
    held = h.server.held[image.fingerprint][0]
    held.write_until(held.body.index(ROOTFS) + 10)
    root = outcome(h, root_d)
    # A follower opens the file as soon as it follows the download.
    with root.path.open("r") as follower:
        held.write_until(len(held.body), held.body.index(ROOTFS) + 10)
        held.finish()
        parts = h.run(download.when_done())
        assert root.available() == len(ROOTFS)
        assert follower.read() == ROOTFS
    assert asked == [image.size]
    assert not download.stored
    assert h.index.get_parts(image.fingerprint) == parts
    assert not h.store.exists(sha(ROOTFS)) and h.index.get(sha(ROOTFS)) is None
    h.clock.advance(0)
    assert h.temp_files() == []


# Through the simplestreams face


def test_the_simplestreams_face_serves_the_files_of_an_lxd_upstream(make: Any) -> None:
    image = split_image()
    h = make([image])
    # First the export (as the LXD face or the prefetcher would start it) teaches the parts.
    h.run(start(h, image).when_done())
    [listed] = h.call(h.remote.catalogue_images())
    assert listed.root is not None
    for data in (META, ROOTFS):
        h.index.remove(sha(data))
        h.store.remove(sha(data))
    # Now two misses: the face follows one export.
    assert h.fetch(listed.meta.path)[:2] == (200, META)
    assert h.store.exists(sha(ROOTFS))
    code, body, response = h.fetch(listed.root.path)
    assert (code, body) == (200, ROOTFS)
    assert response.headers.getRawHeaders(b"ETag") == [f'"{sha(ROOTFS)}"'.encode()]
    assert h.server.exports_requested(image.fingerprint) == 2


def test_a_unified_image_is_served_through_the_simplestreams_face(make: Any) -> None:
    image = unified_image()
    h = make([image])
    [listed] = h.call(h.remote.catalogue_images())
    code, body, _ = h.fetch(listed.meta.path)
    assert (code, body) == (200, image.meta)
    assert h.store.exists(image.fingerprint)
    assert h.fetch(listed.meta.path)[:2] == (200, image.meta)
    assert h.server.exports_requested(image.fingerprint) == 1


# Through the prefetcher


def test_the_files_of_pinned_images_are_learnt_by_one_export_each(make: Any) -> None:
    by_alias = split_image(aliases=("ubuntu/24.04",))
    by_fingerprint, unpinned = (
        FakeImage(meta=META + name.encode(), rootfs=ROOTFS, aliases=(alias,),
                  properties={"os": name, "release": alias.partition("/")[2], "type": "squashfs"})
        for name, alias in (("debian", "debian/12"), ("alpine", "alpine/3.20"))
    )
    h = make([by_alias, by_fingerprint, unpinned])
    learner = PinnedPartsLearner({UPSTREAM: h.remote}, h.fetcher)
    # A fingerprint names an image with 12 hex digits or more, as LXD's short form.
    names = {"ubuntu/24.04", by_fingerprint.fingerprint[:12], unpinned.fingerprint[:11]}
    assert h.call(learner.learn(UPSTREAM, names)) == 2
    for image, exports in ((by_alias, 1), (by_fingerprint, 1), (unpinned, 0)):
        assert h.server.exports_requested(image.fingerprint) == exports
        assert (h.index.get_parts(image.fingerprint) is not None) == bool(exports)
    # Known now: nothing more to learn, and an upstream that is no LXD server has nothing.
    assert h.call(learner.learn(UPSTREAM, names)) == 0
    assert h.call(learner.learn("elsewhere", names)) == 0
    assert h.server.exports_requested(by_alias.fingerprint) == 1


def test_the_prefetcher_brings_a_pinned_image_of_an_lxd_upstream(make: Any, tmp_path: Any) -> None:
    image = split_image(aliases=("ubuntu/24.04",))
    h = make([image])
    # A split image is listed once its parts are known; the export teaches them.
    [waiting] = h.call(h.remote.awaiting_parts())
    h.run(h.fetcher.get_image(UPSTREAM, waiting, background=True).when_done())
    for data in (META, ROOTFS):
        h.index.remove(sha(data))
        h.store.remove(sha(data))
    config = Config(
        server=ServerConfig(),
        cache=CacheConfig(dir=str(tmp_path)),
        upstreams=(UpstreamConfig(UPSTREAM, LXD_URL, protocol="lxd"),),
        pins=(PinConfig(UPSTREAM, "ubuntu/24.04", arch="x86_64"),),
    )
    prefetcher = Prefetcher(
        config, {UPSTREAM: h.remote}, h.fetcher, h.index, h.clock, host_arch="x86_64",
    )
    report = h.call(prefetcher.tick())
    assert report.unresolved == [] and report.failed == []
    assert h.store.exists(sha(META)) and h.store.exists(sha(ROOTFS))
    for data in (META, ROOTFS):
        record = h.index.get(sha(data))
        assert record is not None and record.auto_update and not record.cached
    assert h.server.exports_requested(image.fingerprint) == 2
