"""The log format: C{[log] format} handed to twistd and to the twist runner, and a real JSON log."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogPublisher

from twisted.python.reflect import namedAny

from proxy.logs import apply_log_format, json_observer, twistd_json_observer
from tests.helpers.proxy_process import START_TIMEOUT_SECONDS, env, https_client, stop

reactor: Any = _reactor


def twistd_options(**given: Any) -> dict[str, Any]:
    """The keys twistd's ServerOptions has once parsed (those apply_log_format reads)."""
    return {"logger": None, "logfile": None, "syslog": 0, "nodaemon": 1, **given}


def twist_options(**given: Any) -> dict[str, Any]:
    """The keys the twist runner's options have once parsed."""
    return {"logFile": sys.stdout, "logFormat": "text", "fileLogObserverFactory": None, **given}


def test_twistd_gets_a_json_logger() -> None:
    options = twistd_options()
    apply_log_format(options, "json")
    # twistd imports the factory by its name.
    assert options["logger"] == "proxy.logs.twistd_json_observer"
    assert namedAny(options["logger"]) is twistd_json_observer


@pytest.mark.parametrize("given", [{"logger": "my.observer"}, {"syslog": 1}])
def test_twistd_command_line_wins(given: dict[str, Any]) -> None:
    options = twistd_options(**given)
    apply_log_format(options, "json")
    assert options == twistd_options(**given)


def test_text_leaves_twistd_as_it_is() -> None:
    options = twistd_options()
    apply_log_format(options, "text")
    assert options == twistd_options()


def test_twist_gets_json() -> None:
    options = twist_options()
    apply_log_format(options, "json")
    assert options["fileLogObserverFactory"] is json_observer
    assert options["logFormat"] == "json"


def test_options_parsed_alone_change_nothing() -> None:
    apply_log_format(None, "json")


def test_json_observer_writes_json_lines() -> None:
    out = io.StringIO()
    publisher = LogPublisher(json_observer(out))
    log = Logger(namespace="proxy.test", observer=publisher)
    log.info("fetched {url}", url="https://up/x")
    log.warn("second\nline")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert (first["url"], first["text"], first["log_namespace"]) == (
        "https://up/x", "fetched https://up/x", "proxy.test"
    )
    assert second["text"] == "second\nline"


def _twistd() -> list[str]:
    found = shutil.which("twistd")
    if found is not None:
        return [found]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_twistd_logs_json_lines_with_the_access_line(tmp_path: Path) -> None:
    """
    C{twistd -n lxd-image-proxy} with C{[log] format = "json"}: every line of its output is a
    JSON object, one timestamp each (C{log_time}); a request gets its access event.
    """
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\nport_file = "port"\nworkers = 1\n'
        '[cache]\ndir = "state"\nauto_update_interval = 0\n'
        '[upstreams.up]\nurl = "http://127.0.0.1:9"\nallow_insecure = true\n'
        '[log]\nformat = "json"\n'
    )
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            _twistd() + ["-n", "--pidfile=", "lxd-image-proxy", "--config", str(config)],
            cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        port_file = tmp_path / "port"
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            if port_file.exists() and port_file.read_text().strip():
                break
            assert process.poll() is None, log.read_text()
            await deferLater(reactor, 0.1, lambda: None)
        port = int(port_file.read_text().split()[0])
        client = https_client((tmp_path / "state" / "tls" / "server.crt").read_bytes())
        response = await client.get(f"https://localhost:{port}/").addTimeout(30, reactor)
        body = await treq.content(response)
        for _ in range(int(START_TIMEOUT_SECONDS * 10)):
            if b'"proxy.access"' in log.read_bytes():
                break
            await deferLater(reactor, 0.1, lambda: None)
    finally:
        stop(process)
    assert process.returncode in (0, -signal.SIGTERM), log.read_text()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(isinstance(e["log_time"], float) and "text" in e for e in events)
    [access] = [e for e in events if e["log_namespace"] == "proxy.access"]
    assert (access["face"], access["status"], access["bytes"], access["client"]) == (
        "root", 200, len(body), "127.0.0.1"
    )
    hints = [e["text"] for e in events if "remote add" in e.get("text", "")]
    assert any(h.startswith("LXD image API (up): incus remote add cache https://127.0.0.1:") for h in hints)
