"""The request path wired as L{proxy.service.CacheService} wires it, in memory and deterministic.

On the harness base of L{tests.helpers.harness} (C{StubTreq} over the real resource tree, a
L{ScriptedUpstream} through C{RequestTraversalAgent}, a L{Clock}), as in
C{tests/test_request_path.py}, plus what the service adds: one
L{UpstreamHealth} shared by the fetcher and the metadata, an L{InUse} that the resource holds
while it serves a file, and a L{CacheLifecycle} whose C{make_room} the fetcher calls before every
commit, with C{busy()} being C{InUse.current() | fetcher.busy()}.

L{catalogue_tree} builds small simplestreams trees with several products files and versions.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.blobs import BlobStore
from proxy.busy import InUse
from proxy.config import CacheConfig, UpstreamConfig
from proxy.download_slots import DownloadSlots
from proxy.downloads import Fetcher
from proxy.health import UpstreamHealth
from proxy.index import FileRecord, MetadataRecord
from proxy.lifecycle import CacheLifecycle
from proxy.metadata import UpstreamMetadata
from proxy.metrics import NO_METRICS, Metrics, face_of
from proxy.files import CacheFiles
from proxy.simplestreams import RootResource, UpstreamResource
from tests.helpers.harness import IDLE, CacheHarness
from tests.helpers.scripted import BASE_URL, ScriptedUpstream, sha

TTL = 300.0
INDEX = "streams/v1/index.json"

# products path -> product id -> version -> (metadata item bytes, squashfs bytes)
Catalogue = dict[str, dict[str, dict[str, tuple[bytes, bytes]]]]


def image_dir(product_id: str, version: str) -> str:
    return "images/" + product_id.replace(":", "/") + "/" + version


def meta_path(product_id: str, version: str) -> str:
    return f"{image_dir(product_id, version)}/lxd.tar.xz"


def rootfs_path(product_id: str, version: str) -> str:
    return f"{image_dir(product_id, version)}/rootfs.squashfs"


def catalogue_tree(catalogue: Catalogue) -> dict[str, bytes]:
    """
    An index naming each products file of C{catalogue} (in order), the products files, and
    every image file: each version is one container image, a metadata item and a squashfs.
    """
    files: dict[str, bytes] = {}
    entries: dict[str, Any] = {}
    for products_path, products in catalogue.items():
        doc: dict[str, Any] = {
            "content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
            "products": {},
        }
        for product_id, versions in products.items():
            os_name, release, arch, variant = product_id.split(":")
            items_by_version: dict[str, Any] = {}
            for version, (meta, rootfs) in versions.items():
                items_by_version[version] = {"items": {
                    "lxd.tar.xz": {
                        "ftype": "lxd.tar.xz", "path": meta_path(product_id, version),
                        "size": len(meta), "sha256": sha(meta),
                        "combined_squashfs_sha256": sha(meta + rootfs),
                    },
                    "root.squashfs": {
                        "ftype": "squashfs", "path": rootfs_path(product_id, version),
                        "size": len(rootfs), "sha256": sha(rootfs),
                    },
                }}
                files[meta_path(product_id, version)] = meta
                files[rootfs_path(product_id, version)] = rootfs
            doc["products"][product_id] = {
                "aliases": f"{os_name}/{release}", "arch": arch, "os": os_name,
                "release": release, "release_title": release, "variant": variant,
                "versions": items_by_version,
            }
        files[products_path] = json.dumps(doc).encode()
        key = products_path.rsplit("/", 1)[-1].removesuffix(".json")
        entries[key] = {
            "datatype": "image-downloads", "path": products_path, "format": "products:1.0",
            "products": list(products),
        }
    files[INDEX] = json.dumps({"format": "index:1.0", "index": entries}).encode()
    return files


def hang_up(request: Request) -> Any:
    """A scripted response: the upstream drops the connection without answering."""
    transport: Any = request.channel.transport
    transport.abortConnection()
    return NOT_DONE_YET


class DiskOfCapacity(CacheLifecycle):
    """
    A lifecycle on a file system of C{capacity} bytes that holds nothing but the cache's blobs
    and temp files: free space follows what the test stores, whatever the real disk does.
    """

    def __init__(self, *args: Any, capacity: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = capacity

    def free_bytes(self) -> int:
        return self.capacity - bytes_on_disk(self._store)


def bytes_on_disk(store: BlobStore) -> int:
    """Bytes of every blob (files and metadata) and temp file."""
    total = 0
    for top in (store.blobs_dir.path, store.temp_dir.path):
        for dirpath, _dirs, names in os.walk(top):
            total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return total


class RecordingResource(UpstreamResource):
    """Keeps every server-side request, so a test can reach the producer serving it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[Request] = []

    async def handle(self, request: Request) -> None:
        self.requests.append(request)
        await super().handle(request)


class Harness(CacheHarness):
    """
    One upstream C{up} at L{BASE_URL} serving C{files}, and the proxy in front of it.

    @param capacity: when given, the cache's file system holds this many bytes
        (L{DiskOfCapacity}); otherwise free space is the real file system's.
    @param upstream_concurrency: the most downloads at once (None: no limit).
    """

    def __init__(
        self,
        tmp_path: Any,
        files: dict[str, bytes],
        *,
        forced_offline: bool = False,
        max_size: int | None = None,
        min_free: int = 0,
        capacity: int | None = None,
        metrics: Metrics = NO_METRICS,
        upstream_concurrency: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.files = files
        self.upstream = ScriptedUpstream(files)
        # Far from the epoch, so that "last used at 0" is never a tie with anything real.
        super().__init__(tmp_path, self.origin(), BASE_URL, start=1_000_000)
        self.health = UpstreamHealth("up", self.clock, forced_offline=forced_offline)
        self.in_use = InUse()
        config = CacheConfig(dir=self.root.path, max_size=max_size, min_free=min_free)
        if capacity is None:
            self.lifecycle = CacheLifecycle(
                self.index, self.store, config, self.clock, self.busy, metrics=metrics
            )
        else:
            self.lifecycle = DiskOfCapacity(
                self.index, self.store, config, self.clock, self.busy, capacity=capacity,
                metrics=metrics,
            )
        self.fetcher = Fetcher(
            self.client, self.store, self.index, self.clock, [UpstreamConfig("up", BASE_URL)], IDLE,
            make_room=self.lifecycle.make_room, room_to_receive=self.lifecycle.room_to_receive_later,
            health={"up": self.health}, metrics=metrics,
            slots=DownloadSlots({"up": upstream_concurrency}),
        )
        self.metadata = UpstreamMetadata(
            "up", BASE_URL, self.client, self.store, self.index, self.clock,
            ttl=TTL, idle_timeout=IDLE, health=self.health, metrics=metrics,
        )
        # As CacheService.site builds them.
        self.files_of_cache = CacheFiles(
            self.store, self.index, self.fetcher, self.clock, self.in_use, health={"up": self.health},
            metrics=metrics,
        )
        self.resource = RecordingResource(self.metadata, self.files_of_cache, self.store, self.clock)

        def observe(segment: str, request: Request) -> None:
            metrics.observe_request(face_of(segment, {"up"}), request)

        self.proxy = StubTreq(RootResource({"up": self.resource}, "banner\n", observe=observe))

    def origin(self) -> Resource:
        """What the upstream's origin serves: the scripted upstream, unless a subclass says."""
        return self.upstream

    def busy(self) -> set[str]:
        return self.in_use.current() | self.fetcher.busy()

    # -- requests ------------------------------------------------------------

    def json(self, path: str) -> Any:
        code, body, _ = self.fetch(path)
        assert code == 200, (code, body)
        return json.loads(body)

    # -- the upstream ----------------------------------------------------------

    def upstream_down(self) -> None:
        """Every path of the upstream drops the connection from now on."""
        for path in self.files:
            self.upstream.override[path] = hang_up

    def upstream_up(self) -> None:
        self.upstream.override.clear()

    def upstream_gets(self, path: str | None = None) -> int:
        if path is None:
            return len(self.upstream.requests)
        return self.upstream.paths_requested(path)

    # -- the cache -------------------------------------------------------------

    def stored(self) -> set[str]:
        """Digests of the file records."""
        return {r.sha256 for r in self.index.records()}

    def seed_metadata(self, path: str, body: bytes | None = None) -> None:
        """Store the upstream's C{path} as if fetched just now (a bundle import does the same)."""
        digest = self._put_blob(self.files[path] if body is None else body)
        now = self.clock.seconds()
        self.index.put_metadata(MetadataRecord(
            upstream="up", path=path, sha256=digest, etag=None, last_modified=None,
            fetched_at=now, checked_at=now,
        ))

    def seed_file(self, path: str, *, cached: bool = True) -> FileRecord:
        """Store the upstream's image file C{path} with its record, last used now."""
        data = self.files[path]
        digest = self._put_blob(data)
        now = self.clock.seconds()
        record = FileRecord(
            sha256=digest, size=len(data), upstream="up", paths=(f"up/{path}",), product="",
            version="", stored_at=now, last_used_at=now, use_count=0, cached=cached,
            auto_update=not cached,
        )
        self.index.put(record)
        return record

    def _put_blob(self, data: bytes) -> str:
        partial = self.store.new_partial()
        partial.write(data)
        digest = sha(data)
        partial.commit(digest)
        return digest
