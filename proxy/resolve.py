"""Which image an alias names, decided as the LXD and Incus clients decide it for a simplestreams remote.

The clients (shared/simplestreams `applyAliases` and `sort.go`, PROTOCOLS.md §1.6) sort every
image of the remote by the properties `os`, `release`, `variant` (ascending), `serial` (the
version key, descending: newest first) and `architecture` (the stream's name, ascending), ties
going to the preferred root file type: squashfs, root.tar.xz, disk-kvm.img, uefi1.img, disk1.img
(any other type, such as the `tar.gz` of a unified image, counts as squashfs). Walking that order,
each image adds, for each of its product's comma-separated aliases A, the entries `A` and
`A/<stream arch>`, keyed by (name, image type, LXD architecture); the first image to add a key
owns it. So the image an alias resolves to for a type and an architecture is the first image in
that order which has the type and architecture and carries the alias in either form.

Note that the order compares `os` and `release` before the version: should two products with
different releases share an alias, the lower release wins, however new the other one is. This
module does the same, because it must pick what the clients will ask for.

Two things the clients do are left out on purpose. A remote URL starting with
`https://cloud-images.ubuntu.com` makes them drop a leading `ubuntu/` from alias names; a client
of the proxy never has such a URL. And a bare alias looked up without an architecture
(`lxc image info`, `GetImageAlias`) goes to the client's own architecture first, then to one of
its personalities (i686 on x86_64, 32-bit ARM on aarch64) and only then to any other; here the
architecture is always named, as the LXD daemon does when it places an instance
(`GetImageAliasArchitectures`).

Images that compare equal on every key (the same alias in two products of the same os, release,
variant, serial and architecture, or a unified and a squashfs image of one version) are ordered
by chance in the clients: Go's map iteration and its unstable sort. Here the first in catalogue
order wins.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from functools import cmp_to_key

from proxy.catalogue import ARCHITECTURES, Image

CONTAINER = "container"
VIRTUAL_MACHINE = "virtual-machine"

# Root file types in the clients' order of preference; anything else scores as the first.
ROOT_PREFERENCE: tuple[str, ...] = ("squashfs", "root.tar.xz", "disk-kvm.img", "uefi1.img", "disk1.img")


def host_architecture() -> str:
    """The LXD name of this machine's architecture (`x86_64`, `aarch64`, ...).

    The clients take the kernel's machine name as it is; it already is the LXD name on Linux.
    Other spellings (`amd64` on the BSDs) are mapped, and an unknown one is returned unchanged.
    """
    machine = platform.machine()
    return ARCHITECTURES.get(machine, machine)


def lxd_arch(name: str) -> str:
    """The LXD name of an architecture given by its stream or LXD name (`amd64` -> `x86_64`).

    Raises `ValueError` for a name the clients do not know (they skip such products).
    """
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"{name!r} is not an architecture LXD knows") from None


def _root_score(image: Image) -> int:
    ftype = image.root_ftype
    return ROOT_PREFERENCE.index(ftype) if ftype in ROOT_PREFERENCE else 0


def _before(a: Image, b: Image) -> bool:
    """The clients' `sortedImages.Less`, quirks included.

    An empty property is never "before" a set one, and a set one is before an empty one only
    for the serial (the clients' second emptiness test repeats the first, so the other
    properties just compare as strings, and nothing sorts below "").
    """
    for left, right, descending in (
        (a.os, b.os, False),
        (a.release, b.release, False),
        (a.variant, b.variant, False),
        (a.version, b.version, True),
        (a.arch, b.arch, False),
    ):
        if left == right:
            continue
        if left == "":
            return False
        return left > right if descending else left < right
    if a.root_ftype != b.root_ftype:
        return _root_score(a) < _root_score(b)
    return False


def _compare(a: Image, b: Image) -> int:
    if _before(a, b):
        return -1
    if _before(b, a):
        return 1
    return 0


def sort_images(images: Iterable[Image]) -> list[Image]:
    """The images in the order the clients give them aliases (stable for ties)."""
    return sorted(images, key=cmp_to_key(_compare))


def _has_alias(image: Image, alias: str) -> bool:
    return any(alias == name or alias == f"{name}/{image.arch}" for name in image.aliases)


def _first(candidates: Iterable[Image]) -> Image | None:
    """The candidate that sorts first, as a scan: cheaper than sorting a whole catalogue."""
    best: Image | None = None
    for image in candidates:
        if best is None or _before(image, best):
            best = image
    return best


def _canonical_arch(arch: str) -> str | None:
    if not arch:
        return host_architecture()
    return ARCHITECTURES.get(arch)


def resolve_alias(
    images: Sequence[Image], alias: str, arch: str, type: str = CONTAINER
) -> Image | None:
    """The image `alias` names for architecture `arch` and image `type`, or None.

    `alias` is one of a product's aliases (`ubuntu/24.04`) or the same followed by the stream
    architecture (`ubuntu/24.04/amd64`). `arch` is a stream or LXD name (`amd64` or `x86_64`);
    empty means this machine's. `type` is `container` or `virtual-machine`; empty tries
    `container` first, then `virtual-machine`, as `lxc` does without `--vm`. Unified images
    are candidates like split ones. An unknown alias, type or architecture gives None.
    """
    architecture = _canonical_arch(arch)
    if architecture is None:
        return None
    for wanted in (CONTAINER, VIRTUAL_MACHINE) if type == "" else (type,):
        found = _first(
            image
            for image in images
            if image.type == wanted and image.architecture == architecture and _has_alias(image, alias)
        )
        if found is not None:
            return found
    return None


def alias_architectures(images: Sequence[Image], alias: str, type: str = CONTAINER) -> dict[str, Image]:
    """For every LXD architecture that has `alias` for `type`, the image it resolves to.

    This is the clients' `GetImageAliasArchitectures`, which the LXD daemon uses to pick the
    image for the architecture of the member an instance is placed on.
    """
    by_arch: dict[str, Image] = {}
    for image in images:
        if image.type != type or not _has_alias(image, alias):
            continue
        best = by_arch.get(image.architecture)
        if best is None or _before(image, best):
            by_arch[image.architecture] = image
    return by_arch


def images_for_product(
    images: Iterable[Image], product: str, arch: str, type: str, root_ftype: str
) -> list[Image]:
    """The images of `product` with this architecture, type and root ftype, newest first.

    `arch` is a stream or LXD name (empty: this machine's); `root_ftype` is as
    `Image.root_ftype` (`tar.gz` for unified images). Versions that tie keep their catalogue
    order.
    """
    architecture = _canonical_arch(arch)
    matching = [
        image
        for image in images
        if image.product == product
        and image.architecture == architecture
        and image.type == type
        and image.root_ftype == root_ftype
    ]
    # The version key is the clients' serial: newest first is descending string order.
    return sorted(matching, key=lambda image: image.version, reverse=True)


def versions_for(images: Iterable[Image], image: Image) -> list[Image]:
    """Every version of `image` (same product, architecture, type and root ftype), newest first.

    `image` itself is among them when it comes from `images`.
    """
    return images_for_product(images, image.product, image.arch, image.type, image.root_ftype)
