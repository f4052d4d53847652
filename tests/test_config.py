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
    LogConfig,
    PinConfig,
    ServerConfig,
    UpstreamConfig,
    default_config,
    default_state_dir,
    load_config,
    normalise_listen,
    parse_duration,
    parse_pin_ref,
    parse_size,
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
            request_head_timeout=30.0,
            tls_handshake_timeout=10.0,
            keepalive_timeout=15.0,
            send_timeout=60.0,
            max_request_line=8192,
            max_header_bytes=32768,
            max_headers=100,
            max_connections=4096,
            workers=os.cpu_count() or 1,
        ),
        cache=CacheConfig(
            dir=default_state_dir(),
            metadata_ttl=300.0,
            download_idle_timeout=60.0,
            connect_timeout=30.0,
            usage_flush_interval=10.0,
            expiry_days=10.0,
            max_size=None,
            min_free=0,
            auto_update_interval=21600.0,
            auto_update_cached=True,
            keep_versions=2,
            prefetch_concurrency=2,
            upstream_concurrency=4,
        ),
        upstreams=DEFAULT_UPSTREAMS,
        pins=(),
    )
    assert all(not u.offline for u in default_config().upstreams)


def test_config_constructible_with_keyword_defaults() -> None:
    """Code written before pins and the lifecycle keys existed builds a Config the same way."""
    config = Config(
        server=ServerConfig(),
        cache=CacheConfig(dir="/x"),
        upstreams=(UpstreamConfig(name="a", url="https://a.test"),),
    )
    assert config.pins == ()
    assert config.cache.max_size is None
    assert config.upstreams[0].offline is False


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
    # The outbound proxy's default (the environment decides) has no value to write: shown
    # commented out (test_sample_config_shows_the_outbound_proxy_keys); nor has workers (the
    # CPU count of the machine it runs on).
    assert "\n# workers = " in SAMPLE.read_text()
    expected = {
        f"server.{k}" for k in config_module._SERVER_KEYS - {"upstream_proxy", "workers"}
    }
    expected |= {f"cache.{k}" for k in config_module._CACHE_KEYS}
    for name, _ in config_module.DEFAULT_UPSTREAMS:
        expected |= {f"upstreams.{name}.url", f"upstreams.{name}.ca_file"}
    assert expected <= keys
    # The per-upstream switches are documented once, on the first upstream.
    assert keys - expected == {
        "upstreams.images.allow_insecure", "upstreams.images.offline", "upstreams.images.protocol",
        "upstreams.images.upstream_concurrency", "upstreams.images.allow", "lxd_api.upstreams", "log.format", "metrics.listen",
        "cluster.peers", "cluster.ca_file",
    }


def test_sample_config_shows_the_outbound_proxy_keys(tmp_path: Path) -> None:
    """Commented out in the sample, and valid once uncommented."""
    text = SAMPLE.read_text()
    for line in ('# upstream_proxy = "http://proxy.lan:3128"', '# proxy = "http://proxy.lan:3128"'):
        assert line in text.splitlines()
        text = text.replace(line, line.removeprefix("# "))
    config = load_config(write(tmp_path, text))
    assert config.server.upstream_proxy == config.upstreams[0].proxy
    assert config.upstreams[0].proxy is not None


def test_sample_config_comments_every_key() -> None:
    """Each key line in the sample is preceded by a comment line."""
    lines = SAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", "[")):
            assert lines[number - 1].strip().startswith("#"), f"line {number + 1}: {line}"


def _sample_pin_example() -> str:
    """The commented-out [[pin]] example at the end of the sample, uncommented once."""
    lines = SAMPLE.read_text().splitlines()
    start = lines.index("# [[pin]]")
    return "\n".join(line.removeprefix("# ") for line in lines[start:]) + "\n"


def test_sample_pin_example_parses(tmp_path: Path) -> None:
    """The [[pin]] example in the sample is valid and shows the defaults of arch and type."""
    path = write(tmp_path, _sample_pin_example())
    assert load_config(path).pins == (PinConfig(upstream="images", alias="ubuntu/24.04"),)
    document = tomllib.loads(_sample_pin_example())
    assert set(document["pin"][0]) == config_module._PIN_KEYS


def test_readme_pin_example_parses(tmp_path: Path) -> None:
    """The [[pin]] example in the README's configuration section is valid."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    section = section[: section.index("\n## ", 1)]
    block = section[section.index("```toml\n") + len("```toml\n"):]
    block = block[: block.index("```")]
    config = load_config(write(tmp_path, block))
    assert config.pins and config.upstreams == DEFAULT_UPSTREAMS


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
request_head_timeout = "1m"
tls_handshake_timeout = 5
keepalive_timeout = "75s"
send_timeout = "2m"
max_request_line = "16KiB"
max_header_bytes = 65536
max_headers = 64
max_connections = 512
workers = 2

[cache]
dir = "state"
metadata_ttl = "1h30m"
download_idle_timeout = 5
connect_timeout = 2.5
usage_flush_interval = "1d"
expiry_days = 2.5
max_size = "200GiB"
min_free = 1000000
auto_update_interval = "30m"
auto_update_cached = false
keep_versions = 1
prefetch_concurrency = 4

[upstreams.local]
url = "http://127.0.0.1:8080/base/"
allow_insecure = true

[upstreams."other.one"]
url = "https://127.0.0.1:8443"
ca_file = "ca.pem"
offline = true

[[pin]]
upstream = "local"
alias = "ubuntu/24.04"

[[pin]]
upstream = "other.one"
alias = "debian/12/cloud"
arch = "arm64"
type = "virtual-machine"
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
            request_head_timeout=60.0,
            tls_handshake_timeout=5.0,
            keepalive_timeout=75.0,
            send_timeout=120.0,
            max_request_line=16384,
            max_header_bytes=65536,
            max_headers=64,
            max_connections=512,
            workers=2,
        ),
        cache=CacheConfig(
            dir=str(tmp_path / "state"),
            metadata_ttl=5400.0,
            download_idle_timeout=5.0,
            connect_timeout=2.5,
            usage_flush_interval=86400.0,
            expiry_days=2.5,
            max_size=200 * 1024**3,
            min_free=1000000,
            auto_update_interval=1800.0,
            auto_update_cached=False,
            keep_versions=1,
            prefetch_concurrency=4,
        ),
        upstreams=(
            UpstreamConfig(
                name="local", url="http://127.0.0.1:8080/base", ca_file="", allow_insecure=True
            ),
            UpstreamConfig(
                name="other.one",
                url="https://127.0.0.1:8443",
                ca_file=str(tmp_path / "ca.pem"),
                offline=True,
            ),
        ),
        pins=(
            PinConfig(upstream="local", alias="ubuntu/24.04", arch="", type="container"),
            PinConfig(
                upstream="other.one", alias="debian/12/cloud", arch="aarch64", type="virtual-machine"
            ),
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


# -- client connection limits --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("request_head_timeout = 0",
         "server.request_head_timeout: expected more than zero seconds, got 0"),
        ('tls_handshake_timeout = "soon"',
         'server.tls_handshake_timeout: expected seconds or a duration like "5m", got "soon"'),
        ('keepalive_timeout = "-1s"',
         'server.keepalive_timeout: expected seconds or a duration like "5m", got "-1s"'),
        ("keepalive_timeout = -1", "server.keepalive_timeout: expected more than zero seconds, got -1"),
        ('max_request_line = "lots"',
         'server.max_request_line: expected bytes or a size like "200GiB", got "lots"'),
        ("max_request_line = 0", "server.max_request_line: expected more than zero bytes, got 0"),
        ("max_request_line = 512", "server.max_request_line: expected at least 1024 bytes, got 512"),
        ('max_header_bytes = "1000B"',
         'server.max_header_bytes: expected at least 1024 bytes, got "1000B"'),
        ("max_headers = 0", "server.max_headers: expected 1 or more, got 0"),
        ('max_headers = "100"', 'server.max_headers: expected a whole number, got "100"'),
        ("max_connections = 0", "server.max_connections: expected 1 or more, got 0"),
        ("max_connections = 1.5", "server.max_connections: expected a whole number, got 1.5"),
    ],
)
def test_connection_limit_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, f"[server]\n{text}\n") == sentence


def test_connection_limit_units(tmp_path: Path) -> None:
    text = (
        '[server]\nrequest_head_timeout = "2.5s"\nmax_request_line = "1KiB"\n'
        'max_header_bytes = "1MB"\n'
    )
    server = load_config(write(tmp_path, text)).server
    assert server.request_head_timeout == 2.5
    assert (server.max_request_line, server.max_header_bytes) == (1024, 1_000_000)
    # Keys left out keep their defaults.
    assert server.keepalive_timeout == ServerConfig().keepalive_timeout == 15.0


# -- structure and types -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("[sever]\n", "sever: unknown table; expected one of cache, cluster, log, lxd_api, metrics, pin, server, upstreams"),
        ('[[pins]]\nupstream = "images"\n',
         "pins: unknown table; expected one of cache, cluster, log, lxd_api, metrics, pin, server, upstreams"),
        ('[server]\nlisen = ["8443"]\n',
         "server.lisen: unknown key; expected one of allow, keepalive_timeout, listen, "
         "listen_plain, max_connections, max_header_bytes, max_headers, max_request_line, "
         "plain_http_files, port_file, "
         "request_head_timeout, send_timeout, tls_cert, tls_handshake_timeout, tls_key, tls_names, "
         "upstream_proxy, workers"),
        ("[cache]\ndirectory = 'x'\n",
         "cache.directory: unknown key; expected one of auto_update_cached, "
         "auto_update_interval, connect_timeout, dir, download_idle_timeout, expiry_days, "
         "keep_versions, max_size, metadata_ttl, min_free, prefetch_concurrency, "
         "upstream_concurrency, usage_flush_interval"),
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


def test_mirrors(tmp_path: Path) -> None:
    config = load_config(write(
        tmp_path, '[upstreams.a]\nurls = ["https://one.test/x/", "https://two.test:8443/y"]\n'
    ))
    assert config.upstreams == (UpstreamConfig(
        name="a", url="https://one.test/x", urls=("https://one.test/x", "https://two.test:8443/y"),
    ),)
    assert config.upstreams[0].base_urls == ("https://one.test/x", "https://two.test:8443/y")
    # One url is a list of one.
    assert load_config(write(tmp_path, '[upstreams.a]\nurl = "https://one.test"\n')).upstreams[
        0
    ].base_urls == ("https://one.test",)


@pytest.mark.parametrize(
    "text, sentence",
    [
        ('[upstreams.a]\nurl = "https://a.test"\nurls = ["https://b.test"]\n',
         "upstreams.a: url and urls both given; use url for one base URL, urls for mirrors"),
        ('[upstreams.a]\nurls = []\n', "upstreams.a.urls: expected at least one base URL"),
        ('[upstreams.a]\nurls = "https://a.test"\n',
         'upstreams.a.urls: expected a list of strings, got "https://a.test"'),
        ('[upstreams.a]\nurls = ["https://a.test", "https://a.test/"]\n',
         'upstreams.a.urls: "https://a.test/" is listed twice'),
        ('[upstreams.a]\nurls = ["https://a.test", "ftp://b.test"]\n',
         'upstreams.a.urls: expected an https:// URL, got "ftp://b.test"'),
        ('[upstreams.a]\nurls = ["https://a.test", "https://b.test"]\nprotocol = "lxd"\n',
         "upstreams.a.urls: mirrors are for simplestreams upstreams; an LXD server upstream has one url"),
    ],
)
def test_bad_mirrors(tmp_path: Path, text: str, sentence: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert str(caught.value) == sentence


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("[upstreams]\n", "upstreams: expected at least one [upstreams.NAME] table"),
        ('[upstreams."1.0"]\nurl = "https://a.test"\n',
         'upstreams.1.0: an upstream name must match [a-z0-9][a-z0-9._-]* and not be one of "1.0", "healthz", "import", "metrics", "readyz", "setup.sh", "status.json" (paths the proxy serves itself)'),
        ('[upstreams.Big]\nurl = "https://a.test"\n',
         'upstreams.Big: an upstream name must match [a-z0-9][a-z0-9._-]* and not be one of "1.0", "healthz", "import", "metrics", "readyz", "setup.sh", "status.json" (paths the proxy serves itself)'),
        ('[upstreams._x]\nurl = "https://a.test"\n',
         'upstreams._x: an upstream name must match [a-z0-9][a-z0-9._-]* and not be one of "1.0", "healthz", "import", "metrics", "readyz", "setup.sh", "status.json" (paths the proxy serves itself)'),
        ("[upstreams]\na = 1\n", "upstreams.a: expected a table, got 1"),
        ("[upstreams.a]\n", "upstreams.a.url: missing; every upstream needs a base URL"),
        ('[upstreams.a]\nurl = "https://a.test"\nmirror = 1\n',
         "upstreams.a.mirror: unknown key; expected one of allow, allow_insecure, ca_file, offline, "
         "protocol, proxy, upstream_concurrency, url, urls"),
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
        ('[upstreams.a]\nurl = "https://a.test"\noffline = 1\n',
         "upstreams.a.offline: expected true or false, got 1"),
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


def test_upstream_offline(tmp_path: Path) -> None:
    text = '[upstreams.a]\nurl = "https://a.test"\n[upstreams.b]\nurl = "https://b.test"\noffline = true\n'
    config = load_config(write(tmp_path, text))
    assert [(u.name, u.offline) for u in config.upstreams] == [("a", False), ("b", True)]


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, size",
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("4096B", 4096),
        ("1kB", 1000),
        ("500MB", 500_000_000),
        ("2GB", 2_000_000_000),
        ("1.5TB", 1_500_000_000_000),
        ("1.1TB", 1_100_000_000_000),
        ("1KiB", 1024),
        ("3MiB", 3 * 1024**2),
        ("200GiB", 200 * 1024**3),
        ("2TiB", 2 * 1024**4),
        ("0.5KiB", 512),
        (".5kB", 500),
        ("1.0005kB", 1000),  # rounded down to a whole byte
        (" 10 GiB ", 10 * 1024**3),
        ("10gib", 10 * 1024**3),
        ("10KB", 10_000),
    ],
)
def test_sizes(given: object, size: int) -> None:
    assert parse_size(given) == size


@pytest.mark.parametrize(
    "given", ["", "lots", "10 G", "10GiBs", "10 Mbit", "1.5.2GB", "-5GB", "GB", "1e9", "10PB",
              1.5e9, True, [1], {}]
)
def test_bad_sizes(given: object) -> None:
    assert parse_size(given) is None


def test_size_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[cache]\nmax_size = "500MB"\nmin_free = "1GiB"\n'))
    assert (config.cache.max_size, config.cache.min_free) == (500_000_000, 1024**3)
    config = load_config(write(tmp_path, "[cache]\nmax_size = 1000\nmin_free = 0\n"))
    assert (config.cache.max_size, config.cache.min_free) == (1000, 0)
    # TOML has no null: the empty string is the explicit "no cap".
    assert load_config(write(tmp_path, '[cache]\nmax_size = ""\n')).cache.max_size is None


@pytest.mark.parametrize(
    "text, sentence",
    [
        ('max_size = "lots"', 'cache.max_size: expected bytes or a size like "200GiB", got "lots"'),
        ("max_size = 1.5e9",
         'cache.max_size: expected bytes or a size like "200GiB", got 1500000000.0'),
        ("max_size = true", 'cache.max_size: expected bytes or a size like "200GiB", got true'),
        ("max_size = 0", "cache.max_size: expected more than zero bytes, got 0"),
        ('max_size = "0GB"', 'cache.max_size: expected more than zero bytes, got "0GB"'),
        ('max_size = "0.1B"', 'cache.max_size: expected more than zero bytes, got "0.1B"'),
        ("max_size = -1", "cache.max_size: expected more than zero bytes, got -1"),
        ('max_size = "-1GB"', 'cache.max_size: expected bytes or a size like "200GiB", got "-1GB"'),
        ('min_free = ""', 'cache.min_free: expected bytes or a size like "200GiB", got ""'),
        ('min_free = "5 parsecs"',
         'cache.min_free: expected bytes or a size like "200GiB", got "5 parsecs"'),
        ("min_free = -5", "cache.min_free: expected zero or more bytes, got -5"),
    ],
)
def test_size_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, f"[cache]\n{text}\n") == sentence


# -- the cache lifecycle keys --------------------------------------------------------------


def test_lifecycle_keys(tmp_path: Path) -> None:
    text = """
[cache]
expiry_days = 30
auto_update_interval = 0
auto_update_cached = false
keep_versions = 5
prefetch_concurrency = 1
"""
    cache = load_config(write(tmp_path, text)).cache
    assert cache == evolve(
        default_config().cache,
        expiry_days=30.0,
        auto_update_interval=0.0,
        auto_update_cached=False,
        keep_versions=5,
        prefetch_concurrency=1,
    )
    assert type(cache.expiry_days) is float
    assert load_config(write(tmp_path, "[cache]\nexpiry_days = 0.25\n")).cache.expiry_days == 0.25
    assert load_config(
        write(tmp_path, '[cache]\nauto_update_interval = "1d"\n')
    ).cache.auto_update_interval == 86400.0


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("expiry_days = 0", "cache.expiry_days: expected more than zero days, got 0"),
        ("expiry_days = -1.5", "cache.expiry_days: expected more than zero days, got -1.5"),
        ('expiry_days = "10d"', 'cache.expiry_days: expected a number of days, got "10d"'),
        ("expiry_days = true", "cache.expiry_days: expected a number of days, got true"),
        ("expiry_days = nan", "cache.expiry_days: expected a number of days, got nan"),
        ("expiry_days = inf", "cache.expiry_days: expected a number of days, got inf"),
        ('auto_update_interval = "often"',
         'cache.auto_update_interval: expected seconds or a duration like "5m", got "often"'),
        ("auto_update_interval = -1",
         "cache.auto_update_interval: expected zero or more seconds, got -1"),
        ('auto_update_cached = "yes"', 'cache.auto_update_cached: expected true or false, got "yes"'),
        ("auto_update_cached = 1", "cache.auto_update_cached: expected true or false, got 1"),
        ("keep_versions = 0", "cache.keep_versions: expected 1 or more, got 0"),
        ("keep_versions = -2", "cache.keep_versions: expected 1 or more, got -2"),
        ("keep_versions = 2.0", "cache.keep_versions: expected a whole number, got 2.0"),
        ('keep_versions = "2"', 'cache.keep_versions: expected a whole number, got "2"'),
        ("keep_versions = true", "cache.keep_versions: expected a whole number, got true"),
        ("prefetch_concurrency = 0", "cache.prefetch_concurrency: expected 1 or more, got 0"),
        ("prefetch_concurrency = 1.5",
         "cache.prefetch_concurrency: expected a whole number, got 1.5"),
    ],
)
def test_lifecycle_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, f"[cache]\n{text}\n") == sentence


def test_upstream_concurrency_in_cache_and_per_upstream(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[cache]
upstream_concurrency = 2

[upstreams.a]
url = "https://a.example"

[upstreams.b]
url = "https://b.example"
upstream_concurrency = 8

[upstreams.c]
url = "https://c.example"
upstream_concurrency = 0

[upstreams.d]
url = "https://d.example"
upstream_concurrency = ""
"""))
    assert config.cache.upstream_concurrency == 2
    assert [u.upstream_concurrency for u in config.upstreams] == [None, 8, 0, None]
    # 0 is no limit; an upstream without its own ("" or absent) takes the [cache] one
    assert [config.upstream_concurrency(n) for n in "abcd"] == [2, 8, None, 2]
    assert default_config().upstream_concurrency("images") == 4


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("[cache]\nupstream_concurrency = -1\n",
         "cache.upstream_concurrency: expected a whole number, 0 for no limit, got -1"),
        ('[cache]\nupstream_concurrency = "4"\n',
         'cache.upstream_concurrency: expected a whole number, 0 for no limit, got "4"'),
        ('[upstreams.a]\nurl = "https://a.example"\nupstream_concurrency = 1.5\n',
         "upstreams.a.upstream_concurrency: expected a whole number, 0 for no limit, got 1.5"),
    ],
)
def test_upstream_concurrency_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, text) == sentence


# -- [[pin]] -------------------------------------------------------------------------------


def pins_of(tmp_path: Path, text: str) -> tuple[PinConfig, ...]:
    return load_config(write(tmp_path, text)).pins


def test_pin_defaults(tmp_path: Path) -> None:
    assert pins_of(tmp_path, '[[pin]]\nupstream = "images"\nalias = "ubuntu/24.04"\n') == (
        PinConfig(upstream="images", alias="ubuntu/24.04", arch="", type="container"),
    )
    assert pins_of(tmp_path, "pin = []\n") == ()


@pytest.mark.parametrize(
    "arch, lxd",
    [("x86_64", "x86_64"), ("amd64", "x86_64"), ("aarch64", "aarch64"), ("arm64", "aarch64"),
     ("armhf", "armv7l"), ("ppc64el", "ppc64le"), ("riscv64", "riscv64"), ("", "")],
)
def test_pin_arch_is_normalised(tmp_path: Path, arch: str, lxd: str) -> None:
    text = f'[[pin]]\nupstream = "images"\nalias = "debian/12"\narch = "{arch}"\n'
    assert pins_of(tmp_path, text)[0].arch == lxd


def test_pins_keep_file_order_and_see_configured_upstreams(tmp_path: Path) -> None:
    text = """
[upstreams.mine]
url = "https://mirror.test"

[[pin]]
upstream = "mine"
alias = "b"
type = "virtual-machine"

[[pin]]
upstream = "mine"
alias = "a"

[[pin]]
upstream = "mine"
alias = "a"
arch = "arm64"

[[pin]]
upstream = "mine"
alias = "0123abcd"
"""
    assert pins_of(tmp_path, text) == (
        PinConfig("mine", "b", "", "virtual-machine"),
        PinConfig("mine", "a"),
        PinConfig("mine", "a", "aarch64"),
        PinConfig("mine", "0123abcd"),
    )


PIN = '[[pin]]\nupstream = "images"\nalias = "ubuntu/24.04"\n'


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("pin = 1\n", "pin: expected [[pin]] tables, got 1"),
        ('[pin]\nupstream = "images"\n', "pin: expected [[pin]] tables, got a table"),
        ('pin = ["images:ubuntu/24.04"]\n',
         'pin: expected [[pin]] tables, got ["images:ubuntu/24.04"]'),
        ('[[pin]]\nalias = "ubuntu/24.04"\n',
         "pin[1].upstream: missing; every pin names an upstream and an alias"),
        (PIN + '[[pin]]\nupstream = "images"\n',
         "pin[2].alias: missing; every pin names an upstream and an alias"),
        (PIN + 'name = "x"\n',
         "pin[1].name: unknown key; expected one of alias, arch, type, upstream"),
        ('[[pin]]\nupstream = "elsewhere"\nalias = "a"\n',
         'pin[1].upstream: "elsewhere" is not a configured upstream; expected one of images, '
         "ubuntu, ubuntu-daily, linuxcontainers"),
        ('[upstreams.mine]\nurl = "https://m.test"\n' + PIN,
         'pin[1].upstream: "images" is not a configured upstream; expected one of mine'),
        ('[[pin]]\nupstream = 1\nalias = "a"\n', "pin[1].upstream: expected a string, got 1"),
        ('[[pin]]\nupstream = "images"\nalias = ""\n',
         'pin[1].alias: expected an image alias such as "ubuntu/24.04", got ""'),
        ('[[pin]]\nupstream = "images"\nalias = "ubuntu 24.04"\n',
         'pin[1].alias: expected an image alias such as "ubuntu/24.04", got "ubuntu 24.04"'),
        ('[[pin]]\nupstream = "images"\nalias = "a,b"\n',
         'pin[1].alias: expected an image alias such as "ubuntu/24.04", got "a,b"'),
        ('[[pin]]\nupstream = "images"\nalias = ["a"]\n',
         'pin[1].alias: expected a string, got ["a"]'),
        (PIN + 'arch = "sparc"\n',
         'pin[1].arch: "sparc" is not an architecture LXD knows; use an LXD or stream name '
         'such as "x86_64", "amd64", "aarch64" or "arm64", or "" for the proxy host\'s'),
        (PIN + 'arch = "X86_64"\n',
         'pin[1].arch: "X86_64" is not an architecture LXD knows; use an LXD or stream name '
         'such as "x86_64", "amd64", "aarch64" or "arm64", or "" for the proxy host\'s'),
        (PIN + 'type = "vm"\n',
         'pin[1].type: expected "container" or "virtual-machine", got "vm"'),
        (PIN + 'type = ""\n', 'pin[1].type: expected "container" or "virtual-machine", got ""'),
        (PIN + PIN, "pin[2]: pins the same image as pin[1]"),
        (PIN + 'arch = "amd64"\n' + PIN + 'arch = "x86_64"\n' + 'type = "container"\n',
         "pin[2]: pins the same image as pin[1]"),
    ],
)
def test_pin_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, text) == sentence


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("images:ubuntu/24.04", ("images", "ubuntu/24.04")),
        ("ubuntu-daily:noble", ("ubuntu-daily", "noble")),
        ("other.one:debian/12/cloud", ("other.one", "debian/12/cloud")),
        ("images:0123abcdef", ("images", "0123abcdef")),
        ("images:a:b", ("images", "a:b")),
    ],
)
def test_parse_pin_ref(ref: str, expected: tuple[str, str]) -> None:
    assert parse_pin_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["ubuntu/24.04", "images:", ":ubuntu/24.04", "Images:ubuntu", "1.0:x", "images:a b",
            "images:a,b", " images:a", ""]
)
def test_bad_pin_refs(ref: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pin_ref(ref)
    assert str(info.value) == (
        f'expected an image reference like "images:ubuntu/24.04", got "{ref}"'
    )


def test_pin_ref_against_configured_upstreams() -> None:
    names = [u.name for u in default_config().upstreams]
    assert parse_pin_ref("ubuntu:noble", names) == ("ubuntu", "noble")
    with pytest.raises(ConfigError) as info:
        parse_pin_ref("mine:noble", names)
    assert str(info.value) == (
        '"mine" is not a configured upstream; expected one of images, ubuntu, ubuntu-daily, '
        "linuxcontainers"
    )


def test_upstream_protocol_and_lxd_api(tmp_path: Path) -> None:
    text = (
        '[upstreams.a]\nurl = "https://a.test"\nprotocol = "lxd"\n'
        '[upstreams.b]\nurl = "https://b.test"\n'
        '[lxd_api]\nupstreams = ["b", "a"]\n'
    )
    config = load_config(write(tmp_path, text))
    assert [(u.name, u.protocol) for u in config.upstreams] == [("a", "lxd"), ("b", "simplestreams")]
    assert [u.name for u in config.lxd_api_upstreams()] == ["b", "a"]
    # Without [lxd_api] the API lists the first upstream.
    config = load_config(write(tmp_path, '[upstreams.a]\nurl = "https://a.test"\n[upstreams.b]\nurl = "https://b.test"\n'))
    assert [u.name for u in config.lxd_api_upstreams()] == ["a"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[upstreams.a]\nurl = "https://a.test"\nprotocol = "oci"\n',
         'upstreams.a.protocol: expected one of simplestreams, lxd, got "oci"'),
        ('[upstreams.a]\nurl = "https://a.test"\n[lxd_api]\nupstreams = ["zz"]\n',
         'lxd_api.upstreams: "zz" is not a configured upstream; expected one of a'),
        ('[upstreams.a]\nurl = "https://a.test"\n[lxd_api]\nupstreams = ["a", "a"]\n',
         'lxd_api.upstreams: "a" is listed twice'),
        ('[lxd_api]\nmirror = 1\n', "lxd_api.mirror: unknown key; expected one of upstreams"),
        ('[upstreams.import]\nurl = "https://a.test"\n',
         'upstreams.import: an upstream name must match [a-z0-9][a-z0-9._-]* and not be one of "1.0", "healthz", "import", "metrics", "readyz", "setup.sh", "status.json" (paths the proxy serves itself)'),
    ],
)
def test_protocol_and_lxd_api_errors(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(tmp_path, text) == message


@pytest.mark.parametrize(("text", "format"), [("", "text"), ('[log]\nformat = "json"\n', "json")])
def test_log_format(tmp_path: Path, text: str, format: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    assert load_config(str(path)).log == LogConfig(format=format)


@pytest.mark.parametrize(("text", "sentence"), [
    ('[log]\nformat = "xml"\n', 'log.format: expected "text" or "json", got "xml"'),
    ("[log]\nformat = 1\n", "log.format: expected a string, got 1"),
    ('[log]\nlevel = "debug"\n', "log.level: unknown key; expected one of format"),
])
def test_bad_log_table(tmp_path: Path, text: str, sentence: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == sentence


# -- [metrics] -----------------------------------------------------------------------------


def test_metrics_listen_defaults_to_loopback_9464(tmp_path: Path) -> None:
    assert default_config().metrics.listen == ("tcp:9464:interface=127.0.0.1",)
    assert load_config(write(tmp_path, "[metrics]\n")).metrics.listen == (
        "tcp:9464:interface=127.0.0.1",
    )


def test_metrics_listen_takes_the_server_listen_syntax_and_an_empty_list(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[metrics]\nlisten = ["[::1]:9100", "9101"]\n'))
    assert config.metrics.listen == ("tcp:9100:interface=\\:\\:1", "tcp:9101:interface=0.0.0.0")
    assert load_config(write(tmp_path, "[metrics]\nlisten = []\n")).metrics.listen == ()


@pytest.mark.parametrize(
    "text, message",
    [
        ('[metrics]\nlisten = "9100"\n', 'metrics.listen: expected a list of strings, got "9100"'),
        ('[metrics]\nlisten = ["ssl:9100"]\n',
         'metrics.listen: "ssl:9100" is not a plain TCP endpoint; the proxy adds TLS itself, so '
         'use "tcp:PORT" or "ADDRESS:PORT"'),
        ('[metrics]\nlisten = ["localhost:9100"]\n',
         'metrics.listen: expected an address like "0.0.0.0:8443", "[::]:8443" or "tcp:8443", '
         'got "localhost:9100"'),
        ('[metrics]\nlisten = ["9100", "0.0.0.0:9100"]\n',
         'metrics.listen: an address is listed twice in ["9100", "0.0.0.0:9100"]'),
        ('[server]\nlisten = ["127.0.0.1:8443"]\n[metrics]\nlisten = ["127.0.0.1:8443"]\n',
         'metrics.listen: "tcp:8443:interface=127.0.0.1" is also in server.listen or server.listen_plain; the metrics '
         'listener needs an address of its own'),
        ("[metrics]\nport = 1\n", "metrics.port: unknown key; expected one of listen"),
    ],
)
def test_metrics_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(tmp_path, text) == message


@pytest.mark.parametrize("name", ["healthz", "readyz", "metrics"])
def test_the_health_and_metrics_paths_are_no_upstream_names(tmp_path: Path, name: str) -> None:
    message = error_of(tmp_path, f'[upstreams.{name}]\nurl = "https://a.test"\n')
    assert message.startswith(f"upstreams.{name}: an upstream name must match")


def test_plain_http_keys(tmp_path: Path) -> None:
    server = load_config(write(tmp_path, "[cache]\ndir = 'x'\n")).server
    assert (server.plain_http_files, server.listen_plain) == (True, ())
    text = (
        "[cache]\ndir = 'x'\n[server]\nlisten = ['8443']\nplain_http_files = false\n"
        "listen_plain = ['80', '[::]:8080']\n"
    )
    server = load_config(write(tmp_path, text)).server
    assert server.plain_http_files is False
    assert server.listen_plain == ("tcp:80:interface=0.0.0.0", "tcp:8080:interface=\\:\\:")


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("[server]\nplain_http_files = 'yes'\n",
         'server.plain_http_files: expected true or false, got "yes"'),
        ("[server]\nlisten = ['8443']\nlisten_plain = ['0.0.0.0:8443']\n",
         'server.listen_plain: "tcp:8443:interface=0.0.0.0" is also in server.listen or listed '
         "twice; a plain-HTTP listener needs an address of its own (every server.listen port "
         "serves the same files over plain HTTP already)"),
        ("[server]\nlisten_plain = ['80', '0.0.0.0:80']\n",
         'server.listen_plain: "tcp:80:interface=0.0.0.0" is also in server.listen or listed '
         "twice; a plain-HTTP listener needs an address of its own (every server.listen port "
         "serves the same files over plain HTTP already)"),
        ("[server]\nlisten_plain = ['80']\n[metrics]\nlisten = ['80']\n",
         'metrics.listen: "tcp:80:interface=0.0.0.0" is also in server.listen or '
         "server.listen_plain; the metrics listener needs an address of its own"),
        ("[server]\nlisten_plain = ['ssl:80']\n",
         'server.listen_plain: "ssl:80" is not a plain TCP endpoint; the proxy adds TLS itself, '
         'so use "tcp:PORT" or "ADDRESS:PORT"'),
    ],
)
def test_plain_http_key_errors(tmp_path: Path, text: str, sentence: str) -> None:
    assert error_of(tmp_path, text) == sentence


# -- [server] workers ------------------------------------------------------------------------


def test_workers_default_is_the_cpu_count(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\n")
    assert load_config(str(path)).server.workers == (os.cpu_count() or 1)
    path.write_text("[server]\nworkers = 3\n")
    assert load_config(str(path)).server.workers == 3
    # Code that builds a ServerConfig itself (the tests' harnesses) keeps one process.
    assert ServerConfig().workers == 1


@pytest.mark.parametrize("value, message", [
    ("0", "server.workers: expected 1 or more, got 0"),
    ('"4"', "server.workers: expected a whole number"),
    ("true", "server.workers: expected a whole number"),
])
def test_workers_bad_values(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[server]\nworkers = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
