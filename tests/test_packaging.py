"""
The Debian package (debian/, built by packaging/build-deb with dpkg-buildpackage and
dh-virtualenv) built, installed, run, upgraded, removed and purged on this machine, the way an
admin does it: as root, with dpkg, and the installed program started as the unit starts it.

The .deb is built once for the module, and the tests after the first run in order, each
continuing from the state the one before left: installed, serving (which stores images in the
state directory), upgraded, removed, purged. No systemd runs as PID 1 here, so the service is
started by hand with the unit's own C{ExecStart} and C{User}. At the end the package is purged
and the service user removed if this module made it, so the machine is left as it was; a
machine that already has the package, its state or its configuration is left alone (skipped).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from tests.helpers.certs import make_ca
from tests.helpers.proxy_process import START_TIMEOUT_SECONDS
from tests.helpers.proxy_process import https_client
from tests.helpers.proxy_process import stop as stop_process
from tests.helpers.tree import build_tree
from tests.helpers.upstream import start_https_upstream

reactor: Any = _reactor

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lxd-image-proxy"
USER = "lxd-image-proxy"
VENV = Path("/opt/venvs/lxd-image-proxy")
STATE = Path("/var/lib/lxd-image-proxy")
ETC = Path("/etc/lxd-image-proxy")
CONFIG = ETC / "lxd-image-proxy.toml"
UNIT = Path("/lib/systemd/system/lxd-image-proxy.service")
ENABLED = Path("/etc/systemd/system/multi-user.target.wants/lxd-image-proxy.service")
# Held while the module runs, so that two runs on one machine never install at once.
LOCK = Path("/run/lock/lxd-image-proxy-packaging-test.lock")
# Building downloads the dependencies from PyPI: minutes, not seconds, on a slow link.
BUILD_TIMEOUT_SECONDS = 1800
DPKG_TIMEOUT_SECONDS = 600


def _clean_env() -> dict[str, str]:
    """This environment without the test run's Python settings (they would reach the
    build's virtualenv and the installed program) or HTTP proxies."""
    return {
        k: v for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.lower().endswith("_proxy")
    }


def _run(args: list[str], timeout: float = DPKG_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    # stdin is closed: a dpkg that asked about a conffile would fail rather than wait.
    return subprocess.run(
        args, env=_clean_env() | {"DEBIAN_FRONTEND": "noninteractive"}, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


def _ok(args: list[str], timeout: float = DPKG_TIMEOUT_SECONDS) -> str:
    done = _run(args, timeout)
    assert done.returncode == 0, f"{shlex.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def _status() -> str:
    """dpkg's status of the package, such as C{"ii "}; empty when dpkg never heard of it."""
    done = _run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PACKAGE])
    return done.stdout if done.returncode == 0 else ""


def _user_exists() -> bool:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return False
    return True


def _stored_files() -> dict[str, str]:
    """Every file under the state directory's C{blobs/}, by path, with its sha256."""
    found = {}
    for path in sorted((STATE / "blobs").rglob("*")):
        if path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_changelog_version_is_the_program_version() -> None:
    """The package's version is the program's: a release without a changelog entry fails here
    (and in packaging/build-deb) rather than shipping under the old version."""
    changelog = (ROOT / "debian" / "changelog").read_text()
    match = re.match(r"lxd-image-proxy \(([^)]+)\)", changelog)
    assert match is not None
    import proxy

    assert match.group(1) == proxy.__version__


def _pip_install_line(text: str) -> str:
    """The one command of C{text} that installs the checkout, without C{--quiet}."""
    lines = [ln.strip() for ln in text.splitlines() if "pip install" in ln and "-e '.[test]'" in ln]
    assert len(lines) == 1, lines
    return " ".join(w for w in lines[0].split() if w != "--quiet")


def test_readme_install_is_the_ci_install() -> None:
    """The README's install command is the one CI runs, and neither uses setuptools'
    deprecated C{compat} editable mode."""
    readme = _pip_install_line((ROOT / "README.md").read_text())
    ci = _pip_install_line((ROOT / ".ci" / "run").read_text())
    assert readme == ci
    assert "compat" not in readme
    assert "editable_mode=strict" in readme


def test_editable_install_shows_the_plugin_to_twistd(tmp_path: Path) -> None:
    """The README's editable install, into a new virtualenv, of a copy of this checkout: from
    anywhere, without C{PYTHONPATH}, twistd lists the C{lxd-image-proxy} plugin and imports
    the checkout's code. The virtualenv borrows this one's packages through a path file and
    builds without the network."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the checkout's files are taken from git ls-files")
    pytest.importorskip("wheel", reason="wheel is not installed (it is in the [test] extra)")
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = src / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next(venv.glob("lib/python3*/site-packages"))
    # The packages of this virtualenv, but not its .pth files (an install of another checkout).
    (site_packages / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = str(venv / "bin" / "python")
    # --ignore-installed: this virtualenv's own lxd-image-proxy is visible, and stays as it is.
    _ok_in(src, [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                 "--no-build-isolation", "--ignore-installed",
                 "-e", ".", "--config-settings", "editable_mode=strict"])

    imported = _ok_in(Path("/"), [python, "-c", "import proxy; print(proxy.__file__)"])
    assert Path(imported.strip()).resolve() == (src / "proxy" / "__init__.py").resolve()
    listed = _ok_in(Path("/"), [python, "-c", "import sys; from twisted.scripts.twistd import run; "
                                "sys.argv = ['twistd', '--help']; run()"])
    assert "lxd-image-proxy" in listed, listed


def _ok_in(cwd: Path, args: list[str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=_clean_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=DPKG_TIMEOUT_SECONDS)
    assert done.returncode == 0, f"{shlex.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def machine() -> Iterator[dict[str, Any]]:
    """This machine, checked fit for installing the package, and put back afterwards; what
    the ordered tests hand on to each other."""
    if os.geteuid() != 0:
        pytest.skip("installs a .deb with dpkg: runs as root only")
    for tool, package in (("dpkg-buildpackage", "dpkg-dev"), ("dh_virtualenv", "dh-virtualenv"),
                          ("systemd-analyze", "systemd")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package}; .ci/run does)")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.skip("another run of this module is installing the package on this machine")
        if _status().strip() not in ("", "un", "pn"):
            pytest.skip(f"{PACKAGE} is installed on this machine: not touching it")
        for path in (STATE, ETC, VENV):
            if path.exists():
                pytest.skip(f"{path} exists on this machine: purging the package would remove it")
        made_user = not _user_exists()
        shared: dict[str, Any] = {}
        try:
            yield shared
        finally:
            process = shared.get("process")
            if process is not None:
                stop_process(process, signal.SIGKILL)
            _run(["dpkg", "--purge", PACKAGE])
            if made_user and _user_exists():
                _run(["deluser", "--system", USER])
            if made_user:
                _run(["delgroup", "--system", "--only-if-empty", USER])
            config_dir = shared.get("config_dir")
            if config_dir is not None:
                shutil.rmtree(config_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def deb(machine: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb, built from this checkout by the documented command."""
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run(
        [str(ROOT / "packaging" / "build-deb"), "--out", str(out)], env=_clean_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, f"packaging/build-deb failed:\n{done.stdout[-6000:]}{done.stderr[-6000:]}"
    built = list(out.glob(f"{PACKAGE}_*.deb"))
    assert len(built) == 1, built
    return built[0]


def test_install(machine: dict[str, Any], deb: Path) -> None:
    """C{dpkg -i} installs the service: the program in its virtualenv, the admin command on
    PATH, the commented configuration as a conffile, the unit from conf/ enabled, a system
    user owning a private state directory."""
    _ok(["dpkg", "-i", str(deb)])
    assert _status() == "ii "

    twistd = VENV / "bin" / "twistd"
    assert os.access(twistd, os.X_OK)
    assert Path("/usr/bin/lxd-image-proxy").resolve() == VENV / "bin" / "lxd-image-proxy"
    assert CONFIG.read_bytes() == (ROOT / "conf" / "lxd-image-proxy.toml").read_bytes()
    conffiles = _ok(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE])
    assert str(CONFIG) in conffiles
    assert UNIT.read_bytes() == (ROOT / "conf" / "lxd-image-proxy.service").read_bytes()
    assert ENABLED.resolve() == UNIT.resolve()

    user = pwd.getpwnam(USER)
    assert user.pw_uid < 1000
    assert user.pw_shell == "/usr/sbin/nologin"
    info = STATE.stat()
    assert (info.st_uid, info.st_gid) == (user.pw_uid, user.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o750
    # twistd's plugin cache is fresh, so the service user never has to rewrite it.
    assert list(VENV.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache"))


def test_unit_verifies(machine: dict[str, Any]) -> None:
    """C{systemd-analyze verify} accepts the installed unit: its ExecStart names a program
    that exists and is executable."""
    done = _run(["systemd-analyze", "verify", str(UNIT)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lxd-image-proxy" not in done.stdout + done.stderr


def _unit_command(config: Path) -> list[str]:
    """The installed unit's ExecStart, reading C{config} instead of the installed one."""
    line = next(ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0] == str(VENV / "bin" / "twistd")
    assert argv[-2:] == ["--config", str(CONFIG)]
    return argv[:-1] + [str(config)]


def _test_config(installed: str, port_file: Path, upstream_url: str, ca_file: Path) -> str:
    """The installed configuration with only its listen addresses (loopback ports, for the
    HTTPS port and the metrics listener), port file and upstreams (one loopback test upstream)
    changed: never the public ones."""
    text, n = re.subn(r'(?m)^listen = .*$', 'listen = ["127.0.0.1:0"]', installed)
    assert n == 2
    text, n = re.subn(r'(?m)^port_file = .*$', f'port_file = "{port_file}"', text)
    assert n == 1
    start = text.index("\n[upstreams.")
    end = text.index("\n[lxd_api]")
    table = f'\n[upstreams.cache]\nurl = "{upstream_url}"\nca_file = "{ca_file}"\n'
    text = text[:start] + table + text[end:]
    assert "https://images" not in text and "https://cloud-images" not in text
    return text


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_installed_program_serves(machine: dict[str, Any], tmp_path: Path) -> None:
    """The installed program, started as the unit starts it (its ExecStart, as its User, from
    /) with the installed configuration, serves image files through a loopback upstream,
    stores them in the state directory, and the admin command on PATH lists them."""
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed (apt-get install squashfs-tools)")
    tree = build_tree(tmp_path / "tree")
    image = tree.image("testos/1.0")
    assert image.root is not None
    ca = make_ca()
    upstream = start_https_upstream(reactor, tree.root, ca)
    user = pwd.getpwnam(USER)
    # Outside tmp_path, whose parents the service user may not enter.
    config_dir = Path(tempfile.mkdtemp(prefix="lxd-image-proxy-package-"))
    machine["config_dir"] = config_dir
    os.chown(config_dir, user.pw_uid, user.pw_gid)
    config_dir.chmod(0o755)
    port_file = config_dir / "port"
    ca_file = config_dir / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    config = config_dir / "lxd-image-proxy.toml"
    config.write_text(_test_config(CONFIG.read_text(), port_file, upstream.url, ca_file))
    log = config_dir / "proxy.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as out:
            process = subprocess.Popen(
                _unit_command(config), cwd="/", user=USER, group=USER, extra_groups=[],
                # What systemd gives the unit's process, and nothing of this test run.
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "LANG": "C.UTF-8", "HOME": str(STATE), "STATE_DIRECTORY": str(STATE)},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        machine["process"] = process
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            if port_file.exists() and port_file.read_text().strip():
                break
            assert process.poll() is None, log.read_text()
            await deferLater(reactor, 0.1, lambda: None)
        else:
            raise AssertionError("the installed program did not write its port file:\n" + log.read_text())
        port = int(port_file.read_text().split()[0])

        client = https_client((STATE / "tls" / "server.crt").read_bytes())
        base = f"https://localhost:{port}/cache"
        index = await client.get(f"{base}/streams/v1/index.json")
        assert index.code == 200
        await treq.content(index)
        for item in image.files:
            response = await client.get(f"{base}/{item.path}")
            assert response.code == 200
            assert hashlib.sha256(await treq.content(response)).hexdigest() == item.sha256

        stored = _stored_files()
        assert {image.meta.sha256, image.root.sha256} <= set(stored.values())
        for path in stored:
            assert Path(path).stat().st_uid == user.pw_uid
        machine["stored"] = stored

        listed = subprocess.run(
            ["lxd-image-proxy", "--config", str(config), "list", "--format", "json"],
            user=USER, group=USER, extra_groups=[], cwd="/",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS,
        )
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)
        assert any(e["fingerprint"] == image.fingerprint for e in entries), entries
    finally:
        machine.pop("process", None)
        if process is not None:
            process.send_signal(signal.SIGTERM)
            for _ in range(int(START_TIMEOUT_SECONDS * 10)):
                if process.poll() is not None:
                    break
                await deferLater(reactor, 0.1, lambda: None)
            stop_process(process, signal.SIGKILL)
        await upstream.stop()
    text = log.read_text()
    assert process is not None
    # twistd ends by re-raising the signal it stopped on.
    assert process.returncode in (0, -signal.SIGTERM), text
    assert "Traceback" not in text, text
    # The plugin cache written at install time is fresh: twistd does not try to rewrite it.
    assert "plugin cache" not in text, text


def test_upgrade_keeps_state_and_modified_config(machine: dict[str, Any], deb: Path) -> None:
    """Installing the package again (an upgrade as dpkg runs it: old prerm, unpack, new
    postinst) keeps the cached images and the admin's edit of the configuration, without
    asking."""
    stored = machine.get("stored")
    assert stored, "test_installed_program_serves stored nothing"
    edited = CONFIG.read_text().replace('metadata_ttl = "5m"', 'metadata_ttl = "10m"')
    assert edited != CONFIG.read_text()
    CONFIG.write_text(edited)

    _ok(["dpkg", "-i", str(deb)])
    assert _status() == "ii "
    assert CONFIG.read_text() == edited
    assert list(ETC.glob("*.dpkg-*")) == []
    assert _stored_files() == stored
    assert (STATE / "index").is_dir()


def test_remove_keeps_cached_images(machine: dict[str, Any]) -> None:
    """C{dpkg -r} removes the program and its virtualenv entirely and keeps the cached images
    (and, as for every package, the configuration)."""
    stored = machine.get("stored")
    assert stored, "test_installed_program_serves stored nothing"
    _ok(["dpkg", "-r", PACKAGE])
    assert _status() == "rc "
    assert not VENV.exists()
    assert not Path("/usr/bin/lxd-image-proxy").exists()
    assert _stored_files() == stored
    assert (STATE / "index").is_dir()
    assert (STATE / "tls" / "server.crt").exists()
    assert CONFIG.exists()


def test_purge_removes_state_and_config(machine: dict[str, Any]) -> None:
    """C{dpkg --purge} removes the state directory (the cached images) and the configuration;
    the system user stays, as Debian leaves system users."""
    _ok(["dpkg", "--purge", PACKAGE])
    assert _status() == ""
    assert not STATE.exists()
    assert not ETC.exists()
    assert not ENABLED.exists()
    assert _user_exists()
