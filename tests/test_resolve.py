"""Alias resolution (proxy.resolve): the image the LXD client would pick, checked three ways.

Against hand-written catalogues for each rule, against a generated tree (whose `Tree.image`
knows what it built), and over loopback against the real `lxc image info` for many aliases.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from attrs import evolve
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IReactorSSL

from proxy import resolve
from proxy.catalogue import Image, parse_images
from proxy.resolve import (
    alias_architectures,
    host_architecture,
    images_for_product,
    lxd_arch,
    resolve_alias,
    sort_images,
    versions_for,
)
from tests.helpers.certs import make_ca
from tests.helpers.tree import DEFAULT_PRODUCTS, PRODUCTS_PATH, ProductSpec, Tree, build_tree
from tests.helpers.upstream import start_https_upstream
from tests.test_helpers_tree import lxc_remote, needs_lxc, run_lxc

# -- hand-written catalogues ------------------------------------------------------------------


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def version_items(tag: str, roots: tuple[str, ...], unified: bool = False) -> dict[str, Any]:
    """Items of one version: lxd.tar.xz plus one item per root ftype, or one unified tarball.

    Fingerprints are `sha(f"{tag} {ftype}")`, so a test can name the image it expects.
    """
    items: dict[str, Any] = {}
    if unified:
        items["lxd_combined.tar.gz"] = {
            "ftype": "lxd_combined.tar.gz", "path": f"{tag}/unified.tar.gz",
            "sha256": sha(f"{tag} tar.gz"), "size": 10,
        }
    if not roots:
        return items
    fields = {
        "squashfs": "combined_squashfs_sha256",
        "root.tar.xz": "combined_rootxz_sha256",
        "disk-kvm.img": "combined_disk-kvm-img_sha256",
        "uefi1.img": "combined_uefi1-img_sha256",
        "disk1.img": "combined_disk1-img_sha256",
    }
    meta: dict[str, Any] = {
        "ftype": "lxd.tar.xz", "path": f"{tag}/lxd.tar.xz", "sha256": sha(f"{tag} meta"), "size": 1,
    }
    for ftype in roots:
        meta[fields[ftype]] = sha(f"{tag} {ftype}")
        items[ftype] = {"ftype": ftype, "path": f"{tag}/{ftype}", "sha256": sha(f"{tag} {ftype} file"), "size": 2}
    items["lxd.tar.xz"] = meta
    return items


def product(
    os: str,
    release: str,
    arch: str,
    aliases: str,
    versions: dict[str, tuple[str, ...]],
    variant: str = "default",
    unified: tuple[str, ...] = (),
) -> tuple[str, dict[str, Any]]:
    pid = f"{os}:{release}:{arch}:{variant}"
    return pid, {
        "aliases": aliases, "arch": arch, "os": os, "release": release, "release_title": release,
        "variant": variant,
        "versions": {
            v: {"items": version_items(f"{pid} {v}", roots, unified=v in unified)}
            for v, roots in versions.items()
        },
    }


def images_of(*products: tuple[str, dict[str, Any]]) -> list[Image]:
    doc = {"content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
           "products": dict(products)}
    return parse_images(json.dumps(doc).encode())


def fp(pid: str, version: str, ftype: str) -> str:
    return sha(f"{pid} {version} {ftype}")


def fingerprint_of(image: Image | None) -> str | None:
    return None if image is None else image.fingerprint


V1, V2 = "20240101_0000", "20240201_0000"


def test_newest_version_wins_over_root_preference() -> None:
    images = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs",), V2: ("root.tar.xz",)}))
    assert fingerprint_of(resolve_alias(images, "os/1", "amd64")) == fp("os:1:amd64:default", V2, "root.tar.xz")


def test_squashfs_preferred_over_root_tar_xz() -> None:
    for roots in (("squashfs", "root.tar.xz"), ("root.tar.xz", "squashfs")):
        images = images_of(product("os", "1", "amd64", "os/1", {V1: roots}))
        image = resolve_alias(images, "os/1", "amd64")
        assert image is not None and image.root_ftype == "squashfs"


def test_vm_root_preference() -> None:
    pid = "os:1:amd64:default"
    for roots, expected in (
        (("disk1.img", "uefi1.img", "disk-kvm.img"), "disk-kvm.img"),
        (("disk1.img", "uefi1.img"), "uefi1.img"),
        (("disk1.img",), "disk1.img"),
    ):
        images = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs", *roots)}))
        assert fingerprint_of(resolve_alias(images, "os/1", "amd64", "virtual-machine")) == fp(pid, V1, expected)
        assert fingerprint_of(resolve_alias(images, "os/1", "amd64")) == fp(pid, V1, "squashfs")


def test_container_and_vm_of_one_alias() -> None:
    images = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs", "disk-kvm.img"), V2: ("squashfs",)}))
    container = resolve_alias(images, "os/1", "amd64", "container")
    vm = resolve_alias(images, "os/1", "amd64", "virtual-machine")
    assert container is not None and container.version == V2 and container.type == "container"
    # The newest version has no VM image: the VM alias stays on the older one.
    assert vm is not None and vm.version == V1 and vm.type == "virtual-machine"
    # No type given: container first, as lxc without --vm.
    assert resolve_alias(images, "os/1", "amd64", "") == container
    vm_only = images_of(product("os", "1", "amd64", "os/1", {V1: ("disk-kvm.img",)}))
    assert resolve_alias(vm_only, "os/1", "amd64", "container") is None
    assert resolve_alias(vm_only, "os/1", "amd64", "") == resolve_alias(vm_only, "os/1", "amd64", "virtual-machine")


def test_architectures_and_medium_aliases() -> None:
    images = images_of(
        product("os", "1", "amd64", "os/1,os", {V1: ("squashfs",)}),
        product("os", "1", "arm64", "os/1,os", {V1: ("squashfs",)}),
        product("os", "1", "armhf", "os/1,os", {V2: ("squashfs",)}),
    )
    amd64 = fp("os:1:amd64:default", V1, "squashfs")
    arm64 = fp("os:1:arm64:default", V1, "squashfs")
    armhf = fp("os:1:armhf:default", V2, "squashfs")
    for arch in ("amd64", "x86_64"):
        assert fingerprint_of(resolve_alias(images, "os/1", arch)) == amd64
        assert fingerprint_of(resolve_alias(images, "os/1/amd64", arch)) == amd64
        assert resolve_alias(images, "os/1/arm64", arch) is None
    for arch in ("arm64", "aarch64"):
        assert fingerprint_of(resolve_alias(images, "os", arch)) == arm64
        assert fingerprint_of(resolve_alias(images, "os/arm64", arch)) == arm64
    assert fingerprint_of(resolve_alias(images, "os/1/armhf", "armv7l")) == armhf
    # The medium form uses the stream's name, not LXD's.
    assert resolve_alias(images, "os/1/x86_64", "amd64") is None
    assert resolve_alias(images, "os/1", "riscv64") is None
    assert resolve_alias(images, "os/1", "sparc") is None
    assert {arch: i.fingerprint for arch, i in alias_architectures(images, "os/1").items()} == {
        "x86_64": amd64, "aarch64": arm64, "armv7l": armhf,
    }


def test_empty_arch_is_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    images = images_of(
        product("os", "1", "amd64", "os/1", {V1: ("squashfs",)}),
        product("os", "1", "arm64", "os/1", {V1: ("squashfs",)}),
    )
    monkeypatch.setattr(resolve.platform, "machine", lambda: "aarch64")
    assert fingerprint_of(resolve_alias(images, "os/1", "")) == fp("os:1:arm64:default", V1, "squashfs")
    monkeypatch.setattr(resolve.platform, "machine", lambda: "x86_64")
    assert fingerprint_of(resolve_alias(images, "os/1", "")) == fp("os:1:amd64:default", V1, "squashfs")


def test_unknown_alias() -> None:
    images = images_of(product("os", "1", "amd64", "os/1,os", {V1: ("squashfs",)}))
    for alias in ("nope", "os/", "os/1/", "OS/1", "os/1,os", "", "1", "os/1/amd64/amd64"):
        assert resolve_alias(images, alias, "amd64") is None, alias
    assert resolve_alias([], "os/1", "amd64") is None
    # A product without aliases gives none, not an empty one.
    assert resolve_alias(images_of(product("os", "1", "amd64", "", {V1: ("squashfs",)})), "", "amd64") is None


def test_unified_images_are_candidates() -> None:
    pid = "os:1:amd64:default"
    images = images_of(product("os", "1", "amd64", "os/1", {V1: ("squashfs",), V2: ()}, unified=(V2,)))
    image = resolve_alias(images, "os/1", "amd64")
    assert image is not None and image.root is None and image.fingerprint == fp(pid, V2, "tar.gz")
    # The clients score unified ("tar.gz") like squashfs, so it beats root.tar.xz of its version.
    images = images_of(product("os", "1", "amd64", "os/1", {V1: ("root.tar.xz",)}, unified=(V1,)))
    assert fingerprint_of(resolve_alias(images, "os/1", "amd64")) == fp(pid, V1, "tar.gz")


def test_shared_alias_goes_to_the_first_release_not_the_newest() -> None:
    # The clients sort by os, release and variant before the serial.
    images = images_of(
        product("os", "2", "amd64", "os/lts", {V2: ("squashfs",)}),
        product("os", "1", "amd64", "os/lts", {V1: ("squashfs",)}),
        product("os", "1", "amd64", "os/lts", {V2: ("squashfs",)}, variant="zz"),
        product("os", "1", "amd64", "os/lts", {V2: ("squashfs",)}, variant="cloud"),
    )
    assert fingerprint_of(resolve_alias(images, "os/lts", "amd64")) == fp("os:1:amd64:cloud", V2, "squashfs")
    order = [(i.release, i.variant) for i in sort_images(images)]
    assert order == [("1", "cloud"), ("1", "default"), ("1", "zz"), ("2", "default")]


def test_sort_order() -> None:
    images = images_of(
        product("b", "1", "arm64", "x", {V1: ("root.tar.xz", "squashfs", "disk-kvm.img", "disk1.img", "uefi1.img")}),
        product("b", "1", "amd64", "x", {V1: ("root.tar.xz",), V2: ("squashfs",)}),
        product("a", "9", "amd64", "x", {V1: ("squashfs",)}),
    )
    order = [(i.os, i.version, i.arch, i.root_ftype) for i in sort_images(images)]
    assert order == [
        ("a", V1, "amd64", "squashfs"),
        ("b", V2, "amd64", "squashfs"),
        ("b", V1, "amd64", "root.tar.xz"),
        ("b", V1, "arm64", "squashfs"),
        ("b", V1, "arm64", "root.tar.xz"),
        ("b", V1, "arm64", "disk-kvm.img"),
        ("b", V1, "arm64", "uefi1.img"),
        ("b", V1, "arm64", "disk1.img"),
    ]


def test_versions_for_and_images_for_product() -> None:
    pid = "os:1:amd64:default"
    images = images_of(
        product("os", "1", "amd64", "os/1", {
            V1: ("squashfs", "root.tar.xz", "disk-kvm.img"),
            "20240301_0000": ("squashfs", "disk-kvm.img"),
            V2: ("squashfs", "root.tar.xz"),
        }),
        product("os", "1", "arm64", "os/1", {V2: ("squashfs",)}),
    )
    newest = resolve_alias(images, "os/1", "amd64")
    assert newest is not None
    assert [i.version for i in versions_for(images, newest)] == ["20240301_0000", V2, V1]
    assert all(i.root_ftype == "squashfs" and i.product == pid for i in versions_for(images, newest))
    assert versions_for(images, newest)[0] == newest
    rootxz = images_for_product(images, pid, "x86_64", "container", "root.tar.xz")
    assert [i.fingerprint for i in rootxz] == [fp(pid, V2, "root.tar.xz"), fp(pid, V1, "root.tar.xz")]
    vms = images_for_product(images, pid, "amd64", "virtual-machine", "disk-kvm.img")
    assert [i.version for i in vms] == ["20240301_0000", V1]
    assert images_for_product(images, pid, "arm64", "container", "squashfs") == []


def test_lxd_arch() -> None:
    assert {name: lxd_arch(name) for name in (
        "amd64", "x86_64", "arm64", "aarch64", "armhf", "armel", "i386", "i686",
        "ppc64el", "ppc64le", "s390x", "riscv64", "loong64",
    )} == {
        "amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
        "armhf": "armv7l", "armel": "armv6l", "i386": "i686", "i686": "i686",
        "ppc64el": "ppc64le", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
        "loong64": "loongarch64",
    }
    for bad in ("", "sparc", "AMD64"):
        with pytest.raises(ValueError):
            lxd_arch(bad)


def test_host_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    for machine, expected in (("x86_64", "x86_64"), ("aarch64", "aarch64"), ("amd64", "x86_64"), ("vax", "vax")):
        monkeypatch.setattr(resolve.platform, "machine", lambda m=machine: m)
        assert host_architecture() == expected


# -- a generated tree -------------------------------------------------------------------------

EXTRA_PRODUCTS = (
    # Two releases sharing "dup": the client picks release 1 although release 2 is newer.
    ProductSpec("dup", "1", arches=("amd64", "arm64"), aliases=("dup", "dup/one"),
                versions=("20240101_0000",), rootxz=False),
    ProductSpec("dup", "2", arches=("amd64", "arm64"), aliases=("dup", "dup/two"),
                versions=("20240301_0000",), rootxz=False),
    ProductSpec("armonly", "1", arches=("arm64",), aliases=("armonly",)),
    # Built with squashfs only; `tree_for_lxc` adds a newer version with root.tar.xz only.
    ProductSpec("xzos", "1", arches=("amd64", "arm64"), aliases=("xzos",), rootxz=False),
)
XZ_NEW = "20240401_0000"


def build_resolve_tree(root: Path) -> Tree:
    tree = build_tree(root, [*DEFAULT_PRODUCTS, *EXTRA_PRODUCTS])
    index = next(i for i, s in enumerate(tree.products) if s.os == "xzos")
    tree.products[index] = evolve(tree.products[index], squashfs=False, rootxz=True)
    tree.add_version("xzos", "1", XZ_NEW)
    return tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return build_resolve_tree(tmp_path_factory.mktemp("resolve-tree"))


def tree_images(tree: Tree) -> list[Image]:
    return parse_images(tree.read(PRODUCTS_PATH))


def test_generated_tree(tree: Tree) -> None:
    images = tree_images(tree)
    checked = 0
    for spec in DEFAULT_PRODUCTS:
        for name in spec.alias_names:
            for arch in ("amd64", "arm64"):
                for image_type in ("container", "virtual-machine"):
                    try:
                        expected: str | None = tree.image(name, arch, image_type).fingerprint
                    except KeyError:
                        expected = None
                    assert fingerprint_of(resolve_alias(images, name, arch, image_type)) == expected
                    assert fingerprint_of(resolve_alias(images, f"{name}/{arch}", lxd_arch(arch), image_type)) == expected
                    checked += expected is not None
    assert checked > 20

    newest = resolve_alias(images, "testos/2.0", "amd64")
    assert newest is not None
    assert (newest.version, newest.root_ftype) == ("20240201_0000", "squashfs")
    vm = resolve_alias(images, "testos/two", "arm64", "virtual-machine")
    assert vm is not None and (vm.version, vm.root_ftype, vm.arch) == ("20240201_0000", "disk-kvm.img", "arm64")
    assert resolve_alias(images, "testos/1.0", "amd64", "virtual-machine") is None
    assert resolve_alias(images, "testos/unified", "arm64") is None

    dup = resolve_alias(images, "dup", "amd64")
    assert dup is not None and dup.release == "1"
    xz = resolve_alias(images, "xzos", "arm64")
    assert xz is not None and (xz.version, xz.root_ftype) == (XZ_NEW, "root.tar.xz")
    assert [i.version for i in versions_for(images, xz)] == [XZ_NEW]
    older = images_for_product(images, xz.product, "arm64", "container", "squashfs")
    assert [i.version for i in older] == ["20240101_0000"]


# -- the real client --------------------------------------------------------------------------

FINGERPRINT_RE = re.compile(rb"^Fingerprint: ([0-9a-f]{64})\s*$", re.MULTILINE)
STREAM_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@needs_lxc
@pytest.mark.lxc
@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_matches_lxc_image_info(tmp_path: Path, tree: Tree) -> None:
    host = host_architecture()
    if host not in STREAM_ARCH:
        pytest.skip(f"the tree has no images for {host}")
    native = STREAM_ARCH[host]
    other = "arm64" if native == "amd64" else "amd64"
    images = tree_images(tree)
    cases: list[tuple[str, str, str]] = [
        (alias, native, image_type)
        for alias in (
            "testos", "testos/1.0", "testos/one", "testos/2.0", "testos/two", "testos/2.0/default",
            "testos/unified", "dup", "dup/one", "dup/two", "xzos",
            f"testos/2.0/{native}", f"testos/two/{native}",
        )
        for image_type in ("container", "virtual-machine")
    ]
    # Medium aliases of the other architecture, and a short one only that architecture has:
    # the client's sole candidate, which resolve_alias gives when asked for that architecture.
    cases += [
        (f"testos/2.0/{other}", other, "container"),
        (f"testos/2.0/{other}", other, "virtual-machine"),
        (f"xzos/{other}", other, "container"),
        ("armonly" if other == "arm64" else "nope", other, "container"),
    ]
    running = start_https_upstream(cast(IReactorSSL, global_reactor), tree.root, make_ca())
    try:
        conf = await lxc_remote(tmp_path, running)
        resolved = 0
        for alias, arch, image_type in cases:
            expected = resolve_alias(images, alias, arch, image_type)
            if expected is None:
                continue
            args = ["image", "info", f"t:{alias}"]
            if image_type == "virtual-machine":
                args.append("--vm")
            match = FINGERPRINT_RE.search(await run_lxc(conf, *args))
            assert match is not None, alias
            assert match.group(1).decode() == expected.fingerprint, (alias, arch, image_type)
            resolved += 1
        assert resolved >= 20
        # What resolve_alias finds nothing for, the client has no alias for either.
        listed = json.loads(await run_lxc(conf, "image", "alias", "list", "t:", "--format", "json"))
        names = {(a["name"], a["type"]) for a in listed}
        missing = [(alias, t) for alias, arch, t in cases if arch == native and resolve_alias(images, alias, arch, t) is None]
        assert ("testos/1.0", "virtual-machine") in missing
        assert not names & set(missing)
        assert resolve_alias(images, "armonly", native) is None
    finally:
        await running.stop()
