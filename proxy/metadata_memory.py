# -*- test-case-name: tests.test_metadata_memory -*-
"""Small metadata bodies answered from memory: a bounded LRU of bytes keyed by their sha256.

An index or products file is asked for by every LXD host all day, and most are small (an
index is a few KiB); reading one from its blob for each request (a file open and a producer
with timer steps for one write) costs more than the rest of the answer. L{MetadataMemory}
keeps bodies up to C{max_body} bytes, C{max_total} bytes in all, least recently served
dropped first. The key is the content's sha256, so an entry is never stale: a replaced
catalogue has another sha256 and is simply another entry. Bodies are read on the disk worker
(L{load_small}) and put here on the reactor thread, which alone uses this object.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from weakref import WeakKeyDictionary

from proxy.blobs import BlobStore

# A body larger than this (products files of real upstreams reach tens of MiB) keeps the
# streaming path: holding it would cost more memory than its reads cost time.
METADATA_MEMORY_BODY_MAX_BYTES = 1024 * 1024
# All bodies held at once, per process.
METADATA_MEMORY_TOTAL_BYTES = 16 * 1024 * 1024
# sha256s known to be over the bound, remembered so that they cost no stat per request.
_TOO_BIG_REMEMBERED = 256


class MetadataMemory:
    """The LRU; every method is for the reactor thread."""

    def __init__(
        self,
        max_body: int = METADATA_MEMORY_BODY_MAX_BYTES,
        max_total: int = METADATA_MEMORY_TOTAL_BYTES,
    ) -> None:
        self.max_body = min(max_body, max_total)
        self.max_total = max_total
        self.total = 0
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._too_big: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bodies)

    def get(self, sha256: str) -> bytes | None:
        """The body C{sha256} if held (now the most recently used), else None."""
        body = self._bodies.get(sha256)
        if body is not None:
            self._bodies.move_to_end(sha256)
        return body

    def too_big(self, sha256: str) -> bool:
        """Whether C{sha256} was found over the bound: it is streamed, never read whole."""
        return sha256 in self._too_big

    def put(self, sha256: str, body: bytes | None) -> None:
        """Hold C{body} as C{sha256}; None (or a body over the bound) marks it too big."""
        if body is None or len(body) > self.max_body:
            self._too_big[sha256] = None
            if len(self._too_big) > _TOO_BIG_REMEMBERED:
                self._too_big.popitem(last=False)
            return
        if sha256 in self._bodies:
            self._bodies.move_to_end(sha256)
            return
        self._bodies[sha256] = body
        self.total += len(body)
        while self.total > self.max_total:
            _, dropped = self._bodies.popitem(last=False)
            self.total -= len(dropped)


def load_small(store: BlobStore, sha256: str, max_body: int) -> bytes | None:
    """
    The body C{sha256} of C{store}, or None when it is over C{max_body} bytes (blocking: for
    the disk worker).

    @raise FileNotFoundError: no such body is stored.
    """
    with open(store.path_for(sha256).path, "rb") as f:
        if os.fstat(f.fileno()).st_size > max_body:
            return None
        return f.read()


# One LRU per blob store in a process, whichever upstream's face serves from it.
_MEMORIES: "WeakKeyDictionary[BlobStore, MetadataMemory]" = WeakKeyDictionary()


def memory_of(store: BlobStore) -> MetadataMemory:
    memory = _MEMORIES.get(store)
    if memory is None:
        memory = _MEMORIES[store] = MetadataMemory()
    return memory


__all__ = [
    "METADATA_MEMORY_BODY_MAX_BYTES",
    "METADATA_MEMORY_TOTAL_BYTES",
    "MetadataMemory",
    "load_small",
    "memory_of",
]
