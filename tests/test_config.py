"""Configuration: the built-in default, the TOML loader, and its one-sentence errors."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve

from proxy import config as config_module
from proxy.config import (
    CacheConfig,
    Config,
    ServerConfig,
    UpstreamConfig,
    default_config,
    default_state_dir,
    load_config,
    normalise_listen,
    parse_duration,
)
from proxy.errors import ConfigError
from tests.helpers.certs import make_ca

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "conf" / "lxd-image-proxy.toml"

DEFAULT_UPSTREAMS = (
    UpstreamConfig(name="images", url="https://images.lxd.canonical.com"),
    UpstreamConfig(name="ubuntu", url="https://cloud-images.ubuntu.com/releases"),
    UpstreamConfig(name="ubuntu-daily", url="https://cloud-images.ubuntu.com/daily"),
    UpstreamConfig(name="linuxcontainers", url="https://images.linuxcontainers.org"),
)


@pytest.fixture(autouse=True)
def _state_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test sees the same environment for the default state directory."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))


def write(tmp_path: Path, text: str, name: str = "proxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


# -- defaults ------------------------------------------------------------------------------


def test_default_config_whole() -> None:
    assert load_config(None) == default_config() == Config(
        server=ServerConfig(
            listen=("tcp:8443:interface=0.0.0.0",),
            tls_cert="",
            tls_key="",
            tls_names=(),
            port_file="",
        ),
        cache=CacheConfig(
            dir=default_state_dir(),
            metadata_ttl=300.0,
            download_idle_timeout=60.0,
            connect_timeout=30.0,
            usage_flush_interval=10.0,
        ),
        upstreams=DEFAULT_UPSTREAMS,
    )


def test_default_state_dir_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir() == "/var/lib/lxd-image-proxy"


def test_default_state_dir_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_state_dir() == str(tmp_path / "xdg" / "lxd-image-proxy")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == str(tmp_path / "home" / ".local/state/lxd-image-proxy")
    # The XDG spec says a relative XDG_STATE_HOME is ignored.
    monkeypatch.setenv("XDG_STATE_HOME", "relative")
    assert default_state_dir() == str(tmp_path / "home" / ".local/state/lxd-image-proxy")


def test_default_state_dir_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/lxd-image-proxy:/var/lib/other")
    assert default_state_dir() == "/var/lib/lxd-image-proxy"


def test_config_upstream_lookup() -> None:
    config = default_config()
    assert config.upstream("ubuntu") == DEFAULT_UPSTREAMS[1]
    assert config.upstream("nope") is None


def test_empty_file_is_the_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == default_config()


# -- the sample configuration --------------------------------------------------------------


def _leaves(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            keys |= _leaves(value, name)
        else:
            keys.add(name)
    return keys


def test_sample_config_equals_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """conf/lxd-image-proxy.toml parses, and every key it sets equals the built-in default."""
    # The sample is written for the systemd unit, which runs with the root default
    # directory (StateDirectory=lxd-image-proxy).
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert load_config(str(SAMPLE)) == default_config()


def test_sample_config_sets_every_key() -> None:
    """Every key the loader knows appears in the sample (so every key is documented there)."""
    document = tomllib.loads(SAMPLE.read_text())
    keys = _leaves(document)
    expected = {f"server.{k}" for k in config_module._SERVER_KEYS}
    expected |= {f"cache.{k}" for k in config_module._CACHE_KEYS}
    for name, _ in config_module.DEFAULT_UPSTREAMS:
        expected |= {f"upstreams.{name}.url", f"upstreams.{name}.ca_file"}
    assert expected <= keys
    allow_insecure = {k for k in keys - expected if k.endswith(".allow_insecure")}
    assert keys - expected == allow_insecure
    assert len(allow_insecure) == 1


def test_sample_config_comments_every_key() -> None:
    """Each key line in the sample is preceded by a comment line."""
    lines = SAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", "[")):
            assert lines[number - 1].strip().startswith("#"), f"line {number + 1}: {line}"


# -- a full file ---------------------------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    cert_pem, key_pem = ca.issue(["proxy.test"])
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    path = write(
        tmp_path,
        """
[server]
listen = ["127.0.0.1:0", "[::1]:8443", "9000", "tcp:8444:interface=127.0.0.2"]
tls_cert = "cert.pem"
tls_key = "key.pem"
tls_names = ["Proxy.Example.", "10.0.0.1"]
port_file = "run/ports"

[cache]
dir = "state"
metadata_ttl = "1h30m"
download_idle_timeout = 5
connect_timeout = 2.5
usage_flush_interval = "1d"

[upstreams.local]
url = "http://127.0.0.1:8080/base/"
allow_insecure = true

[upstreams."other.one"]
url = "https://127.0.0.1:8443"
ca_file = "ca.pem"
""",
    )
    assert load_config(path) == Config(
        server=ServerConfig(
            listen=(
                "tcp:0:interface=127.0.0.1",
                "tcp:8443:interface=\\:\\:1",
                "tcp:9000:interface=0.0.0.0",
                "tcp:8444:interface=127.0.0.2",
            ),
            tls_cert=str(tmp_path / "cert.pem"),
            tls_key=str(tmp_path / "key.pem"),
            tls_names=("proxy.example", "10.0.0.1"),
            port_file=str(tmp_path / "run" / "ports"),
        ),
        cache=CacheConfig(
            dir=str(tmp_path / "state"),
            metadata_ttl=5400.0,
            download_idle_timeout=5.0,
            connect_timeout=2.5,
            usage_flush_interval=86400.0,
        ),
        upstreams=(
            UpstreamConfig(
                name="local", url="http://127.0.0.1:8080/base", ca_file="", allow_insecure=True
            ),
            UpstreamConfig(name="other.one", url="https://127.0.0.1:8443", ca_file=str(tmp_path / "ca.pem")),
        ),
    )


def test_partial_tables_keep_other_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[cache]\nmetadata_ttl = "90s"\n[server]\nlisten = ["8443"]\n')
    default = default_config()
    assert load_config(path) == evolve(default, cache=evolve(default.cache, metadata_ttl=90.0))


def test_absolute_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, '[cache]\ndir = "~/cache"\n[server]\nport_file = "/run/p"\n'))
    assert config.cache.dir == str(tmp_path / "home" / "cache")
    assert config.server.port_file == "/run/p"


# -- listen --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("8443", "tcp:8443:interface=0.0.0.0"),
        ("0.0.0.0:8443", "tcp:8443:interface=0.0.0.0"),
        ("[::]:8443", "tcp:8443:interface=\\:\\:"),
        ("127.0.0.1:0", "tcp:0:interface=127.0.0.1"),
        ("tcp:8443:interface=127.0.0.1", "tcp:8443:interface=127.0.0.1"),
        ("tcp:8443", "tcp:8443:interface=0.0.0.0"),
        ("tcp:port=8443:interface=\\:\\:1", "tcp:8443:interface=\\:\\:1"),
        ("tcp6:8443", "tcp:8443:interface=\\:\\:"),
        ("tcp:8443:backlog=10", "tcp:8443:interface=0.0.0.0:backlog=10"),
    ],
)
def test_listen_forms(given: str, expected: str) -> None:
    assert normalise_listen(given) == expected


def test_listen_descriptions_work_with_twisted() -> None:
    """The canonical descriptions parse as Twisted server endpoints with the right address."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    for given in ["[::]:0", "127.0.0.1:0"]:
        serverFromString(reactor, normalise_listen(given)).listen(None)
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (0, "::"),
        (0, "127.0.0.1"),
    ]


@pytest.mark.parametrize(
    "given, sentence",
    [
        (
            "ssl:8443",
            'server.listen: "ssl:8443" is not a plain TCP endpoint; the proxy adds TLS '
            'itself, so use "tcp:PORT" or "ADDRESS:PORT"',
        ),
        (
            "localhost:8443",
            'server.listen: expected an address like "0.0.0.0:8443", "[::]:8443" or '
            '"tcp:8443", got "localhost:8443"',
        ),
        ("70000", 'server.listen: port must be between 0 and 65535 in "70000"'),
        (
            "tcp:80:interface=example.org",
            'server.listen: "example.org" is not an IP address in '
            '"tcp:80:interface=example.org"; listen addresses must be numeric',
        ),
        (
            "tcp:80:reuse=yes",
            'server.listen: expected an address like "0.0.0.0:8443", "[::]:8443" or '
            '"tcp:8443", got "tcp:80:reuse=yes"',
        ),
    ],
)
def test_listen_errors(tmp_path: Path, given: str, sentence: str) -> None:
    assert error_of(tmp_path, f"[server]\nlisten = [{given!r}]\n".replace("'", '"')) == sentence


def test_listen_empty_and_duplicate(tmp_path: Path) -> None:
    assert error_of(tmp_path, "[server]\nlisten = []\n") == (
        "server.listen: expected at least one address to listen on"
    )
    assert error_of(tmp_path, '[server]\nlisten = ["8443", "0.0.0.0:8443"]\n') == (
        'server.listen: an address is listed twice in ["8443", "0.0.0.0:8443"]'
    )


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, seconds",
    [(90, 90.0), (1.5, 1.5), ("90s", 90.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0),
     ("1h30m", 5400.0), ("90", 90.0), (" 2M ", 120.0), ("0.5m", 30.0)],
)
def test_durations(given: object, seconds: float) -> None:
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("given", ["soon", "", "1h30", "5 m", "m", "-5m", True, [1], {}])
def test_bad_durations(given: object) -> None:
    assert parse_duration(given) is None


def test_duration_error_sentence(tmp_path: Path) -> None:
    assert error_of(tmp_path, '[cache]\nmetadata_ttl = "soon"\n') == (
        'cache.metadata_ttl: expected seconds or a duration like "5m", got "soon"'
    )
    assert error_of(tmp_path, "[cache]\nconnect_timeout = true\n") == (
        'cache.connect_timeout: expected seconds or a duration like "5m", got true'
    )
    assert error_of(tmp_path, "[cache]\nmetadata_ttl = nan\n") == (
        'cache.metadata_ttl: expected seconds or a duration like "5m", got nan'
    )


def test_duration_bounds(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[cache]\nmetadata_ttl = 0\n")).cache.metadata_ttl == 0.0
    assert error_of(tmp_path, "[cache]\nmetadata_ttl = -1\n") == (
        "cache.metadata_ttl: expected zero or more seconds, got -1"
    )
    assert error_of(tmp_path, '[cache]\ndownload_idle_timeout = "0s"\n') == (
        'cache.download_idle_timeout: expected more than zero seconds, got "0s"'
    )


# -- structure and types -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("[sever]\n", "sever: unknown table; expected one of cache, server, upstreams"),
        ('[server]\nlisen = ["8443"]\n',
         "server.lisen: unknown key; expected one of listen, port_file, tls_cert, tls_key, tls_names"),
        ("[cache]\ndirectory = 'x'\n",
         "cache.directory: unknown key; expected one of connect_timeout, dir, "
         "download_idle_timeout, metadata_ttl, usage_flush_interval"),
        ("server = 1\n", "server: expected a table, got 1"),
        ('[server]\nlisten = "8443"\n', 'server.listen: expected a list of strings, got "8443"'),
        ("[server]\nlisten = [8443]\n", "server.listen: expected a list of strings, got [8443]"),
        ("[server]\nport_file = 5\n", "server.port_file: expected a string, got 5"),
        ("[cache]\ndir = ''\n", 'cache.dir: expected a directory path, got ""'),
        ('[server]\ntls_names = ["bad name"]\n',
         'server.tls_names: expected DNS names or IP addresses, got "bad name"'),
        ('[server]\ntls_cert = "c.pem"\n',
         "server.tls_key: must be set together with server.tls_cert, or both left empty"),
    ],
)
def test_structure_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, text) == sentence


def test_missing_and_broken_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"cannot read configuration file {missing}: No such file or directory"

    path = write(tmp_path, "[server\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path} is not valid TOML: ")
    assert "\n" not in str(info.value)

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        load_config(str(binary))
    assert str(info.value) == f"{binary} is not valid TOML: it is not UTF-8 text"


def test_tls_files(tmp_path: Path) -> None:
    ca = make_ca()
    cert_pem, key_pem = ca.issue(["a.test"])
    _, other_key = ca.issue(["b.test"])
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "other.pem").write_bytes(other_key)
    (tmp_path / "junk.pem").write_text("junk")
    pair = '[server]\ntls_cert = "{}"\ntls_key = "{}"\n'
    assert error_of(tmp_path, pair.format("missing.pem", "key.pem")) == (
        f"server.tls_cert: cannot read {tmp_path / 'missing.pem'}: No such file or directory"
    )
    assert error_of(tmp_path, pair.format("junk.pem", "key.pem")) == (
        f"server.tls_cert: {tmp_path / 'junk.pem'} holds no PEM certificate"
    )
    assert error_of(tmp_path, pair.format("cert.pem", "junk.pem")) == (
        f"server.tls_key: {tmp_path / 'junk.pem'} holds no unencrypted PEM private key"
    )
    assert error_of(tmp_path, pair.format("cert.pem", "other.pem")) == (
        f"server.tls_key: {tmp_path / 'other.pem'} is not the key of the certificate in "
        f"{tmp_path / 'cert.pem'}"
    )


# -- upstreams -----------------------------------------------------------------------------


def test_upstreams_replace_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[upstreams.mine]\nurl = "https://mirror.test/x"\n'))
    assert config.upstreams == (UpstreamConfig(name="mine", url="https://mirror.test/x"),)


def test_only_one_trailing_slash_is_stripped(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[upstreams.a]\nurl = "https://mirror.test/x/"\n'))
    assert config.upstreams[0].url == "https://mirror.test/x"


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("[upstreams]\n", "upstreams: expected at least one [upstreams.NAME] table"),
        ('[upstreams."1.0"]\nurl = "https://a.test"\n',
         'upstreams.1.0: an upstream name must match [a-z0-9][a-z0-9._-]* and not be "1.0"'),
        ('[upstreams.Big]\nurl = "https://a.test"\n',
         'upstreams.Big: an upstream name must match [a-z0-9][a-z0-9._-]* and not be "1.0"'),
        ('[upstreams._x]\nurl = "https://a.test"\n',
         'upstreams._x: an upstream name must match [a-z0-9][a-z0-9._-]* and not be "1.0"'),
        ("[upstreams]\na = 1\n", "upstreams.a: expected a table, got 1"),
        ("[upstreams.a]\n", "upstreams.a.url: missing; every upstream needs a base URL"),
        ('[upstreams.a]\nurl = "https://a.test"\nmirror = 1\n',
         "upstreams.a.mirror: unknown key; expected one of allow_insecure, ca_file, url"),
        ('[upstreams.a]\nurl = "http://a.test"\n',
         'upstreams.a.url: upstreams must use https://, got "http://a.test" '
         "(allow_insecure = true permits http:// for tests)"),
        ('[upstreams.a]\nurl = "ftp://a.test"\n',
         'upstreams.a.url: expected an https:// URL, got "ftp://a.test"'),
        ('[upstreams.a]\nurl = "a.test/images"\n',
         'upstreams.a.url: expected an https:// URL, got "a.test/images"'),
        ('[upstreams.a]\nurl = "https:///x"\n', 'upstreams.a.url: "https:///x" has no host name'),
        ('[upstreams.a]\nurl = "https://u:p@a.test"\n',
         'upstreams.a.url: "https://u:p@a.test" must not carry credentials'),
        ('[upstreams.a]\nurl = "https://a.test/?x=1"\n',
         'upstreams.a.url: "https://a.test/?x=1" must not have a query or fragment'),
        ('[upstreams.a]\nurl = "https://a.test:99999"\n',
         'upstreams.a.url: "https://a.test:99999" is not a valid URL'),
        ('[upstreams.a]\nurl = "https://a.test"\nallow_insecure = "yes"\n',
         'upstreams.a.allow_insecure: expected true or false, got "yes"'),
    ],
)
def test_upstream_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, text) == sentence


def test_upstream_ca_file(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("junk")
    text = '[upstreams.a]\nurl = "https://a.test"\nca_file = "{}"\n'
    assert error_of(tmp_path, text.format("nope.pem")) == (
        f"upstreams.a.ca_file: cannot read {tmp_path / 'nope.pem'}: No such file or directory"
    )
    assert error_of(tmp_path, text.format("junk.pem")) == (
        f"upstreams.a.ca_file: {tmp_path / 'junk.pem'} holds no PEM certificate"
    )
