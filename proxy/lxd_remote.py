"""An LXD or Incus server with public images, read as if it were a simplestreams upstream.

An upstream with C{protocol = "lxd"} publishes its images through the LXD REST API
(PROTOCOLS.md §2): C{GET /1.0/images?recursion=1} lists them, C{GET /1.0/images/FP/export}
sends their files. L{LxdRemote} keeps the list with the same TTL, revalidation, stale-if-error,
one-refresh-at-a-time and health rules as an upstream's index (an L{UpstreamFiles} of the
list's path), and from it synthesises a C{streams/v1/index.json} and a
C{streams/v1/images.json} that the LXD client accepts, stored as metadata records like an
upstream's own and read by an L{UpstreamMetadata}. So the simplestreams face, the prefetcher,
pins and the admin command treat it as any other upstream (a L{SimplestreamsMetadata}).

What the list cannot say, the export teaches: the API gives an image's fingerprint (the sha256
of all its files together) and total size, never the sha256 and size of each file of a split
image. A split image is therefore listed only once L{proxy.downloads.Fetcher} has
downloaded it once and recorded its L{ImageParts}; a unified image's one file is the
fingerprint itself, so it is listed at once.

Catalogue shape (PROTOCOLS.md §1.3-1.5): one product per (os, release, arch, variant, type),
C{<os>:<release>:<arch>:<variant>} (VMs add C{:vm}), whose C{aliases} are those of its newest
image; an aliased image that is not the newest of its product gets a product of its own
(C{<product>:<fingerprint[:12]>}), so that every LXD alias resolves to exactly its own target.
Every image is one version, keyed C{YYYYMMDD_HHMM} from its C{created_at} (with
C{.<fingerprint[:12]>} when two images of a product share the minute), and its files are
C{images/<fingerprint>/meta-<fingerprint>.tar.xz} plus C{images/<fingerprint>/<fingerprint><ext>},
or C{images/<fingerprint>/<fingerprint>.tar.gz} for a unified image.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy import jsonsteps
from proxy.blobs import BlobStore, is_sha256
from proxy.catalogue import (
    ARCHITECTURES,
    COMBINED_HASH_FIELDS,
    FILE_EXTENSIONS,
    LEGACY_ROOTXZ_FIELD,
    META_FTYPE,
    UNIFIED_FTYPE,
    VM_ROOT_FTYPES,
    CatalogueError,
    Family,
    Image,
    Item,
)
from proxy.health import UpstreamHealth
from proxy.errors import NotFound
from proxy.index import CacheIndex, ImageParts, MetadataRecord
from proxy.metadata import INDEX_PATH, ParsedOnce, UpstreamFiles, UpstreamMetadata
from proxy.metrics import NO_METRICS, Metrics
from proxy.metadata_store import MetadataStore
from proxy.work import Run, heavy, inline
from proxy.upstream import UpstreamClient

# The upstream's image list, relative to its base URL; also the path of its copy in the index.
API_PATH = "1.0/images?recursion=1"
PRODUCTS_PATH = "streams/v1/images.json"
SYNTHESISED_PATHS = frozenset({INDEX_PATH, PRODUCTS_PATH})

ImageType = Literal["container", "virtual-machine"]

# Root ftypes a split image can be listed with.
ROOT_FTYPES = frozenset(COMBINED_HASH_FIELDS)
UNIFIED_EXTENSION = ".tar.gz"

# The stream name of each architecture LXD reports (the names images.lxd.canonical.com uses);
# an architecture not here is listed under its LXD name, which the clients accept too.
_STREAM_ARCH: Mapping[str, str] = {
    "x86_64": "amd64",
    "i686": "i386",
    "aarch64": "arm64",
    "armv7l": "armhf",
    "armv6l": "armel",
    "ppc64le": "ppc64el",
    "loongarch64": "loong64",
}

_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?"
)


@frozen
class RemoteImage:
    """
    One public image of an LXD upstream, as its C{/1.0/images?recursion=1} describes it.

    @ivar architecture: LXD's name (C{x86_64}); C{arch} is the stream name it is listed under.
    @ivar properties: the image's properties, sorted by name.
    @ivar aliases: the names of its aliases on the upstream, in the upstream's order.
    @ivar created_at: None when absent or not a date (Go's zero time is a date: year 1).
    """

    fingerprint: str
    size: int
    type: ImageType = "container"
    architecture: str = ""
    filename: str = ""
    properties: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()
    created_at: datetime | None = None
    uploaded_at: datetime | None = None
    expires_at: datetime | None = None

    def prop(self, name: str) -> str:
        for key, value in self.properties:
            if key == name:
                return value
        return ""

    @property
    def arch(self) -> str | None:
        """The stream architecture name, or None for an architecture the clients do not know."""
        canonical = ARCHITECTURES.get(self.architecture)
        if canonical is None:
            return None
        declared = self.prop("architecture")
        if declared and ARCHITECTURES.get(declared) == canonical:
            return declared
        return _STREAM_ARCH.get(canonical, canonical)

    @property
    def presumed_unified(self) -> bool:
        """
        Whether the image is taken for unified before its export has been seen.

        Images an LXD server fetched from a simplestreams server carry the root ftype (or
        C{tar.gz} for a unified image) as their C{type} property; images made with
        C{lxc publish} carry none and are unified tarballs. An export that turns out
        otherwise teaches the truth (L{ImageParts}), which then wins.
        """
        return self.prop("type") not in ROOT_FTYPES


# -- the image list ----------------------------------------------------------------------------


def parse_remote_images(body: bytes) -> list[RemoteImage]:
    """
    The images of an LXD C{/1.0/images?recursion=1} answer.

    Entries an LXD client could not use are skipped (no full fingerprint, no size, not
    public); a body that is not a sync envelope holding a list raises L{CatalogueError}.
    """
    try:
        doc = jsonsteps.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise CatalogueError(f"image list is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CatalogueError("image list is not an LXD response envelope")
    if doc.get("type") != "sync":
        error = doc.get("error") if isinstance(doc.get("error"), str) else ""
        raise CatalogueError(f"image list is not a sync response: {error or doc.get('type')!r}")
    metadata = doc.get("metadata")
    if metadata is None:
        return []
    if not isinstance(metadata, list):
        raise CatalogueError("image list: metadata is not a list")
    images: list[RemoteImage] = []
    seen: set[str] = set()
    for entry in metadata:
        image = _remote_image(entry)
        if image is not None and image.fingerprint not in seen:
            seen.add(image.fingerprint)
            images.append(image)
    return images


def _remote_image(entry: object) -> RemoteImage | None:
    if not isinstance(entry, dict):
        return None
    fingerprint = entry.get("fingerprint")
    size = entry.get("size")
    if not is_sha256(fingerprint) or isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return None
    assert isinstance(fingerprint, str)
    if entry.get("public") is False:
        return None
    raw_properties = entry.get("properties")
    properties: dict[str, str] = {}
    if isinstance(raw_properties, dict):
        properties = {k: v for k, v in raw_properties.items() if isinstance(k, str) and isinstance(v, str)}
    aliases: list[str] = []
    raw_aliases = entry.get("aliases")
    if isinstance(raw_aliases, list):
        for alias in raw_aliases:
            name = alias.get("name") if isinstance(alias, dict) else None
            # A comma would split the product's alias string; such a name cannot be listed.
            if isinstance(name, str) and name and "," not in name and name not in aliases:
                aliases.append(name)
    image_type: ImageType = "virtual-machine" if entry.get("type") == "virtual-machine" else "container"
    return RemoteImage(
        fingerprint=fingerprint,
        size=size,
        type=image_type,
        architecture=_text(entry.get("architecture")),
        filename=_text(entry.get("filename")),
        properties=tuple(sorted(properties.items())),
        aliases=tuple(aliases),
        created_at=_parse_time(entry.get("created_at")),
        uploaded_at=_parse_time(entry.get("uploaded_at")),
        expires_at=_parse_time(entry.get("expires_at")),
    )


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _parse_time(value: object) -> datetime | None:
    """An RFC 3339 time as Go writes it (nanoseconds, Z or an offset), in UTC."""
    if not isinstance(value, str):
        return None
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        when = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro)
    except ValueError:
        return None
    if zone and zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        offset = sign * (int(zone[1:3]) * 60 + int(zone[4:6]))
        try:
            return when.replace(tzinfo=timezone.utc) - timedelta(minutes=offset)
        except OverflowError:
            return None
    return when.replace(tzinfo=timezone.utc)


# -- file names --------------------------------------------------------------------------------


def meta_filename(fingerprint: str, ftype: str = "lxd.tar.xz") -> str:
    """The metadata file's name, as LXD names the export's C{metadata} part."""
    return f"meta-{fingerprint}{FILE_EXTENSIONS.get(ftype, '')}"


def root_filename(fingerprint: str, ftype: str) -> str:
    """The root file's name, as LXD names the export's C{rootfs} part."""
    return f"{fingerprint}{FILE_EXTENSIONS.get(ftype, '')}"


def unified_filename(fingerprint: str) -> str:
    return f"{fingerprint}{UNIFIED_EXTENSION}"


def image_item_path(fingerprint: str, filename: str) -> str:
    """Where a file of an image is listed, relative to the upstream's C{/NAME/}."""
    return f"images/{fingerprint}/{filename}"


def split_image_item_path(path: str) -> tuple[str, str] | None:
    """C{(fingerprint, filename)} of a listed file's path, or None for any other path."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != "images" or not is_sha256(parts[1]) or not parts[2]:
        return None
    return parts[1], parts[2]


def item_role(path: str) -> tuple[str, Literal["meta", "root", "unified"]] | None:
    """The image a listed file belongs to, and which of its files it is."""
    found = split_image_item_path(path)
    if found is None:
        return None
    fingerprint, filename = found
    if filename == unified_filename(fingerprint):
        return fingerprint, "unified"
    if filename.startswith(f"meta-{fingerprint}"):
        return fingerprint, "meta"
    if filename.startswith(fingerprint):
        return fingerprint, "root"
    return None


def root_ftype_of(form_name: str, filename: str, image_type: str = "", type_property: str = "") -> str:
    """
    The simplestreams ftype to list a root file as, from what its export part said.

    C{rootfs.img} (or a VM image) is a VM disk; for containers the file name's extension tells
    a squashfs from a tarball (LXD names parts after the compression it detects).
    """
    if form_name == "rootfs.img" or image_type == "virtual-machine":
        return type_property if type_property in VM_ROOT_FTYPES else "disk-kvm.img"
    lowered = filename.lower()
    if lowered.endswith(".squashfs"):
        return "squashfs"
    if ".tar" in lowered:
        return "root.tar.xz"
    if type_property in ROOT_FTYPES and type_property not in VM_ROOT_FTYPES:
        return type_property
    return "squashfs"


# -- the synthesised catalogue -----------------------------------------------------------------


def version_base(image: RemoteImage) -> str:
    """C{YYYYMMDD_HHMM} of the image's creation (its upload, else the epoch, when unknown)."""
    for when in (image.created_at, image.uploaded_at):
        if when is not None and when >= _UNIX_EPOCH:
            return when.strftime("%Y%m%d_%H%M")
    return _UNIX_EPOCH.strftime("%Y%m%d_%H%M")


def base_product(image: RemoteImage) -> str:
    """C{<os>:<release>:<arch>:<variant>}, with C{:vm} for a VM image."""
    os_name = image.prop("os") or "unknown"
    release = image.prop("release") or image.prop("version") or "unknown"
    variant = image.prop("variant") or "default"
    product = f"{os_name}:{release}:{image.arch or image.architecture}:{variant}"
    return product + ":vm" if image.type == "virtual-machine" else product


@frozen
class _Files:
    """The files an image is listed with: one (unified, C{root_sha256} None) or two."""

    meta_sha256: str
    meta_size: int
    root_sha256: str | None = None
    root_size: int = 0
    root_ftype: str = ""


@attrs.define
class _Listed:
    image: RemoteImage
    arch: str
    files: _Files
    version: str = ""
    product: str = ""


def _listing(image: RemoteImage, known: ImageParts | None, families: Sequence[Family]) -> _Files | None:
    """The files an image is listed with, or None while it cannot be listed."""
    if known is not None:
        if known.size != image.size:
            # Not what the upstream now says this image is: list nothing rather than a size
            # no download can match.
            return None
        files = _Files(known.meta_sha256, known.meta_size, known.root_sha256, known.root_size,
                       known.root_ftype)
    elif image.presumed_unified:
        files = _Files(image.fingerprint, image.size)
    else:
        # Split, and the size and sha256 of each file are not known yet.
        return None
    if files.root_sha256 is None and image.type == "virtual-machine" and "incus" not in families:
        # LXD takes every unified simplestreams image for a container: only Incus
        # (combined_type) can be told that this one is a VM.
        return None
    return files


def synthesise(
    images: Iterable[RemoteImage],
    known: Mapping[str, ImageParts],
    families: Sequence[Family] = ("lxd",),
) -> tuple[bytes, bytes]:
    """
    The C{index.json} and C{images.json} bodies listing C{images}.

    @param known: the parts learnt so far, by fingerprint; split images without parts are
        left out.
    @param families: the clients to list metadata items for: C{"lxd"} (C{lxd.tar.xz},
        C{lxd_combined.tar.gz}) and, when asked, C{"incus"} twins of the same files.
    """
    listed: list[_Listed] = []
    for image in images:
        arch = image.arch
        if arch is None:
            continue
        files = _listing(image, known.get(image.fingerprint), families)
        if files is not None:
            listed.append(_Listed(image, arch, files))

    groups: dict[str, list[_Listed]] = defaultdict(list)
    for entry in listed:
        groups[base_product(entry.image)].append(entry)

    products: dict[str, Any] = {}
    for base, entries in groups.items():
        by_minute: dict[str, list[_Listed]] = defaultdict(list)
        for entry in entries:
            by_minute[version_base(entry.image)].append(entry)
        for minute, same in by_minute.items():
            for entry in same:
                # One image per version: the client pairs every metadata item of a version with
                # every root item of it, which two images of one root ftype would confuse.
                entry.version = minute if len(same) == 1 else f"{minute}.{entry.image.fingerprint[:12]}"
        newest = max(entries, key=lambda e: e.version)
        for entry in entries:
            if entry is newest or not entry.image.aliases:
                entry.product = base
            else:
                # Its aliases name it, not the newest image of the product.
                entry.product = f"{base}:{entry.image.fingerprint[:12]}"
        by_product: dict[str, list[_Listed]] = defaultdict(list)
        for entry in entries:
            by_product[entry.product].append(entry)
        for product_id, members in by_product.items():
            head = newest if product_id == base else members[0]
            products[product_id] = _product(head, members, families)

    products_doc = {
        "content_id": "images",
        "datatype": "image-downloads",
        "format": "products:1.0",
        "products": products,
    }
    index_doc = {
        "format": "index:1.0",
        "index": {
            "images": {
                "datatype": "image-downloads",
                "path": PRODUCTS_PATH,
                "format": "products:1.0",
                "products": sorted(products),
            }
        },
    }
    return _dump(index_doc), _dump(products_doc)


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _product(head: _Listed, members: list[_Listed], families: Sequence[Family]) -> dict[str, Any]:
    image = head.image
    product: dict[str, Any] = {
        "aliases": ",".join(image.aliases),
        "arch": head.arch,
        "os": image.prop("os") or "unknown",
        "release": image.prop("release") or image.prop("version") or "unknown",
        "release_title": (
            image.prop("release_title") or image.prop("version") or image.prop("release")
            or "unknown"
        ),
        "variant": image.prop("variant") or "default",
        "versions": {},
    }
    if image.prop("version"):
        product["version"] = image.prop("version")
    requirements = {
        key[len("requirements."):]: value
        for key, value in image.properties
        if key.startswith("requirements.") and len(key) > len("requirements.")
    }
    if requirements:
        product["requirements"] = requirements
    for entry in members:
        version: dict[str, Any] = {"items": _items(entry, families)}
        label = entry.image.prop("label")
        if label:
            version["label"] = label
        product["versions"][entry.version] = version
    return product


def _items(entry: _Listed, families: Sequence[Family]) -> dict[str, Any]:
    fingerprint = entry.image.fingerprint
    files = entry.files
    is_vm = entry.image.type == "virtual-machine"
    items: dict[str, Any] = {}
    # Each family's metadata item names the same file; the Incus twins (PROTOCOLS.md §6) are
    # only listed when asked for.
    if files.root_sha256 is None:
        path = image_item_path(fingerprint, unified_filename(fingerprint))
        for family in families:
            if family == "lxd" and is_vm:
                continue
            item: dict[str, Any] = {
                "ftype": UNIFIED_FTYPE[family], "path": path, "size": files.meta_size,
                "sha256": fingerprint,
            }
            if family == "incus" and is_vm:
                item["combined_type"] = "virtual-machine"
            items[UNIFIED_FTYPE[family]] = item
        return items
    root_ftype = files.root_ftype if files.root_ftype in ROOT_FTYPES else (
        "disk-kvm.img" if is_vm else "squashfs"
    )
    meta_path = image_item_path(fingerprint, meta_filename(fingerprint))
    for family in families:
        meta: dict[str, Any] = {
            "ftype": META_FTYPE[family], "path": meta_path, "size": files.meta_size,
            "sha256": files.meta_sha256, COMBINED_HASH_FIELDS[root_ftype]: fingerprint,
        }
        if root_ftype == "root.tar.xz":
            meta[LEGACY_ROOTXZ_FIELD] = fingerprint
        items[META_FTYPE[family]] = meta
    items[root_ftype] = {
        "ftype": root_ftype,
        "path": image_item_path(fingerprint, root_filename(fingerprint, root_ftype)),
        "size": files.root_size,
        "sha256": files.root_sha256,
    }
    return items


# -- the upstream ------------------------------------------------------------------------------


@frozen
class _Built:
    """The synthesised catalogue's files, with their sha256, and how many images it lists."""

    index_body: bytes
    index_sha256: str
    products_body: bytes
    products_sha256: str
    listed: int


class _SynthesisedFiles:
    """
    The files of an LXD upstream's catalogue (a L{MetadataFiles}): the synthesised index and
    products file, each stored as a metadata record as fresh as the image list it was built
    from. The list is fetched and kept by an L{UpstreamFiles}; each copy of it is parsed once,
    and the catalogue is rebuilt once per change of the list or of the parts learnt, on the
    disk worker, with its records written on the index's writer.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        base_url: str,
        client: UpstreamClient,
        bodies: MetadataStore,
        clock: IReactorTime,
        *,
        ttl: float,
        idle_timeout: float,
        health: UpstreamHealth | None,
        families: Sequence[Family],
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._name = name
        self._bodies = bodies
        self._index = bodies.index
        self._clock = clock
        self._families: tuple[Family, ...] = tuple(families)
        self.list = UpstreamFiles(
            name, base_url, client, bodies, clock, ttl=ttl, idle_timeout=idle_timeout,
            validate=lambda _path, body: parse_remote_images(body), remember=self._remember,
            health=health, metrics=metrics,
        )
        self._parsed: ParsedOnce[str, list[RemoteImage]] = ParsedOnce()
        # The one rebuild per (sha256 of the list, parts records) that callers share; one at
        # a time, so that a rebuild from an older list never writes after a newer one.
        self._builds: ParsedOnce[str, None] = ParsedOnce()
        self._building = DeferredLock()

    def holds(self, path: str) -> bool:
        # Whenever the list is held, its catalogue can be built without asking the upstream.
        return path in SYNTHESISED_PATHS and self.list.holds(API_PATH)

    async def copy(self, path: str) -> MetadataRecord:
        return await self._synthesised(path, await self.list.copy(API_PATH))

    async def current(self, path: str, *, wait: bool = False) -> MetadataRecord:
        return await self._synthesised(path, await self.list.current(API_PATH, wait=wait))

    def images(self, record: MetadataRecord) -> "Deferred[list[RemoteImage]]":
        """The images of the copy C{record} of the list, parsed once per copy."""
        return self._parsed.get(
            API_PATH, record.sha256,
            lambda: self._bodies.disk(heavy(lambda: parse_remote_images(self._bodies.read(record.sha256)))),
        )

    def _remember(self, path: str, digest: str, parsed: object) -> None:
        """Keep the list that validating a fetched copy parsed, so that it is parsed once."""
        if isinstance(parsed, list):
            self._parsed.put(API_PATH, digest, parsed)

    async def _synthesised(self, path: str, source: MetadataRecord) -> MetadataRecord:
        """The stored synthesised file C{path}, rebuilt first if C{source} or the parts changed."""
        if path not in SYNTHESISED_PATHS:
            raise NotFound(f"{self._name}: {path} is not a file of this upstream's catalogue")
        if self._bodies.stored(self._name, path) is None:
            # Built, but gone since (removed as corrupt, say).
            self._builds.forget(API_PATH)
        version = f"{source.sha256} {self._index.parts_count()}"
        await self._builds.get(API_PATH, version, lambda: Deferred.fromCoroutine(self._rebuild(source)))
        record = self._bodies.stored(self._name, path)
        assert record is not None
        if record.checked_at != source.checked_at:
            # As fresh as the list it was built from: the TTL is the list's.
            record = attrs.evolve(record, checked_at=source.checked_at)
            await self._bodies.put_record(record)
        return record

    async def _rebuild(self, source: MetadataRecord) -> None:
        async with self._building:
            images = await self.images(source)
            built = await self._bodies.disk(heavy(self._build), images)
            now = self._clock.seconds()
            changed = False
            for path, body, digest in (
                (PRODUCTS_PATH, built.products_body, built.products_sha256),
                (INDEX_PATH, built.index_body, built.index_sha256),
            ):
                existing = self._bodies.stored(self._name, path)
                if existing is None or existing.sha256 != digest:
                    await self._bodies.put(self._name, path, body, fetched_at=now, checked_at=source.checked_at)
                    changed = True
            if changed:
                self.log.info(
                    "{upstream}: catalogue rebuilt from {url}: {listed} of {total} images listed",
                    upstream=self._name, url=self.list.url(API_PATH), total=len(images), listed=built.listed,
                )

    def _build(self, images: list[RemoteImage]) -> _Built:
        """Synthesise the catalogue of C{images} with the parts learnt so far (slow: a worker runs it)."""
        known: dict[str, ImageParts] = {}
        for image in images:
            parts = self._index.get_parts(image.fingerprint)
            if parts is not None:
                known[image.fingerprint] = parts
        index_body, products_body = synthesise(images, known, self._families)
        products = jsonsteps.loads(products_body)["products"]
        return _Built(
            index_body=index_body, index_sha256=hashlib.sha256(index_body).hexdigest(),
            products_body=products_body, products_sha256=hashlib.sha256(products_body).hexdigest(),
            listed=sum(len(p["versions"]) for p in products.values()),
        )


class LxdRemote:
    """
    The image list of the LXD upstream C{name} at C{base_url}, and the simplestreams catalogue
    synthesised from it: a L{SimplestreamsMetadata} like L{UpstreamMetadata}, which it holds
    over the synthesised files, so that C{get}, C{products_paths}, C{item}, C{read},
    C{offline}, C{offline_view} and C{health} work the same. The synthesised files are current
    exactly when the list they come from is, and the list is refreshed under the same rules as
    an upstream's index. They are rebuilt when the list changes or when the parts of an image
    are learnt.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        client: UpstreamClient,
        store: BlobStore,
        index: CacheIndex,
        clock: IReactorTime,
        *,
        ttl: float,
        idle_timeout: float,
        health: UpstreamHealth | None = None,
        families: Sequence[Family] = ("lxd",),
        disk: Run = inline,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._index = index
        self._files = _SynthesisedFiles(
            name, base_url, client, MetadataStore(store, index, disk), clock, ttl=ttl,
            idle_timeout=idle_timeout, health=health, families=families, metrics=metrics,
        )
        self._metadata = UpstreamMetadata(
            name, base_url, client, store, index, clock, ttl=ttl, idle_timeout=idle_timeout,
            health=health, disk=disk, files=self._files, products=(PRODUCTS_PATH,),
        )

    # -- what the LXD face and the export fetcher read --------------------------------------

    async def images(self, *, refresh: bool = True) -> list[RemoteImage]:
        """
        The upstream's public images: from a list no older than the TTL (as a client's
        C{get} would have it), or with C{refresh=False} from whatever copy is held.
        """
        record = await (self._files.list.current(API_PATH) if refresh else self._files.list.copy(API_PATH))
        return await self._files.images(record)

    async def unknown_files(self, *, refresh: bool = True) -> list[RemoteImage]:
        """
        The images whose files no export has shown yet, those taken for unified included:
        only an export tells what an image's files are, and whether it is split at all.
        """
        return [
            image for image in await self.images(refresh=refresh)
            if image.arch is not None and self._index.get_parts(image.fingerprint) is None
        ]

    async def awaiting_parts(self, *, refresh: bool = True) -> list[RemoteImage]:
        """
        The split images not listed yet, for want of their files' hashes and sizes: one
        export download of each (L{proxy.downloads.Fetcher.get_image}) lists it.
        """
        return [i for i in await self.unknown_files(refresh=refresh) if not i.presumed_unified]

    # -- SimplestreamsMetadata, from the synthesised catalogue --------------------------------

    @property
    def name(self) -> str:
        return self._metadata.name

    @property
    def base_url(self) -> str:
        return self._metadata.base_url

    @property
    def family(self) -> Family:
        return self._metadata.family

    @property
    def health(self) -> UpstreamHealth | None:
        return self._metadata.health

    @property
    def offline(self) -> bool:
        return self._metadata.offline

    async def get(self, path: str) -> MetadataRecord:
        return await self._metadata.get(path)

    def holds_catalogue(self) -> bool:
        return self._metadata.holds_catalogue()

    async def offline_view(self, path: str) -> bytes:
        return await self._metadata.offline_view(path)

    async def products_paths(self, *, refresh: bool = True) -> list[str]:
        return await self._metadata.products_paths(refresh=refresh)

    async def revalidate(self) -> None:
        await self._metadata.revalidate()

    async def item(self, path: str) -> Item | None:
        return await self._metadata.item(path)

    async def catalogue_images(self, family: Family | None = None, *, refresh: bool = True) -> list[Image]:
        return await self._metadata.catalogue_images(family, refresh=refresh)

    async def products_images(
        self, products_path: str, family: Family | None = None, *, refresh: bool = True
    ) -> list[Image]:
        return await self._metadata.products_images(products_path, family, refresh=refresh)

    def read(self, record: MetadataRecord) -> bytes:
        return self._metadata.read(record)


__all__ = [
    "API_PATH",
    "LxdRemote",
    "PRODUCTS_PATH",
    "RemoteImage",
    "base_product",
    "image_item_path",
    "item_role",
    "meta_filename",
    "parse_remote_images",
    "root_filename",
    "root_ftype_of",
    "split_image_item_path",
    "synthesise",
    "unified_filename",
    "version_base",
]
