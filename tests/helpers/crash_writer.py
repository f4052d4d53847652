"""Write blobs and index records in a loop until killed (tests/test_crash_recovery.py).

Usage: crash_writer.py ROOT ITERATIONS SEED

Uses ROOT/cache for the blob store and ROOT/index for the index, in the order
the proxy does: temp file -> verify -> commit (fsync, link into the store) -> index
commit -> temp name removed; removals drop the record before the blob. One slow
partial is always open, as a long download would be (the next one is opened
before the current one is committed), so a kill always leaves a temp file. Prints
"started" once the first slow partial exists.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore, PartialBlob
from proxy.index import CacheIndex, FileRecord, MetadataRecord


def write_blob(store: BlobStore, rng: random.Random, data: bytes) -> PartialBlob:
    """A committed partial whose temp name is still there, as the proxy leaves it until indexed."""
    partial = store.new_partial()
    offset = 0
    while offset < len(data):
        step = rng.randint(1, 2048)
        partial.write(data[offset : offset + step])
        partial.flush()
        offset += step
    partial.commit(hashlib.sha256(data).hexdigest(), keep_temp=True)
    return partial


def file_record(digest: str, size: int, path: str, now: float) -> FileRecord:
    return FileRecord(
        sha256=digest,
        size=size,
        upstream="ubuntu",
        paths=(path,),
        product="ubuntu:noble:amd64:default",
        version="20240622",
        stored_at=now,
        last_used_at=now,
        use_count=0,
    )


def main(argv: list[str]) -> int:
    root, iterations, seed = argv[1], int(argv[2]), int(argv[3])
    rng = random.Random(seed)
    clock = Clock()
    store = BlobStore(FilePath(os.path.join(root, "cache")))
    index = CacheIndex(os.path.join(root, "index"), clock)

    slow: PartialBlob = store.new_partial()
    slow_data = bytearray()
    slow_count = 0
    print("started", flush=True)

    live: list[str] = []
    for i in range(iterations):
        clock.advance(1)
        data = rng.randbytes(rng.randint(1, 8192))
        blob = write_blob(store, rng, data)
        digest = blob.hexdigest()
        index.put(file_record(digest, len(data), f"ubuntu/images/{i}/rootfs.squashfs", clock.seconds()))
        blob.release_temp()
        live.append(digest)

        if i % 7 == 0:
            index.add_path(digest, "mirror", f"images/{i}/rootfs.squashfs")
        if i % 3 == 0:
            index.note_use(rng.choice(live))
        if i % 10 == 0:
            index.flush_usage()
        if i % 11 == 0:
            # Replacing a metadata file leaves its old body unreferenced,
            # as a metadata refresh does.
            body = b'{"format": "products:1.0", "n": %d}' % i
            blob = write_blob(store, rng, body)
            index.put_metadata(
                MetadataRecord(
                    upstream="ubuntu",
                    path=f"streams/v1/p{i % 3}.json",
                    sha256=blob.hexdigest(),
                    etag=f'"{i}"',
                    last_modified=None,
                    fetched_at=clock.seconds(),
                    checked_at=clock.seconds(),
                )
            )
            blob.release_temp()
        if i % 13 == 0 and len(live) > 2:
            victim = live.pop(rng.randrange(len(live) - 1))
            index.remove(victim)
            store.remove(victim)

        chunk = rng.randbytes(rng.randint(1, 1024))
        slow.write(chunk)
        slow.flush()
        slow_data += chunk
        if i % 50 == 49:
            following = store.new_partial()
            digest = hashlib.sha256(slow_data).hexdigest()
            slow.commit(digest)
            index.put(file_record(digest, len(slow_data), f"ubuntu/slow/{slow_count}", clock.seconds()))
            slow_count += 1
            slow = following
            slow_data = bytearray()

    slow.discard()
    index.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
