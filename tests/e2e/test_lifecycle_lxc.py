"""
The cache lifecycle end to end with the real C{lxc} client: auto-update of a pinned alias before
any client asks, serving while the upstream is down, and moving images to an air-gapped proxy
with a bundle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.e2e.lxd import LxcClient
from tests.helpers.certs import make_ca
from tests.helpers.running_proxy import start_proxy
from tests.helpers.tree import Tree, TreeImage, build_tree
from tests.helpers.upstream import start_https_upstream

ROOT = Path(__file__).resolve().parent.parent.parent
ALIAS = "testos/1.0"
NEW_VERSION = "20240301_0000"
reactor: Any = _reactor

pytestmark = [pytest.mark.loopback, pytest.mark.lxc]


def _require_tools() -> None:
    for tool, package in (("lxc", "lxd-client"), ("mksquashfs", "squashfs-tools")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_gets(upstream: Any, tree: Tree) -> int:
    files = set(tree.files)
    return sum(1 for r in upstream.resource.requests if r.method == "GET" and r.path in files)


def _newest(tree: Tree, alias: str = ALIAS) -> TreeImage:
    return tree.image(alias)


@pytest_twisted.ensureDeferred
async def test_pinned_alias_is_updated_before_any_client_asks(tmp_path: Path) -> None:
    _require_tools()
    tree = build_tree(tmp_path / "tree")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = await start_proxy(
        reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)},
        cache={"metadata_ttl": 0},
        pins=[{"upstream": "cache", "alias": ALIAS, "arch": "x86_64"}],
    )
    try:
        first = _newest(tree)
        await proxy.cache.prefetcher.run()
        for item in first.files:
            record = proxy.cache.index.get(item.sha256)
            assert record is not None and not record.cached and record.auto_update

        # The upstream publishes a newer version; the next auto-update run fetches it.
        tree.add_version("testos", "1.0", NEW_VERSION)
        newer = _newest(tree)
        assert newer.version == NEW_VERSION and newer.fingerprint != first.fingerprint
        report = await proxy.cache.prefetcher.run()
        assert sorted(report.downloaded) == sorted(f.path for f in newer.files)
        for image in (first, newer):  # keep_versions = 2: the older one stays pinned
            for item in image.files:
                record = proxy.cache.index.get(item.sha256)
                assert record is not None and not record.cached

        # A client now exports the alias: the newest image, with no upstream file request.
        gets = _file_gets(upstream, tree)
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        files = await client.image_export(f"cache:{ALIAS}", tmp_path / "export")
        assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in newer.files)
        assert _file_gets(upstream, tree) == gets
    finally:
        await proxy.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_cached_images_are_listed_and_exported_with_the_upstream_stopped(tmp_path: Path) -> None:
    _require_tools()
    tree = build_tree(tmp_path / "tree")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = await start_proxy(
        reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)},
        cache={"metadata_ttl": 0, "connect_timeout": 2},
    )
    try:
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        image = tree.image(ALIAS)
        await client.image_export(f"cache:{ALIAS}", tmp_path / "online")
        await upstream.stop()

        # The first listing after the outage gets the expired catalogue at once (stale while
        # revalidate); the refreshes behind it find the upstream gone and mark it offline.
        await client.image_list("cache")
        health = proxy.cache.health["cache"]
        for _ in range(100):
            if health.offline:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert health.offline
        listed = await client.image_list("cache")
        # Offline, the catalogue holds exactly the images whose files are all stored.
        assert [i["fingerprint"] for i in listed] == [image.fingerprint]
        files = await client.image_export(f"cache:{ALIAS}", tmp_path / "offline")
        assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
        # A miss while offline fails at once: it probes the upstream, which refuses it.
        result = await client.run("image", "export", "cache:testos/2.0", str(tmp_path / "miss") + "/")
        assert result.code != 0
    finally:
        await proxy.stop()
        await upstream.stop()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "--config", str(config), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )


def _config_file(tmp_path: Path, name: str, state: Path, url: str, ca_pem: bytes, offline: bool) -> Path:
    ca = tmp_path / f"{name}-ca.pem"
    ca.write_bytes(ca_pem)
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
[cache]
dir = "{state}"

[upstreams.cache]
url = "{url}"
ca_file = "{ca}"
offline = {"true" if offline else "false"}
"""
    )
    return path


@pytest_twisted.ensureDeferred
async def test_a_bundle_seeds_a_proxy_that_has_no_upstream(tmp_path: Path) -> None:
    _require_tools()
    tree = build_tree(tmp_path / "tree")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    image = tree.image(ALIAS)
    bundle = tmp_path / "seed.tar"
    try:
        connected = await start_proxy(
            reactor, tmp_path / "a", {"cache": (upstream.url, ca.cert_pem)},
            pins=[{"upstream": "cache", "alias": ALIAS, "arch": "x86_64"}],
        )
        try:
            await connected.cache.prefetcher.run()
            config_a = _config_file(tmp_path, "a", tmp_path / "a", upstream.url, ca.cert_pem, False)
            result = await deferToThread(_cli, config_a, "bundle", "export", str(bundle))
            assert result.returncode == 0, result.stderr
        finally:
            await connected.stop()
    finally:
        await upstream.stop()

    # The air-gapped proxy: its upstream is forced offline and its URL leads nowhere.
    dead_url = "https://127.0.0.1:9"
    isolated = await start_proxy(
        reactor, tmp_path / "b", {"cache": (dead_url, ca.cert_pem)},
        upstream_options={"cache": {"offline": True}},
    )
    try:
        config_b = _config_file(tmp_path, "b", tmp_path / "b", dead_url, ca.cert_pem, True)
        result = await deferToThread(_cli, config_b, "bundle", "import", str(bundle))
        assert result.returncode == 0, result.stderr
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("cache", isolated.url("cache"), isolated.cert_pem)
        listed = await client.image_list("cache")
        assert image.fingerprint in {i["fingerprint"] for i in listed}
        files = await client.image_export(f"cache:{ALIAS}", tmp_path / "export")
        assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
    finally:
        await isolated.stop()


@pytest_twisted.ensureDeferred
async def test_the_admin_command_works_on_the_cache_of_a_running_proxy(tmp_path: Path) -> None:
    _require_tools()
    tree = build_tree(tmp_path / "tree")
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    proxy = await start_proxy(reactor, tmp_path / "state", {"cache": (upstream.url, ca.cert_pem)})
    try:
        config = _config_file(tmp_path, "a", tmp_path / "state", upstream.url, ca.cert_pem, False)
        image = tree.image(ALIAS)
        result = await deferToThread(_cli, config, "pin", "--arch", "x86_64", f"cache:{ALIAS}")
        assert result.returncode == 0, result.stderr
        # Not a terminal: one plain line per file, no progress bar.
        result = await deferToThread(_cli, config, "prefetch", "--arch", "x86_64", f"cache:{ALIAS}")
        assert result.returncode == 0, result.stderr
        assert "\r" not in result.stderr + result.stdout
        for item in image.files:
            record = proxy.cache.index.get(item.sha256)
            assert record is not None and not record.cached and record.auto_update

        result = await deferToThread(_cli, config, "list", "--format", "json")
        assert result.returncode == 0, result.stderr
        assert image.fingerprint in result.stdout

        # The running proxy serves what the command fetched, without asking the upstream.
        gets = _file_gets(upstream, tree)
        client = LxcClient(tmp_path / "lxc")
        await client.add_simplestreams_remote("cache", proxy.url("cache"), proxy.cert_pem)
        files = await client.image_export(f"cache:{ALIAS}", tmp_path / "export")
        assert sorted(_sha256(f) for f in files) == sorted(f.sha256 for f in image.files)
        assert _file_gets(upstream, tree) == gets

        for command in (["verify"], ["gc"], ["stats"]):
            result = await deferToThread(_cli, config, *command)
            assert result.returncode == 0, (command, result.stderr)
        result = await deferToThread(_cli, config, "info", "--arch", "x86_64", "cache:nosuch/alias")
        assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
    finally:
        await proxy.stop()
        await upstream.stop()
