"""Kill a writer with SIGKILL mid-flight, then check reconcile leaves a consistent cache.

The writer (tests/helpers/crash_writer.py) commits blobs and index records in
the proxy's order as fast as it can; the kill lands at an arbitrary instruction,
including inside fsync, rename or an LMDB commit.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.index import CacheIndex, FileRecord, ReconcileReport, reconcile, split_item_path

REPO = Path(__file__).resolve().parent.parent
WRITER = Path(__file__).resolve().parent / "helpers" / "crash_writer.py"
# Far more than the writer can do before the kill; the bound only keeps a
# writer that somehow escaped the kill from running for long.
ITERATIONS = 20000
STARTUP_TIMEOUT_SECONDS = 10.0
EXIT_TIMEOUT_SECONDS = 10.0


def wait_for_line(proc: subprocess.Popen[bytes], line: bytes, timeout: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while line + b"\n" not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"writer did not print {line!r} in {timeout}s; got {seen!r}")
            if not selector.select(remaining):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                stderr = proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"writer exited early: {stderr.decode(errors='replace')}")
            seen += chunk


def run_and_kill(root: Path, delay: float, seed: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(root), str(ITERATIONS), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        wait_for_line(proc, b"started", STARTUP_TIMEOUT_SECONDS)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=EXIT_TIMEOUT_SECONDS)
        stderr = proc.stderr.read() if proc.stderr else b""
        # Killed by us, not finished and not crashed on its own.
        assert proc.returncode == -signal.SIGKILL, stderr.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT_SECONDS)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(65536), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_sigkill_then_reconcile(tmp_path: Path, delay: float) -> None:
    run_and_kill(tmp_path, delay, seed=int(delay * 1000))

    temp_dir = tmp_path / "cache" / "tmp"
    temp_before = len(os.listdir(temp_dir))
    # The writer always has a slow partial open.
    assert temp_before >= 1

    store = BlobStore(FilePath(str(tmp_path / "cache")))
    index = CacheIndex(str(tmp_path / "index"), Clock())
    try:
        report = reconcile(index, store)
        assert report.temp_removed == temp_before
        assert os.listdir(temp_dir) == []

        records = list(index.records())
        if delay >= 0.5:
            assert records, "the writer committed nothing in 0.5 s"
        referenced = set()
        for record in records:
            path = store.path_for(record.sha256).path
            assert os.path.getsize(path) == record.size
            assert file_sha256(path) == record.sha256
            for item in record.paths:
                assert index.find_path(*split_item_path(item)) == record
            referenced.add(record.sha256)
        for metadata in index.metadata_records():
            assert file_sha256(store.path_for(metadata.sha256).path) == metadata.sha256
            referenced.add(metadata.sha256)
        assert set(store.stored()) == referenced

        # The index and the store take new writes after the crash.
        data = b"after the crash"
        partial = store.new_partial()
        partial.write(data)
        digest = hashlib.sha256(data).hexdigest()
        partial.commit(digest)
        fresh = FileRecord(
            sha256=digest,
            size=len(data),
            upstream="ubuntu",
            paths=("ubuntu/after/crash",),
            product="p",
            version="v",
            stored_at=1.0,
            last_used_at=1.0,
            use_count=0,
        )
        index.put(fresh)
        index.add_path(digest, "mirror", "after/crash")
        index.note_use(digest)
        assert index.flush_usage() == 1
        got = index.find_path("mirror", "after/crash")
        assert got is not None and got.use_count == 1

        assert reconcile(index, store) == ReconcileReport(0, 0, 0)
    finally:
        index.close()
