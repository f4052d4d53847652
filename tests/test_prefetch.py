"""
Auto-update (L{proxy.prefetch.Prefetcher}), in memory and deterministic.

The upstream is a L{ScriptedUpstream} serving a small generated catalogue through
C{RequestTraversalAgent}; the cache (blob store, LMDB index, L{Fetcher}, L{UpstreamMetadata}) is
the real one. Time is a L{Clock}: the schedule, the metadata TTL, the expiry window and the wait
for clients' downloads all move only when a test advances it. Every wait is a bounded loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pytest
from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent
from twisted.python.filepath import FilePath

from proxy.catalogue import Item
from proxy.config import CacheConfig, Config, PinConfig, ServerConfig, UpstreamConfig
from proxy.downloads import Fetcher
from proxy.fetch import Download, FetchedItem
from proxy.index import PinRecord
from proxy.metadata import UpstreamMetadata
from proxy.prefetch import (
    DAY_SECONDS,
    STARTUP_DELAY_SECONDS,
    YIELD_TO_CLIENTS_SECONDS,
    PinRef,
    Prefetcher,
    TickReport,
)
from tests.helpers.harness import CacheHarness, Closing, collect, outcome
from tests.helpers.logs import Logged
from tests.helpers.scripted import BASE_URL, Held, ScriptedUpstream, sha

START = 1_700_000_000.0
TTL = 300.0
IDLE = 60.0
HOUR = 3600.0
V0, V1, V2, V3 = "20231201_0000", "20240101_0000", "20240201_0000", "20240301_0000"
CONTAINER, VM = "container", "virtual-machine"


# -- a catalogue whose versions a test can add ------------------------------------------------


@frozen
class Product:
    """One amd64 (or other) product; every file of every version has its own content."""

    os: str
    release: str
    arch: str = "amd64"
    versions: tuple[str, ...] = (V1,)
    # also a disk-kvm.img root, which makes a virtual-machine image sharing the metadata file
    vm: bool = False
    # (version, base): the version lists a squashfs delta from base
    deltas: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        return f"{self.os}:{self.release}:{self.arch}:default"

    @property
    def alias(self) -> str:
        return f"{self.os}/{self.release}"

    def meta(self, version: str) -> str:
        return f"{self._base(version)}/lxd.tar.xz"

    def root(self, version: str, type: str = CONTAINER) -> str:
        return f"{self._base(version)}/{'rootfs.squashfs' if type == CONTAINER else 'disk.qcow2'}"

    def files(self, version: str, type: str = CONTAINER) -> list[str]:
        return [self.meta(version), self.root(version, type)]

    def delta(self, version: str, base: str) -> str:
        return f"{self._base(version)}/delta-{base}.vcdiff"

    def with_versions(self, *versions: str) -> Product:
        return attrs.evolve(self, versions=versions)

    def with_deltas(self, *deltas: tuple[str, str]) -> Product:
        return attrs.evolve(self, deltas=deltas)

    def _base(self, version: str) -> str:
        return f"images/{self.os}/{self.release}/{self.arch}/default/{version}"


def content(path: str) -> bytes:
    return f"{path}\n".encode() * 40


def catalogue(products: Iterable[Product]) -> dict[str, bytes]:
    """The index, the products file and every image file of C{products}, by path."""
    files: dict[str, bytes] = {}
    entries: dict[str, Any] = {}

    def item(ftype: str, path: str, **extra: str) -> dict[str, Any]:
        body = files[path] = content(path)
        return {"ftype": ftype, "path": path, "size": len(body), "sha256": sha(body), **extra}

    for product in products:
        versions: dict[str, Any] = {}
        for version in product.versions:
            meta, root = product.meta(version), product.root(version)
            items = {"root.squashfs": item("squashfs", root)}
            combined = {"combined_squashfs_sha256": sha(content(meta) + content(root))}
            if product.vm:
                disk = product.root(version, VM)
                items["disk.qcow2"] = item("disk-kvm.img", disk)
                combined["combined_disk-kvm-img_sha256"] = sha(content(meta) + content(disk))
            items["lxd.tar.xz"] = item("lxd.tar.xz", meta, **combined)
            for new, base in product.deltas:
                if new == version:
                    items[f"root.{base}.vcdiff"] = item(
                        "squashfs.vcdiff", product.delta(version, base), delta_base=base
                    )
            versions[version] = {"items": items}
        entries[product.id] = {
            "aliases": product.alias, "arch": product.arch, "os": product.os,
            "release": product.release, "release_title": product.release, "variant": "default",
            "versions": versions,
        }
    products_doc = {"content_id": "images", "datatype": "image-downloads", "format": "products:1.0",
                    "products": entries}
    index_doc = {"format": "index:1.0", "index": {"images": {
        "datatype": "image-downloads", "path": "streams/v1/images.json", "format": "products:1.0",
        "products": list(entries)}}}
    files["streams/v1/index.json"] = json.dumps(index_doc).encode()
    files["streams/v1/images.json"] = json.dumps(products_doc).encode()
    return files


TESTOS = Product("testos", "2.0", vm=True)
TESTOS_ARM = Product("testos", "2.0", arch="arm64", vm=True)
OTHER = Product("other", "1.0")
THIRD = Product("third", "1.0")


# -- the harness ------------------------------------------------------------------------------


class RecordingFetcher(Fetcher):
    """A L{Fetcher} that remembers every C{get}: (item path, background)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gets: list[tuple[str, bool]] = []

    def get(self, upstream: str, item: Item, *, background: bool = False) -> FetchedItem:
        self.gets.append((item.path, background))
        return super().get(upstream, item, background=background)


class Harness(CacheHarness):
    def __init__(
        self, tmp_path: Any, products: Iterable[Product], pins: Iterable[PinConfig] = (), **cache: Any
    ) -> None:
        self.files = catalogue(products)
        self.upstream = ScriptedUpstream(self.files)
        super().__init__(tmp_path, self.upstream, BASE_URL, start=START)
        self.fetcher = RecordingFetcher(
            self.client, self.store, self.index, self.clock, [UpstreamConfig("up", BASE_URL)], IDLE
        )
        self.metadata = UpstreamMetadata(
            "up", BASE_URL, self.client, self.store, self.index, self.clock, ttl=TTL, idle_timeout=IDLE
        )
        self.config = Config(
            server=ServerConfig(),
            cache=CacheConfig(dir=str(tmp_path), metadata_ttl=TTL, **cache),
            upstreams=(UpstreamConfig("up", BASE_URL),),
            pins=tuple(pins),
        )
        self.prefetcher = Prefetcher(
            self.config, {"up": self.metadata}, self.fetcher, self.index, self.clock, host_arch="x86_64"
        )

    # -- driving --

    def tick(self) -> TickReport:
        report: TickReport = self.run(Deferred.fromCoroutine(self.prefetcher.tick()))
        return report

    def start_tick(self) -> list[Any]:
        """Start a tick; the list gets its outcome once it ends."""
        return collect(Deferred.fromCoroutine(self.prefetcher.tick()))

    def publish(self, *products: Product) -> None:
        """Change what the upstream lists, and let the TTL of the proxy's copy run out."""
        self.files.update(catalogue(products))
        self.clock.advance(TTL + 1)

    def pin(self, alias: str, type: str = CONTAINER, arch: str = "") -> None:
        """A pin made with the admin command: kept in the index."""
        self.index.put_pin(PinRecord("up", alias, type, arch, self.clock.seconds()))

    # -- clients --

    def item(self, path: str) -> Item:
        found = self.run(Deferred.fromCoroutine(self.metadata.item(path)))
        assert isinstance(found, Item), path
        return found

    def client_download(self, path: str) -> Download:
        """What a client's miss starts (not in the background)."""
        download = self.fetcher.get("up", self.item(path))
        # A file of a simplestreams upstream is fetched as itself.
        assert isinstance(download, Download)
        return download

    def finish_held(self, path: str) -> None:
        held = [h for h in self.upstream.held.get(path, []) if not h.request.finished]
        assert held, f"no request for {path} is waiting"
        held[0].write(self.files[path])
        held[0].finish()
        self.settle()

    def answer_held(self, most_at_once: int) -> int:
        """
        Answer the held upstream requests one at a time until none is left, checking that no
        more than C{most_at_once} downloads run at any moment; return the most seen.
        """
        most = 0
        for _ in range(50):
            self.settle()
            active = self.active_downloads()
            assert len(active) <= most_at_once
            assert len(self.fetcher.in_flight()) <= most_at_once
            most = max(most, len(active))
            if not active:
                return most
            self.finish_held(active[0][0])
        raise AssertionError("held requests kept coming")

    # -- looking --

    def state(self, path: str) -> str:
        record = self.index.find_path("up", path)
        if record is None:
            return "missing"
        return {(False, True): "pinned", (True, False): "cached"}.get(
            (record.cached, record.auto_update), f"cached={record.cached} auto_update={record.auto_update}"
        )

    def states(self, paths: Iterable[str]) -> list[str]:
        return [self.state(path) for path in paths]

    def image_requests(self) -> list[str]:
        """Every image file the upstream was asked for, in order (metadata left out)."""
        return [path for _, path, _ in self.upstream.requests if path.startswith("images/")]

    def active_downloads(self) -> list[tuple[str, Held]]:
        return [
            (path, held) for path, helds in self.upstream.held.items()
            for held in helds if not held.request.finished
        ]


Make = Callable[..., Harness]


@pytest.fixture
def make(tmp_path: Any, closing: Closing) -> Make:
    """Build the harness for a test's catalogue and configuration; the index is closed after."""

    def build(products: Iterable[Product], pins: Iterable[PinConfig] = (), **cache: Any) -> Harness:
        return closing(Harness(tmp_path, products, pins, **cache))

    return build


def fake_ticks(monkeypatch: pytest.MonkeyPatch, h: Harness) -> tuple[list[float], list["Deferred[None]"]]:
    """
    Replace the tick by one that notes when it starts (seconds since C{START}) and, when the
    test put a gate in the second list, waits for that gate before it ends.
    """
    started: list[float] = []
    gates: list[Deferred[None]] = []

    async def tick(refs: Any = None, *, follow_cached: bool | None = None) -> TickReport:
        started.append(h.clock.seconds() - START)
        if gates:
            await gates.pop(0)
        return TickReport()

    monkeypatch.setattr(h.prefetcher, "tick", tick)
    return started, gates


# -- 1. schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [10.0, HOUR])
def test_first_tick_after_the_startup_delay_then_every_interval(
    make: Make, monkeypatch: pytest.MonkeyPatch, interval: float
) -> None:
    h = make([TESTOS], auto_update_interval=interval)
    started, _ = fake_ticks(monkeypatch, h)
    h.prefetcher.startService()
    # However short the interval, nothing runs before the start-up delay is over.
    h.clock.advance(STARTUP_DELAY_SECONDS - 1)
    assert started == []
    h.clock.advance(1)
    assert started == [STARTUP_DELAY_SECONDS]
    for n in range(1, 4):
        h.clock.advance(interval - 1)
        assert len(started) == n
        h.clock.advance(1)
        assert started[n:] == [STARTUP_DELAY_SECONDS + n * interval]
    h.prefetcher.stopService()


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_an_interval_of_zero_or_less_disables_auto_update(
    make: Make, monkeypatch: pytest.MonkeyPatch, interval: float
) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)], auto_update_interval=interval)
    started, _ = fake_ticks(monkeypatch, h)
    h.prefetcher.startService()
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(30 * DAY_SECONDS)
    assert started == []
    h.prefetcher.stopService()


@pytest.mark.parametrize("stop_at", [0.0, STARTUP_DELAY_SECONDS - 1, STARTUP_DELAY_SECONDS + 1])
def test_stop_cancels_the_first_tick_and_the_loop(
    make: Make, monkeypatch: pytest.MonkeyPatch, stop_at: float
) -> None:
    h = make([TESTOS], auto_update_interval=HOUR)
    started, _ = fake_ticks(monkeypatch, h)
    h.prefetcher.startService()
    h.clock.advance(stop_at)
    ran = list(started)
    h.prefetcher.stopService()
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(10 * HOUR)
    assert started == ran


def test_run_while_a_tick_runs_joins_the_running_one(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    h = make([TESTOS])
    started, gates = fake_ticks(monkeypatch, h)
    gate: Deferred[None] = Deferred()
    gates.append(gate)
    running = h.prefetcher.run()
    results = collect(running)
    joined = h.prefetcher.run()
    joined_results = collect(joined)
    cancelled = h.prefetcher.run()
    cancelled.addErrback(lambda _: None)
    assert joined is not running
    assert len(started) == 1 and results == []
    # One caller giving up cancels neither the run nor the others' answer.
    cancelled.cancel()
    gate.callback(None)
    report = outcome(results)
    assert isinstance(report, TickReport) and outcome(joined_results) is report
    # Once it is over, the next call starts a new one.
    assert isinstance(outcome(collect(h.prefetcher.run())), TickReport)
    assert len(started) == 2


def test_the_loop_does_not_start_a_tick_while_one_runs(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    h = make([TESTOS], auto_update_interval=60.0)
    started, gates = fake_ticks(monkeypatch, h)
    gate: Deferred[None] = Deferred()
    gates.append(gate)
    h.prefetcher.startService()
    h.clock.advance(STARTUP_DELAY_SECONDS)
    assert len(started) == 1
    # The loop comes round twice while the first tick runs: it waits for it instead.
    h.clock.advance(60.0)
    h.clock.advance(60.0)
    assert len(started) == 1
    gate.callback(None)
    # It carries on with its next round.
    h.clock.advance(60.0)
    assert len(started) == 2
    h.prefetcher.stopService()
    assert h.clock.getDelayedCalls() == []


def test_a_failing_tick_is_logged_and_the_loop_goes_on(
    make: Make, monkeypatch: pytest.MonkeyPatch, logged: Logged
) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)], auto_update_interval=HOUR)
    real_pin_refs = h.prefetcher.pin_refs
    calls: list[None] = []

    def pin_refs() -> Any:
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError("index unreadable")
        return real_pin_refs()

    monkeypatch.setattr(h.prefetcher, "pin_refs", pin_refs)
    h.prefetcher.startService()
    h.clock.advance(STARTUP_DELAY_SECONDS)
    h.settle()
    failures = [e for e in logged.failures() if e["log_failure"].check(RuntimeError)]
    assert [e["log_format"] for e in failures] == ["auto-update run failed"]
    assert h.image_requests() == []
    h.clock.advance(HOUR)
    h.settle()
    assert h.states(TESTOS.files(V1)) == ["pinned", "pinned"]
    h.prefetcher.stopService()


def test_run_turns_a_failure_into_an_empty_report(
    make: Make, monkeypatch: pytest.MonkeyPatch, logged: Logged
) -> None:
    h = make([TESTOS])

    async def tick(refs: Any = None, *, follow_cached: bool | None = None) -> TickReport:
        raise RuntimeError("boom")

    monkeypatch.setattr(h.prefetcher, "tick", tick)
    assert outcome(collect(h.prefetcher.run())) == TickReport()
    assert any(e["log_failure"].check(RuntimeError) for e in logged.failures())


# -- 2. pinned aliases ------------------------------------------------------------------------


def test_pins_bring_the_newest_version_for_their_arch_and_type(make: Make) -> None:
    testos = TESTOS.with_versions(V1, V2)
    testos_arm = TESTOS_ARM.with_versions(V1, V2)
    h = make([testos, testos_arm, OTHER], [PinConfig("up", testos.alias, arch="x86_64")])
    # An admin pin without an arch is for the proxy's host (x86_64 here); an arch may also be
    # named as the stream names it (amd64).
    h.pin(testos.alias, VM)
    h.pin(OTHER.alias, CONTAINER, arch="amd64")
    report = h.tick()
    wanted = [testos.meta(V2), testos.root(V2), testos.root(V2, VM), OTHER.meta(V1), OTHER.root(V1)]
    assert sorted(h.image_requests()) == sorted(wanted)
    assert sorted(report.downloaded) == sorted(wanted)
    assert (report.images, report.failed, report.unresolved) == (3, [], [])
    assert sorted(h.fetcher.gets) == sorted((path, True) for path in wanted)
    assert h.states(wanted) == ["pinned"] * len(wanted)
    for path in wanted:
        record = h.index.find_path("up", path)
        assert record is not None and record.sha256 == sha(h.files[path])
        assert h.store.exists(record.sha256)
    # Nothing else is stored: no older version, no other architecture.
    assert h.states([testos.meta(V1), testos.root(V1), testos_arm.meta(V2)]) == ["missing"] * 3


def test_stored_files_are_not_downloaded_again_but_become_pinned(make: Make) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)])
    h.run(h.client_download(TESTOS.meta(V1)).when_done())
    assert h.state(TESTOS.meta(V1)) == "cached"
    report = h.tick()
    assert h.image_requests() == [TESTOS.meta(V1), TESTOS.root(V1)]
    assert report.downloaded == [TESTOS.root(V1)]
    assert h.states(TESTOS.files(V1)) == ["pinned", "pinned"]
    # A second run finds everything in place.
    report = h.tick()
    assert (report.images, report.downloaded) == (1, [])
    assert len(h.image_requests()) == 2


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_file_two_pinned_images_share_is_downloaded_once(make: Make, concurrency: int) -> None:
    h = make([TESTOS], prefetch_concurrency=concurrency)
    h.pin(TESTOS.alias, CONTAINER)
    h.pin(TESTOS.alias, VM)
    wanted = [TESTOS.meta(V1), TESTOS.root(V1), TESTOS.root(V1, VM)]
    # Held, so that both images wait for the metadata file they share.
    h.upstream.held_paths.update(wanted)
    results = h.start_tick()
    h.answer_held(concurrency)
    report = outcome(results)
    assert sorted(h.image_requests()) == sorted(wanted)
    assert sorted(report.downloaded) == sorted(wanted)
    assert h.states(wanted) == ["pinned"] * 3


# -- 3. keep_versions -------------------------------------------------------------------------


def test_keep_one_version(make: Make) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)], keep_versions=1)
    h.tick()
    assert h.states(TESTOS.files(V1)) == ["pinned", "pinned"]
    h.publish(TESTOS.with_versions(V1, V2))
    report = h.tick()
    assert sorted(report.downloaded) == sorted(TESTOS.files(V2))
    assert h.states(TESTOS.files(V2)) == ["pinned", "pinned"]
    # One newer version is stored: the older one may age out now.
    assert h.states(TESTOS.files(V1)) == ["cached", "cached"]
    assert report.unpinned == 2


def test_keep_two_versions(make: Make) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)], keep_versions=2)
    h.tick()
    h.publish(TESTOS.with_versions(V1, V2))
    report = h.tick()
    assert h.states(TESTOS.files(V1) + TESTOS.files(V2)) == ["pinned"] * 4
    assert report.unpinned == 0
    h.publish(TESTOS.with_versions(V1, V2, V3))
    report = h.tick()
    assert h.states(TESTOS.files(V3) + TESTOS.files(V2)) == ["pinned"] * 4
    assert h.states(TESTOS.files(V1)) == ["cached", "cached"]
    assert report.unpinned == 2


def test_the_old_version_stays_pinned_until_the_new_one_is_stored(make: Make) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)], keep_versions=1)
    h.tick()
    h.publish(TESTOS.with_versions(V1, V2))
    h.upstream.statuses[TESTOS.root(V2)] = 500
    report = h.tick()
    assert report.failed == [TESTOS.root(V2)]
    assert h.states(TESTOS.files(V1)) == ["pinned", "pinned"]
    # The metadata file came, but the image is not complete: not pinned yet.
    assert h.states(TESTOS.files(V2)) == ["cached", "missing"]
    del h.upstream.statuses[TESTOS.root(V2)]
    report = h.tick()
    assert report.downloaded == [TESTOS.root(V2)]
    assert h.states(TESTOS.files(V2)) == ["pinned", "pinned"]
    assert h.states(TESTOS.files(V1)) == ["cached", "cached"]


def test_versions_of_other_architectures_are_not_counted(make: Make) -> None:
    # The arm64 product's versions are stored (pinned as well) and newer, but they are not
    # versions of the amd64 image.
    h = make([TESTOS, TESTOS_ARM.with_versions(V1, V2)], [PinConfig("up", TESTOS.alias)], keep_versions=1)
    h.pin(TESTOS.alias, arch="aarch64")
    h.tick()
    assert h.states(TESTOS.files(V1) + TESTOS_ARM.files(V2)) == ["pinned"] * 4
    assert h.states(TESTOS_ARM.files(V1)) == ["missing"] * 2


# -- 4. auto_update_cached --------------------------------------------------------------------


def use(h: Harness, product: Product, version: str) -> None:
    """A client downloads the image and uses it; the use is written to the index."""
    for path in product.files(version):
        h.run(h.client_download(path).when_done())
        h.index.note_use(sha(h.files[path]))
    h.index.flush_usage()


@pytest.mark.parametrize(
    "follow, idle_days, fetched",
    [(True, 0.0, True), (True, 9.0, True), (False, 0.0, False), (True, 10.5, False)],
)
def test_recently_used_cached_images_are_updated(
    make: Make, follow: bool, idle_days: float, fetched: bool
) -> None:
    h = make([TESTOS, OTHER], auto_update_cached=follow, expiry_days=10.0)
    use(h, TESTOS, V1)
    h.clock.advance(idle_days * DAY_SECONDS)
    h.publish(TESTOS.with_versions(V1, V2), OTHER)
    gets = len(h.fetcher.gets)
    report = h.tick()
    if fetched:
        assert report.images == 1
        assert sorted(report.downloaded) == sorted(TESTOS.files(V2))
        assert h.fetcher.gets[gets:] == [(path, True) for path in TESTOS.files(V2)]
        # Not pinned: the new version is cached and ages out like the old one.
        assert h.states(TESTOS.files(V2)) == ["cached", "cached"]
    else:
        assert (report.images, report.downloaded) == (0, [])
        assert h.states(TESTOS.files(V2)) == ["missing", "missing"]
    assert h.states(TESTOS.files(V1)) == ["cached", "cached"]
    assert h.states(OTHER.files(V1)) == ["missing", "missing"]


def test_a_stored_but_never_used_image_is_not_followed(make: Make) -> None:
    h = make([TESTOS], auto_update_cached=True)
    for path in TESTOS.files(V1):
        h.run(h.client_download(path).when_done())
    h.publish(TESTOS.with_versions(V1, V2))
    assert h.tick().images == 0
    assert h.states(TESTOS.files(V2)) == ["missing", "missing"]


# -- 5. politeness ----------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 2])
def test_at_most_prefetch_concurrency_downloads_at_once(make: Make, concurrency: int) -> None:
    products = [TESTOS, OTHER, THIRD]
    h = make(products, [PinConfig("up", p.alias) for p in products], prefetch_concurrency=concurrency)
    wanted = [path for p in products for path in p.files(V1)]
    h.upstream.held_paths.update(wanted)
    results = h.start_tick()
    most = h.answer_held(concurrency)
    assert results, "the run did not end"
    report = outcome(results)
    assert most == concurrency
    assert sorted(report.downloaded) == sorted(wanted)
    assert h.states(wanted) == ["pinned"] * len(wanted)


def test_background_downloads_wait_while_a_client_waits_for_one(make: Make) -> None:
    h = make([TESTOS, OTHER], [PinConfig("up", OTHER.alias)])
    h.upstream.held_paths.add(TESTOS.root(V1))
    client = h.client_download(TESTOS.root(V1))
    h.settle()
    results = h.start_tick()
    for _ in range(3):
        h.settle()
        assert h.image_requests() == [TESTOS.root(V1)]
        h.clock.advance(YIELD_TO_CLIENTS_SECONDS)
    h.finish_held(TESTOS.root(V1))
    assert client.final_path is not None
    # The prefetcher looks again only when its wait is over.
    assert h.image_requests() == [TESTOS.root(V1)]
    assert not results
    h.clock.advance(YIELD_TO_CLIENTS_SECONDS)
    h.settle()
    assert h.image_requests() == [TESTOS.root(V1)] + OTHER.files(V1)
    assert sorted(outcome(results).downloaded) == sorted(OTHER.files(V1))


def test_a_file_a_client_downloaded_meanwhile_is_not_downloaded_again(make: Make) -> None:
    # The prefetcher waits for the client's download of the very file it wants next.
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)])
    h.upstream.held_paths.add(TESTOS.meta(V1))
    h.client_download(TESTOS.meta(V1))
    h.settle()
    h.upstream.held_paths.clear()
    results = h.start_tick()
    h.settle()
    h.finish_held(TESTOS.meta(V1))
    for _ in range(5):
        if results:
            break
        h.clock.advance(YIELD_TO_CLIENTS_SECONDS)
        h.settle()
    assert results, "the run did not end"
    report = outcome(results)
    assert h.image_requests() == TESTOS.files(V1)
    assert report.downloaded == [TESTOS.root(V1)]
    assert h.states(TESTOS.files(V1)) == ["pinned", "pinned"]


# -- 6. what a run reports --------------------------------------------------------------------


def test_unresolvable_pins_are_reported_and_the_others_still_run(make: Make) -> None:
    pins = [
        PinConfig("up", "nosuch"),
        PinConfig("gone", TESTOS.alias),
        PinConfig("up", TESTOS.alias, arch="sparc"),
        PinConfig("up", OTHER.alias, type=VM),
        PinConfig("up", TESTOS.alias),
    ]
    h = make([TESTOS, OTHER], pins)
    report = h.tick()
    assert report.unresolved == ["up:nosuch", "gone:testos/2.0", "up:testos/2.0", "up:other/1.0"]
    assert report.images == 1
    assert sorted(report.downloaded) == sorted(TESTOS.files(V1))
    assert h.states(TESTOS.files(V1)) == ["pinned", "pinned"]


def test_nothing_is_unpinned_while_a_pin_is_unresolved(make: Make) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)], keep_versions=1)
    h.tick()
    h.pin("nosuch")
    h.publish(TESTOS.with_versions(V1, V2))
    report = h.tick()
    assert (report.unresolved, report.unpinned) == (["up:nosuch"], 0)
    # Which files the unresolved pin needs is not known, so none is let go.
    assert h.states(TESTOS.files(V1) + TESTOS.files(V2)) == ["pinned"] * 4
    h.index.remove_pin("up", "nosuch", CONTAINER, "")
    report = h.tick()
    assert report.unpinned == 2
    assert h.states(TESTOS.files(V1)) == ["cached", "cached"]


def test_without_a_catalogue_every_pin_is_unresolved(make: Make) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)])
    h.upstream.statuses["streams/v1/index.json"] = 502
    report = h.tick()
    assert (report.unresolved, report.downloaded, report.failed) == (["up:testos/2.0"], [], [])
    assert h.image_requests() == []


def corrupt(h: Harness, path: str) -> None:
    h.files[path] = b"X" + h.files[path][1:]


@pytest.mark.parametrize(
    "breaks",
    [
        lambda h, path: h.upstream.statuses.__setitem__(path, 500),
        lambda h, path: h.upstream.statuses.__setitem__(path, 404),
        corrupt,
    ],
    ids=["500", "404", "corrupt"],
)
def test_a_failing_download_is_reported_and_the_others_still_run(make: Make, breaks: Any) -> None:
    h = make([TESTOS, OTHER], [PinConfig("up", TESTOS.alias), PinConfig("up", OTHER.alias)])
    breaks(h, TESTOS.root(V1))
    report = h.tick()
    assert report.failed == [TESTOS.root(V1)]
    assert sorted(report.downloaded) == sorted([TESTOS.meta(V1)] + OTHER.files(V1))
    assert h.states(TESTOS.files(V1)) == ["cached", "missing"]
    assert h.states(OTHER.files(V1)) == ["pinned", "pinned"]
    assert list(FilePath(h.store.root.path).child("tmp").children()) == []


# -- 7. the steps the admin command uses --------------------------------------------------------


@attrs.define
class Watch:
    """A L{FetchWatch} that notes what it is told."""

    events: list[tuple[str, str, str | None]] = attrs.field(factory=list)

    def started(self, upstream: str, item: Item, download: FetchedItem) -> None:
        self.events.append(("started", item.path, None))

    def finished(self, upstream: str, item: Item, problem: str | None) -> None:
        self.events.append(("finished", item.path, problem))


def test_plan_resolves_each_reference_or_says_why_not(make: Make) -> None:
    h = make([TESTOS])
    refs = [PinRef("up", TESTOS.alias, "x86_64", VM), PinRef("up", "nosuch", "x86_64", CONTAINER),
            PinRef("gone", TESTOS.alias, "x86_64", CONTAINER)]
    planned = h.run(Deferred.fromCoroutine(h.prefetcher.plan(refs)))
    assert [p.ref for p in planned] == refs
    assert planned[0].image is not None and planned[0].image.type == VM
    assert (planned[1].image, planned[1].unreadable) == (None, None)
    assert (planned[2].image, list(planned[2].images)) == (None, [])
    # Planning downloads nothing.
    assert h.image_requests() == []


def test_plan_says_when_the_catalogue_cannot_be_read(make: Make) -> None:
    h = make([TESTOS])
    h.upstream.statuses["streams/v1/index.json"] = 502
    [planned] = h.run(Deferred.fromCoroutine(h.prefetcher.plan([PinRef("up", TESTOS.alias, "x86_64", CONTAINER)])))
    assert planned.image is None and planned.unreadable is not None and "502" in planned.unreadable


def test_bring_in_the_foreground_tells_its_watch_and_pins_nothing(make: Make) -> None:
    h = make([TESTOS, OTHER])
    h.run(h.client_download(OTHER.meta(V1)).when_done())
    h.upstream.statuses[OTHER.root(V1)] = 404
    files = [("up", h.item(path)) for path in TESTOS.files(V1) + OTHER.files(V1)]
    watch = Watch()
    brought = h.run(Deferred.fromCoroutine(h.prefetcher.bring(files, watch=watch, background=False)))
    assert [(b.downloaded, b.stored, b.problem is None) for b in brought] == [
        (True, True, True), (True, True, True), (False, True, True), (False, False, False)]
    assert "404" in (brought[3].problem or "")
    assert sorted(h.fetcher.gets) == sorted(
        [(TESTOS.meta(V1), False), (TESTOS.root(V1), False), (OTHER.meta(V1), False), (OTHER.root(V1), False)])
    # A file stored already is settled without a download.
    assert ("finished", OTHER.meta(V1), None) in watch.events
    assert ("started", OTHER.meta(V1), None) not in watch.events
    for path in TESTOS.files(V1):
        assert watch.events.index(("started", path, None)) < watch.events.index(("finished", path, None))
    assert h.states(TESTOS.files(V1)) == ["cached", "cached"]


def test_keep_pins_the_newest_stored_versions(make: Make) -> None:
    testos = TESTOS.with_versions(V1, V2, V3)
    h = make([testos], keep_versions=2)
    for version in (V1, V2):
        for path in testos.files(version):
            h.run(h.client_download(path).when_done())
    [planned] = h.run(Deferred.fromCoroutine(h.prefetcher.plan([PinRef("up", testos.alias, "x86_64", CONTAINER)])))
    assert planned.image is not None and planned.image.version == V3
    # V3 is not stored: the two newest stored versions stay.
    kept = h.run(Deferred.fromCoroutine(h.prefetcher.keep(planned.images, planned.image)))
    assert kept == {sha(h.files[path]) for path in testos.files(V1) + testos.files(V2)}
    assert h.states(testos.files(V1) + testos.files(V2)) == ["pinned"] * 4


# -- 8. deltas --------------------------------------------------------------------------------


def test_a_new_version_brings_the_deltas_from_stored_versions_only(make: Make) -> None:
    """V2 lists deltas from V1 (stored) and V0 (listed, never stored): only V1's comes."""
    h = make([TESTOS.with_versions(V0, V1)])
    use(h, TESTOS, V1)
    newer = TESTOS.with_versions(V0, V1, V2).with_deltas((V2, V1), (V2, V0))
    h.publish(newer)
    report = h.tick()
    assert sorted(report.downloaded) == sorted(newer.files(V2))
    assert (report.deltas, report.deltas_failed, report.failed) == ([newer.delta(V2, V1)], [], [])
    # The image's files first, then its delta; never the delta from a version nobody holds.
    assert h.image_requests()[-3:] == [*newer.files(V2), newer.delta(V2, V1)]
    assert newer.delta(V2, V0) not in h.image_requests()
    # Verified and recorded like any file, with its version.
    record = h.index.find_path("up", newer.delta(V2, V1))
    assert record is not None and record.sha256 == sha(h.files[newer.delta(V2, V1)])
    assert (record.product, record.version, record.cached) == (newer.id, V2, True)
    assert h.store.exists(record.sha256)
    assert h.state(newer.delta(V2, V0)) == "missing"
    # A second run has nothing left to bring.
    assert (h.tick().deltas, h.image_requests()[-1]) == ([], newer.delta(V2, V1))


def test_no_delta_without_a_stored_older_version(make: Make) -> None:
    testos = TESTOS.with_versions(V1, V2).with_deltas((V2, V1))
    h = make([testos], [PinConfig("up", testos.alias)])
    report = h.tick()
    assert (sorted(report.downloaded), report.deltas) == (sorted(testos.files(V2)), [])
    assert sorted(h.image_requests()) == sorted(testos.files(V2))


def test_a_failing_delta_fails_nothing(make: Make, logged: Logged) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)])
    h.tick()
    newer = TESTOS.with_versions(V1, V2).with_deltas((V2, V1))
    h.publish(newer)
    h.upstream.statuses[newer.delta(V2, V1)] = 500
    report = h.tick()
    assert (report.failed, report.unresolved) == ([], [])
    assert report.deltas_failed == [newer.delta(V2, V1)] and report.deltas == []
    assert h.states(newer.files(V2)) == ["pinned", "pinned"]
    assert h.state(newer.delta(V2, V1)) == "missing"
    assert list(FilePath(h.store.root.path).child("tmp").children()) == []
    [warning] = logged.matching("fetching the delta")
    assert "500" in formatEvent(warning) and V1 in formatEvent(warning)
    # The next run tries it again.
    del h.upstream.statuses[newer.delta(V2, V1)]
    assert h.tick().deltas == [newer.delta(V2, V1)]


def test_a_pinned_version_keeps_its_deltas_pinned_and_releases_them_with_it(make: Make) -> None:
    h = make([TESTOS], [PinConfig("up", TESTOS.alias)], keep_versions=1)
    h.tick()
    newer = TESTOS.with_versions(V1, V2).with_deltas((V2, V1))
    h.publish(newer)
    h.tick()
    assert h.states([*newer.files(V2), newer.delta(V2, V1)]) == ["pinned"] * 3
    assert h.states(newer.files(V1)) == ["cached", "cached"]
    newest = newer.with_versions(V1, V2, V3).with_deltas((V2, V1), (V3, V2))
    h.publish(newest)
    report = h.tick()
    assert report.deltas == [newest.delta(V3, V2)]
    assert h.states([*newest.files(V3), newest.delta(V3, V2)]) == ["pinned"] * 3
    # V2 is no longer kept: its delta turns cached with its files, and ages out with them.
    assert h.states([*newest.files(V2), newest.delta(V2, V1)]) == ["cached"] * 3


def test_the_deltas_step_names_the_deltas_worth_storing(make: Make) -> None:
    testos = TESTOS.with_versions(V0, V1, V2).with_deltas((V2, V1), (V2, V0))
    h = make([testos])
    [planned] = h.run(Deferred.fromCoroutine(h.prefetcher.plan([PinRef("up", testos.alias, "x86_64", CONTAINER)])))
    assert planned.image is not None
    assert h.prefetcher.deltas(planned.images, planned.image) == []
    use(h, testos, V0)
    assert [d.path for d in h.prefetcher.deltas(planned.images, planned.image)] == [testos.delta(V2, V0)]
    # The VM image of the same version has no squashfs delta.
    [vm] = h.run(Deferred.fromCoroutine(h.prefetcher.plan([PinRef("up", testos.alias, "x86_64", VM)])))
    assert vm.image is not None and h.prefetcher.deltas(vm.images, vm.image) == []
