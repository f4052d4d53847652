"""One export download per image of an LXD upstream, split into its files as it arrives.

C{GET /1.0/images/FP/export} (PROTOCOLS.md §2.5) answers a unified image with its one file
(C{application/octet-stream}) and a split image with a C{multipart/form-data} body whose two
parts are the C{metadata} file and the C{rootfs} (C{rootfs.img} for a VM) file, framed as Go's
C{mime/multipart} writer frames them. L{proxy.multipart.MultipartSplitter} cuts that body into
the two files while it streams (never holding more than a chunk in memory), each written to its
own temp file, with one running sha256 over both. Only when sha256(meta ‖ rootfs) is the fingerprint are both
committed, recorded as files, and their sizes and hashes kept as the image's L{ImageParts}; any
other ending discards both and fails everyone who follows the download.

This module is the export kind of download only: how its body is received and what it must turn
out to be. Starting it once however many ask, the commit, the no-room rule and the health of the
upstream are the engine's (L{proxy.downloads.Fetcher}), as for a file of a simplestreams upstream.

Followers read the temp files while they grow (the disk is the buffer, as for a
L{proxy.fetch.Download}): L{ExportDownload} offers L{PartSource}s for the LXD face and, as an
L{ItemDownload}, one listed file that behaves like a L{proxy.fetch.Download}, for the simplestreams
face and the prefetcher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from typing import Any, Callable, Literal

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.iweb import IResponse

from proxy.blobs import PartialBlob
from proxy.catalogue import META_FTYPE, UNIFIED_FTYPE, Item
from proxy.errors import NotFound, UpstreamFailed, VerificationFailed
from proxy.fetch import Receive, StoredFile, Verified
from proxy.index import CacheIndex, ImageParts
from proxy.lxd_remote import (
    RemoteImage,
    base_product,
    image_item_path,
    item_role,
    meta_filename,
    root_filename,
    root_ftype_of,
    unified_filename,
    version_base,
)
from proxy.multipart import MultipartError, MultipartSplitter, multipart_boundary
from proxy.observers import Observers
from proxy.streaming import FileSource

# Bytes an export may carry beyond the image's files: the boundaries and the two part headers
# (a few hundred bytes as LXD writes them).
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# What is read of an error answer to find LXD's error message in it.
MAX_ERROR_BODY_BYTES = 64 * 1024

Kind = Literal["split", "unified"]
Role = Literal["meta", "root", "unified"]
ROOT_FORM_NAMES = ("rootfs", "rootfs.img")


class WrongShape(UpstreamFailed):
    """The export is split where unified was expected, or the other way round."""


# -- the download ------------------------------------------------------------------------------


@define(eq=False)
class _Part:
    """One file of an export being written: its temp file and what has arrived of it."""

    partial: PartialBlob
    name: str = ""
    filename: str = ""
    received: int = 0
    complete: bool = False
    sha256: str | None = None
    final_path: FilePath[Any] | None = None

    @property
    def path(self) -> FilePath[Any]:
        # A follower that opened the temp file keeps a valid descriptor through the rename.
        return self.final_path if self.final_path is not None else self.partial.path


@define(eq=False)
class PartSource:
    """
    A L{proxy.streaming.FileSource} over one file of an L{ExportDownload}.

    With C{hold_back}, the last byte is only readable once the file's content is known good:
    the whole export verified, or (with C{expect}) the file complete and hashing to C{expect}.
    It fails with the download, or on its own when the file turns out larger than C{size},
    or complete with another size or hash than expected.
    """

    _download: ExportDownload
    _part: _Part
    size: int
    expect: str | None = None
    hold_back: bool = True
    _own_failure: Failure | None = field(default=None, init=False)

    @property
    def path(self) -> FilePath[Any]:
        return self._part.path

    @property
    def received(self) -> int:
        return self._part.received

    @property
    def failure(self) -> Failure | None:
        if self._download.failure is not None:
            return self._download.failure
        return self._check()

    def verified(self) -> bool:
        """Whether every byte may be handed out as good."""
        part = self._part
        if self._check() is not None:
            return False
        if part.final_path is not None:
            return True
        return (
            part.complete and self.expect is not None and part.sha256 == self.expect
            and part.received == self.size
        )

    def available(self) -> int:
        got = min(self._part.received, self.size)
        if not self.hold_back or self.verified():
            return got
        return max(0, min(got, self.size - 1))

    def wait(self) -> "Deferred[None]":
        return self._download.wait()

    def _check(self) -> Failure | None:
        if self._own_failure is None:
            part = self._part
            problem = ""
            if part.received > self.size:
                problem = f"more than the {self.size} bytes expected"
            elif part.complete and part.received != self.size:
                problem = f"{part.received} bytes, {self.size} expected"
            elif part.complete and self.expect is not None and part.sha256 != self.expect:
                problem = f"sha256 {part.sha256}, {self.expect} expected"
            if problem:
                self._own_failure = Failure(VerificationFailed(
                    f"{part.name or 'file'} of image {self._download.fingerprint} from {self._download.url}: "
                    f"{problem}"
                ))
        return self._own_failure


@define(eq=False)
class ExportDownload:
    """
    The export of one image being fetched into the cache.

    C{meta}, C{root} and C{unified} each give a new Deferred per access (so that cancelling
    one affects nobody else) firing with a L{PartSource}:

      - C{meta}, once the metadata part of a split export is complete. Its bytes are whole
        but verified only with the rootfs: send them as part of the export, never as a
        complete file of their own before L{when_done}.
      - C{root}, once the rootfs part starts, sized C{image.size - meta size}, holding back
        its last byte until the export is verified.
      - C{unified}, once a unified export starts, holding back its last byte likewise.

    Asking a unified export for C{meta} or C{root}, or a split one for C{unified}, fails with
    L{WrongShape}; so does every one of them when the download fails, with its failure.
    C{when_done()} fires with the image's L{ImageParts} once verified (committed unless
    C{stored} is False: no room), or fails.
    """

    upstream: str
    url: str
    image: RemoteImage
    expected: ImageParts | None
    _meta_part: _Part
    _root_part: _Part
    product: str = ""
    version: str = ""
    # started by the prefetcher rather than for a waiting client
    background: bool = False
    # waiting for a download slot of its upstream: its clients have headers, no bytes yet
    queued: bool = field(default=False, init=False)
    failure: Failure | None = field(default=None, init=False)
    # False when the verified files were streamed to their clients but not kept (no room)
    stored: bool = field(default=True, init=False)
    kind: Kind | None = field(default=None, init=False)
    parts: ImageParts | None = field(default=None, init=False)
    # body bytes received, framing included
    received: int = field(default=0, init=False)
    _combined: Any = field(factory=hashlib.sha256, init=False)
    _waiters: Observers[None] = field(factory=Observers, init=False)
    _start_observers: Observers[None] = field(factory=Observers, init=False)
    _done_observers: Observers[ImageParts] = field(factory=Observers, init=False)
    _meta_observers: Observers[FileSource] = field(factory=Observers, init=False)
    _root_observers: Observers[FileSource] = field(factory=Observers, init=False)
    _unified_observers: Observers[FileSource] = field(factory=Observers, init=False)
    _root_source: PartSource | None = field(default=None, init=False)

    @property
    def fingerprint(self) -> str:
        return self.image.fingerprint

    @property
    def finished(self) -> bool:
        return self.parts is not None or self.failure is not None

    # -- what followers use -----------------------------------------------------------------

    def when_streaming(self) -> "Deferred[None]":
        """Fires once the upstream answered 200 (then L{kind} is set); fails with the download."""
        if self.failure is not None:
            return fail(self.failure)
        if self.kind is not None:
            return succeed(None)
        return self._start_observers.add()

    def when_done(self) -> "Deferred[ImageParts]":
        if self.parts is not None:
            return succeed(self.parts)
        if self.failure is not None:
            return fail(self.failure)
        return self._done_observers.add()

    @property
    def meta(self) -> "Deferred[FileSource]":
        return self._observe(self._meta_observers, "split", self._meta_source)

    @property
    def root(self) -> "Deferred[FileSource]":
        return self._observe(self._root_observers, "split", lambda: self._root_source)

    @property
    def unified(self) -> "Deferred[FileSource]":
        return self._observe(self._unified_observers, "unified", self._unified_source)

    def wait(self) -> "Deferred[None]":
        """Fires when more bytes arrived, or the download ended either way."""
        return succeed(None) if self.finished else self._waiters.add()

    def source_for(self, role: Role, item: Item) -> PartSource:
        """A source for the listed file C{item}, sized and checked by the catalogue's word."""
        part = self._root_part if role == "root" else self._meta_part
        return PartSource(self, part, item.size, expect=item.sha256)

    # -- as the engine drives it (L{proxy.fetch.Job}) ------------------------------------------

    @classmethod
    def new(
        cls, upstream: str, base_url: str, image: RemoteImage, expected: ImageParts | None,
        new_partial: Callable[[], PartialBlob], *, product: str = "", version: str = "",
    ) -> "ExportDownload":
        """The export of C{image} from the LXD server at C{base_url}, with its two temp files."""
        meta = new_partial()
        try:
            root = new_partial()
        except BaseException:
            meta.discard()
            raise
        return cls(
            upstream, f"{base_url}/1.0/images/{image.fingerprint}/export", image, expected,
            _Part(meta), _Part(root), product=product or base_product(image),
            version=version or version_base(image),
        )

    @property
    def key(self) -> str:
        return self.fingerprint

    @property
    def subject(self) -> str:
        return f"image {self.fingerprint}"

    @property
    def transfer_subject(self) -> str:
        return f"export of image {self.fingerprint}"

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def partials(self) -> Sequence[PartialBlob]:
        # A unified export leaves the rootfs temp file unused (discarded at its start).
        return (self._meta_part.partial, self._root_part.partial)

    def busy(self) -> Collection[str]:
        found = {self.fingerprint}
        if self.expected is not None:
            found.add(self.expected.meta_sha256)
            if self.expected.root_sha256 is not None:
                found.add(self.expected.root_sha256)
        return found

    async def error_text(self, response: IResponse, receive: Receive) -> str:
        """LXD's error message from an error answer (its envelope), read and dropped."""
        chunks: list[bytes] = []
        try:
            await receive(response, chunks.append, MAX_ERROR_BODY_BYTES)
        except Exception:
            return ""
        try:
            doc = json.loads(b"".join(chunks))
        except ValueError:
            return ""
        error = doc.get("error") if isinstance(doc, dict) else None
        return " ".join(error.split())[:200] if isinstance(error, str) else ""

    async def receive(self, response: IResponse, receive: Receive) -> None:
        content_type = response.headers.getRawHeaders(b"Content-Type")
        try:
            boundary = multipart_boundary(content_type[0] if content_type else None)
        except MultipartError:
            await self.error_text(response, receive)
            raise
        if boundary is None:
            await self._receive_unified(response, receive)
        else:
            await self._receive_split(response, receive, boundary)

    async def _receive_unified(self, response: IResponse, receive: Receive) -> None:
        image = self.image
        if isinstance(response.length, int) and response.length != image.size:
            await self.error_text(response, receive)
            raise VerificationFailed(
                f"upstream announced {response.length} bytes for image {image.fingerprint}, "
                f"its size is {image.size}"
            )
        self.start("unified")
        await receive(response, self.unified_data, image.size)
        self.unified_complete()

    async def _receive_split(self, response: IResponse, receive: Receive, boundary: bytes) -> None:
        splitter = MultipartSplitter(boundary, _SplitWriter(self))
        self.start("split")
        errors: list[Exception] = []

        def sink(data: bytes) -> None:
            self.received += len(data)
            try:
                splitter.feed(data)
            except Exception as e:
                # Raised from here, the body receiver would only say it could not store it.
                errors.append(e)
                raise

        try:
            await receive(response, sink, self.image.size + MULTIPART_OVERHEAD_BYTES)
        except Exception:
            if errors:
                raise errors[0]
            raise
        splitter.close()

    def verified(self) -> Verified:
        """The files (one, or two) if sha256(meta ‖ rootfs) is the fingerprint; the parts learnt."""
        image = self.image
        fingerprint = image.fingerprint
        meta, root = self._meta_part, self._root_part
        if self.kind == "unified":
            digest = meta.partial.hexdigest()
            total = meta.received
        else:
            if not root.name:
                raise MultipartError(f"export of image {fingerprint} has no rootfs part")
            digest = self._combined.hexdigest()
            total = meta.received + root.received
        if total != image.size:
            raise VerificationFailed(f"upstream sent {total} of {image.size} bytes for image {fingerprint}")
        if digest != fingerprint:
            raise VerificationFailed(
                f"sha256 of the export of image {fingerprint} is {digest}: not the fingerprint"
            )
        files: list[tuple[_Part, str, str]] = []
        if self.kind == "unified":
            parts = ImageParts(
                fingerprint=fingerprint, upstream=self.upstream, meta_sha256=fingerprint,
                meta_size=meta.received, meta_ftype=UNIFIED_FTYPE["lxd"], root_sha256=None,
                root_size=0, root_ftype="",
            )
            files.append((meta, fingerprint, image_item_path(fingerprint, unified_filename(fingerprint))))
        else:
            assert meta.sha256 is not None and root.sha256 is not None
            expected = self.expected
            if expected is not None and expected.root_sha256 == root.sha256 and expected.root_ftype:
                # As it is listed already: the files' paths must not move.
                root_ftype = expected.root_ftype
            else:
                root_ftype = root_ftype_of(root.name, root.filename, image.type, image.prop("type"))
            parts = ImageParts(
                fingerprint=fingerprint, upstream=self.upstream, meta_sha256=meta.sha256,
                meta_size=meta.received, meta_ftype=META_FTYPE["lxd"], root_sha256=root.sha256,
                root_size=root.received, root_ftype=root_ftype,
            )
            files.append((meta, meta.sha256, image_item_path(fingerprint, meta_filename(fingerprint))))
            root_path = image_item_path(fingerprint, root_filename(fingerprint, root_ftype))
            files.append((root, root.sha256, root_path))
        return Verified(
            tuple(
                StoredFile(part.partial, sha256, part.received, path, self.product, self.version)
                for part, sha256, path in files
            ),
            parts,
        )

    def committed(self, verified: Verified, paths: Sequence[FilePath[Any]], *, stored: bool) -> None:
        assert verified.parts is not None
        self.succeed(verified.parts, paths[0], paths[1] if len(paths) > 1 else None, stored=stored)

    # -- internals ----------------------------------------------------------------------------

    def _observe(
        self, observers: Observers[FileSource], kind: Kind, ready: Callable[[], PartSource | None],
    ) -> "Deferred[FileSource]":
        if self.failure is not None:
            return fail(self.failure)
        if self.kind is not None and self.kind != kind:
            return fail(self._wrong_shape(kind))
        source = ready()
        return succeed(source) if source is not None else observers.add()

    def _wrong_shape(self, wanted: Kind) -> Failure:
        return Failure(WrongShape(
            f"image {self.fingerprint} is exported {self.kind} by {self.url}, not {wanted}"
        ))

    def _meta_source(self) -> PartSource | None:
        part = self._meta_part
        if self.kind != "split" or not part.complete:
            return None
        expect = self.expected.meta_sha256 if self.expected is not None else None
        return PartSource(self, part, part.received, expect=expect, hold_back=False)

    def _unified_source(self) -> PartSource | None:
        if self.kind != "unified":
            return None
        return PartSource(self, self._meta_part, self.image.size, expect=self.fingerprint)

    def _wake(self) -> None:
        self._waiters.fire(None)

    def start(self, kind: Kind) -> None:
        """The upstream answered 200 with an export of C{kind}."""
        self.kind = kind
        if kind == "unified":
            # The one file goes where a split export's metadata would.
            self._root_part.partial.discard()
            unified = self._unified_source()
            assert unified is not None  # the kind is set
            self._unified_observers.fire(unified)
            self._meta_observers.fire(self._wrong_shape("split"))
            self._root_observers.fire(self._wrong_shape("split"))
        else:
            self._unified_observers.fire(self._wrong_shape("unified"))
        self._start_observers.fire(None)

    def unified_data(self, data: bytes) -> None:
        part = self._meta_part
        part.partial.write(data)
        part.received += len(data)
        self.received += len(data)
        self._wake()

    def unified_complete(self) -> None:
        part = self._meta_part
        part.complete = True
        part.sha256 = part.partial.hexdigest()

    def succeed(self, parts: ImageParts, meta_path: FilePath[Any], root_path: FilePath[Any] | None,
                *, stored: bool) -> None:
        self.stored = stored
        self._meta_part.final_path = meta_path
        if root_path is not None:
            self._root_part.final_path = root_path
        self.parts = parts
        self._wake()
        self._done_observers.fire(parts)

    def fail(self, failure: Failure) -> None:
        self._meta_part.partial.discard()
        self._root_part.partial.discard()
        self.failure = failure
        self._wake()
        for observers in (
            self._start_observers, self._done_observers, self._meta_observers,
            self._root_observers, self._unified_observers,
        ):
            observers.fire(failure)


@define(eq=False)
class _SplitWriter:
    """Receives the parts of a split export: metadata first, then the rootfs, nothing else."""

    download: ExportDownload
    _current: _Part | None = field(default=None, init=False)

    def start_part(self, name: str, filename: str) -> None:
        d = self.download
        meta, root = d._meta_part, d._root_part
        if not meta.name:
            if name != "metadata":
                raise MultipartError(f"export's first part is {name!r}, not 'metadata'")
            part = meta
        elif not root.name:
            if name not in ROOT_FORM_NAMES:
                raise MultipartError(f"export's second part is {name!r}, not 'rootfs' or 'rootfs.img'")
            part = root
        else:
            raise MultipartError("export has more than two parts")
        part.name, part.filename = name, filename
        self._current = part
        if part is root:
            size = d.image.size - meta.received
            if size < 0:
                raise VerificationFailed(
                    f"metadata of image {d.fingerprint} is {meta.received} bytes, more than the "
                    f"image's {d.image.size}"
                )
            expect = d.expected.root_sha256 if d.expected is not None else None
            d._root_source = PartSource(d, root, size, expect=expect)
            d._root_observers.fire(d._root_source)

    def part_data(self, data: bytes) -> None:
        d = self.download
        part = self._current
        assert part is not None
        if d._meta_part.received + d._root_part.received + len(data) > d.image.size:
            raise VerificationFailed(
                f"export of image {d.fingerprint} is larger than its {d.image.size} bytes"
            )
        part.partial.write(data)
        part.received += len(data)
        d._combined.update(data)
        d._wake()

    def end_part(self) -> None:
        part = self._current
        assert part is not None
        part.complete = True
        part.sha256 = part.partial.hexdigest()
        self._current = None
        d = self.download
        if part is d._meta_part:
            meta = d._meta_source()
            assert meta is not None  # a split export whose metadata part is complete
            d._meta_observers.fire(meta)
        d._wake()


@define(eq=False)
class ItemDownload:
    """
    One listed file of an LXD upstream's image, served from its image's export download: what
    L{proxy.fetch.Fetcher.get} returns for a file of a simplestreams upstream (C{path},
    C{size}, C{failure}, C{available()}, C{wait()}, C{when_streaming()}, C{when_done()},
    C{background}, C{stored}, C{received}).

    The file is handed out whole once its own sha256 is the catalogue's (the metadata file
    before the rootfs has arrived), or once the export is verified.
    """

    export: ExportDownload
    item: Item
    role: Role
    _source: PartSource = field(init=False)
    _shape_failure: Failure | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._source = self.export.source_for(self.role, self.item)

    @property
    def path(self) -> FilePath[Any]:
        return self._source.path

    @property
    def size(self) -> int:
        return self.item.size

    @property
    def failure(self) -> Failure | None:
        return self._shape() or self._source.failure

    def available(self) -> int:
        return 0 if self._shape() is not None else self._source.available()

    def wait(self) -> "Deferred[None]":
        return self.export.wait()

    @property
    def received(self) -> int:
        return self._source.received

    @property
    def stored(self) -> bool:
        return self.export.stored

    @property
    def background(self) -> bool:
        return self.export.background

    @background.setter
    def background(self, value: bool) -> None:
        self.export.background = value

    @property
    def queued(self) -> bool:
        return self.export.queued

    def when_streaming(self) -> "Deferred[None]":
        d: Deferred[None] = Deferred()

        def started(_: None) -> None:
            failure = self.failure
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(None)

        self.export.when_streaming().addCallbacks(started, d.errback)
        return d

    def when_done(self) -> "Deferred[FilePath[Any]]":
        d: Deferred[FilePath[Any]] = Deferred()

        def done(_: ImageParts) -> None:
            failure = self.failure
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(self.path)

        self.export.when_done().addCallbacks(done, d.errback)
        return d

    def _shape(self) -> Failure | None:
        if self._shape_failure is None and self.export.kind is not None:
            listed_as: Kind = "unified" if self.role == "unified" else "split"
            if self.export.kind != listed_as:
                self._shape_failure = self.export._wrong_shape(listed_as)
        return self._shape_failure


def listed_file(index: CacheIndex, upstream: str, item: Item) -> tuple[RemoteImage, Role]:
    """
    The image whose export brings C{item}, a file of the synthesised catalogue
    (L{proxy.lxd_remote}), and which of its files C{item} is.

    @raise NotFound: C{item} is not a file of an LXD upstream's image, or its image is split
        and its files are not known (they are listed only once they are).
    """
    found = item_role(item.path)
    if found is None:
        raise NotFound(f"{upstream}: {item.path} is not a file of an image of this upstream")
    fingerprint, role = found
    if role == "unified":
        size = item.size
    else:
        parts = index.get_parts(fingerprint)
        if parts is None or parts.unified:
            raise NotFound(f"{upstream}: the files of image {fingerprint} are not known")
        size = parts.size
    return RemoteImage(fingerprint=fingerprint, size=size), role


__all__ = [
    "ExportDownload",
    "ItemDownload",
    "PartSource",
    "WrongShape",
    "listed_file",
]
