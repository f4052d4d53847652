"""The twistd plugin: options, makeService, and the command line from a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.application.service import Service
from twisted.python import usage

import proxy.config
import proxy.service
from proxy.config import Config, default_config, load_config
from proxy.errors import ConfigError
from proxy.tap import Options, makeService

REPO = Path(__file__).resolve().parents[1]
BAD_SENTENCE = 'cache.metadata_ttl: expected seconds or a duration like "5m", got "soon"'
SUBPROCESS_TIMEOUT_SECONDS = 60


@pytest.fixture(autouse=True)
def _state_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))


def parse(*argv: str) -> dict[str, Any]:
    options = Options()
    options.parseOptions(list(argv))
    return dict(options)


def test_options_default() -> None:
    assert parse() == {"config": None, "proxy_config": default_config()}


@pytest.mark.parametrize("flag", ["--config", "-c"])
def test_options_config(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text('[cache]\nmetadata_ttl = "1h"\n')
    assert parse(flag, str(path)) == {"config": str(path), "proxy_config": load_config(str(path))}
    assert parse(f"{flag}={path}" if flag == "--config" else f"-c{path}")["config"] == str(path)


def test_options_bad_config_exits_with_the_sentence(tmp_path: Path) -> None:
    # SystemExit, not a UsageError: the runners print their usage text before a usage error.
    path = tmp_path / "bad.toml"
    path.write_text('[cache]\nmetadata_ttl = "soon"\n')
    with pytest.raises(SystemExit) as info:
        parse("--config", str(path))
    assert str(info.value) == f"lxd-image-proxy: {BAD_SENTENCE}"


def test_options_reject_stray_arguments() -> None:
    with pytest.raises(usage.UsageError):
        parse("extra")


def test_make_service_builds_from_the_loaded_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import reactor

    built: list[tuple[Config, object]] = []
    service = Service()

    def build_service(config: Config, reactor: object) -> Service:
        built.append((config, reactor))
        return service

    monkeypatch.setattr(proxy.service, "build_service", build_service)
    # One process: the service itself (more are supervised, as the next test shows).
    monkeypatch.setattr(proxy.config, "default_workers", lambda: 1)
    options = Options()
    options.parseOptions([])
    result = makeService(options)
    assert cast(object, result) is service
    assert built == [(default_config(), reactor)]


def test_make_service_with_workers_builds_their_supervisor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    import proxy.workers

    made: list[tuple[Config, str | None]] = []

    class Supervisor(Service):
        def __init__(self, config: Config, reactor: object, path: str | None) -> None:
            made.append((config, path))

    monkeypatch.setattr(proxy.workers, "WorkerSupervisor", Supervisor)
    path = tmp_path / "c.toml"
    path.write_text('[server]\nworkers = 3\n[cache]\ndir = "state"\n')
    options = Options()
    options.parseOptions(["--config", str(path)])
    assert isinstance(makeService(options), Supervisor)
    assert [(c.server.workers, p) for c, p in made] == [(3, str(path))]


def test_make_service_config_error_exits_with_the_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    def build_service(config: Config, reactor: object) -> Service:
        raise ConfigError("server.tls_cert: cannot read /x.pem: No such file or directory")

    monkeypatch.setattr(proxy.service, "build_service", build_service)
    monkeypatch.setattr(proxy.config, "default_workers", lambda: 1)
    options = Options()
    options.parseOptions([])
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert str(info.value) == (
        "lxd-image-proxy: server.tls_cert: cannot read /x.pem: No such file or directory"
    )


# -- the command line, from the checkout ---------------------------------------------------


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "STATE_DIRECTORY")}
    env["PYTHONPATH"] = str(REPO)
    env["XDG_STATE_HOME"] = str(cwd / "xdg")
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )


def test_help_from_checkout(tmp_path: Path) -> None:
    result = run(["-m", "twisted", "lxd-image-proxy", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--config=" in result.stdout
    assert "lxd-image-proxy [--config FILE]" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_plugin_is_listed(tmp_path: Path) -> None:
    result = run(["-m", "twisted", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lxd-image-proxy" in result.stdout


def test_bad_config_from_checkout(tmp_path: Path) -> None:
    """A bad configuration ends `python3 -m twisted lxd-image-proxy` with its sentence alone."""
    (tmp_path / "bad.toml").write_text('[cache]\nmetadata_ttl = "soon"\n')
    result = run(["-m", "twisted", "lxd-image-proxy", "--config", "bad.toml"], tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"lxd-image-proxy: {BAD_SENTENCE}\n"
    assert result.stdout == ""


def test_missing_config_from_checkout(tmp_path: Path) -> None:
    result = run(["-m", "twisted", "lxd-image-proxy", "-c", "nope.toml"], tmp_path)
    assert result.returncode != 0
    assert "cannot read configuration file nope.toml: No such file or directory" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def test_bad_config_under_twistd(tmp_path: Path) -> None:
    """twistd ends with the same one sentence on stderr, no usage text, and exit status 1."""
    (tmp_path / "bad.toml").write_text('[cache]\nmetadata_ttl = "soon"\n')
    result = run(
        ["-c", TWISTD, "--nodaemon", "--pidfile=", "lxd-image-proxy", "--config", "bad.toml"],
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr == f"lxd-image-proxy: {BAD_SENTENCE}\n"
    assert result.stdout == ""


@pytest.mark.parametrize("runner", [["-m", "twisted"], ["-c", TWISTD, "--pidfile="]])
def test_version(tmp_path: Path, runner: list[str]) -> None:
    from twisted import copyright

    from proxy import __version__

    result = run([*runner, "lxd-image-proxy", "--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"lxd-image-proxy {__version__} (Twisted {copyright.version})\n"


def test_systemd_unit_runs_the_plugin() -> None:
    unit = (REPO / "conf" / "lxd-image-proxy.service").read_text().splitlines()
    settings = [line.split("=", 1) for line in unit if "=" in line and not line.startswith("#")]
    values: dict[str, list[str]] = {}
    for key, value in settings:
        values.setdefault(key, []).append(value)
    assert values["ExecStart"] == [
        "/opt/venvs/lxd-image-proxy/bin/twistd --nodaemon --pidfile= lxd-image-proxy "
        "--config /etc/lxd-image-proxy/lxd-image-proxy.toml"
    ]
    assert values["StateDirectory"] == ["lxd-image-proxy"]
    assert values["ReadWritePaths"] == ["/var/lib/lxd-image-proxy"]
    assert values["Restart"] == ["on-failure"]
    for hardening in ("NoNewPrivileges", "PrivateTmp"):
        assert values[hardening] == ["yes"]
    assert values["ProtectSystem"] == ["strict"]
    # The sample configuration keeps its state where the unit's StateDirectory is.
    sample = load_config(str(REPO / "conf" / "lxd-image-proxy.toml"))
    assert sample.cache.dir == "/var/lib/lxd-image-proxy"
