"""The simplestreams metadata of one upstream: kept, refreshed, and read as a catalogue.

The index and the products files it names are stored as blobs (byte for byte as the upstream
sent them) with a L{MetadataRecord} holding their validators (L{MetadataStore}). A copy
younger than the TTL is served as is; an older one is revalidated, and several clients asking
at once share one refresh. When the upstream fails, the last good copy is served and the
failure is logged once per outage, not once per request.

L{UpstreamFiles} does that for any file of an upstream; L{UpstreamMetadata} reads the files it
is given (an L{UpstreamFiles} of the index and products files by default) as a catalogue,
parsing each copy once, off the reactor thread. Both it and L{proxy.lxd_remote.LxdRemote} are
what their users know as a L{SimplestreamsMetadata}.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import Any, Callable, Generic, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.agents import ClientAgents
from proxy.blobs import BlobStore
from proxy.catalogue import (
    Catalogue,
    CatalogueError,
    Family,
    Image,
    Item,
    parse_catalogue,
    parse_images,
    products_paths,
)
from proxy.catalogue_filter import filter_catalogue, filter_index
from proxy.health import UpstreamHealth
from proxy.errors import NotFound, ProxyError, UpstreamFailed
from proxy.index import CacheIndex, MetadataRecord
from proxy.metadata_store import MetadataStore
from proxy.metrics import NO_METRICS, Metrics
from proxy.mirrors import Mirrors
from proxy.observers import Observers
from proxy.upstream import (
    BodyBroken,
    BodyStalled,
    UpstreamClient,
    UpstreamServerError,
    as_proxy_error,
    receive_body,
)
from proxy.work import Run, free_in_steps, heavy, inline, kept

INDEX_PATH = "streams/v1/index.json"
# A products file is JSON that the proxy parses whole; this bounds what an upstream can make it
# hold. The largest real one (Ubuntu releases) is tens of MiB.
MAX_METADATA_BYTES = 512 * 1024 * 1024
# How long a client waits for a stale copy to be revalidated before it gets the copy as is.
STALE_WAIT_SECONDS = 5.0
# After a failed refresh the copy is served without asking the upstream for this long (or the
# TTL, if shorter), so that an outage costs each client nothing.
RETRY_AFTER_FAILURE_SECONDS = 30.0
# How long the filtered catalogue served while offline is reused before it is rebuilt.
OFFLINE_VIEW_SECONDS = 10.0

# What an offline view is built from: file records, their bytes, and (path, sha256) of each copy.
_ViewState = tuple[int, int, frozenset[tuple[str, str]]]


K = TypeVar("K")
V = TypeVar("V")


class ParsedOnce(Generic[K, V]):
    """
    The value computed from the latest copy of each key, computed once per copy.

    Callers asking while it is being computed share that computation; a value computed
    from an older copy is replaced, never served for a newer one.
    """

    def __init__(self, retire: Callable[[V], object] | None = None) -> None:
        self._done: dict[K, tuple[str, V]] = {}
        self._running: dict[K, tuple[str, Observers[V]]] = {}
        # Given each value replaced by a newer one (to free a large one in steps).
        self._retire = retire

    def put(self, key: K, version: str, value: V) -> None:
        old = self._done.get(key)
        self._done[key] = (version, value)
        if old is not None and old[1] is not value and self._retire is not None:
            self._retire(old[1])

    def forget(self, key: K) -> None:
        """Compute the value of C{key} again next time, whatever its version (it went missing)."""
        self._done.pop(key, None)

    def get(self, key: K, version: str, compute: Callable[[], "Deferred[V]"]) -> "Deferred[V]":
        done = self._done.get(key)
        if done is not None and done[0] == version:
            return succeed(done[1])
        running = self._running.get(key)
        if running is not None and running[0] == version:
            return running[1].add()
        waiters: Observers[V] = Observers()
        self._running[key] = (version, waiters)
        d = waiters.add()
        before = self._done.get(key)

        def finished(result: V | Failure) -> None:
            if self._running.get(key, (None, None))[1] is waiters:
                del self._running[key]
            if not isinstance(result, Failure):
                if self._done.get(key) is before:
                    self.put(key, version, result)
                elif self._retire is not None:
                    # A newer copy's value was kept meanwhile: this one only serves its callers.
                    self._retire(result)
            waiters.fire(result)

        compute().addBoth(finished)
        return d


class MetadataFiles(Protocol):
    """
    Where the files of a catalogue come from, each as its L{MetadataRecord}: fetched from the
    upstream (L{UpstreamFiles}), or synthesised from another file that is
    (L{proxy.lxd_remote.LxdRemote}).
    """

    def holds(self, path: str) -> bool:
        """Whether a copy of C{path} is held, so that reading it asks no upstream."""
        ...

    async def copy(self, path: str) -> MetadataRecord:
        """The copy held of C{path}, of any age; fetched only when there is none."""
        ...

    async def current(self, path: str, *, wait: bool = False) -> MetadataRecord:
        """
        A copy of C{path} no older than the TTL where the upstream allows: an expired one is
        served while it is revalidated, unless C{wait} (see L{UpstreamFiles.current}).
        """
        ...


def _keep_nothing(path: str, digest: str, parsed: object) -> None:
    return None


class UpstreamFiles:
    """
    Metadata files of the upstream C{name} at C{base_url}, fetched and kept in C{bodies}:
    the TTL, revalidation, stale-if-error, one-refresh-at-a-time and health rules of the
    module docstring, for any path.

    Every fetched body is checked by C{validate(path, body)} on the disk worker (raising
    L{CatalogueError} refuses it: the copy held stays), and what that parsed goes to
    C{remember(path, sha256, parsed)}, so that the owner parses each copy once.
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
        validate: Callable[[str, bytes], object],
        remember: Callable[[str, str, object], None] = _keep_nothing,
        health: UpstreamHealth | None = None,
        family: Family = "lxd",
        agents: ClientAgents | None = None,
        metrics: Metrics = NO_METRICS,
        mirrors: Mirrors | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url
        self._metrics = metrics
        # Several base URLs: each refresh asks the first healthy one, then the next.
        self._mirrors = mirrors
        self.family: Family = family
        # The LXD family's files are kept under the plain paths (as before families were told
        # apart), any other's under "@FAMILY/".
        self._record_prefix = "" if family == "lxd" else f"@{family}/"
        self._client = client
        self._bodies = bodies
        self._store = bodies.store
        self._clock = clock
        self._ttl = ttl
        self._idle_timeout = idle_timeout
        self._validate = validate
        self._remember = remember
        self.health = health
        self._agents = agents
        self._refreshing: dict[str, Observers[MetadataRecord]] = {}
        self._failing: set[str] = set()
        self._retry_at: dict[str, float] = {}
        # paths whose running refresh has outlasted STALE_WAIT_SECONDS
        self._slow: set[str] = set()
        # paths whose expired copy was served, a background refresh about to start
        self._revalidating: set[str] = set()

    def stored(self, path: str) -> MetadataRecord | None:
        """The copy held of C{path}, or None."""
        return self._bodies.stored(self.name, self._record_prefix + path)

    def holds(self, path: str) -> bool:
        return self.stored(path) is not None

    async def copy(self, path: str) -> MetadataRecord:
        """The copy held of C{path}, of any age; fetched only when there is none."""
        record = self.stored(path)
        if record is not None:
            return record
        return await self._refresh_shared(path, None)

    async def current(self, path: str, *, wait: bool = False) -> MetadataRecord:
        """
        A copy of C{path} no older than the TTL where the upstream allows.

        A stale copy is served at once while one refresh runs in the background (stale while
        revalidate): the requests after it get the new copy. With C{wait} (background work
        that must see the newest catalogue, such as auto-update), or while the upstream is
        offline and this request may probe it, the caller waits for the revalidation, but at
        most C{STALE_WAIT_SECONDS}: while the upstream hangs the last good copy is served (at
        once to everyone after the first wait ran out). After a failure the copy is served
        without asking again until C{_retry_at}. With no copy at all, the caller waits for one.
        """
        record = self.stored(path)
        if record is None:
            return await self._refresh_shared(path, None)
        now = self._clock.seconds()
        # While the upstream is offline, a request that may probe it does, fresh copy or not:
        # the first one after it comes back brings the whole catalogue back.
        probe = self.health is not None and self.health.probe_due
        if not probe and (now - record.checked_at < self._ttl or now < self._retry_at.get(path, 0.0)):
            return record
        if not probe and not wait:
            if path not in self._refreshing and path not in self._revalidating:
                # On the next turn: the caller opens the copy first, which a refresh that
                # replaced it at once (from a memory cache, say) would have removed.
                self._revalidating.add(path)
                # In this request's context: its Via chain goes with the refresh (proxy.via).
                self._clock.callLater(0, contextvars.copy_context().run, self._revalidate, path)
            return record
        # The probe waits (up to STALE_WAIT_SECONDS): what is served while offline is the
        # reduced view of the stored images, and the client that finds the upstream back
        # should get the whole catalogue, not that view once more.
        if path in self._slow:
            # A refresh is already running past the wait: nobody else waits for it.
            return record
        refreshed = Deferred.fromCoroutine(self._refresh_shared(path, record))
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            if path in self._refreshing:
                self._slow.add(path)
            refreshed.cancel()

        timer = self._clock.callLater(STALE_WAIT_SECONDS, give_up)
        try:
            return await refreshed
        except CancelledError:
            if timed_out:
                # Still waiting on the upstream: serve the copy; the refresh goes on.
                return record
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _revalidate(self, path: str) -> None:
        """Refresh C{path} in the background; the next request gets the outcome."""
        self._revalidating.discard(path)
        # A failure is logged once and the copy served until the retry interval is over.
        Deferred.fromCoroutine(self._refresh_shared(path, self.stored(path))).addErrback(
            lambda _: None
        )

    async def _refresh_shared(self, path: str, stale: MetadataRecord | None) -> MetadataRecord:
        observers = self._refreshing.get(path)
        if observers is not None:
            return await observers.add()
        # Register before starting: the refresh may finish synchronously.
        observers = self._refreshing[path] = Observers()
        d = observers.add()
        Deferred.fromCoroutine(self._refresh_and_tell(path, stale))
        return await d

    async def _refresh_and_tell(self, path: str, stale: MetadataRecord | None) -> None:
        result: MetadataRecord | Failure
        try:
            result = await self._refresh(path, stale)
        except Exception as e:
            error = as_proxy_error(Failure(e), f"{self.name}: {path}")
            self._retry_at[path] = self._clock.seconds() + min(self._ttl, RETRY_AFTER_FAILURE_SECONDS)
            if path not in self._failing:
                self._failing.add(path)
                self.log.warn(
                    "refreshing {url} failed: {reason}; "
                    + ("serving the copy from {age:.0f}s ago until it recovers" if stale else "no copy to serve"),
                    url=self.url(path), reason=error.message,
                    age=(self._clock.seconds() - stale.fetched_at) if stale else 0.0,
                )
            result = stale if stale is not None else Failure(error)
        else:
            self._retry_at.pop(path, None)
            if path in self._failing:
                self._failing.discard(path)
                self.log.info("{url} is answering again", url=self.url(path))
        self._slow.discard(path)
        observers = self._refreshing.pop(path, None)
        if observers is not None:
            observers.fire(result)

    def url(self, path: str, base: str | None = None) -> str:
        if base is None:
            base = self._mirrors.current() if self._mirrors is not None else self.base_url
        return f"{base}/{path}"

    async def _refresh(self, path: str, stale: MetadataRecord | None) -> MetadataRecord:
        health = self.health
        if health is not None:
            health.check()
        if self._mirrors is not None:
            return await self._refresh_from_mirrors(self._mirrors, path, stale)
        try:
            record = await self._fetch(path, stale)
        except Exception as e:
            if health is not None:
                health.record_error(e, self.url(path))
            raise
        return record

    async def _refresh_from_mirrors(
        self, mirrors: Mirrors, path: str, stale: MetadataRecord | None,
    ) -> MetadataRecord:
        """
        Ask the mirrors in their order until one gives C{path}; one that cannot be reached,
        answers a 5xx, breaks off or sends a catalogue that is not one is marked down. The
        upstream is told of a failure only when every mirror failed.
        """
        tried: list[str] = []
        while True:
            base = (mirrors.order(tried=tried) or [""])[0]
            if not base:
                raise AssertionError("no mirror to ask")  # pragma: no cover: order() has one
            try:
                return await self._fetch(path, stale, base)
            except Exception as e:
                answered = isinstance(e, ProxyError) and not isinstance(
                    e, (UpstreamServerError, BodyBroken, BodyStalled, _Unusable)
                )
                if answered:
                    raise
                reason = as_proxy_error(Failure(e), f"{self.name}: {path}").message
                mirrors.failed(base, reason)
                tried.append(base)
                if mirrors.order(tried=tried):
                    continue
                if self.health is not None:
                    self.health.record_failure(f"every mirror failed, the last: {reason}", True)
                raise

    async def _fetch(
        self, path: str, stale: MetadataRecord | None, base: str | None = None,
    ) -> MetadataRecord:
        headers: dict[bytes, bytes] = {}
        if stale is not None:
            if stale.etag:
                headers[b"If-None-Match"] = stale.etag.encode("latin-1")
            if stale.last_modified:
                headers[b"If-Modified-Since"] = stale.last_modified.encode("latin-1")
        if self._agents is not None:
            headers[b"User-Agent"] = self._agents.for_family(self.family)
        url = self.url(path, base)
        try:
            response = await self._client.get(url, headers)
        except Exception:
            self._metrics.upstream_answer(self.name, "metadata", None)
            raise
        self._metrics.upstream_answer(self.name, "metadata", response.code)
        if self.health is not None and (base is None or response.code < 500):
            # With mirrors, a 5xx is that mirror's (the caller moves on to the next).
            self.health.record_answer(response.code, url)
        if base is not None and self._mirrors is not None and response.code < 500:
            self._mirrors.answered(base)
        now = self._clock.seconds()
        if response.code == 304 and stale is not None:
            await receive_body(response, lambda _: None, limit=MAX_METADATA_BYTES,
                               clock=self._clock, idle_timeout=self._idle_timeout)
            record = MetadataRecord(
                upstream=self.name, path=self._record_prefix + path, sha256=stale.sha256, etag=stale.etag,
                last_modified=stale.last_modified, fetched_at=stale.fetched_at, checked_at=now,
            )
            await self._bodies.put_record(record)
            return record
        if response.code != 200:
            await receive_body(response, lambda _: None, limit=MAX_METADATA_BYTES,
                               clock=self._clock, idle_timeout=self._idle_timeout)
            if response.code == 404:
                raise NotFound(f"{self.name}: upstream has no {path} (404)")
            if response.code >= 500:
                raise UpstreamServerError(f"{self.name}: upstream answered {response.code} for {path}")
            raise UpstreamFailed(f"{self.name}: upstream answered {response.code} for {path}")
        partial = self._store.new_partial()
        try:
            await receive_body(response, partial.write, limit=MAX_METADATA_BYTES,
                               clock=self._clock, idle_timeout=self._idle_timeout)
        except BaseException:
            partial.discard()
            raise
        try:
            record, parsed = await self._bodies.put(
                self.name, self._record_prefix + path, partial,
                etag=_header(response, b"ETag"), last_modified=_header(response, b"Last-Modified"),
                fetched_at=now, checked_at=now, check=heavy(lambda body: self._validate(path, body)),
            )
        except CatalogueError as e:
            raise _Unusable(f"{self.name}: {path} from upstream is not usable: {e}")
        self._remember(path, record.sha256, parsed)
        self._metrics.upstream_received(self.name, "metadata", partial.size)
        self.log.info("fetched {url} ({size} bytes)", url=url, size=partial.size)
        return record


class _Unusable(UpstreamFailed):
    """A metadata file that is not what its path must be (another mirror may have a good one)."""


class SimplestreamsMetadata(Protocol):
    """
    The simplestreams metadata of one upstream, as the faces, the prefetcher and the admin
    command read it: L{UpstreamMetadata} keeps the files an upstream publishes,
    L{proxy.lxd_remote.LxdRemote} synthesises them from an LXD server's image list.
    """

    @property
    def name(self) -> str: ...

    @property
    def base_url(self) -> str: ...

    @property
    def family(self) -> Family: ...

    @property
    def health(self) -> UpstreamHealth | None: ...

    @property
    def offline(self) -> bool: ...

    async def get(self, path: str) -> MetadataRecord: ...

    def holds_catalogue(self) -> bool: ...

    async def offline_view(self, path: str) -> bytes: ...

    async def products_paths(self, *, refresh: bool = True) -> list[str]: ...

    async def revalidate(self) -> None:
        """
        Bring every file of the catalogue up to date, waiting for each refresh as a client
        no longer does (stale while revalidate): for background work that must plan on the
        newest catalogue.
        """

    async def item(self, path: str) -> Item | None: ...

    async def catalogue_images(self, family: Family | None = None, *, refresh: bool = True) -> list[Image]: ...

    async def products_images(
        self, products_path: str, family: Family | None = None, *, refresh: bool = True
    ) -> list[Image]: ...

    def read(self, record: MetadataRecord) -> bytes: ...


class UpstreamMetadata:
    """
    Metadata and catalogue of the upstream C{name} at C{base_url}: a L{SimplestreamsMetadata}.

    Its files come from C{files}: by default an L{UpstreamFiles} fetching them from the
    upstream (which is what C{client}, C{ttl}, C{idle_timeout} and C{agents} are for).
    L{proxy.lxd_remote.LxdRemote} gives files it synthesises instead, and C{products}, the
    products files its index names even while it lists none.
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
        family: Family = "lxd",
        agents: ClientAgents | None = None,
        disk: Run = inline,
        files: MetadataFiles | None = None,
        products: Sequence[str] | None = None,
        metrics: Metrics = NO_METRICS,
        mirrors: Mirrors | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url
        # The client family whose catalogue this is.
        self.family: Family = family
        self._store = store
        self._index = index
        self._clock = clock
        # Reading and parsing a products file (tens of MiB for Ubuntu's) runs here, never on
        # the reactor thread.
        self._disk = disk
        self._bodies = MetadataStore(store, index, disk)
        self.health = health
        self._files: MetadataFiles = files if files is not None else UpstreamFiles(
            name, base_url, client, self._bodies, clock, ttl=ttl, idle_timeout=idle_timeout,
            validate=self._validate, remember=self._remember, health=health, family=family,
            agents=agents, metrics=metrics, mirrors=mirrors,
        )
        self._products = None if products is None else list(products)
        # Each catalogue file parsed once per copy: the index's products paths; each products
        # file's items and this family's images, from one pass; the images another family
        # sees, when asked for, apart.
        self._index_paths: ParsedOnce[str, list[str]] = ParsedOnce()
        self._catalogues: ParsedOnce[str, Catalogue] = ParsedOnce(
            retire=lambda old: free_in_steps(clock, old.items, old.images)
        )
        self._other_images: ParsedOnce[tuple[str, Family], list[Image]] = ParsedOnce()
        # path -> (when built, what it was built from, the body served while offline)
        self._offline_views: dict[str, tuple[float, _ViewState, bytes]] = {}

    async def get(self, path: str) -> MetadataRecord:
        """
        Return a current record for the metadata file C{path}: the index, or a products file
        that the index names. Fails with L{NotFound} for any other path, without asking the
        upstream, and with L{UpstreamFailed} when there is no good copy and the upstream fails.
        """
        if path != INDEX_PATH and path not in await self.products_paths():
            raise NotFound(f"{self.name}: {path} is not a file of this upstream's catalogue")
        return await self._files.current(path)

    def holds_catalogue(self) -> bool:
        """Whether a copy of the index is held (so that looking paths up asks no upstream)."""
        return self._files.holds(INDEX_PATH)

    @property
    def offline(self) -> bool:
        return self.health is not None and self.health.offline

    async def offline_view(self, path: str) -> bytes:
        """
        The body of C{path} as served while the upstream is offline: the catalogue filtered
        to the images whose files are all stored, so that every alias resolves to the newest
        image that can actually be served. Reused for at most C{OFFLINE_VIEW_SECONDS}, and
        only while the copies and the stored files it was built from are unchanged.
        """
        now = self._clock.seconds()
        # A view from an earlier outage (the upstream came back meanwhile and files were
        # stored) would hide images that can be served.
        state = self._offline_state()
        cached = self._offline_views.get(path)
        if cached is not None and cached[1] == state and now - cached[0] < OFFLINE_VIEW_SECONDS:
            return cached[2]
        copies: list[tuple[str, MetadataRecord]] = []
        for products_path in await self.products_paths(refresh=False):
            # One never fetched (nor imported) lists none of its images: asking the upstream
            # for it is what offline rules out.
            if self._files.holds(products_path):
                copies.append((products_path, await self._files.copy(products_path)))
        index_record = await self._files.copy(INDEX_PATH)
        bodies = await self._disk(heavy(self._filtered_bodies), copies, index_record)
        for built_path, body in bodies.items():
            self._offline_views[built_path] = (now, state, body)
        if path not in bodies:
            raise NotFound(f"{self.name}: {path} is not a file of this upstream's catalogue")
        return bodies[path]

    def _filtered_bodies(
        self, copies: list[tuple[str, MetadataRecord]], index_record: MetadataRecord
    ) -> dict[str, bytes]:
        """The catalogue's files keeping only the images whose files are all stored (slow)."""
        remaining: dict[str, list[str]] = {}
        bodies: dict[str, bytes] = {}
        for products_path, record in copies:
            body, left = filter_catalogue(
                self.read(record), lambda item: self._store.exists(item.sha256)
            )
            bodies[products_path] = body
            remaining[products_path] = sorted(left)
        bodies[INDEX_PATH] = filter_index(self.read(index_record), remaining)
        return bodies

    def _offline_state(self) -> _ViewState:
        """What the offline views of this upstream are built from, now."""
        copies = frozenset(
            (r.path, r.sha256) for r in self._index.metadata_records() if r.upstream == self.name
        )
        return (self._index.file_count(), self._index.total_size(), copies)

    async def revalidate(self) -> None:
        await self._files.current(INDEX_PATH, wait=True)
        for products_path in await self.products_paths(refresh=False):
            await self._files.current(products_path, wait=True)

    async def products_paths(self, *, refresh: bool = True) -> list[str]:
        record = await (self._files.current(INDEX_PATH) if refresh else self._files.copy(INDEX_PATH))
        if self._products is not None:
            # Named even while the index names none (it lists no image yet).
            return self._products
        return await self._index_paths.get(
            INDEX_PATH, record.sha256, lambda: self._disk(lambda: products_paths(self.read(record))),
        )

    async def item(self, path: str) -> Item | None:
        """
        The catalogue entry for the item C{path}, or None when no products file lists it.

        This reads the copies the proxy holds, whatever their age, and asks the upstream only
        for a file it has no copy of: clients fetch the index and products files (which
        refreshes them) before they ask for files, and a path that no catalogue lists must
        not cost an upstream request.
        """
        unreadable: ProxyError | None = None
        for products_path in await self.products_paths(refresh=False):
            try:
                items = await self._items(products_path)
            except ProxyError as e:
                # No copy and the upstream cannot give one now (offline, say): the item may
                # still be listed by another products file.
                unreadable = e
                continue
            found = items.get(path)
            if found is not None:
                return found
        if unreadable is not None:
            raise unreadable
        return None

    async def catalogue_images(self, family: Family | None = None, *, refresh: bool = True) -> list[Image]:
        """
        The images the catalogue lists for a client of C{family} (this catalogue's own by
        default): from copies no older than the TTL, or with C{refresh=False} from whatever
        copies are held.
        """
        images: list[Image] = []
        for products_path in await self.products_paths(refresh=refresh):
            images.extend(await self.products_images(products_path, family, refresh=refresh))
        return images

    async def products_images(
        self, products_path: str, family: Family | None = None, *, refresh: bool = True
    ) -> list[Image]:
        """The images of one products file, parsed once per version of it."""
        family = self.family if family is None else family
        record = await (self.get(products_path) if refresh else self._files.copy(products_path))
        if family == self.family:
            return (await self._catalogue(products_path, record)).images
        return await self._other_images.get(
            (products_path, family), record.sha256,
            lambda: self._disk(heavy(lambda: kept(parse_images(self.read(record), family)))),
        )

    async def _items(self, products_path: str) -> dict[str, Item]:
        record = await self._files.copy(products_path)
        return (await self._catalogue(products_path, record)).items

    def _catalogue(self, products_path: str, record: MetadataRecord) -> "Deferred[Catalogue]":
        return self._catalogues.get(
            products_path, record.sha256,
            lambda: self._disk(heavy(lambda: kept(parse_catalogue(self.read(record), self.family)))),
        )

    def read(self, record: MetadataRecord) -> bytes:
        """The stored body of a metadata file (blocking: called inside C{disk} work)."""
        return self._bodies.read(record.sha256)

    def _remember(self, path: str, digest: str, parsed: object) -> None:
        """Keep what validating the copy C{digest} of C{path} parsed, so it is parsed once."""
        if path == INDEX_PATH and isinstance(parsed, list):
            self._index_paths.put(INDEX_PATH, digest, parsed)
        elif isinstance(parsed, Catalogue):
            self._catalogues.put(path, digest, parsed)

    def _validate(self, path: str, body: bytes) -> object:
        """Parse a fetched body as what C{path} must be; raise L{CatalogueError} if it is not."""
        if path == INDEX_PATH:
            return products_paths(body)
        # Runs on the disk worker: the catalogue is kept, so out of the collector's scans.
        return kept(parse_catalogue(body, self.family))


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value: bytes | str = values[0]
    return value.decode("latin-1") if isinstance(value, bytes) else value


__all__ = [
    "INDEX_PATH",
    "MetadataFiles",
    "ParsedOnce",
    "SimplestreamsMetadata",
    "UpstreamFiles",
    "UpstreamMetadata",
]
