"""Each upstream's images as the LXD image API and URL import list and open them.

An L{ImageSource} is one upstream seen as an LXD server sees its images: a simplestreams
upstream through its catalogue (L{SimplestreamsImages}), an LXD server through its image list
and the files its exports taught (L{LxdRemoteImages}). L{FaceCatalogue} is the catalogue of the
listed upstreams that the LXD face publishes, rebuilt only when one of them changed.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime, timezone
from typing import Mapping, Protocol, Sequence

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from proxy.blobs import BlobStore
from proxy.catalogue import ARCHITECTURES, Family, Image, Item
from proxy.downloads import Fetcher
from proxy.errors import NotFound, ProxyError
from proxy.export import ExportPart, export_parts
from proxy.files import CacheFiles, await_start
from proxy.index import CacheIndex, ImageParts
from proxy.lxd_model import LxdCatalogue
from proxy.lxd_remote import (
    LxdRemote,
    RemoteImage,
    base_product,
    image_item_path,
    meta_filename,
    root_filename,
    unified_filename,
    version_base,
)
from proxy.metadata import INDEX_PATH, SimplestreamsMetadata


class ImageSource(Protocol):
    """One upstream as the LXD face (and URL import) sees it."""

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    async def images(self, family: Family) -> tuple[object, list[Image]]:
        """The upstream's images for C{family}, and a key that changes when they change."""

    async def missing_parts(self, image: Image) -> list[ExportPart]:
        """
        The export parts of C{image}, some of whose files are not stored: started (or joined)
        downloads, once the upstream has accepted them or the grace for that has run out.
        """


class SimplestreamsImages:
    """The images of a simplestreams upstream, from its (cached, refreshed) catalogue."""

    def __init__(
        self,
        metadata: SimplestreamsMetadata,
        files: CacheFiles,
        *,
        families: Mapping[Family, SimplestreamsMetadata] | None = None,
    ) -> None:
        self._metadata = metadata
        self._families: dict[Family, SimplestreamsMetadata] = dict(families or {metadata.family: metadata})
        self._files = files

    @property
    def name(self) -> str:
        return self._metadata.name

    @property
    def url(self) -> str:
        return self._metadata.base_url

    @property
    def protocol(self) -> str:
        return "simplestreams"

    async def images(self, family: Family) -> tuple[object, list[Image]]:
        metadata = self._families.get(family, self._metadata)
        if metadata.offline:
            # The request that may probe the upstream does; the copy serves if it is still down.
            with suppress(ProxyError):
                await metadata.get(INDEX_PATH)
        offline = metadata.offline
        if offline:
            paths = await metadata.products_paths(refresh=False)
        else:
            await metadata.get(INDEX_PATH)
            paths = await metadata.products_paths()
        images: list[Image] = []
        key: list[object] = [offline]
        for path in paths:
            try:
                record = await metadata.get(path)
            except ProxyError:
                if offline:
                    # A products file never fetched lists nothing that can be served.
                    continue
                raise
            key.append(record.sha256)
            # Parsed once per copy, off the reactor, by the catalogue itself.
            images.extend(await metadata.products_images(path, family, refresh=False))
        if offline:
            # As the simplestreams face does while offline: only images that can be served.
            images = [i for i in images if self._files.stored(i.files)]
            key.append(frozenset(i.fingerprint for i in images))
        return tuple(key), images

    async def missing_parts(self, image: Image) -> list[ExportPart]:
        sources = [await self._files.source(self.name, item) for item in image.files]
        return export_parts(image, sources[0], sources[1] if len(sources) > 1 else None)


class LxdRemoteImages:
    """
    The images of an upstream of protocol C{lxd}: every public image it lists, with its files
    as far as an earlier export taught them (L{CacheIndex.get_parts}).
    """

    def __init__(
        self,
        remote: LxdRemote,
        fetcher: Fetcher,
        store: BlobStore,
        index: CacheIndex,
        clock: IReactorTime,
    ) -> None:
        self._remote = remote
        self._fetcher = fetcher
        self._store = store
        self._index = index
        self._clock = clock
        self._by_fingerprint: dict[str, RemoteImage] = {}

    @property
    def name(self) -> str:
        return self._remote.name

    @property
    def url(self) -> str:
        return self._remote.base_url

    @property
    def protocol(self) -> str:
        return "lxd"

    async def images(self, family: Family) -> tuple[object, list[Image]]:
        if self._remote.offline:
            with suppress(ProxyError):
                await self._remote.images()
        offline = self._remote.offline
        remote_images = await self._remote.images(refresh=not offline)
        self._by_fingerprint = {r.fingerprint: r for r in remote_images}
        images: list[Image] = []
        known: list[object] = []
        for remote in remote_images:
            arch = remote.arch
            if arch is None:
                continue
            parts = self._index.get_parts(remote.fingerprint)
            known.append(parts)
            image = _image_of(remote, arch, parts)
            if offline and not (
                parts is not None and all(self._store.exists(i.sha256) for i in image.files)
            ):
                continue
            images.append(image)
        return (offline, tuple(r.fingerprint for r in remote_images), tuple(known)), images

    async def missing_parts(self, image: Image) -> list[ExportPart]:
        remote = self._by_fingerprint.get(image.fingerprint)
        if remote is None:
            raise NotFound(f"{self.name}: image {image.fingerprint} is no longer listed")
        download = self._fetcher.get_image(self.name, remote)
        await await_start(download, self._clock)
        fp = image.fingerprint
        if download.kind == "unified":
            return [ExportPart("metadata", unified_filename(fp), download.unified)]
        if download.kind is None:
            # The upstream has not answered within the grace: the client gets its headers
            # now, and the shape expected.
            if remote.presumed_unified:
                return [ExportPart("metadata", unified_filename(fp), download.unified)]
        root_name = "rootfs.img" if remote.type == "virtual-machine" else "rootfs"
        root_ftype = image.root.ftype if image.root is not None else (
            "disk-kvm.img" if remote.type == "virtual-machine" else "squashfs"
        )
        return [
            ExportPart("metadata", meta_filename(fp), download.meta),
            ExportPart(root_name, root_filename(fp, root_ftype), download.root),
        ]


def _image_of(remote: RemoteImage, arch: str, parts: ImageParts | None) -> Image:
    """
    A catalogue image for an LXD upstream's image: with its real files when they are known,
    else with one placeholder file of the whole size and no hash (never looked up in the store).
    """
    fp = remote.fingerprint
    product = base_product(remote)
    version = version_base(remote)
    if parts is None:
        meta = Item(remote.filename or unified_filename(fp), "", remote.size, "lxd_combined.tar.gz", product, version)
        root = None
    elif parts.root_sha256 is None:
        meta = Item(image_item_path(fp, unified_filename(fp)), parts.meta_sha256, parts.meta_size,
                    "lxd_combined.tar.gz", product, version)
        root = None
    else:
        meta = Item(image_item_path(fp, meta_filename(fp, parts.meta_ftype)), parts.meta_sha256,
                    parts.meta_size, parts.meta_ftype, product, version)
        root = Item(image_item_path(fp, root_filename(fp, parts.root_ftype)), parts.root_sha256,
                    parts.root_size, parts.root_ftype, product, version)
    return Image(
        fingerprint=fp,
        type=remote.type,
        arch=arch,
        product=product,
        version=remote.prop("serial") or version,
        aliases=remote.aliases,
        meta=meta,
        root=root,
        architecture=ARCHITECTURES.get(remote.architecture, remote.architecture),
        os=remote.prop("os"),
        release=remote.prop("release"),
        release_title=remote.prop("release") or remote.prop("version"),
        variant=remote.prop("variant"),
        label=remote.prop("label"),
        os_version=remote.prop("version"),
        created_at=remote.created_at or _EPOCH,
        expires_at=remote.expires_at or _EPOCH,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@frozen
class _Built:
    key: object
    catalogue: LxdCatalogue


class FaceCatalogue:
    """The L{LxdCatalogue} of the listed upstreams, rebuilt only when one of them changed."""

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        self._sources = list(sources)
        # By family and the upstreams a client may use (None: all of them).
        self._built: dict[tuple[Family, frozenset[str] | None], _Built] = {}

    @property
    def sources(self) -> list[ImageSource]:
        return list(self._sources)

    def source(self, name: str) -> ImageSource:
        for source in self._sources:
            if source.name == name:
                return source
        raise NotFound(f"no upstream named {name!r} is listed here")

    async def get(self, family: Family, usable: frozenset[str] | None = None) -> LxdCatalogue:
        """
        The catalogue of the listed upstreams for C{family}; with C{usable}, of those of them
        named there only (the others are not even asked: a client that may not use an
        upstream causes it no traffic).
        """
        keys: list[object] = []
        published: list[tuple[str, list[Image]]] = []
        for source in self._sources:
            if usable is not None and source.name not in usable:
                continue
            key, images = await source.images(family)
            keys.append(key)
            published.append((source.name, images))
        key = tuple(keys)
        built = self._built.get((family, usable))
        if built is None or built.key != key:
            built = _Built(key, LxdCatalogue(published))
            self._built[(family, usable)] = built
        return built.catalogue


__all__ = ["FaceCatalogue", "ImageSource", "LxdRemoteImages", "SimplestreamsImages"]
