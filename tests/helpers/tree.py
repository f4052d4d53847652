"""A real simplestreams tree on disk, small enough for every test and accepted by the lxc client.

`build_tree(root)` writes image files with the real tools (tarfile for `lxd.tar.xz` and
`rootfs.tar.xz`, `mksquashfs` for `rootfs.squashfs`, `qemu-img` for `disk.qcow2`) under
`images/<os>/<release>/<arch>/<variant>/<version>/`, then `streams/v1/index.json` and
`streams/v1/images.json` describing them with correct sizes, sha256 and combined hashes. The
returned `Tree` knows every file and image, so tests compare against it instead of re-parsing.

Content is a pure function of the specs: the same specs give byte-identical files (fixed
timestamps, owners and modes; `mksquashfs -all-time/-mkfs-time`; gzip without a name or mtime),
except the qcow2 fallback noted in `_qcow2`. Every file of every image differs from every other,
so no two items share a sha256 by accident.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from attrs import define, evolve, field, frozen

INDEX_PATH = "streams/v1/index.json"
PRODUCTS_PATH = "streams/v1/images.json"
INDEX_KEY = "images"
UPDATED = "Mon, 01 Jan 2024 00:00:00 +0000"

# Every timestamp inside generated archives; keeps output reproducible.
FIXED_MTIME = 1704067200  # 2024-01-01T00:00:00Z

CANONICAL_ARCH = {"amd64": "x86_64", "arm64": "aarch64", "armhf": "armv7l", "i386": "i686"}

ImageType = Literal["container", "virtual-machine"]

# Root ftype preference when several images share an alias, type and arch (PROTOCOLS.md §1.6).
ROOT_PREFERENCE = ("squashfs", "root.tar.xz", "disk-kvm.img", "uefi1.img", "disk1.img")


@frozen
class ProductSpec:
    """One product per architecture: `<os>:<release>:<arch>:<variant>`.

    `aliases` is the product's alias list (written comma-separated); empty means
    `os/release/variant` plus `os/release` for the default variant. Each version gets a metadata
    `lxd.tar.xz` and, as enabled, a `squashfs` and a `root.tar.xz` rootfs (container images) and a
    `disk-kvm.img` qcow2 (VM image). `unified` replaces all of that with one
    `lxd_combined.tar.gz`. `deltas` gives every version after the first a `squashfs.vcdiff`
    item from each earlier version (`delta_base`), made with `xdelta3 -e -s OLD NEW` from the
    two `rootfs.squashfs` and named as linuxcontainers names them (`delta-<base>.vcdiff`,
    item `root.<base>.vcdiff`). `incus` adds an `incus.tar.xz` item naming the same metadata file, as
    linuxcontainers publishes. `payload_bytes` adds that many seeded random bytes to the rootfs
    (for streaming tests); such squashfs data is stored uncompressed to keep building fast.
    """

    os: str
    release: str
    arches: tuple[str, ...] = ("amd64", "arm64")
    versions: tuple[str, ...] = ("20240101_0000",)
    variant: str = "default"
    aliases: tuple[str, ...] = ()
    squashfs: bool = True
    rootxz: bool = True
    vm: bool = False
    unified: bool = False
    incus: bool = False
    payload_bytes: int = 0
    requirements: tuple[tuple[str, str], ...] = ()
    deltas: bool = False

    @property
    def alias_names(self) -> tuple[str, ...]:
        if self.aliases:
            return self.aliases
        names = [f"{self.os}/{self.release}/{self.variant}"]
        if self.variant == "default":
            names.append(f"{self.os}/{self.release}")
        return tuple(names)

    def product_id(self, arch: str) -> str:
        return f"{self.os}:{self.release}:{arch}:{self.variant}"


DEFAULT_PRODUCTS: tuple[ProductSpec, ...] = (
    ProductSpec(
        "testos",
        "1.0",
        aliases=("testos/1.0", "testos/1.0/default", "testos/one"),
    ),
    ProductSpec(
        "testos",
        "2.0",
        versions=("20240101_0000", "20240201_0000"),
        aliases=("testos/2.0", "testos/2.0/default", "testos/two", "testos"),
        vm=True,
        requirements=(("secureboot", "false"),),
    ),
    ProductSpec(
        "testos",
        "3.0",
        arches=("amd64",),
        aliases=("testos/3.0", "testos/3.0/default", "testos/unified"),
        unified=True,
    ),
)


def big_product(payload_bytes: int) -> ProductSpec:
    """A single amd64 container image whose squashfs carries `payload_bytes` random bytes."""
    return ProductSpec(
        "bigos",
        "1.0",
        arches=("amd64",),
        aliases=("bigos/1.0", "bigos"),
        rootxz=False,
        payload_bytes=payload_bytes,
    )


@frozen
class FileItem:
    """A file of the tree, by its path relative to the tree root (= the remote base URL)."""

    path: str
    sha256: str
    size: int
    ftype: str = ""
    delta_base: str = ""


@frozen
class TreeImage:
    """An image as the clients list it (see `proxy.catalogue.Image`)."""

    fingerprint: str
    type: ImageType
    arch: str
    product: str
    os: str
    release: str
    variant: str
    version: str
    aliases: tuple[str, ...]
    meta: FileItem
    root: FileItem | None
    # The root's deltas from earlier versions (not among `files`: a client fetches one of them
    # instead of the root, and only when it holds the base).
    deltas: tuple[FileItem, ...] = ()

    def delta_from(self, base: str) -> FileItem:
        for delta in self.deltas:
            if delta.delta_base == base:
                return delta
        raise KeyError(f"{self.version} has no delta from {base}")

    @property
    def files(self) -> tuple[FileItem, ...]:
        return (self.meta,) if self.root is None else (self.meta, self.root)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@frozen
class _BuiltVersion:
    """What one (product, arch, version) contributes: catalogue items, files, images."""

    items: dict[str, dict[str, object]]
    files: tuple[FileItem, ...]
    images: tuple[TreeImage, ...]


@define
class Tree:
    """A simplestreams tree on disk and everything a test needs to know about it."""

    root: Path
    products: list[ProductSpec]
    index: FileItem = field(default=FileItem(INDEX_PATH, "", 0))
    products_file: FileItem = field(default=FileItem(PRODUCTS_PATH, "", 0))
    _built: dict[tuple[str, str, str], _BuiltVersion] = field(factory=dict)

    # -- reading ------------------------------------------------------------------------------

    @property
    def images(self) -> list[TreeImage]:
        """Every listed image, in catalogue order."""
        return [image for built in self._ordered() for image in built.images]

    @property
    def files(self) -> dict[str, FileItem]:
        """Every image file by path (metadata JSON files are `index` and `products_file`)."""
        return {f.path: f for built in self._ordered() for f in built.files}

    def path_of(self, item: FileItem | str) -> Path:
        """The on-disk location of a tree path."""
        return self.root / (item if isinstance(item, str) else item.path)

    def read(self, item: FileItem | str) -> bytes:
        return self.path_of(item).read_bytes()

    def file(self, path: str) -> FileItem:
        """Any file the tree serves by its path, JSON files included; KeyError if unknown."""
        if path == self.index.path:
            return self.index
        if path == self.products_file.path:
            return self.products_file
        return self.files[path]

    def image(self, alias: str, arch: str = "amd64", type: ImageType = "container") -> TreeImage:
        """The image a client resolves `alias` to: newest version, then preferred root ftype."""
        candidates = [
            image
            for image in self.images
            if alias in image.aliases and image.arch == arch and image.type == type
        ]
        if not candidates:
            raise KeyError(f"no {type} image for alias {alias!r} on {arch}")
        return max(candidates, key=lambda image: (image.version, -_root_rank(image)))

    def image_by_fingerprint(self, fingerprint: str) -> TreeImage:
        for image in self.images:
            if image.fingerprint == fingerprint:
                return image
        raise KeyError(fingerprint)

    def images_of(self, os: str, release: str, version: str | None = None) -> list[TreeImage]:
        return [
            image
            for image in self.images
            if image.os == os
            and image.release == release
            and (version is None or image.version == version)
        ]

    # -- changing -----------------------------------------------------------------------------

    def add_version(
        self,
        os: str,
        release: str,
        version: str,
        variant: str = "default",
        write: bool = True,
    ) -> list[TreeImage]:
        """Build `version` for every arch of the product and (unless `write=False`) rewrite
        the catalogue; returns the new images."""
        index, spec = self._spec(os, release, variant)
        if version in spec.versions:
            raise ValueError(f"{os}/{release} already has version {version}")
        spec = evolve(spec, versions=(*spec.versions, version))
        self.products[index] = spec
        new: list[TreeImage] = []
        for arch in spec.arches:
            built = _build_version(self.root, spec, arch, version, spec.versions[:-1])
            self._built[(spec.product_id(arch), version, arch)] = built
            new.extend(built.images)
        if write:
            self.write_catalogue()
        return new

    def remove_version(
        self,
        os: str,
        release: str,
        version: str,
        variant: str = "default",
        write: bool = True,
        delete_files: bool = False,
    ) -> None:
        """Drop `version` from the catalogue (its files stay unless `delete_files`)."""
        index, spec = self._spec(os, release, variant)
        if version not in spec.versions:
            raise KeyError(f"{os}/{release} has no version {version}")
        self.products[index] = evolve(
            spec, versions=tuple(v for v in spec.versions if v != version)
        )
        for arch in spec.arches:
            built = self._built.pop((spec.product_id(arch), version, arch))
            if delete_files:
                for f in built.files:
                    self.path_of(f).unlink(missing_ok=True)
        if write:
            self.write_catalogue()

    def write_catalogue(self) -> None:
        """(Re)write images.json then index.json from the current state, atomically each."""
        products: dict[str, object] = {}
        for spec in self.products:
            for arch in spec.arches:
                product: dict[str, object] = {
                    "aliases": ",".join(spec.alias_names),
                    "arch": arch,
                    "os": spec.os,
                    "release": spec.release,
                    "release_title": spec.release,
                    "variant": spec.variant,
                    "versions": {
                        version: {"items": self._built[(spec.product_id(arch), version, arch)].items}
                        for version in spec.versions
                    },
                }
                if spec.requirements:
                    product["requirements"] = dict(spec.requirements)
                products[spec.product_id(arch)] = product
        products_doc = {
            "content_id": INDEX_KEY,
            "datatype": "image-downloads",
            "format": "products:1.0",
            "updated": UPDATED,
            "products": products,
        }
        self.products_file = _write_json(self.root, PRODUCTS_PATH, products_doc)
        index_doc = {
            "format": "index:1.0",
            "updated": UPDATED,
            "index": {
                INDEX_KEY: {
                    "datatype": "image-downloads",
                    "path": PRODUCTS_PATH,
                    "format": "products:1.0",
                    "updated": UPDATED,
                    "products": list(products),
                }
            },
        }
        self.index = _write_json(self.root, INDEX_PATH, index_doc)

    # -- internals ----------------------------------------------------------------------------

    def _spec(self, os: str, release: str, variant: str) -> tuple[int, ProductSpec]:
        for i, spec in enumerate(self.products):
            if (spec.os, spec.release, spec.variant) == (os, release, variant):
                return i, spec
        raise KeyError(f"no product {os}/{release}/{variant}")

    def _ordered(self) -> Iterable[_BuiltVersion]:
        for spec in self.products:
            for arch in spec.arches:
                for version in spec.versions:
                    yield self._built[(spec.product_id(arch), version, arch)]


def build_tree(
    root: Path,
    products: Iterable[ProductSpec] | None = None,
    big_rootfs_bytes: int = 0,
) -> Tree:
    """Write a complete tree under `root` (created if needed) and describe it.

    `products` defaults to `DEFAULT_PRODUCTS`: testos 1.0 and 2.0 on amd64 and arm64 (2.0 with
    two versions and VM images), and a unified testos 3.0 on amd64. `big_rootfs_bytes` adds
    `big_product(big_rootfs_bytes)` ("bigos/1.0").
    """
    specs = list(DEFAULT_PRODUCTS if products is None else products)
    if big_rootfs_bytes:
        specs.append(big_product(big_rootfs_bytes))
    root.mkdir(parents=True, exist_ok=True)
    tree = Tree(root=root, products=specs)
    for spec in specs:
        for arch in spec.arches:
            for n, version in enumerate(spec.versions):
                tree._built[(spec.product_id(arch), version, arch)] = _build_version(
                    root, spec, arch, version, spec.versions[:n]
                )
    tree.write_catalogue()
    return tree


# -- building files ---------------------------------------------------------------------------


def _root_rank(image: TreeImage) -> int:
    ftype = image.root.ftype if image.root is not None else ""
    return ROOT_PREFERENCE.index(ftype) if ftype in ROOT_PREFERENCE else len(ROOT_PREFERENCE)


def _sha256_file(*paths: Path) -> str:
    """sha256 of the concatenated files, read in 1 MiB steps."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _write_json(root: Path, path: str, doc: object) -> FileItem:
    data = json.dumps(doc, indent=1).encode() + b"\n"
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    # A rename gives the new file a new inode, so the upstream's ETag changes with it.
    os.replace(tmp, target)
    return FileItem(path, hashlib.sha256(data).hexdigest(), len(data))


def _version_date(version: str) -> datetime:
    try:
        return datetime.strptime(version[:13], "%Y%m%d_%H%M").replace(tzinfo=timezone.utc)
    except ValueError:
        return datetime.strptime(version[:8], "%Y%m%d").replace(tzinfo=timezone.utc)


def _metadata_yaml(spec: ProductSpec, arch: str, version: str) -> bytes:
    # JSON strings are valid YAML scalars and keep "1.0" a string.
    q = json.dumps
    created = int(_version_date(version).timestamp())
    description = f"{spec.os} {spec.release} {arch} ({version})"
    return (
        f"architecture: {q(CANONICAL_ARCH.get(arch, arch))}\n"
        f"creation_date: {created}\n"
        "properties:\n"
        f"  architecture: {q(arch)}\n"
        f"  description: {q(description)}\n"
        f"  os: {q(spec.os)}\n"
        f"  release: {q(spec.release)}\n"
        f"  serial: {q(version)}\n"
        f"  variant: {q(spec.variant)}\n"
        "templates: {}\n"
    ).encode()


def _rootfs_files(spec: ProductSpec, arch: str, version: str) -> dict[str, bytes]:
    identity = f"{spec.os} {spec.release} {spec.variant} {arch} {version}"
    files = {
        "etc/hostname": f"{spec.os}\n".encode(),
        "etc/os-release": (
            f'NAME="{spec.os}"\nVERSION_ID="{spec.release}"\nBUILD_ID="{version}"\n'
        ).encode(),
        "etc/image-identity": f"{identity}\n".encode(),
        "bin/.keep": b"",
    }
    if spec.payload_bytes:
        files["payload.bin"] = random.Random(identity).randbytes(spec.payload_bytes)
    return files


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = mode
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _tar_tree(tar: tarfile.TarFile, files: dict[str, bytes], prefix: str = "") -> None:
    dirs: set[str] = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                _tar_add(tar, prefix + d, None, 0o755)
        _tar_add(tar, prefix + name, files[name], 0o644)


def _metadata_tar(path: Path, metadata: bytes) -> None:
    with tarfile.open(path, "w:xz") as tar:
        _tar_add(tar, "metadata.yaml", metadata, 0o644)
        _tar_add(tar, "templates", None, 0o755)


def _rootxz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:xz") as tar:
        _tar_tree(tar, files)


def _unified(path: Path, metadata: bytes, files: dict[str, bytes]) -> None:
    # GzipFile with an empty name and mtime 0 writes a reproducible header.
    with path.open("wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            _tar_add(tar, "metadata.yaml", metadata, 0o644)
            _tar_add(tar, "templates", None, 0o755)
            _tar_add(tar, "rootfs", None, 0o755)
            _tar_tree(tar, files, prefix="rootfs/")


def _squashfs(path: Path, files: dict[str, bytes], uncompressed: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="tree-rootfs-") as scratch:
        base = Path(scratch) / "rootfs"
        for name, data in files.items():
            target = base / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        for dirpath, dirnames, filenames in os.walk(base):
            os.chmod(dirpath, 0o755)
            for filename in filenames:
                os.chmod(os.path.join(dirpath, filename), 0o644)
        args = [
            "mksquashfs",
            str(base),
            str(path),
            "-noappend",
            "-quiet",
            "-no-progress",
            "-no-xattrs",
            "-all-root",
            "-mkfs-time",
            "0",
            "-all-time",
            str(FIXED_MTIME),
        ]
        if uncompressed:
            args += ["-noD", "-noF"]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def have_qemu_img() -> bool:
    return shutil.which("qemu-img") is not None


def _qcow2(path: Path, identity: bytes) -> None:
    """A real qcow2 whose one data cluster holds `identity`.

    Without qemu-img, a stand-in with the qcow2 magic: enough for anything that only moves bytes.
    """
    disk = identity.ljust(64 * 1024, b"\0")
    if not have_qemu_img():
        path.write_bytes(b"QFI\xfb" + disk[:4092])
        return
    with tempfile.TemporaryDirectory(prefix="tree-disk-") as scratch:
        raw = Path(scratch) / "disk.raw"
        raw.write_bytes(disk)
        subprocess.run(
            [
                "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                "-o", "cluster_size=4096", str(raw), str(path),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )


def _vcdiff(source: Path, target: Path, delta: Path) -> None:
    """The real delta LXD applies with `xdelta3 -d -s`. `-A=` leaves the file names out of the
    delta's application header, so that it depends on the two files' bytes only."""
    if shutil.which("xdelta3") is None:
        raise RuntimeError("xdelta3 is not installed (apt-get install xdelta3): deltas cannot be built")
    subprocess.run(
        ["xdelta3", "-e", "-f", "-A=", "-s", str(source), str(target), str(delta)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _build_version(
    root: Path, spec: ProductSpec, arch: str, version: str, earlier: tuple[str, ...] = ()
) -> _BuiltVersion:
    base = f"images/{spec.os}/{spec.release}/{arch}/{spec.variant}/{version}"
    directory = root / base
    directory.mkdir(parents=True, exist_ok=True)
    metadata = _metadata_yaml(spec, arch, version)
    rootfs = _rootfs_files(spec, arch, version)
    product = spec.product_id(arch)

    def file_item(name: str, ftype: str, delta_base: str = "") -> FileItem:
        local = directory / name
        return FileItem(f"{base}/{name}", _sha256_file(local), local.stat().st_size, ftype, delta_base)

    def image(
        fingerprint: str, type: ImageType, meta: FileItem, root: FileItem | None,
        deltas: tuple[FileItem, ...] = (),
    ) -> TreeImage:
        return TreeImage(
            fingerprint=fingerprint,
            type=type,
            arch=arch,
            product=product,
            os=spec.os,
            release=spec.release,
            variant=spec.variant,
            version=version,
            aliases=spec.alias_names,
            meta=meta,
            root=root,
            deltas=deltas,
        )

    def entry(item: FileItem, **extra: str) -> dict[str, object]:
        return {"ftype": item.ftype, "path": item.path, "sha256": item.sha256, "size": item.size, **extra}

    if spec.unified:
        _unified(directory / "lxd_combined.tar.gz", metadata, rootfs)
        item = file_item("lxd_combined.tar.gz", "lxd_combined.tar.gz")
        return _BuiltVersion(
            items={"lxd_combined.tar.gz": entry(item)},
            files=(item,),
            images=(image(item.sha256, "container", item, None),),
        )

    _metadata_tar(directory / "lxd.tar.xz", metadata)
    meta = file_item("lxd.tar.xz", "lxd.tar.xz")
    roots: list[tuple[str, FileItem]] = []
    if spec.squashfs:
        _squashfs(directory / "rootfs.squashfs", rootfs, uncompressed=spec.payload_bytes > 0)
        roots.append(("rootfs.squashfs", file_item("rootfs.squashfs", "squashfs")))
    if spec.rootxz:
        _rootxz(directory / "rootfs.tar.xz", rootfs)
        roots.append(("rootfs.tar.xz", file_item("rootfs.tar.xz", "root.tar.xz")))
    if spec.vm:
        _qcow2(directory / "disk.qcow2", f"{product} {version} disk\n".encode())
        roots.append(("disk.qcow2", file_item("disk.qcow2", "disk-kvm.img")))
    deltas: list[tuple[str, FileItem]] = []
    if spec.deltas and spec.squashfs:
        for older in earlier:
            name = f"delta-{older}.vcdiff"
            source = root / f"images/{spec.os}/{spec.release}/{arch}/{spec.variant}/{older}/rootfs.squashfs"
            _vcdiff(source, directory / "rootfs.squashfs", directory / name)
            deltas.append((f"root.{older}.vcdiff", file_item(name, "squashfs.vcdiff", older)))

    combined: dict[str, str] = {}
    images: list[TreeImage] = []
    for _name, root_item in roots:
        fingerprint = _sha256_file(root / meta.path, root / root_item.path)
        field_name = {
            "squashfs": "combined_squashfs_sha256",
            "root.tar.xz": "combined_rootxz_sha256",
            "disk-kvm.img": "combined_disk-kvm-img_sha256",
        }[root_item.ftype]
        combined[field_name] = fingerprint
        if root_item.ftype == "root.tar.xz":
            combined["combined_sha256"] = fingerprint
        image_type: ImageType = "virtual-machine" if root_item.ftype == "disk-kvm.img" else "container"
        own = tuple(d for _, d in deltas) if root_item.ftype == "squashfs" else ()
        images.append(image(fingerprint, image_type, meta, root_item, own))

    items: dict[str, dict[str, object]] = {"lxd.tar.xz": entry(meta, **combined)}
    if spec.incus:
        items["incus.tar.xz"] = {**entry(meta, **combined), "ftype": "incus.tar.xz"}
    for name, root_item in roots:
        items[name] = entry(root_item)
    for key, delta in deltas:
        items[key] = entry(delta, delta_base=delta.delta_base)
    files = (meta, *(r for _, r in roots), *(d for _, d in deltas))
    return _BuiltVersion(items=items, files=files, images=tuple(images))
