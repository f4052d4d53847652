# -*- test-case-name: tests.test_cli -*-
"""The C{lxd-image-proxy} admin command: look at and manage the cache, also while the server runs.

It opens the index (LMDB allows several processes) and the blob store directly, and never takes
the server's state lock; what it shows of them is the model in L{proxy.inventory}. Every command ends with exit status 0, or 1 and one sentence on stderr
(2 for a command line argparse cannot make sense of); never with a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO, cast

import attrs
import lmdb
from attrs import define
from twisted.internet.interfaces import IReactorTime

from proxy import __version__
from proxy.blobs import BlobStore
from proxy.bundle import BundleError, export_bundle, import_bundle
from proxy.catalogue import CatalogueError, Image, Item
from proxy.config import LXD, load_config
from proxy.errors import ConfigError, ProxyError
from proxy.index import FileRecord
from proxy.inventory import (
    Cache,
    Entry,
    FingerprintRef,
    InventoryError,
    check_upstream,
    inventory,
    one_entry,
    open_cache,
    parse_ref,
)
from proxy.pins import (
    PinError,
    PinRef,
    keep_files,
    normalise_ref,
    pin,
    pin_refs,
    pinned_files,
    stored_versions,
    unpin,
)
from proxy.resolve import CONTAINER, VIRTUAL_MACHINE

if TYPE_CHECKING:
    # Imported when used: the commands that fetch nothing start without the fetch stack.
    from proxy.fetch import FetchedItem
    from proxy.prefetch import Planned

PROG = "lxd-image-proxy"
HASH_CHUNK_BYTES = 1024 * 1024
PROGRESS_INTERVAL_SECONDS = 0.25


class CliError(Exception):
    """A command that cannot be done; the message is one sentence for the admin."""


def _image_type(args: argparse.Namespace) -> str:
    return VIRTUAL_MACHINE if getattr(args, "vm", False) else CONTAINER


# -- formatting -----------------------------------------------------------------------------


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_time(when: float | None) -> str:
    if when is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "kind": entry.kind,
        "upstream": entry.upstream,
        "alias": entry.alias,
        "aliases": list(entry.aliases),
        "fingerprint": entry.fingerprint,
        "type": entry.type,
        "architecture": entry.architecture,
        "product": entry.product,
        "version": entry.version,
        "size": entry.size,
        "status": entry.status,
        "pinned_by": [f"{u}:{a}" for u, a, _r, _t in entry.pins],
        "last_used_at": entry.last_used_at,
        "uses": entry.uses,
        "files": [
            {"sha256": r.sha256, "size": r.size, "paths": list(r.paths), "cached": r.cached,
             "auto_update": r.auto_update, "use_count": r.use_count, "last_used_at": r.last_used_at}
            for r in entry.records
        ],
    }


# -- commands -------------------------------------------------------------------------------


def cmd_list(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    entries = inventory(cache).entries
    if args.format == "json":
        json.dump([_entry_json(e) for e in entries], out, indent=1)
        out.write("\n")
        return 0
    if not entries:
        out.write("no images are stored\n")
        return 0
    rows = [["UPSTREAM", "ALIAS", "FINGERPRINT", "TYPE", "ARCH", "VERSION", "SIZE", "STATUS", "LAST USED", "USES"]]
    for e in entries:
        rows.append([
            e.upstream, e.alias or "-", e.fingerprint[:12] or "-", e.type or "file", e.architecture or "-",
            e.version or "-", human_size(e.size) if e.size else "-", e.status, human_time(e.last_used_at),
            str(e.uses),
        ])
    _table(rows, out)
    return 0


def cmd_info(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    inv = inventory(cache)
    entry = one_entry(cache, inv, args.ref, args.arch, _image_type(args))
    lines = [
        ("upstream", entry.upstream),
        ("fingerprint", entry.fingerprint or "-"),
        ("aliases", ", ".join(entry.aliases) or "-"),
        ("product", entry.product or "-"),
        ("version", entry.version or "-"),
        ("type", entry.type or "file"),
        ("architecture", entry.architecture or "-"),
        ("size", f"{human_size(entry.size)} ({entry.size} bytes)"),
        ("status", entry.status),
        ("pinned by", ", ".join(f"{u}:{a} ({t}, {r})" for u, a, r, t in entry.pins) or "-"),
        ("last used", human_time(entry.last_used_at)),
        ("uses", str(entry.uses)),
    ]
    for key, value in lines:
        out.write(f"{key + ':':14}{value}\n")
    out.write("files:\n")
    if entry.image is not None:
        for item in entry.image.files:
            record = cache.index.get(item.sha256)
            state = "not stored" if record is None else _record_state(record)
            out.write(f"  {item.path}  sha256:{item.sha256}  {human_size(item.size)}  {state}\n")
        catalogue = inv.catalogues.get(entry.upstream)
        if catalogue is not None:
            versions = stored_versions(cache.index, catalogue.images, entry.image)
            out.write(f"{'versions:':14}{', '.join(v.version for v in versions) or '-'} (stored, newest first)\n")
    else:
        for record in entry.records:
            for path in record.paths:
                out.write(f"  {path}  sha256:{record.sha256}  {human_size(record.size)}  {_record_state(record)}\n")
    return 0


def _record_state(record: FileRecord) -> str:
    if not record.cached:
        return "pinned" if record.auto_update else "kept"
    return f"cached, {record.use_count} uses, last used {human_time(record.last_used_at if record.use_count else None)}"


def cmd_pin(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    ref = parse_ref(args.ref)
    type = _image_type(args)
    if isinstance(ref, FingerprintRef):
        entry = one_entry(cache, inventory(cache), args.ref, args.arch, type)
        changed = keep_files(cache.index, (r.sha256 for r in entry.records), keep=True)
        out.write(f"kept {entry.fingerprint[:12]} as it is: {len(changed)} files will not expire or be replaced\n")
        return 0
    try:
        result = pin(cache.index, cache.store, ref.upstream, ref.alias, args.arch, type, cache.clock,
                     upstreams=cache.upstream_names)
    except PinError as e:
        raise CliError(str(e)) from None
    record = result.record
    name = f"{record.upstream}:{record.alias} ({record.type}, {record.arch})"
    if result.image is None:
        out.write(f"pinned {name}; the catalogue of {record.upstream} is not stored yet, so the alias is"
                  " resolved at the next auto-update\n")
        return 0
    out.write(f"pinned {name}: image {result.image.fingerprint[:12]} version {result.image.version};"
              f" {len(result.flipped)} stored files now pinned\n")
    if result.missing:
        size = sum(item.size for item in result.missing)
        out.write(f"{len(result.missing)} files ({human_size(size)}) are downloaded at the next auto-update,"
                  f" or now with: {_prefetch_command(args, record.upstream, record.alias)}\n")
    return 0


def _prefetch_command(args: argparse.Namespace, upstream: str, alias: str) -> str:
    """The prefetch command for the image a pin named, with the pin's own options."""
    words = [PROG]
    if args.config:
        words += ["--config", shlex.quote(args.config)]
    words += ["prefetch", shlex.quote(f"{upstream}:{alias}")]
    if args.arch:
        words += ["--arch", shlex.quote(args.arch)]
    if getattr(args, "vm", False):
        words.append("--vm")
    return " ".join(words)


def cmd_unpin(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    ref = parse_ref(args.ref)
    type = _image_type(args)
    if isinstance(ref, FingerprintRef):
        entry = one_entry(cache, inventory(cache), args.ref, args.arch, type)
        kept = [r.sha256 for r in entry.records if not r.cached and not r.auto_update]
        if not kept:
            raise CliError(f"{entry.fingerprint[:12]} is not kept by fingerprint; unpin the alias that pins it.")
        keep_files(cache.index, kept, keep=False)
        out.write(f"released {entry.fingerprint[:12]}: {len(kept)} files now age out like cached ones\n")
        return 0
    try:
        architecture, type = normalise_ref(ref.alias, args.arch, type)
    except PinError as e:
        raise CliError(str(e)) from None
    configured = (ref.upstream, ref.alias, architecture, type) in _configured_pins(cache)
    try:
        result = unpin(cache.index, cache.store, ref.upstream, ref.alias, architecture, type, cache.clock,
                       other_pins=cache.config_pins())
    except PinError as e:
        if configured:
            raise CliError(f"{ref.upstream}:{ref.alias} is pinned by a [[pin]] entry of the configuration file;"
                           " remove it there.") from None
        raise CliError(str(e)) from None
    out.write(f"unpinned {ref.upstream}:{ref.alias} ({type}, {architecture}); {len(result.flipped)} files now"
              " age out like cached ones\n")
    return 0


def _configured_pins(cache: Cache) -> set[PinRef]:
    """The configuration's pins, architectures named as in the index."""
    refs: set[PinRef] = set()
    for upstream, alias, arch, type in cache.config_pins():
        try:
            architecture, type = normalise_ref(alias, arch, type)
        except PinError:
            continue
        refs.add((upstream, alias, architecture, type))
    return refs


def cmd_remove(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    inv = inventory(cache)
    entry = one_entry(cache, inv, args.ref, args.arch, _image_type(args))
    if not entry.records:
        raise CliError(f"no file of {args.ref} is stored.")
    # A metadata file can be shared by the container and VM images of one version: keep it
    # while another stored image needs it.
    others = {
        r.sha256 for e in inv.entries if e is not entry and e.stored and e.image is not None for r in e.records
    }
    doomed = [r for r in entry.records if r.sha256 not in others]
    protected = pinned_files(cache.index, cache.store, extra=cache.config_pins())
    if not args.force and (entry.pins or any(not r.cached or r.sha256 in protected for r in doomed)):
        raise CliError(f"{args.ref} is pinned; unpin it first, or remove it anyway with --force.")
    cache.index.remove_many(r.sha256 for r in doomed)
    for record in doomed:
        cache.store.remove(record.sha256)
    size = sum(r.size for r in doomed)
    name = entry.fingerprint[:12] or args.ref
    out.write(f"removed {name}: {len(doomed)} files, {human_size(size)}\n")
    if entry.pins:
        out.write(f"it is still pinned by {', '.join(f'{u}:{a}' for u, a, _r, _t in entry.pins)}, so the next"
                  " auto-update downloads it again\n")
    return 0


def _hash_blob(store: BlobStore, sha256: str) -> tuple[str, int] | None:
    try:
        f = store.open(sha256)
    except FileNotFoundError:
        return None
    digest = hashlib.sha256()
    size = 0
    with f:
        while True:
            chunk = f.read(HASH_CHUNK_BYTES)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def cmd_verify(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    index, store = cache.index, cache.store
    checked = 0
    total = 0
    corrupt: list[str] = []
    for record in list(index.records()):
        found = _hash_blob(store, record.sha256)
        if found is None and index.get(record.sha256) is None:
            continue  # removed meanwhile (by the server's expiry, say)
        checked += 1
        total += record.size
        if found == (record.sha256, record.size):
            continue
        reason = "missing" if found is None else f"{found[1]} bytes hashing to {found[0][:12]}"
        out.write(f"corrupt: {record.sha256} ({', '.join(record.paths)}): {reason}; removed\n")
        index.remove(record.sha256)
        store.remove(record.sha256)
        corrupt.append(record.sha256)
    for meta in list(index.metadata_records()):
        found = _hash_blob(store, meta.sha256)
        checked += 1
        if found is not None and found[0] == meta.sha256:
            total += found[1]
            continue
        out.write(f"corrupt: {meta.upstream}/{meta.path} (sha256:{meta.sha256}); removed, it is fetched again\n")
        index.remove_metadata(meta.upstream, meta.path)
        if index.get(meta.sha256) is None:
            store.remove(meta.sha256)
        corrupt.append(meta.sha256)
    if corrupt:
        out.write(f"checked {checked} files ({human_size(total)}): {len(corrupt)} corrupt, removed\n")
        # Non-zero, so that a verify run from cron or a monitoring check reports the damage.
        return 1
    out.write(f"checked {checked} files ({human_size(total)}): all intact\n")
    return 0


def cmd_gc(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    from proxy.lifecycle import CacheLifecycle

    # The server's responses and downloads are not known here. Removing a blob that a response
    # still reads is safe (its open descriptor stays valid), and a download has no record yet.
    lifecycle = CacheLifecycle(cache.index, cache.store, cache.config.cache, cache.clock, set)
    report = lifecycle.gc()
    out.write(
        f"gc: {report.expired} files expired ({human_size(report.expired_bytes)}),"
        f" {report.evicted} evicted ({human_size(report.evicted_bytes)});"
        f" {report.files} files ({human_size(report.size)}) left\n"
    )
    if report.over_limit:
        out.write("the cache is still over max_size or under min_free: what is left is pinned\n")
    return 0


def cmd_stats(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    files = 0
    size = 0
    pinned = 0
    pinned_size = 0
    for record in cache.index.records():
        files += 1
        size += record.size
        if not record.cached:
            pinned += 1
            pinned_size += record.size
    stats = cache.index.stats()
    requests = stats.hits + stats.misses
    ratio = f"{100.0 * stats.hits / requests:.1f}%" if requests else "-"
    served = stats.bytes_served
    rows = [
        ("files", f"{files} ({human_size(size)})"),
        ("pinned", f"{pinned} ({human_size(pinned_size)})"),
        ("hits", str(stats.hits)),
        ("misses", str(stats.misses)),
        ("hit ratio", ratio),
        ("served", f"{human_size(stats.bytes_served)} ({stats.bytes_served} bytes)"),
        ("from cache", f"{human_size(stats.bytes_from_cache)} ({stats.bytes_from_cache} bytes)"),
        ("fetched", f"{human_size(stats.bytes_from_upstream)} ({stats.bytes_from_upstream} bytes) from upstreams"),
        ("byte hit ratio", f"{100.0 * stats.bytes_from_cache / served:.1f}%" if served else "-"),
        ("not stored", f"{stats.not_stored} (no room)"),
    ]
    if args.format == "json":
        json.dump({
            "files": files, "bytes": size, "pinned_files": pinned, "pinned_bytes": pinned_size,
            **{f.name: getattr(stats, f.name) for f in attrs.fields(type(stats))},
        }, out, indent=1)
        out.write("\n")
        return 0
    for key, value in rows:
        out.write(f"{key + ':':16}{value}\n")
    return 0


def _alias_refs(refs: Sequence[str], args: argparse.Namespace) -> list[PinRef]:
    result: list[PinRef] = []
    for text in refs:
        ref = parse_ref(text)
        if isinstance(ref, FingerprintRef):
            raise CliError(f"{text} is a fingerprint; name images as UPSTREAM:ALIAS here.")
        result.append((ref.upstream, ref.alias, args.arch, _image_type(args)))
    return result


def cmd_bundle_export(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    refs = _alias_refs(args.refs, args) if args.refs else None
    for upstream, *_rest in refs or []:
        check_upstream(cache, upstream)
    report = export_bundle(cache.index, cache.store, args.file, refs, extra_pins=cache.config_pins())
    out.write(f"wrote {report.path}: {report.images} images, {report.files} files, {human_size(report.bytes)}\n")
    if report.skipped:
        out.write(f"left out (no version stored in full): {', '.join(report.skipped)}\n")
    return 0


def cmd_bundle_import(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    report = import_bundle(cache.index, cache.store, args.file, upstreams=cache.upstream_names)
    out.write(
        f"imported {args.file}: {report.images} images, {report.files} files ({report.new_files} new),"
        f" {human_size(report.bytes)}, {report.pins} pins\n"
    )
    for upstream, how in report.catalogues:
        out.write(f"catalogue of {upstream}: {'stored' if how == 'stored' else 'merged with the stored one'}\n")
    return 0


def cmd_prefetch(cache: Cache, args: argparse.Namespace, out: TextIO) -> int:
    refs = _alias_refs(args.refs, args)
    for upstream, *_rest in refs:
        check_upstream(cache, upstream)
        configured = cache.config.upstream(upstream)
        if configured is not None and configured.offline:
            raise CliError(f"{upstream} is configured offline, so nothing can be fetched from it.")
        if configured is not None and configured.protocol == LXD:
            raise CliError(
                f"{upstream} is an LXD server, whose images the running proxy fetches itself: pin"
                f" the image (lxd-image-proxy pin {upstream}:ALIAS) and it is fetched at the next"
                " auto-update, or export it once through the proxy."
            )
    return run_prefetch(cache, refs, out, sys.stderr)


# -- prefetch -------------------------------------------------------------------------------


@define
class Progress:
    """
    Shows downloads as they go: one bar on a terminal, or one line per file started and
    finished otherwise (logs and pipes get no carriage returns).
    """

    err: TextIO
    tty: bool
    total_bytes: int
    total_files: int
    done_bytes: int = 0
    done_files: int = 0
    _drawn: bool = False

    def started(self, name: str, size: int) -> None:
        if not self.tty:
            self.err.write(f"downloading {name} ({human_size(size)})\n")
            self.err.flush()

    def finished(self, name: str, size: int, problem: str | None) -> None:
        self.done_files += 1
        self.done_bytes += size
        if self.tty:
            if problem is not None:
                self._clear()
                self.err.write(f"{name}: {problem}\n")
            self.draw(0)
        else:
            self.err.write(f"{'stored' if problem is None else 'failed'} {name}"
                           f"{'' if problem is None else ': ' + problem}\n")
            self.err.flush()

    def draw(self, in_flight_bytes: int) -> None:
        if not self.tty or not self.total_bytes:
            return
        done = min(self.total_bytes, self.done_bytes + in_flight_bytes)
        width = 30
        filled = width * done // self.total_bytes
        percent = 100 * done // self.total_bytes
        self.err.write(
            f"\r[{'#' * filled}{'-' * (width - filled)}] {percent:3d}%  {human_size(done)} of"
            f" {human_size(self.total_bytes)}  {self.done_files}/{self.total_files} files "
        )
        self.err.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.err.write("\r\x1b[K")
            self._drawn = False

    def end(self) -> None:
        if self.tty and self._drawn:
            self.err.write("\n")
            self.err.flush()
            self._drawn = False


def run_prefetch(cache: Cache, refs: list[PinRef], out: TextIO, err: TextIO) -> int:
    """Run the reactor until every download of C{refs} has ended; return the exit status."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import Deferred

    reactor = cast(Any, global_reactor)
    if reactor.running:
        raise CliError("prefetch needs a reactor of its own and cannot run inside a running one.")
    outcome: list[int] = []

    async def go() -> None:
        try:
            outcome.append(await _prefetch(reactor, cache, refs, out, err))
        except (CliError, PinError, ConfigError) as e:
            outcome.append(_fail(str(e), err))
        except ProxyError as e:
            outcome.append(_fail(e.message, err))
        except Exception as e:
            outcome.append(_fail(f"unexpected {type(e).__name__}: {e}", err))

    def start() -> None:
        Deferred.fromCoroutine(go()).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return outcome[0] if outcome else _fail("interrupted", err)


@define
class ProgressWatch:
    """What a prefetch tells its L{Progress}: the L{proxy.prefetch.FetchWatch} of its downloads."""

    progress: Progress
    _downloading: dict[str, FetchedItem] = attrs.field(factory=dict)

    def started(self, upstream: str, item: Item, download: FetchedItem) -> None:
        self._downloading[item.sha256] = download
        self.progress.started(f"{upstream}/{item.path}", item.size)

    def finished(self, upstream: str, item: Item, problem: str | None) -> None:
        download = self._downloading.pop(item.sha256, None)
        if problem is None and download is not None and not download.stored:
            problem = "not stored: the cache is full"
        self.progress.finished(f"{upstream}/{item.path}", item.size, problem)

    def draw(self) -> None:
        self.progress.draw(sum(d.received for d in self._downloading.values()))


async def _prefetch(reactor: Any, cache: Cache, refs: list[PinRef], out: TextIO, err: TextIO) -> int:
    from twisted.internet.task import LoopingCall

    from proxy.core import build_core
    from proxy.prefetch import PinRef as Wanted
    from proxy.work import INLINE

    index = cache.index
    # Every reference has the same --arch and --vm: one that cannot be named fails them all,
    # before anything is fetched.
    wanted = [Wanted(upstream, alias, *normalise_ref(alias, arch, type)) for upstream, alias, arch, type in refs]
    # The server's wiring, started as the server never is: no state lock, no reconcile (it
    # would delete the running server's temp files). Inline work: one command, whose reactor
    # serves nothing else. No health: every request is tried, each failure is reported.
    core = build_core(cache.config, reactor, index, cache.store, INLINE, watch_health=False)
    try:
        failures = 0
        plan: list[tuple[Image, Planned]] = []
        for planned in await core.prefetcher.plan(wanted):
            ref = planned.ref
            if planned.unreadable is not None:
                # Also when the image was found in the part that could be read: an admin
                # asking for an image now would rather know.
                err.write(f"{PROG}: cannot read the catalogue of {ref.upstream}: {planned.unreadable}\n")
                failures += 1
            elif planned.image is None:
                err.write(f"{PROG}: the catalogue of {ref.upstream} has no {ref.type} image {ref.alias} for"
                          f" {ref.arch}.\n")
                failures += 1
            else:
                plan.append((planned.image, planned))

        todo: dict[str, tuple[str, Item]] = {}
        for image, planned in plan:
            for item in image.files:
                if index.get(item.sha256) is None:
                    todo.setdefault(item.sha256, (planned.ref.upstream, item))
        # The deltas from stored older versions, which refreshing hosts ask for first. Chosen
        # before anything is brought; one that fails is reported but fails nothing.
        deltas: set[str] = set()
        for image, planned in plan:
            for item in core.prefetcher.deltas(planned.images, image):
                if index.get(item.sha256) is None and item.sha256 not in todo:
                    todo[item.sha256] = (planned.ref.upstream, item)
                    deltas.add(item.sha256)
        progress = Progress(err, err.isatty(), sum(i.size for _u, i in todo.values()), len(todo))
        watch = ProgressWatch(progress)
        ticker = LoopingCall(watch.draw)
        ticker.clock = reactor
        if progress.tty and todo:
            ticker.start(PROGRESS_INTERVAL_SECONDS)
        try:
            brought = await core.prefetcher.bring(todo.values(), watch=watch, background=False)
        finally:
            if ticker.running:
                ticker.stop()
            progress.end()
        failures += sum(1 for b in brought if not b.stored and b.item.sha256 not in deltas)

        pinned = set(pin_refs(index, cache.config_pins()))
        for image, planned in plan:
            ref = planned.ref
            stored = all(index.get(item.sha256) is not None for item in image.files)
            if stored and (ref.upstream, ref.alias, ref.arch, ref.type) in pinned:
                # Only for an alias pinned already: prefetching never pins.
                await core.prefetcher.keep(planned.images, image)
            state = "stored" if stored else "not stored"
            out.write(f"{ref.upstream}:{ref.alias} ({ref.type}, {ref.arch}): {image.fingerprint[:12]}"
                      f" version {image.version}, {state}\n")
        return 1 if failures else 0
    finally:
        await core.close()


# -- the command line -----------------------------------------------------------------------


def _add_ref_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="", help="architecture (default: this machine's)")
    parser.add_argument("--vm", action="store_true", help="the virtual-machine image, not the container")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Look at and manage the cache of lxd-image-proxy, also while the server runs.",
        epilog="REF is UPSTREAM:ALIAS (such as images:ubuntu/24.04) or a fingerprint, or the start"
        " of one; --arch and --vm choose among the images of an alias.",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="configuration file (default: the built-in configuration, as the server)")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("list", help="list the stored images")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_list)

    p = commands.add_parser("info", help="show one image: REF is UPSTREAM:ALIAS or a fingerprint")
    p.add_argument("ref", metavar="REF")
    _add_ref_options(p)
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("pin", help="keep an image and keep it up to date")
    p.add_argument("ref", metavar="REF")
    _add_ref_options(p)
    p.set_defaults(run=cmd_pin)

    p = commands.add_parser("unpin", help="let a pinned image age out again")
    p.add_argument("ref", metavar="REF")
    _add_ref_options(p)
    p.set_defaults(run=cmd_unpin)

    p = commands.add_parser("remove", help="remove an image's files from the cache")
    p.add_argument("ref", metavar="REF")
    _add_ref_options(p)
    p.add_argument("--force", action="store_true", help="remove it even if it is pinned")
    p.set_defaults(run=cmd_remove)

    p = commands.add_parser("prefetch", help="download images now")
    p.add_argument("refs", metavar="REF", nargs="+", help="UPSTREAM:ALIAS")
    _add_ref_options(p)
    p.set_defaults(run=cmd_prefetch)

    p = commands.add_parser("verify", help="re-hash every stored file; remove the corrupt ones (exit 1 if any)")
    p.set_defaults(run=cmd_verify)

    p = commands.add_parser("gc", help="apply expiry and the size cap now")
    p.set_defaults(run=cmd_gc)

    p = commands.add_parser("stats", help="files, bytes and hit ratio")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(run=cmd_stats)

    bundle = commands.add_parser("bundle", help="move images to a proxy that cannot fetch them")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    p = bundle_commands.add_parser("export", help="write images (all pinned ones by default) to FILE")
    p.add_argument("file", metavar="FILE")
    p.add_argument("refs", metavar="REF", nargs="*", help="UPSTREAM:ALIAS")
    _add_ref_options(p)
    p.set_defaults(run=cmd_bundle_export)
    p = bundle_commands.add_parser("import", help="verify FILE and load its images into the cache")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(run=cmd_bundle_import)
    return parser


def _fail(message: str, err: TextIO) -> int:
    message = message.strip()
    if message and message[-1] not in ".!?":
        message += "."
    err.write(f"{PROG}: {message}\n")
    return 1


def main(
    argv: Sequence[str] | None = None,
    *,
    clock: IReactorTime | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """
    Run one command; return the exit status (0, 1 on failure, 2 for a usage error).

    A reader that goes away (C{lxd-image-proxy list | head}) ends the command quietly with
    status 1, as the Python documentation's note on SIGPIPE recommends: no message, and no
    "Exception ignored" from the interpreter's last flush.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        status = _main(argv, clock, out, err)
        out.flush()
        return status
    except BrokenPipeError:
        if out is sys.stdout:
            # The interpreter flushes stdout once more at exit: give it somewhere to go.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None, clock: IReactorTime | None, out: TextIO, err: TextIO) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        return _fail(str(e), err)
    try:
        cache = open_cache(config, clock)
    except InventoryError as e:
        return _fail(str(e), err)
    run = cast(Callable[[Cache, argparse.Namespace, TextIO], int], args.run)
    try:
        return run(cache, args, out)
    except (CliError, InventoryError, PinError, BundleError, ConfigError) as e:
        return _fail(str(e), err)
    except ProxyError as e:
        return _fail(e.message, err)
    except CatalogueError as e:
        return _fail(f"a stored catalogue is unusable: {e}", err)
    except BrokenPipeError:
        # Not a failure to report: the reader has what it wanted (see main).
        raise
    except OSError as e:
        return _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", err)
    except lmdb.Error as e:
        return _fail(f"the cache index failed: {e}", err)
    except KeyboardInterrupt:
        return _fail("interrupted", err)
    except Exception as e:
        return _fail(f"unexpected {type(e).__name__}: {e}", err)
    finally:
        cache.close()


if __name__ == "__main__":
    sys.exit(main())
