"""
The one-line client set-up with the real C{curl} and C{lxc}: the exact line the proxy gives,
run by C{sh} on this host with a client configuration of its own, makes C{lxc image list} and
C{lxc image export} work through the proxy; run again, it changes nothing.

The proxy serves one generated tree as C{images} (a remote LXD's client has by default, pointing
elsewhere: replaced) and as C{ubuntu} (built into LXD's client and unchangeable: added as
C{cache-ubuntu}).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import reactor as _reactor

from tests.e2e.lxd import LxcClient, Result, run_process
from tests.helpers.served import served

reactor: Any = _reactor
ALIAS = "testos/1.0"
SETUP_TIMEOUT_SECONDS = 60.0

pytestmark = [pytest.mark.loopback, pytest.mark.lxc]


def _require_tools() -> None:
    for tool, package in (("lxc", "lxd-client"), ("curl", "curl"), ("mksquashfs", "squashfs-tools")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package})")


async def _run_line(client: LxcClient, line: str) -> Result:
    # The admin's paste: the line as it is, in a shell, as the user whose lxc it sets up.
    result = await run_process(["/bin/sh", "-c", line], client.environment(), SETUP_TIMEOUT_SECONDS)
    assert result.code == 0, f"{line}\n--- stdout ---\n{result.out}\n--- stderr ---\n{result.err}"
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest_twisted.ensureDeferred
async def test_the_one_line_sets_up_lxc_and_is_idempotent(tmp_path: Path) -> None:
    _require_tools()
    async with served(reactor, tmp_path, names=("images", "ubuntu")) as s:
        line = (await s.status())["setup"]["line"]
        assert line.endswith("| sh -s -- images ubuntu")
        client = LxcClient(tmp_path / "lxc")

        first = await _run_line(client, line)
        assert f"lxc: added remote images (https://localhost:{s.proxy.port}/images)" in first.out
        # The client's own default images remote, replaced.
        assert "lxc: remote images pointed at https://" in first.out
        assert f"lxc: added remote cache-ubuntu (https://localhost:{s.proxy.port}/ubuntu)" in first.out
        certs = client.conf_dir / "servercerts"
        assert (certs / "images.crt").read_bytes().strip() == s.proxy.cert_pem.strip()
        assert (certs / "cache-ubuntu.crt").read_bytes().strip() == s.proxy.cert_pem.strip()
        remotes = (await client.run("remote", "list", "--format", "csv", check=True)).out

        image = s.tree.image(ALIAS)
        for remote in ("images", "cache-ubuntu"):
            listed = await client.image_list(remote)
            assert {i["fingerprint"] for i in listed} == {i.fingerprint for i in s.tree.images}
        exported = await client.image_export(f"images:{ALIAS}", tmp_path / "export")
        assert sorted(_sha256(p) for p in exported) == sorted(f.sha256 for f in image.files)

        again = await _run_line(client, line)
        assert "lxc: remote images is set up" in again.out
        assert "lxc: remote cache-ubuntu is set up" in again.out
        assert "added" not in again.out and "replacing" not in again.out
        assert (await client.run("remote", "list", "--format", "csv", check=True)).out == remotes
        listed = await client.image_list("cache-ubuntu")
        assert image.fingerprint in {i["fingerprint"] for i in listed}


@pytest_twisted.ensureDeferred
async def test_the_line_refuses_a_proxy_whose_key_is_not_the_pinned_one(tmp_path: Path) -> None:
    _require_tools()
    async with served(reactor, tmp_path) as s:
        line = (await s.status())["setup"]["line"]
        pin = (await s.status())["setup"]["pinned_pubkey"]
        forged = line.replace(pin, "sha256//" + "A" * 43 + "=")
        client = LxcClient(tmp_path / "lxc")
        result = await run_process(["/bin/sh", "-c", forged], client.environment(), SETUP_TIMEOUT_SECONDS)
        # curl refuses; sh runs an empty script.
        assert "SSL: public key does not match pinned public key" in result.err
        assert not (client.conf_dir / "servercerts").exists()
