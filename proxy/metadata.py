"""The simplestreams metadata of one upstream: kept, refreshed, and read as a catalogue.

The index and the products files it names are stored as blobs (byte for byte as the upstream
sent them) with a L{MetadataRecord} holding their validators. A copy younger than the TTL is
served as is; an older one is revalidated, and several clients asking at once share one
refresh. When the upstream fails, the last good copy is served and the failure is logged once
per outage, not once per request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.blobs import BlobStore
from proxy.catalogue import CatalogueError, Item, parse_products, products_paths
from proxy.errors import NotFound, ProxyError, UpstreamFailed, UpstreamTimeout
from proxy.index import CacheIndex, MetadataRecord
from proxy.upstream import UpstreamClient, receive_body

INDEX_PATH = "streams/v1/index.json"
# A products file is JSON that the proxy parses whole; this bounds what an upstream can make it
# hold. The largest real one (Ubuntu releases) is tens of MiB.
MAX_METADATA_BYTES = 512 * 1024 * 1024


class UpstreamMetadata:
    """Metadata and catalogue of the upstream C{name} at C{base_url}."""

    log = Logger()

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
    ) -> None:
        self.name = name
        self.base_url = base_url
        self._client = client
        self._store = store
        self._index = index
        self._clock = clock
        self._ttl = ttl
        self._idle_timeout = idle_timeout
        self._refreshing: dict[str, list[Deferred[MetadataRecord]]] = {}
        self._failing: set[str] = set()
        # products path -> (sha256 of the body parsed, its items by item path)
        self._parsed: dict[str, tuple[str, dict[str, Item]]] = {}
        self._index_parsed: tuple[str, list[str]] | None = None

    async def get(self, path: str) -> MetadataRecord:
        """
        Return a current record for the metadata file C{path}: the index, or a products file
        that the index names. Fails with L{NotFound} for any other path, without asking the
        upstream, and with L{UpstreamFailed} when there is no good copy and the upstream fails.
        """
        if path != INDEX_PATH and path not in await self.products_paths():
            raise NotFound(f"{self.name}: {path} is not a file of this upstream's catalogue")
        return await self._current(path)

    async def products_paths(self) -> list[str]:
        record = await self._current(INDEX_PATH)
        if self._index_parsed is None or self._index_parsed[0] != record.sha256:
            self._index_parsed = (record.sha256, products_paths(self._read(record)))
        return self._index_parsed[1]

    async def item(self, path: str) -> Item | None:
        """The catalogue entry for the item C{path}, or None when no products file lists it."""
        for products_path in await self.products_paths():
            items = await self._items(products_path)
            found = items.get(path)
            if found is not None:
                return found
        return None

    async def _items(self, products_path: str) -> dict[str, Item]:
        record = await self._current(products_path)
        parsed = self._parsed.get(products_path)
        if parsed is None or parsed[0] != record.sha256:
            parsed = (record.sha256, parse_products(self._read(record)))
            self._parsed[products_path] = parsed
        return parsed[1]

    def _read(self, record: MetadataRecord) -> bytes:
        return self._store.path_for(record.sha256).getContent()

    async def _current(self, path: str) -> MetadataRecord:
        record = self._index.get_metadata(self.name, path)
        if record is not None and self._store.exists(record.sha256):
            if self._clock.seconds() - record.checked_at < self._ttl:
                return record
        else:
            record = None
        return await self._refresh_shared(path, record)

    async def _refresh_shared(self, path: str, stale: MetadataRecord | None) -> MetadataRecord:
        d: Deferred[MetadataRecord] = Deferred()
        observers = self._refreshing.get(path)
        if observers is not None:
            observers.append(d)
        else:
            # Register before starting: the refresh may finish synchronously.
            self._refreshing[path] = [d]
            Deferred.fromCoroutine(self._refresh_and_tell(path, stale))
        return await d

    async def _refresh_and_tell(self, path: str, stale: MetadataRecord | None) -> None:
        result: MetadataRecord | Failure
        try:
            result = await self._refresh(path, stale)
        except BaseException as e:
            failure = Failure(e)
            if isinstance(e, CancelledError):
                failure = Failure(UpstreamTimeout(f"{self.name}: upstream sent no response headers in time"))
            if path not in self._failing:
                self._failing.add(path)
                self.log.warn(
                    "refreshing {url} failed: {reason}; "
                    + ("serving the copy from {age:.0f}s ago until it recovers" if stale else "no copy to serve"),
                    url=self._url(path), reason=failure.getErrorMessage(),
                    age=(self._clock.seconds() - stale.fetched_at) if stale else 0.0,
                )
            if stale is not None:
                result = stale
            elif isinstance(failure.value, ProxyError):
                result = failure
            else:
                result = Failure(UpstreamFailed(f"{self.name}: {failure.getErrorMessage()}"))
        else:
            if path in self._failing:
                self._failing.discard(path)
                self.log.info("{url} is answering again", url=self._url(path))
        for d in self._refreshing.pop(path, []):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    async def _refresh(self, path: str, stale: MetadataRecord | None) -> MetadataRecord:
        headers: dict[bytes, bytes] = {}
        if stale is not None:
            if stale.etag:
                headers[b"If-None-Match"] = stale.etag.encode("latin-1")
            if stale.last_modified:
                headers[b"If-Modified-Since"] = stale.last_modified.encode("latin-1")
        response = await self._client.get(self._url(path), headers)
        now = self._clock.seconds()
        if response.code == 304 and stale is not None:
            await receive_body(response, lambda _: None, limit=MAX_METADATA_BYTES,
                               clock=self._clock, idle_timeout=self._idle_timeout)
            record = MetadataRecord(
                upstream=self.name, path=path, sha256=stale.sha256, etag=stale.etag,
                last_modified=stale.last_modified, fetched_at=stale.fetched_at, checked_at=now,
            )
            self._index.put_metadata(record)
            return record
        if response.code != 200:
            await receive_body(response, lambda _: None, limit=MAX_METADATA_BYTES,
                               clock=self._clock, idle_timeout=self._idle_timeout)
            if response.code == 404:
                raise NotFound(f"{self.name}: upstream has no {path} (404)")
            raise UpstreamFailed(f"{self.name}: upstream answered {response.code} for {path}")
        partial = self._store.new_partial()
        try:
            await receive_body(response, partial.write, limit=MAX_METADATA_BYTES,
                               clock=self._clock, idle_timeout=self._idle_timeout)
            digest = partial.hexdigest()
            body_path = partial.commit(digest)
        except BaseException:
            partial.discard()
            raise
        body = body_path.getContent()
        try:
            self._validate(path, body)
        except CatalogueError as e:
            self._forget_blob(digest)
            raise UpstreamFailed(f"{self.name}: {path} from upstream is not usable: {e}")
        record = MetadataRecord(
            upstream=self.name, path=path, sha256=digest,
            etag=_header(response, b"ETag"), last_modified=_header(response, b"Last-Modified"),
            fetched_at=now, checked_at=now,
        )
        self._index.put_metadata(record)
        if stale is not None and stale.sha256 != digest:
            self._forget_blob(stale.sha256)
        self.log.info("fetched {url} ({size} bytes)", url=self._url(path), size=len(body))
        return record

    def _validate(self, path: str, body: bytes) -> None:
        if path == INDEX_PATH:
            products_paths(body)
        else:
            parse_products(body)

    def _forget_blob(self, sha256: str) -> None:
        """Remove a metadata body that nothing else refers to any more."""
        if self._index.get(sha256) is not None:
            return
        if any(r.sha256 == sha256 for r in self._index.metadata_records()):
            return
        self._store.remove(sha256)


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value: bytes | str = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else value


__all__ = ["INDEX_PATH", "UpstreamMetadata"]
