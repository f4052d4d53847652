"""The admin command (proxy.cli): every command in-process on a seeded cache, and in a process.

In-process runs call C{main(argv)} with a configuration file naming a temporary cache
directory; the test's own index is closed first (LMDB opens an environment once per process).
C{prefetch} runs its own reactor, so it is tested in a child process against a real loopback
upstream served by the test's reactor.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as global_reactor
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorProcess, IReactorSSL, IReactorTime
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from proxy.blobs import BlobStore
from proxy.cli import human_size, main
from proxy.index import CacheIndex, FileRecord, PinRecord
from tests.helpers.certs import make_ca
from tests.helpers.tree import ProductSpec, Tree, TreeImage, build_tree
from tests.helpers.upstream import start_https_upstream
from tests.test_pins import NOW, UPSTREAM, put_blob, seed_catalogue, seed_images

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0
PROCESS_TIMEOUT_SECONDS = 120.0


def write_config(directory: Path, url: str = "https://127.0.0.1:9", ca_file: str = "",
                 extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ca = f'ca_file = "{ca_file}"\n' if ca_file else ""
    path = directory / "proxy.toml"
    path.write_text(
        f'[cache]\ndir = "cache"\n\n[upstreams.{UPSTREAM}]\nurl = "{url}"\n{ca}\n'
        f'[upstreams.other]\nurl = "https://127.0.0.1:10"\n{extra}'
    )
    return path


@contextmanager
def opened(directory: Path) -> Iterator[tuple[CacheIndex, BlobStore]]:
    root = directory / "cache"
    store = BlobStore(FilePath(str(root)))
    index = CacheIndex(str(root / "index"), Clock())
    try:
        yield index, store
    finally:
        index.close()


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return build_tree(tmp_path / "tree")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "proxy")


def at(seconds: float) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str, clock: Clock | None = None
        ) -> tuple[int, str, str]:
    code = main(["--config", str(config), *args], clock=cast(IReactorTime, clock or at(NOW)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_sentence(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lxd-image-proxy: ") and lines[0].endswith(".")
    assert "Traceback" not in err
    return lines[0]


def seeded(config: Path, tree: Tree, images: list[TreeImage], use_count: int = 0) -> None:
    with opened(config.parent) as (index, store):
        seed_catalogue(index, store, tree)
        seed_images(index, store, tree, images, use_count=use_count)


def squashfs_images(tree: Tree, release: str) -> list[TreeImage]:
    return [i for i in tree.images_of("testos", release) if i.arch == "amd64" and i.type == "container"
            and i.root is not None and i.root.ftype == "squashfs"]


# -- list and info --------------------------------------------------------------------------


def test_list_empty(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, err = run(capsys, config, "list")
    assert (code, out, err) == (0, "no images are stored\n", "")
    code, out, _ = run(capsys, config, "list", "--format", "json")
    assert (code, json.loads(out)) == (0, [])


def test_list_shows_stored_images_and_stray_files(
    capsys: pytest.CaptureFixture[str], config: Path, tree: Tree
) -> None:
    image = tree.image("testos/1.0")
    seeded(config, tree, [image], use_count=3)
    with opened(config.parent) as (index, store):
        stray = put_blob(store, b"a file no catalogue lists")
        index.put(FileRecord(
            sha256=stray, size=25, upstream=UPSTREAM, paths=(f"{UPSTREAM}/gone/file.bin",), product="gone",
            version="1", stored_at=NOW, last_used_at=NOW, use_count=0,
        ))

    code, out, err = run(capsys, config, "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["UPSTREAM", "ALIAS", "FINGERPRINT", "TYPE", "ARCH", "VERSION", "SIZE", "STATUS",
                                "LAST", "USED", "USES"]
    row = next(line for line in lines if image.fingerprint[:12] in line)
    assert image.fingerprint[:13] not in row
    for text in ("testos/1.0", "container", "x86_64", image.version, human_size(image.size), "cached", " 3"):
        assert text in row
    assert any(stray[:12] in line and "file" in line and "never" in line for line in lines)

    code, out, _ = run(capsys, config, "list", "--format", "json")
    entries = json.loads(out)
    by_fp = {e["fingerprint"]: e for e in entries}
    assert by_fp[image.fingerprint]["kind"] == "image" and by_fp[image.fingerprint]["uses"] == 3
    assert by_fp[image.fingerprint]["last_used_at"] == NOW
    assert by_fp[image.fingerprint]["size"] == image.size
    assert by_fp[stray]["kind"] == "file" and by_fp[stray]["last_used_at"] is None


def test_info_by_alias_and_by_fingerprint(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    image = tree.image("testos/2.0", type="virtual-machine")
    seeded(config, tree, [image])
    code, out, _ = run(capsys, config, "info", f"{UPSTREAM}:testos/2.0", "--arch", "amd64", "--vm")
    assert code == 0
    assert f"fingerprint:  {image.fingerprint}" in out
    assert "virtual-machine" in out and "status:       cached" in out
    assert image.root is not None and image.root.path in out
    code, out2, _ = run(capsys, config, "info", image.fingerprint[:8])
    assert code == 0 and out2 == out


def test_info_errors(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    seeded(config, tree, [tree.image("testos/1.0"), tree.image("testos/2.0")])
    code, _, err = run(capsys, config, "info", "abcdef")
    assert code == 1 and "no stored image or file has a fingerprint starting with abcdef" in one_sentence(err)
    code, _, err = run(capsys, config, "info", "nowhere:testos/1.0")
    assert code == 1 and "nowhere is not a configured upstream" in one_sentence(err)
    code, _, err = run(capsys, config, "info", f"{UPSTREAM}:nosuch", "--arch", "amd64")
    assert code == 1 and "has no container image nosuch" in one_sentence(err)
    code, _, err = run(capsys, config, "info", "not a ref")
    assert code == 1 and "neither UPSTREAM:ALIAS" in one_sentence(err)
    code, _, err = run(capsys, config, "info", "")
    assert code == 1


# -- pin, unpin, remove ---------------------------------------------------------------------


def flags_of(config: Path, image: TreeImage) -> list[tuple[bool, bool]]:
    with opened(config.parent) as (index, _store):
        out = []
        for f in image.files:
            record = index.get(f.sha256)
            assert record is not None
            out.append((record.cached, record.auto_update))
        return out


def test_pin_and_unpin(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    image = tree.image("testos/2.0")
    seeded(config, tree, [image])
    code, out, err = run(capsys, config, "pin", f"{UPSTREAM}:testos/2.0", "--arch", "amd64")
    assert code == 0 and err == ""
    assert f"pinned {UPSTREAM}:testos/2.0 (container, x86_64): image {image.fingerprint[:12]}" in out
    assert flags_of(config, image) == [(False, True), (False, True)]
    code, out, _ = run(capsys, config, "list")
    assert "pinned" in next(line for line in out.splitlines() if image.fingerprint[:12] in line)

    code, out, _ = run(capsys, config, "pin", f"{UPSTREAM}:testos/2.0", "--arch", "amd64", "--vm")
    assert code == 0 and "are downloaded at the next auto-update" in out

    code, out, err = run(capsys, config, "unpin", f"{UPSTREAM}:testos/2.0", "--arch", "amd64")
    assert code == 0 and "unpinned" in out
    # The metadata file stays pinned for the VM image.
    assert flags_of(config, image) == [(False, True), (True, False)]
    code, _, err = run(capsys, config, "unpin", f"{UPSTREAM}:testos/2.0", "--arch", "amd64")
    assert code == 1 and "is not pinned" in one_sentence(err)


def test_pin_suggests_the_prefetch_of_the_same_image(
    capsys: pytest.CaptureFixture[str], config: Path, tree: Tree
) -> None:
    """The prefetch command a pin suggests names the same architecture, type and config."""
    seeded(config, tree, [])
    code, out, _ = run(capsys, config, "pin", f"{UPSTREAM}:testos/2.0", "--arch", "arm64", "--vm")
    assert code == 0
    suggested = out.splitlines()[-1].split("or now with: ", 1)[1]
    assert suggested == (
        f"lxd-image-proxy --config {config} prefetch {UPSTREAM}:testos/2.0 --arch arm64 --vm"
    )
    # What it suggests parses as the prefetch of that image.
    from proxy.cli import build_parser

    args = build_parser().parse_args(shlex.split(suggested)[1:])
    assert (args.command, args.refs, args.arch, args.vm, args.config) == (
        "prefetch", [f"{UPSTREAM}:testos/2.0"], "arm64", True, str(config)
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lxd-image-proxy {__version__}\n"


def _into_a_closed_pipe(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the command with its standard output a pipe whose reader has gone, as after head."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args], stdout=write, stderr=subprocess.PIPE,
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=PROCESS_TIMEOUT_SECONDS,
        )
    finally:
        os.close(write)


# argparse swallows a failed write of its help text itself, and ends as it would have.
@pytest.mark.parametrize(("args", "status"), [(["list"], 1), (["stats"], 1), (["--help"], 0)])
def test_a_reader_that_goes_away_ends_it_quietly(
    tmp_path: Path, config: Path, tree: Tree, args: list[str], status: int
) -> None:
    """C{lxd-image-proxy list | head}: no "Broken pipe", no traceback."""
    seeded(config, tree, squashfs_images(tree, "2.0"))
    result = _into_a_closed_pipe(tmp_path, "--config", str(config), *args)
    assert result.stderr == b""
    assert result.returncode == status


def test_pin_errors(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    seeded(config, tree, [])
    code, _, err = run(capsys, config, "pin", "nowhere:testos/2.0")
    assert code == 1 and "nowhere is not a configured upstream" in one_sentence(err)
    code, _, err = run(capsys, config, "pin", f"{UPSTREAM}:nosuch", "--arch", "amd64")
    assert code == 1 and "has no container image nosuch" in one_sentence(err)
    code, _, err = run(capsys, config, "pin", f"{UPSTREAM}:testos/2.0", "--arch", "vax")
    assert code == 1 and "not an architecture" in one_sentence(err)
    # An upstream whose catalogue is not stored yet can be pinned: it is checked later.
    code, out, _ = run(capsys, config, "pin", "other:anything")
    assert code == 0 and "not stored yet" in out


def test_pin_by_fingerprint_keeps_the_files(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    image = tree.image("testos/1.0")
    seeded(config, tree, [image])
    code, out, _ = run(capsys, config, "pin", image.fingerprint[:10])
    assert code == 0 and "kept" in out
    assert flags_of(config, image) == [(False, False), (False, False)]
    code, _, err = run(capsys, config, "remove", image.fingerprint[:10])
    assert code == 1 and "is pinned" in one_sentence(err)
    code, out, _ = run(capsys, config, "unpin", image.fingerprint[:10])
    assert code == 0 and flags_of(config, image) == [(True, False), (True, False)]


def test_remove(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    container = tree.image("testos/2.0")
    vm = tree.image("testos/2.0", type="virtual-machine")
    seeded(config, tree, [container, vm])
    run(capsys, config, "pin", f"{UPSTREAM}:testos/2.0", "--arch", "amd64", "--vm")
    code, _, err = run(capsys, config, "remove", f"{UPSTREAM}:testos/2.0", "--arch", "amd64", "--vm")
    assert code == 1 and "unpin it first, or remove it anyway with --force" in one_sentence(err)

    code, out, err = run(capsys, config, "remove", f"{UPSTREAM}:testos/2.0", "--arch", "amd64")
    assert code == 0 and err == "" and "1 files" in out
    with opened(config.parent) as (index, store):
        assert container.root is not None and index.get(container.root.sha256) is None
        assert not store.exists(container.root.sha256)
        # The metadata file is the VM image's too.
        assert index.get(container.meta.sha256) is not None and store.exists(container.meta.sha256)

    code, out, _ = run(capsys, config, "remove", vm.fingerprint, "--force")
    assert code == 0 and "still pinned" in out
    with opened(config.parent) as (index, store):
        assert list(index.records()) == []
        assert all(not store.exists(f.sha256) for f in vm.files)


def test_a_stored_delta_is_listed_and_removed_with_its_image(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    spec = ProductSpec("testos", "9.0", arches=("amd64",), versions=("20240101_0000", "20240201_0000"),
                       rootxz=False, deltas=True)
    tree = build_tree(tmp_path / "deltas", [spec])
    old, new = (tree.images_of("testos", "9.0", v)[0] for v in spec.versions)
    [delta] = new.deltas
    seeded(config, tree, [old, new])
    with opened(config.parent) as (index, store):
        assert put_blob(store, tree.read(delta)) == delta.sha256
        index.put(FileRecord(
            sha256=delta.sha256, size=delta.size, upstream=UPSTREAM, paths=(f"{UPSTREAM}/{delta.path}",),
            product=new.product, version=new.version, stored_at=NOW, last_used_at=NOW, use_count=2,
        ))
    code, out, _ = run(capsys, config, "list", "--format", "json")
    entries = json.loads(out)
    # Part of its image, not a stray file; its uses are the image's.
    assert sorted(e["fingerprint"] for e in entries) == sorted([old.fingerprint, new.fingerprint])
    assert next(e for e in entries if e["fingerprint"] == new.fingerprint)["uses"] == 2
    code, out, _ = run(capsys, config, "remove", new.fingerprint)
    assert code == 0 and "3 files" in out
    with opened(config.parent) as (index, store):
        assert index.get(delta.sha256) is None and not store.exists(delta.sha256)


# -- verify, gc, stats ----------------------------------------------------------------------


def test_verify_removes_corrupt_files(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    image = tree.image("testos/1.0")
    seeded(config, tree, [image])
    code, out, _ = run(capsys, config, "verify")
    assert code == 0 and "checked 4 files" in out and "all intact" in out
    assert image.root is not None
    with opened(config.parent) as (_index, store):
        path = store.path_for(image.root.sha256).path
    data = bytearray(Path(path).read_bytes())
    data[0] ^= 0xFF
    Path(path).write_bytes(bytes(data))

    code, out, _ = run(capsys, config, "verify")
    assert code == 1
    assert f"corrupt: {image.root.sha256}" in out and "1 corrupt, removed" in out
    with opened(config.parent) as (index, store):
        assert index.get(image.root.sha256) is None and not store.exists(image.root.sha256)
        assert index.get(image.meta.sha256) is not None


def test_gc_expires_unused_cached_files(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    pytest.importorskip("proxy.lifecycle")
    kept, expired = tree.image("testos/2.0"), tree.image("testos/1.0")
    seeded(config, tree, [kept, expired])
    run(capsys, config, "pin", f"{UPSTREAM}:testos/2.0", "--arch", "amd64")
    code, out, err = run(capsys, config, "gc", clock=at(NOW + 11 * DAY))
    assert code == 0 and err == "" and out.startswith("gc: ")
    with opened(config.parent) as (index, store):
        assert all(index.get(f.sha256) is not None for f in kept.files)
        assert all(index.get(f.sha256) is None and not store.exists(f.sha256) for f in expired.files)


def test_stats(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree) -> None:
    image = tree.image("testos/1.0")
    seeded(config, tree, [image])
    with opened(config.parent) as (index, _store):
        index.note_served(True, 1000)
        index.note_served(False, 500)
        index.note_fetched(500)
    code, out, _ = run(capsys, config, "stats")
    assert code == 0
    assert f"files:          2 ({human_size(image.size)})" in out
    assert "hit ratio:      50.0%" in out and "fetched:" in out
    code, out, _ = run(capsys, config, "stats", "--format", "json")
    stats = json.loads(out)
    assert (stats["files"], stats["bytes"], stats["hits"], stats["misses"]) == (2, image.size, 1, 1)
    assert (stats["bytes_from_cache"], stats["bytes_from_upstream"]) == (1000, 500)


# -- bundles --------------------------------------------------------------------------------


def test_bundle_moves_pinned_images_to_another_proxy(
    capsys: pytest.CaptureFixture[str], config: Path, tree: Tree, tmp_path: Path
) -> None:
    image = tree.image("testos/2.0")
    seeded(config, tree, [image, tree.image("testos/1.0")])
    run(capsys, config, "pin", f"{UPSTREAM}:testos/2.0", "--arch", "amd64")
    bundle = tmp_path / "seed.tar"
    code, out, err = run(capsys, config, "bundle", "export", str(bundle))
    assert code == 0 and err == "" and "1 images, 2 files" in out

    # The second proxy has an upstream of the same name and nothing stored.
    second = write_config(tmp_path / "second", url="https://127.0.0.1:11")
    code, out, err = run(capsys, second, "bundle", "import", str(bundle))
    assert code == 0 and err == "" and "2 files (2 new)" in out and "1 pins" in out
    code, out, _ = run(capsys, second, "list", "--format", "json")
    [entry] = json.loads(out)
    assert (entry["fingerprint"], entry["status"]) == (image.fingerprint, "pinned")

    code, out, _ = run(capsys, config, "bundle", "export", str(tmp_path / "one.tar"), f"{UPSTREAM}:testos/1.0",
                       "--arch", "amd64")
    assert code == 0 and "1 images" in out


def test_bundle_errors(capsys: pytest.CaptureFixture[str], config: Path, tree: Tree, tmp_path: Path) -> None:
    seeded(config, tree, [])
    code, _, err = run(capsys, config, "bundle", "export", str(tmp_path / "x.tar"))
    assert code == 1 and "no image is pinned" in one_sentence(err)
    code, _, err = run(capsys, config, "bundle", "import", str(tmp_path / "missing.tar"))
    assert code == 1 and "there is no bundle" in one_sentence(err)
    code, _, err = run(capsys, config, "bundle", "export", str(tmp_path / "x.tar"), "abc123")
    assert code == 1 and "is a fingerprint" in one_sentence(err)


# -- the command line itself ----------------------------------------------------------------


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    assert main(["--config", str(config)]) == 2
    assert main(["--config", str(config), "frobnicate"]) == 2
    assert main(["--config", str(config), "list", "--format", "xml"]) == 2
    assert main(["--config", str(config), "bundle"]) == 2
    err = capsys.readouterr().err
    assert "usage: lxd-image-proxy" in err and "Traceback" not in err
    assert main(["--help"]) == 0


def test_a_bad_configuration_is_one_sentence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["--config", str(tmp_path / "missing.toml"), "list"])
    assert code == 1
    assert "cannot read configuration file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nexpiry_days = -1\n")
    assert main(["--config", str(bad), "list"]) == 1
    assert "cache.expiry_days" in capsys.readouterr().err


def test_an_unusable_cache_dir_is_one_sentence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "proxy" / "cache"
    blocker.parent.mkdir()
    blocker.write_text("a file where the cache directory should be")
    config = write_config(tmp_path / "proxy")
    code, _, err = run(capsys, config, "list")
    assert code == 1 and "cannot open the cache at" in one_sentence(err)


def test_prefetch_checks_its_arguments_first(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(capsys, config, "prefetch", "nowhere:testos/2.0")
    assert code == 1 and "nowhere is not a configured upstream" in one_sentence(err)
    code, _, err = run(capsys, config, "prefetch", "abcdef")
    assert code == 1 and "is a fingerprint" in one_sentence(err)
    offline = write_config(config.parent.parent / "offline", extra="offline = true\n")
    code, _, err = run(capsys, offline, "prefetch", "other:testos/2.0")
    assert code == 1 and "other is configured offline" in one_sentence(err)
    lxd = write_config(config.parent.parent / "lxd", extra='protocol = "lxd"\n')
    code, _, err = run(capsys, lxd, "prefetch", "other:testos/2.0")
    assert code == 1 and "other is an LXD server" in one_sentence(err)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.done: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        self.done.callback(code if code is not None else -1)


async def run_process(*args: str) -> tuple[int, str, str]:
    """Run C{python3 -m proxy.cli ARGS} without blocking the reactor, killed if it hangs."""
    protocol = _Collect()
    extra = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + extra if extra else "")}
    transport = cast(IReactorProcess, global_reactor).spawnProcess(
        protocol, sys.executable, [sys.executable, "-m", "proxy.cli", *args], env=env, path=str(ROOT)
    )
    timer = cast(IReactorTime, global_reactor).callLater(PROCESS_TIMEOUT_SECONDS, transport.signalProcess, "KILL")
    try:
        code = await protocol.done
    finally:
        if timer.active():
            timer.cancel()
    return code, protocol.out.decode(), protocol.err.decode()


@pytest_twisted.ensureDeferred
async def test_as_a_process(tmp_path: Path) -> None:
    code, out, err = await run_process("--help")
    assert code == 0 and "usage: lxd-image-proxy" in out and "prefetch" in out
    code, out, err = await run_process("--config", str(tmp_path / "missing.toml"), "list")
    assert code == 1 and out == ""
    assert err.startswith("lxd-image-proxy: cannot read configuration file") and "Traceback" not in err


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_prefetch_downloads_from_a_real_upstream(tmp_path: Path, tree: Tree) -> None:
    ca = make_ca()
    running = start_https_upstream(cast(IReactorSSL, global_reactor), tree.root, ca)
    try:
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(running.ca_pem)
        config = write_config(tmp_path / "proxy", url=running.url, ca_file=str(ca_file))
        image = tree.image("testos/2.0")
        vm = tree.image("testos/2.0", type="virtual-machine")

        code, out, err = await run_process(
            "--config", str(config), "prefetch", f"{UPSTREAM}:testos/2.0", "--arch", "amd64"
        )
        assert code == 0, err
        assert f"{UPSTREAM}:testos/2.0 (container, x86_64): {image.fingerprint[:12]}" in out and "stored" in out
        # Not a terminal: one plain line per file started and finished, no carriage returns.
        assert "\r" not in err
        for f in image.files:
            assert f"downloading {UPSTREAM}/{f.path}" in err and f"stored {UPSTREAM}/{f.path}" in err
        with opened(config.parent) as (index, store):
            for f in image.files:
                record = index.get(f.sha256)
                assert record is not None and (record.cached, record.auto_update) == (True, False)
                assert store.path_for(f.sha256).getContent() == tree.read(f)
            # A pinned alias stays pinned through a prefetch.
            index.put_pin(PinRecord(
                upstream=UPSTREAM, alias="testos/2.0", type="virtual-machine", arch="x86_64", pinned_at=NOW))
        assert running.resource.count(image.root.path) == 1  # type: ignore[union-attr]

        code, out, err = await run_process(
            "--config", str(config), "prefetch", f"{UPSTREAM}:testos/2.0", "--arch", "amd64", "--vm"
        )
        assert code == 0, err
        with opened(config.parent) as (index, _store):
            for f in vm.files:
                record = index.get(f.sha256)
                assert record is not None and (record.cached, record.auto_update) == (False, True)
        # The shared metadata file was not fetched again.
        assert running.resource.count(image.meta.path) == 1

        code, out, err = await run_process(
            "--config", str(config), "prefetch", f"{UPSTREAM}:nosuch", "--arch", "amd64"
        )
        assert code == 1 and "has no container image nosuch" in err and "Traceback" not in err
    finally:
        await running.stop()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_prefetch_brings_the_deltas_from_stored_versions(tmp_path: Path) -> None:
    spec = ProductSpec("deltaos", "1.0", arches=("amd64",), versions=("20240101_0000", "20240201_0000"),
                       aliases=("deltaos/1.0",), rootxz=False, deltas=True)
    tree = build_tree(tmp_path / "tree", [spec])
    old, new = (tree.images_of("deltaos", "1.0", v)[0] for v in spec.versions)
    [delta] = new.deltas
    ca = make_ca()
    running = start_https_upstream(cast(IReactorSSL, global_reactor), tree.root, ca)
    try:
        ca_file = tmp_path / "ca.pem"
        ca_file.write_bytes(running.ca_pem)
        config = write_config(tmp_path / "proxy", url=running.url, ca_file=str(ca_file))
        with opened(config.parent) as (index, store):
            seed_images(index, store, tree, [old])
        # The delta fails first: the image is stored all the same, and the command succeeds.
        (tree.root / delta.path).rename(tmp_path / "held")
        args = ("--config", str(config), "prefetch", f"{UPSTREAM}:deltaos/1.0", "--arch", "amd64")
        code, out, err = await run_process(*args)
        assert code == 0, err
        assert "stored" in out and f"{UPSTREAM}/{delta.path}" in err and "404" in err
        with opened(config.parent) as (index, _store):
            assert all(index.get(f.sha256) is not None for f in new.files)
            assert index.get(delta.sha256) is None
        (tmp_path / "held").rename(tree.root / delta.path)
        code, out, err = await run_process(*args)
        assert code == 0, err
        with opened(config.parent) as (index, store):
            record = index.get(delta.sha256)
            assert record is not None and store.path_for(delta.sha256).getContent() == tree.read(delta)
    finally:
        await running.stop()


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    import io

    from proxy.cli import Progress

    bar = io.StringIO()
    progress = Progress(bar, True, total_bytes=2048, total_files=2)
    progress.started("up/a", 1024)
    progress.draw(512)
    progress.finished("up/a", 1024, None)
    progress.finished("up/b", 1024, "sha256 mismatch")
    progress.end()
    text = bar.getvalue()
    assert "downloading" not in text
    assert "\r[" in text and " 25%" in text and "100%" in text and "2/2 files" in text
    # A problem goes on a line of its own, above the bar.
    assert "\r\x1b[Kup/b: sha256 mismatch\n" in text and text.endswith("\n")

    lines = io.StringIO()
    progress = Progress(lines, False, total_bytes=2048, total_files=2)
    progress.started("up/a", 1024)
    progress.draw(512)
    progress.finished("up/a", 1024, None)
    progress.finished("up/b", 1024, "sha256 mismatch")
    progress.end()
    assert lines.getvalue() == (
        "downloading up/a (1.0 KiB)\nstored up/a\nfailed up/b: sha256 mismatch\n"
    )
