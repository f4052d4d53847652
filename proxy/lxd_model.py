"""The model behind the read-only LXD image API at `/1.0`: pure, no I/O.

What an LXD or Incus client of protocol `lxd` reads (PROTOCOLS.md §2): the response envelope, the
Image and alias objects, which image a fingerprint prefix names, and the alias names. The images
are those of the simplestreams upstreams (`proxy.catalogue.Image`), so the objects carry what the
simplestreams client would have shown for them (`shared/simplestreams/products.go` `ToLXD`).

Alias names differ from the simplestreams face because LXD's REST protocol allows exactly one
target per alias name, and the client checks the target's type: `lxc launch remote:A` asks for a
container, `--vm` for a virtual machine, each under one name. So for every alias A of an image's
product, within one upstream:

- `A`: the container image of the client's architecture, or its VM image when that architecture
  has no container for A;
- `A/vm`: the VM image of the client's architecture;
- `A/<stream arch>` (`ubuntu/24.04/amd64`): the container image of that architecture, or its VM;
- `A/<stream arch>/vm`: the VM image of that architecture.

Each target is the image the simplestreams client would pick for the name, type and architecture
(`proxy.resolve` order: os, release, variant, newest serial, then squashfs over root.tar.xz...).
As there, a name is looked up for the client's own architecture first, so a product alias that
happens to read `X/<other arch>` wins over the explicit name for that client; unlike there, a
bare `A` never falls back to another architecture (i686 on x86_64): the client would get an
image it may not run, and `A/<stream arch>` names it when that is wanted. A name that is a real
alias never gives way to a made-up `/vm` one. Across upstreams, listed in order of precedence, a
name taken by an earlier upstream stays with it; then every upstream's names are also published
as `UPSTREAM/NAME` wherever that name is still free.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from attrs import frozen

from proxy.catalogue import ARCHITECTURES, Family, Image
from proxy.errors import BadRequest, NotFound
from proxy.resolve import CONTAINER, VIRTUAL_MACHINE, sort_images

__all__ = [
    "AliasEntry",
    "ClientInfo",
    "LxdCatalogue",
    "Published",
    "ZERO_TIME",
    "alias_json",
    "client_info",
    "description",
    "error_body",
    "go_time",
    "image_json",
    "image_properties",
    "sync_body",
]

# Suffix of the alias names that target virtual-machine images.
VM_SUFFIX = "/vm"

# LXD's zero time.Time, which it shows for "never" (an image not used yet).
ZERO_TIME = "0001-01-01T00:00:00Z"

FINGERPRINT_LENGTH = 64

_HEX_RE = re.compile(r"[0-9a-f]+\Z")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}\Z")


# ---------------------------------------------------------------------------------------------
# the client


@frozen
class ClientInfo:
    """What the User-Agent says about a client: its family and its LXD architecture name."""

    family: Family
    architecture: str | None


def client_info(user_agent: bytes | str | None) -> ClientInfo:
    """Read a client's family and architecture from its User-Agent; never raises.

    LXD and Incus send `LXD 5.21 LTS (Linux; x86_64; 5.15.0; Ubuntu; 22.04) (ceph 17.2.6)
    (cluster)` or `Incus 6.0 (Linux; aarch64; ...)` (`shared/version/useragent.go`): the family
    is `incus` when the header starts with `Incus`, `lxd` otherwise (an unknown client is taken
    for LXD); the architecture is the second field of the first parenthesis, as LXD names it,
    or None when it is absent or not an architecture LXD knows.
    """
    if user_agent is None:
        text = ""
    elif isinstance(user_agent, bytes):
        text = user_agent.decode("utf-8", "replace")
    else:
        text = user_agent
    text = text.strip()
    family: Family = "incus" if text.startswith("Incus") else "lxd"
    architecture: str | None = None
    start = text.find("(")
    if start >= 0:
        end = text.find(")", start + 1)
        fields = text[start + 1 : end if end >= 0 else len(text)].split(";")
        if len(fields) >= 2:
            architecture = ARCHITECTURES.get(fields[1].strip())
    return ClientInfo(family=family, architecture=architecture)


# ---------------------------------------------------------------------------------------------
# the envelope


def _dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON allows "\ud800" in a products file) has no UTF-8 form; escaped,
        # it is still valid JSON.
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def sync_body(metadata: Any) -> bytes:
    """LXD's synchronous success response around `metadata`, as compact UTF-8 JSON."""
    return _dumps(
        {
            "type": "sync",
            "status": "Success",
            "status_code": 200,
            "operation": "",
            "error_code": 0,
            "error": "",
            "metadata": metadata,
        }
    )


def error_body(code: int, message: str) -> bytes:
    """LXD's error response: `code` is also the HTTP status the caller must send it with."""
    return _dumps(
        {
            "type": "error",
            "status": "",
            "status_code": 0,
            "operation": "",
            "error_code": code,
            "error": message,
            "metadata": None,
        }
    )


# ---------------------------------------------------------------------------------------------
# the catalogue


@frozen
class Published:
    """An image as this face lists it, and the upstream it is exported from."""

    upstream: str
    image: Image


@frozen
class AliasEntry:
    """One alias name and the image it names (`fingerprint`, of `type`), from `upstream`."""

    name: str
    fingerprint: str
    type: str
    upstream: str
    description: str = ""


# name -> LXD architecture -> image type -> the image the simplestreams client picks.
_Table = dict[str, dict[str, dict[str, Image]]]


@frozen
class _UpstreamAliases:
    """One upstream's alias table, the same for every client architecture."""

    upstream: str
    table: _Table
    # `A/<stream arch>` names -> the LXD architecture they name
    explicit: dict[str, str]


def _alias_table(upstream: str, ordered: Sequence[Image]) -> _UpstreamAliases:
    """The simplestreams client's alias table (`applyAliases`), first writer wins.

    `ordered` is in `proxy.resolve` order, so the first image to claim (name, architecture,
    type) is the one the client would pick. An image answers to each alias A of its product and
    to `A/<its stream arch>`, exactly as `proxy.resolve.resolve_alias` matches.
    """
    table: _Table = {}
    explicit: dict[str, str] = {}
    for image in ordered:
        for alias in image.aliases:
            if not alias:
                # "a,,b" in a products file; no client can ask for an empty name.
                continue
            medium = f"{alias}/{image.arch}"
            explicit.setdefault(medium, image.architecture)
            for name in (alias, medium):
                by_type = table.setdefault(name, {}).setdefault(image.architecture, {})
                by_type.setdefault(image.type, image)
    return _UpstreamAliases(upstream=upstream, table=table, explicit=explicit)


def _names_for(aliases: _UpstreamAliases, arch: str) -> dict[str, AliasEntry]:
    """One upstream's REST alias names for a client of LXD architecture `arch`."""
    names: dict[str, AliasEntry] = {}
    vm_names: dict[str, AliasEntry] = {}

    def entry(name: str, image: Image) -> AliasEntry:
        return AliasEntry(
            name=name, fingerprint=image.fingerprint, type=image.type, upstream=aliases.upstream
        )

    for name, by_arch in aliases.table.items():
        # The client's own architecture first, as the simplestreams client looks a name up;
        # otherwise the architecture an explicit `A/<stream arch>` names.
        target_arch = arch if arch in by_arch else aliases.explicit.get(name)
        if target_arch is None:
            continue
        by_type = by_arch[target_arch]
        vm = by_type.get(VIRTUAL_MACHINE)
        image = by_type.get(CONTAINER) or vm
        if image is not None:
            names[name] = entry(name, image)
        if vm is not None:
            vm_names[name + VM_SUFFIX] = entry(name + VM_SUFFIX, vm)
    for name, vm_entry in vm_names.items():
        names.setdefault(name, vm_entry)
    return names


@frozen
class _AliasView:
    """Every alias name for one client architecture, and the reverse index."""

    by_name: dict[str, AliasEntry]
    by_fingerprint: dict[str, list[str]]


class LxdCatalogue:
    """The images and aliases the LXD face serves, from upstreams in order of precedence.

    Built from `(upstream name, its images)` pairs; the work is done on first use and kept:
    sorting and the alias tables once, the names once per client architecture. Build a new
    catalogue when an upstream's images change.
    """

    def __init__(self, published: Sequence[tuple[str, Sequence[Image]]]) -> None:
        self._upstreams: list[tuple[str, list[Image]]] = [
            # An image whose fingerprint is not a sha256 hex digest can never verify on a
            # client, nor be named by a prefix LXD accepts: leave it out.
            (name, [image for image in images if _FINGERPRINT_RE.match(image.fingerprint)])
            for name, images in published
        ]
        self._sorted: list[tuple[str, list[Image]]] | None = None
        self._published: list[Published] | None = None
        self._by_fingerprint: dict[str, Published] = {}
        self._fingerprints: list[str] = []
        self._tables: list[_UpstreamAliases] | None = None
        self._views: dict[str, _AliasView] = {}

    # -- images ---------------------------------------------------------------------------

    def _ordered(self) -> list[tuple[str, list[Image]]]:
        if self._sorted is None:
            self._sorted = [(name, sort_images(images)) for name, images in self._upstreams]
        return self._sorted

    def _images(self) -> list[Published]:
        if self._published is None:
            published: list[Published] = []
            by_fingerprint: dict[str, Published] = {}
            for name, images in self._ordered():
                for image in images:
                    if image.fingerprint not in by_fingerprint:
                        entry = Published(upstream=name, image=image)
                        by_fingerprint[image.fingerprint] = entry
                        published.append(entry)
            self._by_fingerprint = by_fingerprint
            self._fingerprints = sorted(by_fingerprint)
            self._published = published
        return self._published

    def images(self) -> list[Published]:
        """Every image once, by fingerprint, the first upstream to list it winning.

        In upstream order, then in the order the simplestreams client sorts images.
        """
        return list(self._images())

    def find(self, prefix: str) -> Published:
        """The one image whose fingerprint starts with `prefix`, as LXD matches one.

        Any non-empty prefix of lowercase hex is accepted, as Incus and LXD before 6.5 do.
        Raises `BadRequest` for a prefix that is empty, longer than a fingerprint or not
        lowercase hex, and for one that matches several images; `NotFound` if none matches.
        """
        if not prefix:
            raise BadRequest("Image fingerprint prefix must not be empty")
        if len(prefix) > FINGERPRINT_LENGTH:
            raise BadRequest("Image fingerprint cannot be longer than 64 characters")
        if not _HEX_RE.match(prefix):
            raise BadRequest("Image fingerprint prefix must contain only lowercase hexadecimal characters")
        self._images()
        fingerprints = self._fingerprints
        at = bisect.bisect_left(fingerprints, prefix)
        if at == len(fingerprints) or not fingerprints[at].startswith(prefix):
            raise NotFound("Image not found")
        if at + 1 < len(fingerprints) and fingerprints[at + 1].startswith(prefix):
            raise BadRequest("More than one image matches")
        return self._by_fingerprint[fingerprints[at]]

    # -- aliases --------------------------------------------------------------------------

    def _view(self, arch: str) -> _AliasView:
        # Cache under the LXD name; a name LXD does not know gets no short names at all, so
        # every such name shares one view (and callers cannot grow the cache without bound).
        canonical = ARCHITECTURES.get(arch, "")
        view = self._views.get(canonical)
        if view is not None:
            return view
        if self._tables is None:
            self._tables = [_alias_table(name, images) for name, images in self._ordered()]
        per_upstream = [_names_for(table, canonical) for table in self._tables]
        by_name: dict[str, AliasEntry] = {}
        for names in per_upstream:
            for name, entry in names.items():
                by_name.setdefault(name, entry)
        for table, names in zip(self._tables, per_upstream):
            for name, entry in names.items():
                qualified = f"{table.upstream}/{name}"
                if qualified not in by_name:
                    by_name[qualified] = AliasEntry(
                        name=qualified,
                        fingerprint=entry.fingerprint,
                        type=entry.type,
                        upstream=entry.upstream,
                        description=entry.description,
                    )
        by_fingerprint: dict[str, list[str]] = {}
        for name, entry in by_name.items():
            by_fingerprint.setdefault(entry.fingerprint, []).append(name)
        for names_of_image in by_fingerprint.values():
            names_of_image.sort()
        view = _AliasView(by_name=by_name, by_fingerprint=by_fingerprint)
        self._views[canonical] = view
        return view

    def aliases(self, arch: str) -> dict[str, AliasEntry]:
        """Every alias name for a client of LXD architecture `arch` (`x86_64`, `aarch64`).

        The mapping is computed once per architecture and shared: do not change it.
        """
        return self._view(arch).by_name

    def alias(self, name: str, arch: str) -> AliasEntry | None:
        """The alias `name` for a client of LXD architecture `arch`, or None."""
        return self._view(arch).by_name.get(name)

    def aliases_of(self, fingerprint: str, arch: str) -> list[str]:
        """The alias names that target the image `fingerprint` for a client of `arch`, sorted."""
        return list(self._view(arch).by_fingerprint.get(fingerprint, ()))


# ---------------------------------------------------------------------------------------------
# the objects


def go_time(moment: datetime) -> str:
    """A time as Go's `time.Time` marshals it in UTC: RFC 3339, `Z`, no trailing zeros.

    Written out by hand because `strftime("%Y")` drops the leading zeros of year 1, LXD's zero
    time. A naive datetime is taken as UTC.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    else:
        moment = moment.astimezone(timezone.utc)
    fraction = f".{moment.microsecond:06d}".rstrip("0") if moment.microsecond else ""
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}{fraction}Z"
    )


def _timestamp(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ZERO_TIME
    try:
        return go_time(datetime.fromtimestamp(seconds, timezone.utc))
    except (OverflowError, OSError, ValueError):
        return ZERO_TIME


def description(image: Image) -> str:
    """The `description` property the simplestreams client gives an image.

    `<os> <release_title> <stream arch>[ (<label>)] (<serial>)`, the same in LXD and Incus.
    """
    text = f"{image.os} {image.release_title} {image.arch}"
    if image.label:
        text = f"{text} ({image.label})"
    return f"{text} ({image.version})"


def image_properties(image: Image) -> dict[str, str]:
    """The image's properties as the simplestreams client builds them, empty ones dropped."""
    properties = {
        "os": image.os,
        "release": image.release,
        "version": image.os_version,
        "architecture": image.arch,
        "label": image.label,
        "serial": image.version,
        "description": description(image),
    }
    for key, value in image.requirements:
        properties[f"requirements.{key}"] = value
    properties["variant"] = image.variant
    properties["type"] = image.root_ftype
    return {key: value for key, value in properties.items() if value}


def image_json(
    published: Published,
    *,
    aliases: Sequence[str],
    cached: bool,
    auto_update: bool,
    last_used_at: float | None,
    server_url: str,
    protocol: str = "simplestreams",
) -> dict[str, Any]:
    """The LXD Image object (`shared/api/image.go`) for a published image.

    `aliases` are the names to list on it; `last_used_at` is a Unix time, None for never (LXD's
    zero time). `update_source` names the upstream (`server_url`, `protocol`) and the first
    alias of the image's product, as a daemon that pulled it from there would record.
    """
    image = published.image
    return {
        "aliases": [{"name": name, "description": ""} for name in aliases],
        "architecture": image.architecture or ARCHITECTURES.get(image.arch, image.arch),
        "auto_update": auto_update,
        "cached": cached,
        "public": True,
        "type": image.type,
        "filename": image.meta.path.split("/")[-1],
        "fingerprint": image.fingerprint,
        "size": image.size,
        "profiles": ["default"],
        "project": "default",
        "properties": image_properties(image),
        "created_at": go_time(image.created_at),
        "uploaded_at": go_time(image.created_at),
        "expires_at": go_time(image.expires_at),
        "last_used_at": _timestamp(last_used_at),
        "update_source": {
            "alias": image.aliases[0] if image.aliases else "",
            "certificate": "",
            "protocol": protocol,
            "server": server_url,
            "image_type": image.type,
        },
    }


def alias_json(entry: AliasEntry) -> dict[str, Any]:
    """The LXD ImageAliasesEntry object for an alias."""
    return {
        "name": entry.name,
        "description": entry.description,
        "type": entry.type,
        "target": entry.fingerprint,
    }

