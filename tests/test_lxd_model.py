"""The LXD face's model (proxy.lxd_model): User-Agent, envelopes, prefixes, alias names, objects.

Catalogues are small products files parsed by `proxy.catalogue`, so the images are the ones the
simplestreams face would list; fingerprints are `sha(f"{product} {version} {ftype}")` so a test
can name the image it expects.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import pytest
from attrs import evolve

from proxy.catalogue import Family, Image, parse_images
from proxy.errors import BadRequest, NotFound
from proxy.lxd_model import (
    ZERO_TIME,
    AliasEntry,
    ClientInfo,
    LxdCatalogue,
    Published,
    alias_json,
    client_info,
    error_body,
    go_time,
    image_json,
    sync_body,
)
from proxy.resolve import resolve_alias

V1, V2, V3 = "20240101_0000", "20240201_0000", "20240301_0000"

COMBINED = {
    "squashfs": "combined_squashfs_sha256",
    "root.tar.xz": "combined_rootxz_sha256",
    "disk-kvm.img": "combined_disk-kvm-img_sha256",
    "uefi1.img": "combined_uefi1-img_sha256",
    "disk1.img": "combined_disk1-img_sha256",
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fp(pid: str, version: str, ftype: str) -> str:
    return sha(f"{pid} {version} {ftype}")


def version_items(tag: str, roots: tuple[str, ...], unified: bool, meta_ftype: str) -> dict[str, Any]:
    items: dict[str, Any] = {}
    if unified:
        items["unified"] = {
            "ftype": meta_ftype.replace(".tar.xz", "_combined.tar.gz"),
            "path": f"{tag.replace(' ', '/')}/unified.tar.gz",
            "sha256": sha(f"{tag} tar.gz"),
            "size": 100,
        }
    if roots:
        meta: dict[str, Any] = {
            "ftype": meta_ftype, "path": f"{tag.replace(' ', '/')}/meta.tar.xz",
            "sha256": sha(f"{tag} meta"), "size": 1,
        }
        for ftype in roots:
            meta[COMBINED[ftype]] = sha(f"{tag} {ftype}")
            items[ftype] = {
                "ftype": ftype, "path": f"{tag.replace(' ', '/')}/{ftype}",
                "sha256": sha(f"{tag} {ftype} file"), "size": 1000,
            }
        items["meta"] = meta
    return items


def product(
    os: str,
    release: str,
    arch: str,
    aliases: str,
    versions: Mapping[str, tuple[str, ...]],
    variant: str = "default",
    unified: tuple[str, ...] = (),
    meta_ftype: str = "lxd.tar.xz",
    **fields: Any,
) -> tuple[str, dict[str, Any]]:
    pid = f"{os}:{release}:{arch}:{variant}"
    return pid, {
        "aliases": aliases, "arch": arch, "os": os, "release": release, "release_title": release,
        "variant": variant, **fields,
        "versions": {
            v: {"items": version_items(f"{pid} {v}", roots, v in unified, meta_ftype)}
            for v, roots in versions.items()
        },
    }


def images_of(*products: tuple[str, dict[str, Any]], family: Family = "lxd") -> list[Image]:
    doc = {"content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
           "products": dict(products)}
    return parse_images(json.dumps(doc).encode(), family)


def target(catalogue: LxdCatalogue, name: str, arch: str = "x86_64") -> str | None:
    entry = catalogue.alias(name, arch)
    return None if entry is None else entry.fingerprint


def plain_names(catalogue: LxdCatalogue, arch: str, upstream: str = "up") -> set[str]:
    return {name for name in catalogue.aliases(arch) if not name.startswith(f"{upstream}/")}


# -- the User-Agent ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agent, expected",
    [
        ("LXD 5.0.2 (Linux; x86_64; 6.1.0; Debian; 12) (cookiejar)", ClientInfo("lxd", "x86_64")),
        (
            "LXD 5.21 LTS (Linux; x86_64; 5.15.0; Ubuntu; 22.04) "
            "(ceph 17.2.6; zfs 2.1.5-1ubuntu6~22.04.1) (cluster)",
            ClientInfo("lxd", "x86_64"),
        ),
        ("LXD 5.0.2 (Linux; x86_64) (cluster)", ClientInfo("lxd", "x86_64")),
        (b"Incus 6.0 (Linux; aarch64; 6.8.0; Debian; 12)", ClientInfo("incus", "aarch64")),
        ("Incus 6.0 (Linux; armv7l; 6.1.0; Debian; 12) (cookiejar)", ClientInfo("incus", "armv7l")),
        (b"LXD 6.1 (Linux; ppc64le; 6.8.0; Ubuntu; 24.04)", ClientInfo("lxd", "ppc64le")),
        ("LXD 6.1 (Linux; riscv64; 6.8.0; Ubuntu; 24.04)", ClientInfo("lxd", "riscv64")),
        # Stream spellings are mapped to LXD's names.
        ("LXD 6.1 (Linux; amd64; 6.1.0)", ClientInfo("lxd", "x86_64")),
        ("LXD 6.1 (Linux;arm64)", ClientInfo("lxd", "aarch64")),
        ("  Incus 6.0 (Linux; s390x)  ", ClientInfo("incus", "s390x")),
        # No closing parenthesis: the fields are still read.
        ("LXD 6.1 (Linux; x86_64", ClientInfo("lxd", "x86_64")),
        # Absent or unknown architectures.
        ("LXD 6.1 (Linux; sparc64; 6.1.0)", ClientInfo("lxd", None)),
        ("LXD 6.1 (Linux) (x86_64; x86_64)", ClientInfo("lxd", None)),
        ("LXD 6.1 ()", ClientInfo("lxd", None)),
        ("LXD 6.1", ClientInfo("lxd", None)),
        ("Incus", ClientInfo("incus", None)),
        ("Go-http-client/1.1", ClientInfo("lxd", None)),
        ("curl/8.5.0", ClientInfo("lxd", None)),
        ("incus 6.0 (Linux; x86_64)", ClientInfo("lxd", "x86_64")),
        ("", ClientInfo("lxd", None)),
        (None, ClientInfo("lxd", None)),
        (b"\xff\xfe(\x00;\xff\xfe)", ClientInfo("lxd", None)),
        (")(;;;((", ClientInfo("lxd", None)),
        ("(;x86_64)", ClientInfo("lxd", "x86_64")),
        ("LXD 6.1 (Linux; X86_64)", ClientInfo("lxd", None)),
    ],
)
def test_client_info(agent: bytes | str | None, expected: ClientInfo) -> None:
    assert client_info(agent) == expected


# -- the envelope -----------------------------------------------------------------------------


def test_sync_body() -> None:
    assert sync_body({"api_version": "1.0", "public": True}) == (
        b'{"type":"sync","status":"Success","status_code":200,"operation":"","error_code":0,'
        b'"error":"","metadata":{"api_version":"1.0","public":true}}'
    )
    assert json.loads(sync_body(["/1.0/images/ab"]))["metadata"] == ["/1.0/images/ab"]
    assert sync_body(None).endswith(b'"metadata":null}')


def test_error_body() -> None:
    assert error_body(404, "Not Found") == (
        b'{"type":"error","status":"","status_code":0,"operation":"","error_code":404,'
        b'"error":"Not Found","metadata":null}'
    )
    assert json.loads(error_body(400, 'say "no"'))["error"] == 'say "no"'


def test_bodies_are_utf8() -> None:
    body = error_body(400, "Debian « bookworm » ✓")
    assert "Debian « bookworm » ✓".encode() in body
    assert json.loads(body.decode("utf-8"))["error"] == "Debian « bookworm » ✓"
    # A lone surrogate, which json.loads accepts from a products file, still gives UTF-8 JSON.
    body = sync_body({"description": "bad \ud800 name"})
    assert json.loads(body.decode("utf-8"))["metadata"]["description"] == "bad \ud800 name"


# -- images and prefixes ----------------------------------------------------------------------

FP_A = "ab0" + "0" * 61
FP_B = "ab1" + "0" * 61
FP_C = "c" * 64


def catalogue_of_fingerprints(*fingerprints: str) -> tuple[LxdCatalogue, list[Image]]:
    base = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs",)}))[0]
    images = [evolve(base, fingerprint=f) for f in fingerprints]
    return LxdCatalogue([("up", images)]), images


def test_find_unique_prefix() -> None:
    catalogue, _ = catalogue_of_fingerprints(FP_A, FP_B, FP_C)
    for prefix, expected in (
        ("c", FP_C), ("ccc", FP_C), (FP_C, FP_C), ("ab0", FP_A), (FP_A, FP_A), ("ab1", FP_B),
        (FP_B[:12], FP_B),
    ):
        found = catalogue.find(prefix)
        assert found.image.fingerprint == expected and found.upstream == "up"


def test_find_ambiguous_prefix() -> None:
    catalogue, _ = catalogue_of_fingerprints(FP_A, FP_B, FP_C)
    for prefix in ("a", "ab"):
        with pytest.raises(BadRequest) as caught:
            catalogue.find(prefix)
        assert caught.value.message == "More than one image matches"
        assert caught.value.code == 400


@pytest.mark.parametrize(
    "prefix", ["", "AB", "Ab0", "xyz", "ab-", "ab0 ", " ab0", "ab0\n", "%61", "a" * 65, FP_A + "0", "ǎb"]
)
def test_find_bad_prefix(prefix: str) -> None:
    catalogue, _ = catalogue_of_fingerprints(FP_A, FP_B, FP_C)
    with pytest.raises(BadRequest) as caught:
        catalogue.find(prefix)
    assert caught.value.code == 400


@pytest.mark.parametrize("prefix", ["d", "ab2", "0", "f" * 64, "ab00000001", FP_C[:-1] + "d"])
def test_find_unknown_prefix(prefix: str) -> None:
    catalogue, _ = catalogue_of_fingerprints(FP_A, FP_B, FP_C)
    with pytest.raises(NotFound) as caught:
        catalogue.find(prefix)
    assert caught.value.code == 404


def test_find_in_an_empty_catalogue() -> None:
    with pytest.raises(NotFound):
        LxdCatalogue([]).find("ab")
    with pytest.raises(NotFound):
        LxdCatalogue([("up", [])]).find("ab")
    assert LxdCatalogue([]).images() == []
    assert LxdCatalogue([]).aliases("x86_64") == {}


def test_fingerprints_that_cannot_verify_are_left_out() -> None:
    catalogue, images = catalogue_of_fingerprints(FP_A, "AB" * 32, "abc", "../" + "a" * 61, FP_C)
    assert [p.image.fingerprint for p in catalogue.images()] == [FP_A, FP_C]
    with pytest.raises(NotFound):
        catalogue.find("abc")


def test_images_unique_and_ordered() -> None:
    first = images_of(
        product("os", "2", "amd64", "os/2", {V1: ("squashfs",)}),
        product("os", "1", "amd64", "os/1", {V1: ("root.tar.xz", "squashfs"), V2: ("squashfs",)}),
    )
    shared = first[0]
    second = [
        *images_of(product("a", "1", "amd64", "a/1", {V1: ("squashfs",)})),
        evolve(shared, aliases=("other",)),
    ]
    catalogue = LxdCatalogue([("first", first), ("second", second)])
    listed = [(p.upstream, p.image.release, p.image.version, p.image.root_ftype) for p in catalogue.images()]
    # Upstream order first; within one, the simplestreams client's order (os, release, newest
    # serial, preferred root type), even though "a" sorts before "os".
    assert listed == [
        ("first", "1", V2, "squashfs"),
        ("first", "1", V1, "squashfs"),
        ("first", "1", V1, "root.tar.xz"),
        ("first", "2", V1, "squashfs"),
        ("second", "1", V1, "squashfs"),
    ]
    # The image both list is exported from the first.
    assert catalogue.find(shared.fingerprint) == Published("first", shared)
    # images() hands out a copy.
    catalogue.images().clear()
    assert len(catalogue.images()) == 5


# -- alias names ------------------------------------------------------------------------------

PID = "os:1:amd64:default"


def test_container_and_vm_names() -> None:
    images = images_of(product("os", "1", "amd64", "os/1,os/one", {V1: ("squashfs", "disk-kvm.img")}))
    catalogue = LxdCatalogue([("up", images)])
    container, vm = fp(PID, V1, "squashfs"), fp(PID, V1, "disk-kvm.img")
    assert plain_names(catalogue, "x86_64") == {
        "os/1", "os/1/vm", "os/1/amd64", "os/1/amd64/vm",
        "os/one", "os/one/vm", "os/one/amd64", "os/one/amd64/vm",
    }
    assert catalogue.alias("os/1", "x86_64") == AliasEntry("os/1", container, "container", "up")
    assert catalogue.alias("os/1/vm", "x86_64") == AliasEntry("os/1/vm", vm, "virtual-machine", "up")
    assert target(catalogue, "os/1/amd64") == container
    assert target(catalogue, "os/1/amd64/vm") == vm
    assert catalogue.alias("os/1/amd64/vm", "x86_64") is not None
    assert catalogue.alias("os/1/x86_64", "x86_64") is None
    assert catalogue.alias("os/1/vm/vm", "x86_64") is None
    assert catalogue.alias("nope", "x86_64") is None
    assert catalogue.aliases_of(container, "x86_64") == [
        "os/1", "os/1/amd64", "os/one", "os/one/amd64",
        "up/os/1", "up/os/1/amd64", "up/os/one", "up/os/one/amd64",
    ]
    assert catalogue.aliases_of(vm, "x86_64")[:4] == [
        "os/1/amd64/vm", "os/1/vm", "os/one/amd64/vm", "os/one/vm",
    ]
    assert catalogue.aliases_of(sha("unknown"), "x86_64") == []


def test_architecture_of_the_client() -> None:
    images = images_of(
        product("os", "1", "amd64", "os/1", {V1: ("squashfs", "disk-kvm.img")}),
        product("os", "1", "arm64", "os/1", {V1: ("squashfs",)}),
    )
    catalogue = LxdCatalogue([("up", images)])
    amd64, arm64 = fp(PID, V1, "squashfs"), fp("os:1:arm64:default", V1, "squashfs")
    assert target(catalogue, "os/1", "x86_64") == amd64
    assert target(catalogue, "os/1", "aarch64") == arm64
    # Stream spellings name the same architecture.
    assert target(catalogue, "os/1", "amd64") == amd64
    assert catalogue.aliases("amd64") is catalogue.aliases("x86_64")
    # Explicit architectures, whatever the client's.
    for arch in ("x86_64", "aarch64", "riscv64", "sparc", ""):
        assert target(catalogue, "os/1/amd64", arch) == amd64
        assert target(catalogue, "os/1/arm64", arch) == arm64
        assert target(catalogue, "os/1/amd64/vm", arch) == fp(PID, V1, "disk-kvm.img")
        assert catalogue.alias("os/1/arm64/vm", arch) is None
    # No VM for arm64: no os/1/vm for that client.
    assert target(catalogue, "os/1/vm", "x86_64") == fp(PID, V1, "disk-kvm.img")
    assert catalogue.alias("os/1/vm", "aarch64") is None
    # An architecture without the alias has only the explicit names.
    for arch in ("riscv64", "sparc", ""):
        assert plain_names(catalogue, arch) == {"os/1/amd64", "os/1/amd64/vm", "os/1/arm64"}


def test_vm_only_product() -> None:
    images = images_of(product("os", "1", "amd64", "os/1", {V1: ("disk-kvm.img",)}))
    catalogue = LxdCatalogue([("up", images)])
    vm = fp(PID, V1, "disk-kvm.img")
    for name in ("os/1", "os/1/vm", "os/1/amd64", "os/1/amd64/vm"):
        entry = catalogue.alias(name, "x86_64")
        assert entry is not None and entry.fingerprint == vm and entry.type == "virtual-machine", name


def test_an_older_container_beats_a_newer_vm() -> None:
    versions = {V1: ("squashfs", "disk-kvm.img"), V2: ("disk-kvm.img",)}
    images = images_of(product("os", "1", "amd64", "os/1", versions))
    catalogue = LxdCatalogue([("up", images)])
    assert target(catalogue, "os/1") == fp(PID, V1, "squashfs")
    assert target(catalogue, "os/1/amd64") == fp(PID, V1, "squashfs")
    assert target(catalogue, "os/1/vm") == fp(PID, V2, "disk-kvm.img")
    assert target(catalogue, "os/1/amd64/vm") == fp(PID, V2, "disk-kvm.img")


def test_newest_version_wins() -> None:
    versions = {V1: ("squashfs",), V3: ("root.tar.xz",), V2: ("squashfs",)}
    images = images_of(product("os", "1", "amd64", "os/1", versions))
    catalogue = LxdCatalogue([("up", images)])
    assert target(catalogue, "os/1") == fp(PID, V3, "root.tar.xz")
    assert target(catalogue, "os/1/amd64") == fp(PID, V3, "root.tar.xz")


def test_squashfs_preferred_over_root_tar_xz() -> None:
    for roots in (("squashfs", "root.tar.xz"), ("root.tar.xz", "squashfs")):
        catalogue = LxdCatalogue([("up", images_of(product("os", "1", "amd64", "os/1", {V1: roots})))])
        assert target(catalogue, "os/1") == fp(PID, V1, "squashfs")
        assert target(catalogue, "os/1/amd64") == fp(PID, V1, "squashfs")
        # The other one is listed, but no name leads to it.
        rootxz = fp(PID, V1, "root.tar.xz")
        assert catalogue.find(rootxz).image.root_ftype == "root.tar.xz"
        assert catalogue.aliases_of(rootxz, "x86_64") == []


def test_vm_root_preference() -> None:
    images = images_of(product("os", "1", "amd64", "os/1", {V1: ("disk1.img", "uefi1.img", "disk-kvm.img")}))
    catalogue = LxdCatalogue([("up", images)])
    assert target(catalogue, "os/1") == fp(PID, V1, "disk-kvm.img")
    assert target(catalogue, "os/1/vm") == fp(PID, V1, "disk-kvm.img")


def test_names_agree_with_the_simplestreams_resolver() -> None:
    images = images_of(
        product("os", "1", "amd64", "os/1,os", {V1: ("squashfs", "disk-kvm.img"), V2: ("root.tar.xz",)}),
        product("os", "1", "amd64", "os/1", {V3: ("disk1.img",)}, variant="cloud"),
        product("os", "1", "arm64", "os/1,os", {V2: ("disk-kvm.img",), V1: ("squashfs",)}),
        product("os", "2", "arm64", "os/2,os", {V3: ("squashfs", "uefi1.img")}),
        product("os", "2", "armhf", "os/2", {V1: ()}, unified=(V1,)),
    )
    catalogue = LxdCatalogue([("up", images)])
    for arch in ("x86_64", "aarch64", "armv7l"):
        for alias in ("os/1", "os", "os/2"):
            container = resolve_alias(images, alias, arch, "container")
            vm = resolve_alias(images, alias, arch, "virtual-machine")
            wanted = container or vm
            assert target(catalogue, alias, arch) == (wanted and wanted.fingerprint), (arch, alias)
            assert target(catalogue, f"{alias}/vm", arch) == (vm and vm.fingerprint), (arch, alias)
        for alias, stream_arch in (("os/1", "amd64"), ("os/1", "arm64"), ("os/2", "armhf"), ("os", "arm64")):
            name = f"{alias}/{stream_arch}"
            container = resolve_alias(images, name, stream_arch, "container")
            vm = resolve_alias(images, name, stream_arch, "virtual-machine")
            wanted = container or vm
            assert target(catalogue, name, arch) == (wanted and wanted.fingerprint), (arch, name)
            assert target(catalogue, f"{name}/vm", arch) == (vm and vm.fingerprint), (arch, name)


def test_a_real_alias_beats_a_vm_name() -> None:
    images = images_of(
        product("os", "1", "amd64", "os/1", {V1: ("squashfs", "disk-kvm.img")}),
        product("other", "1", "amd64", "os/1/vm", {V1: ("squashfs",)}),
    )
    catalogue = LxdCatalogue([("up", images)])
    assert target(catalogue, "os/1/vm") == fp("other:1:amd64:default", V1, "squashfs")
    assert target(catalogue, "os/1/amd64/vm") == fp(PID, V1, "disk-kvm.img")


def test_the_client_architecture_comes_first() -> None:
    # A product alias that looks like another architecture's explicit name: the simplestreams
    # client looks a name up for its own architecture first, and so does this face.
    images = images_of(
        product("os", "1", "amd64", "os", {V1: ("squashfs",)}),
        product("odd", "1", "arm64", "os/amd64", {V1: ("squashfs",)}),
    )
    catalogue = LxdCatalogue([("up", images)])
    assert target(catalogue, "os/amd64", "aarch64") == fp("odd:1:arm64:default", V1, "squashfs")
    assert target(catalogue, "os/amd64", "x86_64") == fp(PID, V1, "squashfs")
    assert target(catalogue, "os/amd64", "riscv64") == fp(PID, V1, "squashfs")


def test_empty_aliases_give_no_names() -> None:
    images = images_of(product("os", "1", "amd64", "os/1,,os/one", {V1: ("squashfs",)}))
    catalogue = LxdCatalogue([("up", images)])
    assert plain_names(catalogue, "x86_64") == {"os/1", "os/1/amd64", "os/one", "os/one/amd64"}
    images = images_of(product("os", "1", "amd64", "", {V1: ("squashfs",)}))
    assert LxdCatalogue([("up", images)]).aliases("x86_64") == {}


def test_two_upstreams_with_the_same_alias() -> None:
    images_upstream = images_of(product("ubuntu", "noble", "amd64", "ubuntu/24.04", {V1: ("squashfs",)}))
    ubuntu_upstream = images_of(
        product("ubuntu", "noble", "amd64", "ubuntu/24.04,24.04", {V2: ("squashfs",)})
    )
    catalogue = LxdCatalogue([("images", images_upstream), ("ubuntu", ubuntu_upstream)])
    older = fp("ubuntu:noble:amd64:default", V1, "squashfs")
    newer = ubuntu_upstream[0].fingerprint
    names = catalogue.aliases("x86_64")
    assert {name: (entry.fingerprint, entry.upstream) for name, entry in names.items()} == {
        # The earlier upstream keeps its names, though the later one has a newer image.
        "ubuntu/24.04": (older, "images"),
        "ubuntu/24.04/amd64": (older, "images"),
        # Names only the later one has are its own.
        "24.04": (newer, "ubuntu"),
        "24.04/amd64": (newer, "ubuntu"),
        # Every upstream's names under its own name, where free: "ubuntu/" + "24.04" is taken.
        "images/ubuntu/24.04": (older, "images"),
        "images/ubuntu/24.04/amd64": (older, "images"),
        "ubuntu/ubuntu/24.04": (newer, "ubuntu"),
        "ubuntu/ubuntu/24.04/amd64": (newer, "ubuntu"),
    }
    assert all(name == entry.name for name, entry in names.items())
    assert catalogue.aliases_of(newer, "x86_64") == [
        "24.04", "24.04/amd64", "ubuntu/ubuntu/24.04", "ubuntu/ubuntu/24.04/amd64",
    ]
    assert catalogue.aliases_of(older, "x86_64") == [
        "images/ubuntu/24.04", "images/ubuntu/24.04/amd64", "ubuntu/24.04", "ubuntu/24.04/amd64",
    ]


def test_an_upstream_without_a_name_for_the_client_arch() -> None:
    first = images_of(product("os", "1", "arm64", "os/1", {V1: ("squashfs",)}))
    second = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs",)}))
    catalogue = LxdCatalogue([("first", first), ("second", second)])
    # The first has no os/1 for an x86_64 client, so the second's is the plain name.
    x86, arm = second[0].fingerprint, first[0].fingerprint
    assert catalogue.alias("os/1", "x86_64") == AliasEntry("os/1", x86, "container", "second")
    assert catalogue.alias("os/1", "aarch64") == AliasEntry("os/1", arm, "container", "first")
    assert target(catalogue, "first/os/1/arm64") == first[0].fingerprint
    assert catalogue.alias("first/os/1", "x86_64") is None


def test_an_image_two_upstreams_list() -> None:
    image = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs",)}))[0]
    catalogue = LxdCatalogue([("a", [image]), ("b", [evolve(image, aliases=("same",))])])
    assert catalogue.images() == [Published("a", image)]
    assert catalogue.alias("same", "x86_64") == AliasEntry("same", image.fingerprint, "container", "b")
    assert catalogue.aliases_of(image.fingerprint, "x86_64") == [
        "a/os/1", "a/os/1/amd64", "b/same", "b/same/amd64", "os/1", "os/1/amd64", "same", "same/amd64",
    ]


def test_aliases_are_built_once_per_architecture() -> None:
    images = images_of(
        product("os", "1", "amd64", "os/1", {V1: ("squashfs",)}),
        product("os", "1", "arm64", "os/1", {V1: ("squashfs",)}),
    )
    catalogue = LxdCatalogue([("up", images)])
    x86 = catalogue.aliases("x86_64")
    assert catalogue.aliases("x86_64") is x86
    assert catalogue.aliases("aarch64") is not x86
    assert catalogue.aliases("sparc") is catalogue.aliases("mips-ish")


KINDS: tuple[tuple[str, Literal["container", "virtual-machine"]], ...] = (
    ("squashfs", "container"), ("root.tar.xz", "container"), ("disk-kvm.img", "virtual-machine"),
)


def test_a_large_catalogue() -> None:
    # Ubuntu-sized: 5 arches x 30 releases x 20 versions x 3 images. Checks results, not time;
    # a quadratic construction would make this test slow enough to notice.
    base = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs",)}))[0]
    arches = {
        "amd64": "x86_64", "arm64": "aarch64", "armhf": "armv7l", "ppc64el": "ppc64le", "s390x": "s390x",
    }
    images: list[Image] = []
    for arch, architecture in arches.items():
        for release in range(30):
            for day in range(1, 21):
                version = f"202401{day:02d}"
                for ftype, kind in KINDS:
                    images.append(evolve(
                        base, fingerprint=sha(f"{arch} {release} {version} {ftype}"), arch=arch,
                        architecture=architecture, release=f"r{release:02d}", version=version,
                        aliases=(f"os/{release}", f"os/r{release:02d}"), type=kind,
                        root=evolve(base.root, ftype=ftype) if base.root else None,
                    ))
    catalogue = LxdCatalogue([("up", images)])
    assert len(catalogue.images()) == 9000
    names = catalogue.aliases("x86_64")
    # per alias (60): A, A/vm, 5 x (A/arch, A/arch/vm); and all of them again as up/...
    assert len(names) == 60 * 12 * 2
    assert target(catalogue, "os/7") == sha("amd64 7 20240120 squashfs")
    assert target(catalogue, "os/r07/s390x/vm", "aarch64") == sha("s390x 7 20240120 disk-kvm.img")
    assert catalogue.find(sha("armhf 3 20240105 root.tar.xz")[:10]).image.version == "20240105"


# -- the objects ------------------------------------------------------------------------------

UBUNTU_PID = "com.ubuntu.cloud:server:24.04:amd64"
UBUNTU_META = "server/releases/noble/release-20240702/ubuntu-24.04-server-cloudimg-amd64-lxd.tar.xz"


def ubuntu_images() -> list[Image]:
    meta = {
        "ftype": "lxd.tar.xz", "path": UBUNTU_META, "sha256": sha("meta"), "size": 420,
        "combined_squashfs_sha256": sha("squashfs image"), "combined_disk-kvm-img_sha256": sha("vm image"),
    }
    doc = {
        "content_id": "com.ubuntu.cloud:released:download", "datatype": "image-downloads",
        "format": "products:1.0",
        "products": {
            UBUNTU_PID: {
                "aliases": "24.04,noble,lts", "arch": "amd64", "os": "ubuntu", "release": "noble",
                "release_codename": "Noble Numbat", "release_title": "24.04 LTS", "version": "24.04",
                "support_eol": "2029-05-31", "supported": True,
                "versions": {
                    "20240702": {
                        "label": "release", "pubname": "ubuntu-noble-24.04-amd64-server-20240702",
                        "items": {
                            "lxd.tar.xz": meta,
                            "squashfs": {
                                "ftype": "squashfs", "path": "server/noble.squashfs",
                                "sha256": sha("squashfs"), "size": 252116572,
                            },
                            "disk-kvm.img": {
                                "ftype": "disk-kvm.img", "path": "server/noble-disk-kvm.img",
                                "sha256": sha("disk"), "size": 600000000,
                            },
                        },
                    },
                },
            },
        },
    }
    return parse_images(json.dumps(doc).encode())


def test_image_json_of_an_ubuntu_image() -> None:
    images = ubuntu_images()
    catalogue = LxdCatalogue([("ubuntu", images)])
    published = catalogue.find(sha("squashfs image"))
    body = image_json(
        published,
        aliases=catalogue.aliases_of(published.image.fingerprint, "x86_64")[:2],
        cached=True,
        auto_update=False,
        last_used_at=None,
        server_url="https://cloud-images.ubuntu.com/releases/",
    )
    assert body == {
        "aliases": [{"name": "24.04", "description": ""}, {"name": "24.04/amd64", "description": ""}],
        "architecture": "x86_64",
        "auto_update": False,
        "cached": True,
        "public": True,
        "type": "container",
        "filename": "ubuntu-24.04-server-cloudimg-amd64-lxd.tar.xz",
        "fingerprint": sha("squashfs image"),
        "size": 252116992,
        "profiles": ["default"],
        "project": "default",
        "properties": {
            "os": "ubuntu",
            "release": "noble",
            "version": "24.04",
            "architecture": "amd64",
            "label": "release",
            "serial": "20240702",
            "description": "ubuntu 24.04 LTS amd64 (release) (20240702)",
            "type": "squashfs",
        },
        "created_at": "2024-07-02T00:00:00Z",
        "uploaded_at": "2024-07-02T00:00:00Z",
        "expires_at": "2029-05-31T00:00:00Z",
        "last_used_at": "0001-01-01T00:00:00Z",
        "update_source": {
            "alias": "24.04",
            "certificate": "",
            "protocol": "simplestreams",
            "server": "https://cloud-images.ubuntu.com/releases/",
            "image_type": "container",
        },
    }
    # It goes into the envelope as it is.
    assert json.loads(sync_body(body))["metadata"] == body


def test_image_json_of_a_vm_image() -> None:
    catalogue = LxdCatalogue([("ubuntu", ubuntu_images())])
    body = image_json(
        catalogue.find(sha("vm image")[:12]),
        aliases=[],
        cached=False,
        auto_update=True,
        last_used_at=1720000000.5,
        server_url="https://images.example/",
        protocol="lxd",
    )
    assert body["type"] == "virtual-machine"
    assert body["size"] == 600000420
    assert body["aliases"] == []
    assert (body["cached"], body["auto_update"], body["public"]) == (False, True, True)
    assert body["properties"]["type"] == "disk-kvm.img"
    assert body["last_used_at"] == "2024-07-03T09:46:40.5Z"
    assert body["update_source"] == {
        "alias": "24.04", "certificate": "", "protocol": "lxd", "server": "https://images.example/",
        "image_type": "virtual-machine",
    }


@pytest.mark.parametrize("family", ["lxd", "incus"])
def test_image_json_of_a_linuxcontainers_image(family: Family) -> None:
    meta_ftype = "incus.tar.xz" if family == "incus" else "lxd.tar.xz"
    images = images_of(
        product(
            "debian", "bookworm", "arm64", "debian/12/cloud,debian/bookworm/cloud",
            {"20240505_1212": (), "20240209_13:00": ("squashfs",)},
            variant="cloud", unified=("20240505_1212",), meta_ftype=meta_ftype,
            requirements={"secureboot": "false", "nesting": ""},
        ),
        family=family,
    )
    catalogue = LxdCatalogue([("images", images)])
    pid = "debian:bookworm:arm64:cloud"
    unified = image_json(
        catalogue.find(fp(pid, "20240505_1212", "tar.gz")),
        aliases=["debian/12/cloud"], cached=False, auto_update=False, last_used_at=0.0,
        server_url="https://images.linuxcontainers.org/",
    )
    assert unified["architecture"] == "aarch64"
    assert unified["filename"] == "unified.tar.gz"
    assert unified["size"] == 100
    assert unified["properties"] == {
        "os": "debian",
        "release": "bookworm",
        "architecture": "arm64",
        "serial": "20240505_1212",
        "description": "debian bookworm arm64 (20240505_1212)",
        "variant": "cloud",
        "type": "tar.gz",
        "requirements.secureboot": "false",
    }
    # LXD reads the time from a YYYYMMDD_HHMM key, Incus only the date.
    created = "2024-05-05T12:12:00Z" if family == "lxd" else "2024-05-05T00:00:00Z"
    assert unified["created_at"] == unified["uploaded_at"] == created
    assert unified["expires_at"] == "1970-01-01T00:00:00Z"
    assert unified["last_used_at"] == "1970-01-01T00:00:00Z"
    assert unified["update_source"]["alias"] == "debian/12/cloud"
    split = image_json(
        catalogue.find(fp(pid, "20240209_13:00", "squashfs")),
        aliases=[], cached=False, auto_update=False, last_used_at=None, server_url="https://x/",
    )
    assert split["filename"] == "meta.tar.xz"
    assert split["properties"]["serial"] == "20240209_13:00"
    assert split["properties"]["type"] == "squashfs"
    # The key is not YYYYMMDD_HHMM: the date alone.
    assert split["created_at"] == "2024-02-09T00:00:00Z"


def test_image_json_of_an_image_without_aliases() -> None:
    image = images_of(product("os", "1", "amd64", "", {V1: ("squashfs",)}))[0]
    body = image_json(
        Published("up", image), aliases=[], cached=False, auto_update=False, last_used_at=None, server_url="s"
    )
    assert body["update_source"]["alias"] == ""
    assert body["properties"]["description"] == "os 1 amd64 (20240101_0000)"


def test_go_time() -> None:
    utc = timezone.utc
    assert go_time(datetime(1, 1, 1, tzinfo=utc)) == ZERO_TIME == "0001-01-01T00:00:00Z"
    assert go_time(datetime(2024, 1, 2, 3, 4, 5, tzinfo=utc)) == "2024-01-02T03:04:05Z"
    assert go_time(datetime(2024, 1, 2, 3, 4, 5, 120000, tzinfo=utc)) == "2024-01-02T03:04:05.12Z"
    assert go_time(datetime(2024, 1, 2, 3, 4, 5, 1, tzinfo=utc)) == "2024-01-02T03:04:05.000001Z"
    # Naive is UTC; other zones are converted.
    assert go_time(datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05Z"
    plus_two = timezone(timedelta(hours=2))
    assert go_time(datetime(2024, 1, 2, 3, 4, 5, tzinfo=plus_two)) == "2024-01-02T01:04:05Z"


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (None, ZERO_TIME),
        (0, "1970-01-01T00:00:00Z"),
        (1720000000, "2024-07-03T09:46:40Z"),
        (1720000000.25, "2024-07-03T09:46:40.25Z"),
        (math.nan, ZERO_TIME),
        (math.inf, ZERO_TIME),
        (1e20, ZERO_TIME),
    ],
)
def test_last_used_at(seconds: float | None, expected: str) -> None:
    image = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs",)}))[0]
    body = image_json(
        Published("up", image),
        aliases=[], cached=True, auto_update=False, last_used_at=seconds, server_url="s",
    )
    assert body["last_used_at"] == expected


def test_alias_json() -> None:
    entry = AliasEntry("ubuntu/24.04/vm", FP_A, "virtual-machine", "ubuntu")
    assert alias_json(entry) == {
        "name": "ubuntu/24.04/vm", "description": "", "type": "virtual-machine", "target": FP_A,
    }
    assert alias_json(AliasEntry("x", FP_C, "container", "up", "said")) == {
        "name": "x", "description": "said", "type": "container", "target": FP_C,
    }
