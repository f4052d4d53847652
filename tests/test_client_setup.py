"""The client set-up script and line (L{proxy.client_setup}), checked with the real tools.

The script runs under C{/bin/sh} against the real C{lxc} (only its local configuration is
touched: remote add of a simplestreams remote contacts nothing) in a configuration directory of
the test's own. The end-to-end run through C{curl} is C{tests/e2e/test_client_setup_lxc.py}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.client_setup import base_url, parse_host_header, pinned_pubkey, setup_line, setup_script
from tests.helpers.certs import make_ca

PROXY = "https://cache.lan:8443"
RUN_TIMEOUT_SECONDS = 60


@pytest.fixture(scope="module")
def cert_pem() -> str:
    return make_ca("set-up test").cert_pem.decode("ascii")


def _run(script: str, conf: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": path if path is not None else os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(conf / "home"), "LXD_CONF": str(conf / "lxc"), "INCUS_CONF": str(conf / "incus"),
        "LANG": "C.UTF-8",
    }
    (conf / "home").mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["/bin/sh", "-s", "--", *args], input=script, env=env, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_SECONDS,
    )


def _needs(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install {package})")


def test_the_pin_is_the_one_openssl_computes(cert_pem: str, tmp_path: Path) -> None:
    _needs("openssl", "openssl")
    (tmp_path / "cert.pem").write_text(cert_pem)
    pipeline = (
        f"openssl x509 -in {tmp_path / 'cert.pem'} -pubkey -noout | openssl pkey -pubin -outform der"
        " | openssl dgst -sha256 -binary | base64"
    )
    expected = subprocess.run(["/bin/sh", "-c", pipeline], capture_output=True, text=True, check=True,
                              timeout=RUN_TIMEOUT_SECONDS).stdout.strip()
    assert pinned_pubkey(cert_pem) == "sha256//" + expected


def test_the_line_fetches_the_script_pinning_the_key() -> None:
    assert setup_line(base_url("cache.lan", 8443), "sha256//K", ["images", "ubuntu"]) == (
        "curl -fsS --pinnedpubkey 'sha256//K' -k https://cache.lan:8443/setup.sh | sh -s -- images ubuntu"
    )
    assert base_url("fd00::1", 8443) == "https://[fd00::1]:8443"


@pytest.mark.parametrize(
    "header, parsed",
    [
        (b"cache.lan", ("cache.lan", None)),
        (b"cache.lan:8443", ("cache.lan", 8443)),
        (b"[::1]:8443", ("::1", 8443)),
        (b"192.0.2.1:443", ("192.0.2.1", 443)),
        (None, None),
        (b"", None),
        (b"a b:1", None),
        (b"x$(reboot):1", None),
        (b"[::1]x", None),
        (b"[nothex]:1", None),
        (b"host:0", None),
        (b"h\xc3\xa9:1", None),
    ],
)
def test_only_plain_host_headers_are_believed(header: bytes | None, parsed: tuple[str, int | None] | None) -> None:
    assert parse_host_header(header) == parsed


def test_the_script_is_shellcheck_clean(cert_pem: str, tmp_path: Path) -> None:
    _needs("shellcheck", "shellcheck")
    script = tmp_path / "setup.sh"
    script.write_text(setup_script(PROXY, cert_pem, ["images", "ubuntu"]))
    result = subprocess.run(["shellcheck", "--shell=sh", str(script)], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout


def test_the_script_adds_the_remotes_and_a_second_run_changes_nothing(cert_pem: str, tmp_path: Path) -> None:
    _needs("lxc", "lxd-client")
    script = setup_script(PROXY, cert_pem, ["images", "ubuntu", "mine"])
    first = _run(script, tmp_path, "images", "mine=lan")
    assert first.returncode == 0, first.stderr
    assert "lxc: added remote lan (https://cache.lan:8443/mine)" in first.stdout
    assert (tmp_path / "lxc" / "servercerts" / "lan.crt").read_text().strip() == cert_pem.strip()
    listed = subprocess.run(["lxc", "remote", "list", "--format", "csv"], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
                                 "LXD_CONF": str(tmp_path / "lxc")}, timeout=RUN_TIMEOUT_SECONDS).stdout
    assert "images,https://cache.lan:8443/images,simplestreams" in listed
    assert "lan,https://cache.lan:8443/mine,simplestreams" in listed
    second = _run(script, tmp_path, "images", "mine=lan")
    assert second.returncode == 0
    assert second.stdout == (
        "lxc: remote images is set up (https://cache.lan:8443/images)\n"
        "lxc: remote lan is set up (https://cache.lan:8443/mine)\n"
    )


def test_the_script_says_what_it_cannot_do(cert_pem: str, tmp_path: Path) -> None:
    _needs("lxc", "lxd-client")
    script = setup_script(PROXY, cert_pem, ["images"])
    result = _run(script, tmp_path, "nope", "images=../x", "images=")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "setup.sh: nope is not an upstream of https://cache.lan:8443 (it has: images)",
        "setup.sh: ../x is not a usable remote name",
        "setup.sh:  is not a usable remote name",
    ]
    assert not (tmp_path / "lxc" / "servercerts").exists()


def test_without_lxc_or_incus_the_script_says_so(cert_pem: str, tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    for tool in ("awk", "mkdir", "printf"):
        found = shutil.which(tool)
        if found:
            (empty / tool).symlink_to(found)
    result = _run(setup_script(PROXY, cert_pem, ["images"]), tmp_path, path=str(empty))
    assert result.returncode == 1
    assert result.stderr == "setup.sh: neither lxc nor incus is installed here\n"


def test_a_script_cut_short_runs_nothing(cert_pem: str, tmp_path: Path) -> None:
    _needs("lxc", "lxd-client")
    script = setup_script(PROXY, cert_pem, ["images"])
    # Cut inside main(), as a broken connection might.
    cut = script[: script.index('point_remote "$tool"') + 5]
    result = _run(cut, tmp_path, "images")
    assert result.stdout == ""
    assert not (tmp_path / "lxc").exists()
