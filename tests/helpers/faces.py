"""The LXD face (C{/1.0}) and URL import (C{/import/}) wired as L{CacheService.site} wires them.

In memory and deterministic, on top of L{tests.helpers.wired.Harness}: the same upstream C{up}
(a L{ScriptedUpstream} through C{RequestTraversalAgent}), blob store, index, fetcher, metadata,
health and L{Clock}, with one L{UpstreamMetadata} per client family sharing L{ClientAgents},
and L{SimplestreamsImages}, L{FaceCatalogue}, L{LxdApiResource} and L{ImportResource} added
beside the simplestreams face under one L{RootResource}. The host architecture is fixed
(C{x86_64}) so that no answer depends on the machine running the tests.

L{face_tree} builds the upstream's catalogue: split images (container and VM) of two
architectures and several versions, and unified images, each described by an L{Expected} so
that a test names the image it means without parsing the catalogue itself.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import treq
from attrs import frozen
from treq.testing import StubTreq
from twisted.internet.defer import Deferred

from proxy.agents import ClientAgents
from proxy.catalogue import Family
from proxy.files import CacheFiles
from proxy.images import FaceCatalogue, SimplestreamsImages
from proxy.lxd_face import LxdApiResource, ServerCertificate
from proxy.metadata import UpstreamMetadata
from proxy.service import FAMILIES
from proxy.simplestreams import RootResource
from proxy.urlimport import ImportResource
from tests.helpers.scripted import BASE_URL, sha
from tests.helpers.wired import IDLE, INDEX, TTL, Harness, RecordingResource

V1, V2, V3 = "20240101_0000", "20240201_0000", "20240301_0000"
PRODUCTS = "streams/v1/images.json"
CONTAINER, VM = "container", "virtual-machine"
HOST_ARCH = "x86_64"
# The address the tests reach the proxy by; its Host header is what URL import echoes.
PROXY = "proxy.test:8443"

SPLIT_OS, SPLIT_ALIAS = "testos", "testos/2.0"
UNIFIED_OS, UNIFIED_ALIAS = "uni", "uni/1.0"
# (os, release, stream arch, versions)
Products = tuple[tuple[str, str, str, tuple[str, ...]], ...]
SPLIT_PRODUCTS: Products = ((SPLIT_OS, "2.0", "amd64", (V1, V2, V3)), (SPLIT_OS, "2.0", "arm64", (V1, V2)))
UNIFIED_PRODUCTS: Products = ((UNIFIED_OS, "1.0", "amd64", (V1, V2)), (UNIFIED_OS, "1.0", "arm64", (V1,)))

LXD_UA = "LXD 5.0.2 (Linux; {arch}; 5.15.0; Ubuntu; 22.04)"
INCUS_UA = "Incus 6.0 (Linux; {arch}; 6.8.0; Debian; 12)"

CERT_PEM = "-----BEGIN CERTIFICATE-----\nTUlJQmZha2VjZXJ0aWZpY2F0ZQ==\n-----END CERTIFICATE-----\n"
CERT_FINGERPRINT = "c3" * 32


def lxd_agent(arch: str) -> dict[bytes, list[bytes]]:
    """Headers of an LXD client of architecture C{arch} (as the kernel names it)."""
    return {b"User-Agent": [LXD_UA.format(arch=arch).encode()]}


def incus_agent(arch: str) -> dict[bytes, list[bytes]]:
    return {b"User-Agent": [INCUS_UA.format(arch=arch).encode()]}


@frozen
class Expected:
    """One image of the catalogue, as a client of C{family} lists it."""

    fingerprint: str
    type: str
    os: str
    arch: str
    version: str
    # item paths: metadata then root, or the one file of a unified image
    files: tuple[str, ...]
    family: str = "lxd"

    @property
    def unified(self) -> bool:
        return len(self.files) == 1

    @property
    def architecture(self) -> str:
        return {"amd64": "x86_64", "arm64": "aarch64"}[self.arch]


def content(path: str) -> bytes:
    """Each file's own bytes, so that no two files (and no two images) share a digest."""
    return f"{path}\n".encode() * 40


def face_tree() -> tuple[dict[str, bytes], list[Expected]]:
    """
    The upstream's files (index, one products file, every image file) and its images.

    Each split version has a metadata file, a squashfs and a qcow2 disk: a container image and
    a virtual-machine image sharing the metadata. Each unified version has an
    C{lxd_combined.tar.gz} (an LXD container image) and an C{incus_combined.tar.gz} marked as
    a virtual machine (an image only Incus clients list).
    """
    files: dict[str, bytes] = {}
    images: list[Expected] = []
    products: dict[str, Any] = {}

    def item(ftype: str, path: str, **extra: str) -> dict[str, Any]:
        body = files[path] = content(path)
        return {"ftype": ftype, "path": path, "size": len(body), "sha256": sha(body), **extra}

    def product(os_name: str, release: str, arch: str, alias: str, versions: dict[str, Any]) -> None:
        products[f"{os_name}:{release}:{arch}:default"] = {
            "aliases": alias, "arch": arch, "os": os_name, "release": release,
            "release_title": release, "variant": "default", "versions": versions,
        }

    for os_name, release, arch, keys in SPLIT_PRODUCTS:
        versions: dict[str, Any] = {}
        for version in keys:
            base = f"images/{os_name}/{release}/{arch}/default/{version}"
            meta, root, disk = f"{base}/lxd.tar.xz", f"{base}/rootfs.squashfs", f"{base}/disk.qcow2"
            items = {"root.squashfs": item("squashfs", root), "disk.qcow2": item("disk-kvm.img", disk)}
            container_fp = sha(content(meta) + content(root))
            vm_fp = sha(content(meta) + content(disk))
            items["lxd.tar.xz"] = item(
                "lxd.tar.xz", meta, **{"combined_squashfs_sha256": container_fp,
                                       "combined_disk-kvm-img_sha256": vm_fp},
            )
            versions[version] = {"items": items}
            images.append(Expected(container_fp, CONTAINER, os_name, arch, version, (meta, root)))
            images.append(Expected(vm_fp, VM, os_name, arch, version, (meta, disk)))
        product(os_name, release, arch, f"{os_name}/{release}", versions)

    for os_name, release, arch, keys in UNIFIED_PRODUCTS:
        versions = {}
        for version in keys:
            base = f"images/{os_name}/{release}/{arch}/default/{version}"
            lxd_file, incus_file = f"{base}/lxd.tar.gz", f"{base}/incus-vm.tar.gz"
            versions[version] = {"items": {
                "lxd_combined.tar.gz": item("lxd_combined.tar.gz", lxd_file),
                "incus_combined.tar.gz": item(
                    "incus_combined.tar.gz", incus_file, combined_type="virtual-machine"
                ),
            }}
            images.append(Expected(sha(files[lxd_file]), CONTAINER, os_name, arch, version, (lxd_file,)))
            images.append(Expected(
                sha(files[incus_file]), VM, os_name, arch, version, (incus_file,), family="incus"
            ))
        product(os_name, release, arch, f"{os_name}/{release}", versions)

    files[PRODUCTS] = json.dumps({
        "content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
        "products": products,
    }).encode()
    files[INDEX] = json.dumps({"format": "index:1.0", "index": {"images": {
        "datatype": "image-downloads", "path": PRODUCTS, "format": "products:1.0",
        "products": sorted(products),
    }}}).encode()
    return files, images


class FaceHarness(Harness):
    """The upstream C{up} serving L{face_tree}, and the proxy with both faces and URL import."""

    def __init__(self, tmp_path: Any, *, forced_offline: bool = False) -> None:
        files, self.images = face_tree()
        super().__init__(tmp_path, files, forced_offline=forced_offline)
        self.certificate = ServerCertificate(pem=CERT_PEM, fingerprint=CERT_FINGERPRINT)
        # As CacheService builds them: one catalogue per client family, each refreshed with the
        # User-Agent of that family's last client.
        self.agents = ClientAgents()
        self.families: dict[Family, UpstreamMetadata] = {
            family: UpstreamMetadata(
                "up", BASE_URL, self.client, self.store, self.index, self.clock, ttl=TTL,
                idle_timeout=IDLE, health=self.health, family=family, agents=self.agents,
            )
            for family in FAMILIES
        }
        self.metadata = self.families["lxd"]
        self.files_of_cache = CacheFiles(
            self.store, self.index, self.fetcher, self.clock, self.in_use, health={"up": self.health}
        )
        self.resource = RecordingResource(
            self.metadata, self.files_of_cache, self.store, self.clock,
            families=self.families, agents=self.agents,
        )
        # As CacheService.site builds them.
        sources = {
            "up": SimplestreamsImages(self.metadata, self.files_of_cache, families=self.families)
        }
        listed = FaceCatalogue([sources["up"]])
        others = {
            "1.0": LxdApiResource(
                listed, self.files_of_cache, self.clock, self.certificate,
                host_arch=HOST_ARCH, agents=self.agents,
            ),
            "import": ImportResource(sources, self.clock, host_arch=HOST_ARCH),
        }
        self.root_resource = RootResource({"up": self.resource}, "banner\n", others)
        self.proxy = StubTreq(self.root_resource)

    # -- the catalogue ------------------------------------------------------------------------

    def image(
        self, os: str, arch: str, version: str, type: str = CONTAINER, family: str = "lxd"
    ) -> Expected:
        [found] = [
            i for i in self.images
            if (i.os, i.arch, i.version, i.type, i.family) == (os, arch, version, type, family)
        ]
        return found

    def listed(self, family: str = "lxd") -> list[Expected]:
        return [i for i in self.images if i.family == family]

    def store_files(self, paths: Iterable[str], *, cached: bool = True) -> None:
        for path in paths:
            self.seed_file(path, cached=cached)

    # -- requests -----------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[bytes, list[bytes]] | None = None,
        host: str = PROXY,
    ) -> tuple[int, bytes, Any]:
        """One request through the proxy: status, whole body, and the response."""

        async def go() -> tuple[int, bytes, Any]:
            response = await self.proxy.request(
                method, f"https://{host}{path}", headers=headers, unbuffered=True
            )
            body = await treq.content(response)
            return response.code, body, response

        result: tuple[int, bytes, Any] = self.run(Deferred.fromCoroutine(go()))
        return result

    def lxd(
        self, path: str, method: str = "GET", headers: dict[bytes, list[bytes]] | None = None
    ) -> tuple[int, dict[str, Any], Any]:
        """A request under C{/1.0} answered with LXD's envelope: status, envelope, response."""
        code, body, response = self.call(method, path, headers=headers)
        assert response.headers.getRawHeaders(b"Content-Type") == [b"application/json"], body
        envelope: dict[str, Any] = json.loads(body)
        return code, envelope, response

    def metadata_of(self, path: str, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        """The C{metadata} of a successful answer."""
        code, envelope, _ = self.lxd(path, headers=headers)
        assert (code, envelope["type"], envelope["status_code"]) == (200, "sync", 200), envelope
        return envelope["metadata"]


def assert_error(code: int, envelope: dict[str, Any], status: int) -> None:
    """An LXD error envelope sent with HTTP status C{status}."""
    assert code == status, envelope
    assert envelope["type"] == "error"
    assert envelope["error_code"] == status
    assert envelope["status_code"] == 0
    assert envelope["metadata"] is None
    assert isinstance(envelope["error"], str) and envelope["error"]


def parse_multipart(content_type: bytes, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """
    The parts of a C{multipart/form-data} body framed as Go's C{multipart.Writer} frames it:
    each part's headers and bytes, in order. Fails on anything else.
    """
    prefix = b"multipart/form-data; boundary="
    assert content_type.startswith(prefix), content_type
    boundary = content_type[len(prefix):].strip(b'"')
    delimiter = b"\r\n--" + boundary
    assert body.startswith(b"--" + boundary + b"\r\n")
    assert body.endswith(delimiter + b"--\r\n")
    chunks = (b"\r\n" + body).split(delimiter)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n"
    parts: list[tuple[dict[str, str], bytes]] = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n")
        head, separator, data = chunk[2:].partition(b"\r\n\r\n")
        assert separator
        headers = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n"))
        parts.append((headers, data))
    return parts


__all__ = [
    "CERT_FINGERPRINT", "CERT_PEM", "CONTAINER", "Expected", "FaceHarness", "HOST_ARCH", "PROXY",
    "SPLIT_ALIAS", "SPLIT_OS", "UNIFIED_ALIAS", "UNIFIED_OS", "V1", "V2", "V3", "VM",
    "assert_error", "content", "face_tree", "incus_agent", "lxd_agent", "parse_multipart",
]
