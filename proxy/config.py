# -*- test-case-name: tests.test_config -*-
"""The proxy's configuration: frozen values, the built-in default, and the TOML loader.

Every problem a configuration file can have becomes one L{ConfigError} whose message is a
single sentence naming the key (``cache.metadata_ttl: expected ...``), so that twistd can
show it to the admin without a traceback.

Sizes (C{cache.max_size}, C{cache.min_free}, C{server.max_request_line},
C{server.max_header_bytes}) are whole bytes or strings with a unit, decimal
(C{"500MB"}, powers of 1000) or binary (C{"200GiB"}, powers of 1024); see L{parse_size}.

Relative paths in a configuration file (``cache.dir``, ``server.tls_cert``,
``server.tls_key``, ``server.port_file``, ``upstreams.NAME.ca_file``) are taken relative to
the directory holding that file, so a configuration reads the same whatever the working
directory of the process (systemd starts services in ``/``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import urlsplit

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key
# Twisted's endpoint-description parser (quoting, key=value) is only exposed privately.
from twisted.internet.endpoints import _parse as parse_endpoint_description

from proxy.client_networks import parse_network
from proxy.errors import ConfigError
from proxy.outbound import ProxySetting, parse_proxy_setting
from proxy.resolve import CONTAINER, VIRTUAL_MACHINE, lxd_arch

APP_NAME = "lxd-image-proxy"

SIMPLESTREAMS = "simplestreams"
LXD = "lxd"
PROTOCOLS = (SIMPLESTREAMS, LXD)

SECONDS = 1.0
MINUTE = 60 * SECONDS
HOUR = 60 * MINUTE
DAY = 24 * HOUR

DEFAULT_PORT = 8443
DEFAULT_LISTEN: tuple[str, ...] = (f"tcp:{DEFAULT_PORT}:interface=0.0.0.0",)
# The port registered for this exporter in Prometheus' default port allocations list is not
# claimed; 9464 is the one OpenTelemetry's Prometheus exporter uses. Loopback: metrics are for
# a scraper on the same host (or one the admin opens it to), never the LAN by default.
DEFAULT_METRICS_PORT = 9464
DEFAULT_METRICS_LISTEN: tuple[str, ...] = (f"tcp:{DEFAULT_METRICS_PORT}:interface=127.0.0.1",)
DEFAULT_METADATA_TTL_SECONDS = 5 * MINUTE
DEFAULT_DOWNLOAD_IDLE_TIMEOUT_SECONDS = 60 * SECONDS
DEFAULT_CONNECT_TIMEOUT_SECONDS = 30 * SECONDS
DEFAULT_USAGE_FLUSH_INTERVAL_SECONDS = 10 * SECONDS
# Client connections: deadlines and limits near nginx's and Varnish's defaults
# (client_header_timeout 60 s, keepalive_timeout 75 s, large_client_header_buffers 4 8k;
# http_req_hdr_len 8k, http_req_size 32k, http_max_hdr 64), a little tighter where an LXD
# or Incus client never comes near them.
DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS = 30 * SECONDS
DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECONDS = 10 * SECONDS
DEFAULT_KEEPALIVE_TIMEOUT_SECONDS = 15 * SECONDS
# nginx's send_timeout: a client that reads nothing of its response for this long is gone.
DEFAULT_SEND_TIMEOUT_SECONDS = 60 * SECONDS
DEFAULT_MAX_REQUEST_LINE = 8 * 1024
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_CONNECTIONS = 4096
# Below this a request line or header section could not carry an ordinary LXD request.
MIN_HEAD_LIMIT_BYTES = 1024
# LXD's own images.remote_cache_expiry, images.auto_update_interval and
# images.auto_update_cached defaults (PROTOCOLS.md §4), so the LAN cache behaves like a host's.
DEFAULT_EXPIRY_DAYS = 10.0
DEFAULT_AUTO_UPDATE_INTERVAL_SECONDS = 6 * HOUR
DEFAULT_AUTO_UPDATE_CACHED = True
DEFAULT_KEEP_VERSIONS = 2
DEFAULT_PREFETCH_CONCURRENCY = 2
# Downloads per upstream at once: two images' files (metadata and rootfs each) side by side,
# while a burst of misses queues instead of splitting the WAN link so thinly that nothing
# finishes soon; above prefetch_concurrency, so that background work leaves clients room.
DEFAULT_UPSTREAM_CONCURRENCY = 4
ROOT_STATE_DIR = "/var/lib/lxd-image-proxy"

# name -> base URL (no trailing slash); order is the order the proxy lists them in.
DEFAULT_UPSTREAMS: tuple[tuple[str, str], ...] = (
    ("images", "https://images.lxd.canonical.com"),
    ("ubuntu", "https://cloud-images.ubuntu.com/releases"),
    ("ubuntu-daily", "https://cloud-images.ubuntu.com/daily"),
    ("linuxcontainers", "https://images.linuxcontainers.org"),
)


@frozen
class ServerConfig:
    """
    How the proxy listens.

    @ivar listen: plain TCP server endpoint descriptions in one canonical form,
        C{tcp:PORT:interface=ADDRESS} (an IPv6 address has its colons escaped), optionally
        followed by C{:backlog=N}; TLS is added by L{proxy.listen}.
    @ivar tls_cert: PEM certificate (chain) file, or C{""} for the generated one.
    @ivar tls_key: PEM private key file, or C{""} for the generated one; set exactly when
        C{tls_cert} is.
    @ivar tls_names: extra subject alternative names for the generated certificate (DNS
        names, lower-cased, or IP addresses), in the order given; the first DNS name among
        them is the name LXD clients will check.
    @ivar port_file: where to write the bound port numbers once listening, or C{""} to only
        log them.
    @ivar request_head_timeout: seconds from the first byte of a request to the end of its
        head (request line and headers), for every request on a connection.
    @ivar tls_handshake_timeout: seconds from a connection's first byte to the end of its TLS
        handshake.
    @ivar keepalive_timeout: seconds a connection may wait, with no request in progress,
        for the first byte of its next request.
    @ivar send_timeout: seconds a client may read nothing of a response being sent (its
        connection's send buffers staying full) before the connection is dropped.
    @ivar max_request_line: the longest request line in bytes (longer: 414).
    @ivar max_header_bytes: the most bytes of header lines in one request (more: 431).
    @ivar max_headers: the most header fields in one request (more: 431).
    @ivar max_connections: the most client connections open at once; more are closed as
        soon as they are accepted.  The service may lower it to fit the open-file limit.
    @ivar allow: the client networks (canonical CIDR) that may use the proxy; empty: all.
    @ivar upstream_proxy: the outbound HTTP proxy for every upstream (L{proxy.outbound}),
        L{proxy.outbound.DIRECT} for none whatever the environment, or None: the environment's
        C{HTTPS_PROXY} and the like decide.
    @ivar plain_http_files: whether a plain-HTTP GET or HEAD of an image file the catalogue
        lists is served (on every C{listen} port and the C{listen_plain} ones), as LXD's
        plain first attempt asks; off, plain HTTP gets an immediate 400 pointing to https://.
    @ivar listen_plain: plain-HTTP-only listeners (the form of C{listen}) serving only those
        files: port 80, for remotes whose URL has no port.
    @ivar workers: how many processes serve the listening ports (L{proxy.workers}); 1 serves
        them in the twistd process itself, as before workers existed.
    """

    listen: tuple[str, ...] = DEFAULT_LISTEN
    tls_cert: str = ""
    tls_key: str = ""
    tls_names: tuple[str, ...] = ()
    port_file: str = ""
    request_head_timeout: float = DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT_SECONDS
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_SECONDS
    send_timeout: float = DEFAULT_SEND_TIMEOUT_SECONDS
    max_request_line: int = DEFAULT_MAX_REQUEST_LINE
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    allow: tuple[str, ...] = ()
    upstream_proxy: ProxySetting = None
    plain_http_files: bool = True
    listen_plain: tuple[str, ...] = ()
    workers: int = 1


@frozen
class CacheConfig:
    """
    Where and how long things are kept.

    @ivar dir: the state directory: cache, index, generated certificate.
    @ivar metadata_ttl: seconds a cached index or products file is served before it is
        revalidated upstream.
    @ivar download_idle_timeout: seconds an upstream download may go without receiving a
        byte before it fails.
    @ivar connect_timeout: seconds to establish an upstream connection.
    @ivar usage_flush_interval: seconds between writes of the in-memory use counters to the
        index.
    @ivar expiry_days: days (more than zero) a C{cached} file is kept without being used.
    @ivar max_size: the most bytes (more than zero) of stored files, or None for no cap.
    @ivar min_free: bytes to keep free on the cache's file system (zero or more).
    @ivar auto_update_interval: seconds between auto-update rounds; 0 disables auto-update.
    @ivar auto_update_cached: whether auto-update also follows the aliases through which
        cached (not pinned) images were used within the expiry window.
    @ivar keep_versions: newer versions of a pinned alias stored before an older one turns
        C{cached} (at least 1).
    @ivar prefetch_concurrency: the most background downloads at a time (at least 1).
    @ivar upstream_concurrency: the most downloads from one upstream at a time (0: no limit);
        the others wait in a queue, clients' before background ones.
    """

    dir: str
    metadata_ttl: float = DEFAULT_METADATA_TTL_SECONDS
    download_idle_timeout: float = DEFAULT_DOWNLOAD_IDLE_TIMEOUT_SECONDS
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    usage_flush_interval: float = DEFAULT_USAGE_FLUSH_INTERVAL_SECONDS
    expiry_days: float = DEFAULT_EXPIRY_DAYS
    max_size: int | None = None
    min_free: int = 0
    auto_update_interval: float = DEFAULT_AUTO_UPDATE_INTERVAL_SECONDS
    auto_update_cached: bool = DEFAULT_AUTO_UPDATE_CACHED
    keep_versions: int = DEFAULT_KEEP_VERSIONS
    prefetch_concurrency: int = DEFAULT_PREFETCH_CONCURRENCY
    upstream_concurrency: int = DEFAULT_UPSTREAM_CONCURRENCY


@frozen
class UpstreamConfig:
    """
    One upstream image server, served under C{/NAME/}.

    @ivar name: the path prefix, C{[a-z0-9][a-z0-9._-]*}, never C{1.0}.
    @ivar url: base URL without a trailing slash; every stream path is relative to it. With
        mirrors, the first of C{urls}.
    @ivar urls: every mirror's base URL, in the order they are tried (C{urls = [...]}), or
        C{()} when the upstream has the one C{url}; L{base_urls} gives both alike.
    @ivar ca_file: PEM file with extra trust roots for this upstream, or C{""} for the
        system trust store only.
    @ivar allow_insecure: whether C{url} may be C{http://}; meant for tests with loopback
        upstreams, never for real servers.
    @ivar offline: whether the upstream is never contacted (air-gapped sites): the proxy
        serves only what is stored, as when the upstream is down.
    @ivar protocol: C{"simplestreams"} (an image server such as images.lxd.canonical.com) or
        C{"lxd"} (another LXD or Incus server with public images, read through its REST API).
    @ivar proxy: this upstream's outbound proxy, winning over C{server.upstream_proxy}
        (same values).
    @ivar upstream_concurrency: the most downloads from it at a time (0: no limit), or None
        for C{cache.upstream_concurrency}.
    @ivar allow: the client networks (canonical CIDR) that may use it, within
        C{server.allow}; empty: every client C{server.allow} lets in.
    """

    name: str
    url: str
    ca_file: str = ""
    allow_insecure: bool = False
    offline: bool = False
    protocol: str = SIMPLESTREAMS
    proxy: ProxySetting = None
    urls: tuple[str, ...] = ()
    upstream_concurrency: int | None = None
    allow: tuple[str, ...] = ()

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every base URL of the upstream: its mirrors in order, or its one C{url}."""
        return self.urls or (self.url,)


@frozen
class PinConfig:
    """
    One C{[[pin]]} table: an image kept and auto-updated whatever its use.

    @ivar upstream: the name of a configured upstream.
    @ivar alias: the image's alias (or fingerprint) on that upstream, e.g. C{ubuntu/24.04}.
    @ivar arch: the LXD architecture name (C{x86_64}, C{aarch64}, ...), or C{""} for the
        architecture of the host the proxy runs on.
    @ivar type: C{"container"} or C{"virtual-machine"}.
    """

    upstream: str
    alias: str
    arch: str = ""
    type: str = CONTAINER


@frozen
class LxdApiConfig:
    """
    The C{[lxd_api]} table: the LXD image REST API served at C{/1.0}.

    @ivar upstreams: the upstreams whose images it lists, in order of precedence (an alias
        published by several goes to the first; the others are reachable as C{NAME/ALIAS});
        empty means the first configured upstream.
    """

    upstreams: tuple[str, ...] = ()


LOG_FORMATS = ("text", "json")


@frozen
class LogConfig:
    """
    The C{[log]} table.

    @ivar format: C{"text"}, one line per event after a timestamp, or C{"json"}, one JSON
        object per line (Twisted's event serialisation) for log shippers.
    """

    format: str = "text"


@frozen
class MetricsConfig:
    """
    The C{[metrics]} table: the plain-HTTP listener of C{/metrics}, C{/healthz} and C{/readyz}.

    @ivar listen: endpoint descriptions in the form of L{ServerConfig.listen}; empty: no
        listener, and nothing is counted.
    """

    listen: tuple[str, ...] = DEFAULT_METRICS_LISTEN


@frozen
class ClusterConfig:
    """
    The C{[cluster]} table: the other nodes of a pool behind one load balancer.

    @ivar peers: the other nodes' base URLs (C{https://node2.lan:8443}), asked for a file
        this node misses before its upstream is; this node's own URL may be among them (it is
        recognised at its first answer and left out). Empty: no peer fill.
    @ivar ca_file: PEM bundle trusted for the peers' certificates (on top of the system
        store), or C{""}.
    """

    peers: tuple[str, ...] = ()
    ca_file: str = ""


@frozen
class Config:
    """
    The whole configuration.

    @ivar pins: the C{[[pin]]} tables in file order, no two alike.
    """

    server: ServerConfig
    cache: CacheConfig
    upstreams: tuple[UpstreamConfig, ...]
    pins: tuple[PinConfig, ...] = ()
    lxd_api: LxdApiConfig = LxdApiConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    cluster: ClusterConfig = ClusterConfig()

    def lxd_api_upstreams(self) -> tuple[UpstreamConfig, ...]:
        """The upstreams the LXD image API lists, in order of precedence."""
        if not self.lxd_api.upstreams:
            return self.upstreams[:1]
        return tuple(u for name in self.lxd_api.upstreams for u in self.upstreams if u.name == name)

    def upstream_concurrency(self, name: str) -> int | None:
        """The most downloads from the upstream C{name} at a time; None: no limit."""
        upstream = self.upstream(name)
        own = upstream.upstream_concurrency if upstream is not None else None
        limit = self.cache.upstream_concurrency if own is None else own
        return limit or None

    def upstream(self, name: str) -> UpstreamConfig | None:
        """The upstream mounted under C{name}, or None."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None


def default_state_dir(environ: Mapping[str, str] | None = None) -> str:
    """
    The state directory used when the configuration names none.

    systemd's C{StateDirectory=} (announced in C{$STATE_DIRECTORY}) wins; root gets
    C{/var/lib/lxd-image-proxy}; anyone else gets C{$XDG_STATE_HOME/lxd-image-proxy}
    (default C{~/.local/state/lxd-image-proxy}), so that running from a checkout as an
    ordinary user needs no setup.
    """
    env = os.environ if environ is None else environ
    systemd_dirs = env.get("STATE_DIRECTORY", "")
    if systemd_dirs:
        # systemd separates several StateDirectory= entries with colons.
        return systemd_dirs.split(":")[0]
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    xdg = env.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, APP_NAME)
    return os.path.join(os.path.expanduser("~"), ".local", "state", APP_NAME)


def default_config() -> Config:
    """The configuration used when no file is given."""
    return Config(
        server=ServerConfig(workers=default_workers()),
        cache=CacheConfig(dir=default_state_dir()),
        upstreams=tuple(UpstreamConfig(name=name, url=url) for name, url in DEFAULT_UPSTREAMS),
    )


def load_config(path: str | None) -> Config:
    """
    Read a TOML configuration file, or return L{default_config} for C{None}.

    Keys missing from the file keep their defaults; an C{[upstreams]} table replaces the
    default upstreams entirely.

    @raise ConfigError: the file is missing, unreadable, not TOML, or any key is unknown,
        of the wrong type, or has a bad value.
    """
    if path is None:
        return default_config()
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: it is not UTF-8 text") from None
    return parse_config(document, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_config(document: Mapping[str, Any], base_dir: str) -> Config:
    """
    Build a L{Config} from an already parsed TOML document.

    @param base_dir: the directory that relative paths are taken from.
    @raise ConfigError: as L{load_config}.
    """
    _check_keys(
        document, "", {"server", "cache", "upstreams", "pin", "lxd_api", "log", "metrics", "cluster"}
    )
    defaults = default_config()
    server = _parse_server(_table(document, "server"), base_dir)
    cache = _parse_cache(_table(document, "cache"), base_dir, defaults.cache)
    upstreams = defaults.upstreams
    if "upstreams" in document:
        upstreams = _parse_upstreams(_table(document, "upstreams"), base_dir)
    pins = _parse_pins(document.get("pin", []), upstreams)
    lxd_api = _parse_lxd_api(_table(document, "lxd_api"), upstreams)
    log = _parse_log(_table(document, "log"))
    metrics = _parse_metrics(_table(document, "metrics"), server)
    return Config(
        server=server, cache=cache, upstreams=upstreams, pins=pins, lxd_api=lxd_api, log=log,
        metrics=metrics, cluster=_parse_cluster(_table(document, "cluster"), base_dir),
    )


def _parse_cluster(table: Mapping[str, Any], base_dir: str) -> ClusterConfig:
    _check_keys(table, "cluster", {"peers", "ca_file"})
    peers: list[str] = []
    for value in _string_list(table, "peers", "cluster") or []:
        if not value.startswith("https://"):
            raise ConfigError(f"cluster.peers: expected an https:// URL, got {_show(value)}")
        url = _upstream_url(value, "cluster.peers", False)
        if urlsplit(url).path:
            raise ConfigError(
                f"cluster.peers: {_show(value)} has a path; a peer is named by its base URL "
                f"(https://HOST:PORT), as its clients reach it"
            )
        if url in peers:
            raise ConfigError(f"cluster.peers: {_show(value)} is listed twice")
        peers.append(url)
    ca_file = _resolve(base_dir, _string(table, "ca_file", "cluster"))
    if ca_file:
        read_pem_certificates(ca_file, "cluster.ca_file")
    return ClusterConfig(peers=tuple(peers), ca_file=ca_file)


def _parse_log(table: Mapping[str, Any]) -> LogConfig:
    _check_keys(table, "log", {"format"})
    format = _string(table, "format", "log", "text")
    if format not in LOG_FORMATS:
        choices = " or ".join(_show(f) for f in LOG_FORMATS)
        raise ConfigError(f"log.format: expected {choices}, got {_show(format)}")
    return LogConfig(format=format)


# -- helpers -------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A TOML-looking rendering of a value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _table(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {_show(value)}")
    return value


def _is_table_array(value: object) -> TypeGuard[list[dict[str, Any]]]:
    """Whether C{value} is what TOML makes of C{[[NAME]]} tables."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _check_keys(table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for key, value in table.items():
        if key not in known:
            kind = "table" if isinstance(value, dict) or _is_table_array(value) else "key"
            choices = ", ".join(sorted(known))
            raise ConfigError(f"{_join(prefix, key)}: unknown {kind}; expected one of {choices}")


def _string(table: Mapping[str, Any], key: str, prefix: str, default: str = "") -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{_join(prefix, key)}: expected a string, got {_show(value)}")
    return value


def _string_list(table: Mapping[str, Any], key: str, prefix: str) -> list[str] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{_join(prefix, key)}: expected a list of strings, got {_show(value)}")
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")
_UNIT_SECONDS = {"": SECONDS, "s": SECONDS, "m": MINUTE, "h": HOUR, "d": DAY}


def parse_duration(value: object) -> float | None:
    """
    Seconds from a number or from a string like C{"90s"}, C{"5m"}, C{"1h30m"}, C{"1d"} or
    C{"90"}; None if C{value} is neither.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if not text:
        return None
    total = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            return None
        number, unit = match.groups()
        # A unitless number is only accepted on its own: "1h30" is more likely a typo.
        if not unit and (position > 0 or match.end() < len(text)):
            return None
        total += float(number) * _UNIT_SECONDS[unit]
        position = match.end()
    return total


def _duration(
    table: Mapping[str, Any], key: str, prefix: str, default: float, allow_zero: bool
) -> float:
    if key not in table:
        return default
    value = table[key]
    seconds = parse_duration(value)
    name = _join(prefix, key)
    if seconds is None or seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ConfigError(
            f'{name}: expected seconds or a duration like "5m", got {_show(value)}'
        )
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ConfigError(f"{name}: expected {bound} seconds, got {_show(value)}")
    return seconds


def _bool(table: Mapping[str, Any], key: str, prefix: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{_join(prefix, key)}: expected true or false, got {_show(value)}")
    return value


def _count(table: Mapping[str, Any], key: str, prefix: str, default: int) -> int:
    """A whole number of at least 1."""
    value = table.get(key, default)
    name = _join(prefix, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected a whole number, got {_show(value)}")
    if value < 1:
        raise ConfigError(f"{name}: expected 1 or more, got {_show(value)}")
    return value


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_UNIT_BYTES = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: object) -> int | None:
    """
    Bytes from an integer or from a string like C{"500MB"}, C{"200GiB"}, C{"1.5TB"},
    C{"4096B"} or C{"4096"}; None if C{value} is neither.

    Decimal units (kB, MB, GB, TB) are powers of 1000 and binary ones (KiB, MiB, GiB, TiB)
    powers of 1024; units are read without regard to case (there are no bits here, so
    C{"mb"} can only mean megabytes), a space may separate number and unit, and a fraction
    is rounded down to a whole byte. The sign and bounds are the caller's to check; a
    string is never negative.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None:
        return None
    number, unit = match.groups()
    multiplier = _UNIT_BYTES.get(unit)
    if multiplier is None:
        return None
    # Fraction, not float: "1.1TB" must be exactly 1100000000000 bytes.
    return int(Fraction(number) * multiplier)


def _size(table: Mapping[str, Any], key: str, prefix: str, default: int, allow_zero: bool) -> int:
    if key not in table:
        return default
    value = table[key]
    size = parse_size(value)
    name = _join(prefix, key)
    if size is None:
        raise ConfigError(f'{name}: expected bytes or a size like "200GiB", got {_show(value)}')
    if size < 0 or (size == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ConfigError(f"{name}: expected {bound} bytes, got {_show(value)}")
    return size


def _resolve(base_dir: str, value: str) -> str:
    """C{value} with C{~} expanded, taken relative to C{base_dir}; empty stays empty."""
    if not value:
        return value
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _readable_file(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path}: {e.strerror or e}") from None


def read_pem_certificates(path: str, key: str) -> list[x509.Certificate]:
    """
    The certificates in the PEM file C{path}, in file order.

    @param key: the configuration key naming the file, for the error message.
    @raise ConfigError: the file cannot be read or holds no certificate.
    """
    try:
        return x509.load_pem_x509_certificates(_readable_file(key, path))
    except ValueError:
        raise ConfigError(f"{key}: {path} holds no PEM certificate") from None


def read_pem_private_key(path: str, key: str) -> PrivateKeyTypes:
    """
    The unencrypted private key in the PEM file C{path}.

    @param key: the configuration key naming the file, for the error message.
    @raise ConfigError: the file cannot be read or holds no unencrypted key.
    """
    try:
        return load_pem_private_key(_readable_file(key, path), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {path} holds no unencrypted PEM private key") from None


# -- [server] ------------------------------------------------------------------------------

_SERVER_KEYS = {
    "listen",
    "tls_cert",
    "tls_key",
    "tls_names",
    "port_file",
    "request_head_timeout",
    "tls_handshake_timeout",
    "keepalive_timeout",
    "send_timeout",
    "max_request_line",
    "max_header_bytes",
    "max_headers",
    "max_connections",
    "allow",
    "upstream_proxy",
    "plain_http_files",
    "listen_plain",
    "workers",
}


def _parse_server(table: Mapping[str, Any], base_dir: str) -> ServerConfig:
    prefix = "server"
    _check_keys(table, prefix, _SERVER_KEYS)
    listen_values = _string_list(table, "listen", prefix)
    if listen_values is None:
        listen = DEFAULT_LISTEN
    else:
        if not listen_values:
            raise ConfigError("server.listen: expected at least one address to listen on")
        listen = tuple(normalise_listen(v, "server.listen") for v in listen_values)
        if len(set(listen)) != len(listen):
            raise ConfigError(f"server.listen: an address is listed twice in {_show(listen_values)}")
    listen_plain = tuple(
        normalise_listen(v, "server.listen_plain")
        for v in _string_list(table, "listen_plain", prefix) or []
    )
    taken = {_without_backlog(d) for d in listen}
    for description in listen_plain:
        if not description.startswith("tcp:0:") and _without_backlog(description) in taken:
            raise ConfigError(
                f"server.listen_plain: {_show(description)} is also in server.listen or listed "
                f"twice; a plain-HTTP listener needs an address of its own (every server.listen "
                f"port serves the same files over plain HTTP already)"
            )
        taken.add(_without_backlog(description))

    tls_cert = _resolve(base_dir, _string(table, "tls_cert", prefix))
    tls_key = _resolve(base_dir, _string(table, "tls_key", prefix))
    if bool(tls_cert) != bool(tls_key):
        given, missing = ("tls_cert", "tls_key") if tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(
            f"server.{missing}: must be set together with server.{given}, or both left empty"
        )
    if tls_cert:
        _check_certificate_pair(tls_cert, tls_key)

    names_values = _string_list(table, "tls_names", prefix) or []
    tls_names = tuple(_tls_name(v) for v in names_values)
    port_file = _resolve(base_dir, _string(table, "port_file", prefix))
    defaults = ServerConfig()

    def duration(key: str, default: float) -> float:
        return _duration(table, key, prefix, default, False)

    return ServerConfig(
        listen=listen,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_names=tls_names,
        port_file=port_file,
        request_head_timeout=duration("request_head_timeout", defaults.request_head_timeout),
        tls_handshake_timeout=duration("tls_handshake_timeout", defaults.tls_handshake_timeout),
        keepalive_timeout=duration("keepalive_timeout", defaults.keepalive_timeout),
        send_timeout=duration("send_timeout", defaults.send_timeout),
        max_request_line=_head_limit(table, "max_request_line", defaults.max_request_line),
        max_header_bytes=_head_limit(table, "max_header_bytes", defaults.max_header_bytes),
        max_headers=_count(table, "max_headers", prefix, defaults.max_headers),
        max_connections=_count(table, "max_connections", prefix, defaults.max_connections),
        allow=_networks(table, "allow", prefix),
        upstream_proxy=_proxy(table, "upstream_proxy", prefix),
        plain_http_files=_bool(table, "plain_http_files", prefix, True),
        listen_plain=listen_plain,
        workers=_count(table, "workers", prefix, default_workers()),
    )


def default_workers() -> int:
    """C{[server] workers} when the file does not say: one process per CPU."""
    return os.cpu_count() or 1


def _proxy(table: Mapping[str, Any], key: str, prefix: str) -> ProxySetting:
    """An outbound proxy key: absent is None (the environment decides), "" is direct."""
    if key not in table:
        return None
    return parse_proxy_setting(_string(table, key, prefix), _join(prefix, key))


def _networks(table: Mapping[str, Any], key: str, prefix: str) -> tuple[str, ...]:
    """Client networks in CIDR notation, each written back in its canonical form."""
    values = _string_list(table, key, prefix) or []
    networks = []
    for value in values:
        try:
            networks.append(str(parse_network(value)))
        except ValueError:
            raise ConfigError(
                f"{_join(prefix, key)}: expected a network like \"192.168.0.0/16\", "
                f"\"fd00::/8\" or one address, got {_show(value)}"
            ) from None
    return tuple(networks)


# -- [metrics] -----------------------------------------------------------------------------


def _parse_metrics(table: Mapping[str, Any], server: ServerConfig) -> MetricsConfig:
    _check_keys(table, "metrics", {"listen"})
    values = _string_list(table, "listen", "metrics")
    if values is None:
        listen = DEFAULT_METRICS_LISTEN
    else:
        listen = tuple(normalise_listen(v, "metrics.listen") for v in values)
        if len(set(listen)) != len(listen):
            raise ConfigError(f"metrics.listen: an address is listed twice in {_show(values)}")
    shared = set(_without_backlog(d) for d in listen) & set(
        _without_backlog(d) for d in server.listen + server.listen_plain
    )
    if any(not d.startswith("tcp:0:") for d in shared):
        raise ConfigError(
            f"metrics.listen: {_show(sorted(shared)[0])} is also in server.listen or "
            f"server.listen_plain; the metrics "
            f"listener needs an address of its own"
        )
    return MetricsConfig(listen=listen)


def _without_backlog(description: str) -> str:
    return description.split(":backlog=")[0]


def _head_limit(table: Mapping[str, Any], key: str, default: int) -> int:
    size = _size(table, key, "server", default, False)
    if size < MIN_HEAD_LIMIT_BYTES:
        raise ConfigError(
            f"server.{key}: expected at least {MIN_HEAD_LIMIT_BYTES} bytes, got {_show(table[key])}"
        )
    return size


def _check_certificate_pair(cert_path: str, key_path: str) -> None:
    certificate = read_pem_certificates(cert_path, "server.tls_cert")[0]
    key = read_pem_private_key(key_path, "server.tls_key")
    if key.public_key() != certificate.public_key():
        raise ConfigError(
            f"server.tls_key: {key_path} is not the key of the certificate in {cert_path}"
        )


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def is_dns_name(name: str) -> bool:
    """Whether C{name} is a plain DNS host name (letters, digits, hyphens; C{*.} first allowed)."""
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    return (
        0 < len(name) <= 253
        and bool(labels)
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
    )


def _tls_name(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.strip().lower().rstrip(".")
    if not is_dns_name(name):
        raise ConfigError(
            f"server.tls_names: expected DNS names or IP addresses, got {_show(value)}"
        )
    return name


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)")


def normalise_listen(value: str, key: str = "server.listen") -> str:
    """
    Turn one listen address into a canonical plain TCP server endpoint description.

    Accepted: C{"8443"} (every IPv4 address), C{"0.0.0.0:8443"}, C{"[::]:8443"},
    C{"127.0.0.1:0"}, or a Twisted C{tcp:}/C{tcp6:} endpoint description such as
    C{"tcp:8443:interface=127.0.0.1"}.  The result is C{tcp:PORT:interface=ADDRESS}, plus
    C{:backlog=N} when one was given.

    @raise ConfigError: for anything else, including C{ssl:} (TLS is always added by the
        proxy) and host names (the interface must be an address).
    """
    text = value.strip()
    bad = f"{key}: expected an address like \"0.0.0.0:8443\", \"[::]:8443\" or \"tcp:8443\", got {_show(value)}"
    interface: str
    backlog: str | None = None
    if text.isdigit():
        port, interface = text, "0.0.0.0"
    elif text[:1].isdigit() or text[:1] in "[:":
        match = _HOST_PORT.fullmatch(text)
        if match is None:
            raise ConfigError(bad)
        port = match.group("port")
        interface = match.group("v6") or match.group("host") or "0.0.0.0"
        if match.group("v6") is not None and ":" not in interface:
            raise ConfigError(bad)
    else:
        kind, _, _ = text.partition(":")
        if kind not in ("tcp", "tcp6"):
            if kind in ("ssl", "tls", "unix", "systemd"):
                raise ConfigError(
                    f"{key}: {_show(value)} is not a plain TCP endpoint; "
                    f"the proxy adds TLS itself, so use \"tcp:PORT\" or \"ADDRESS:PORT\""
                )
            raise ConfigError(bad)
        try:
            args, kwargs = parse_endpoint_description(text)
        except Exception:
            raise ConfigError(bad) from None
        args = args[1:]
        kwargs = dict(kwargs)
        if len(args) > 1:
            raise ConfigError(bad)
        if args:
            if "port" in kwargs:
                raise ConfigError(bad)
            kwargs["port"] = args[0]
        unknown = set(kwargs) - {"port", "interface", "backlog"}
        if unknown or "port" not in kwargs:
            raise ConfigError(bad)
        port = kwargs["port"]
        interface = kwargs.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
        backlog = kwargs.get("backlog")
        if backlog is not None and (not backlog.isdigit() or int(backlog) < 1):
            raise ConfigError(f"{key}: backlog must be a positive integer in {_show(value)}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: port must be between 0 and 65535 in {_show(value)}")
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        raise ConfigError(
            f"{key}: {_show(interface)} is not an IP address in {_show(value)}; "
            f"listen addresses must be numeric"
        ) from None
    escaped = str(address).replace(":", "\\:")
    description = f"tcp:{int(port)}:interface={escaped}"
    if backlog is not None:
        description += f":backlog={int(backlog)}"
    return description


# -- [cache] -------------------------------------------------------------------------------

_CACHE_KEYS = {
    "dir",
    "metadata_ttl",
    "download_idle_timeout",
    "connect_timeout",
    "usage_flush_interval",
    "expiry_days",
    "max_size",
    "min_free",
    "auto_update_interval",
    "auto_update_cached",
    "keep_versions",
    "prefetch_concurrency",
    "upstream_concurrency",
}


def _parse_cache(table: Mapping[str, Any], base_dir: str, defaults: CacheConfig) -> CacheConfig:
    prefix = "cache"
    _check_keys(table, prefix, _CACHE_KEYS)
    directory = _string(table, "dir", prefix)
    if "dir" in table and not directory:
        raise ConfigError("cache.dir: expected a directory path, got \"\"")

    def duration(key: str, default: float, allow_zero: bool) -> float:
        return _duration(table, key, prefix, default, allow_zero)

    return CacheConfig(
        dir=_resolve(base_dir, directory) if directory else defaults.dir,
        metadata_ttl=duration("metadata_ttl", defaults.metadata_ttl, True),
        download_idle_timeout=duration(
            "download_idle_timeout", defaults.download_idle_timeout, False
        ),
        connect_timeout=duration("connect_timeout", defaults.connect_timeout, False),
        usage_flush_interval=duration("usage_flush_interval", defaults.usage_flush_interval, False),
        expiry_days=_expiry_days(table, defaults.expiry_days),
        max_size=_max_size(table, defaults.max_size),
        min_free=_size(table, "min_free", prefix, defaults.min_free, True),
        auto_update_interval=duration("auto_update_interval", defaults.auto_update_interval, True),
        auto_update_cached=_bool(table, "auto_update_cached", prefix, defaults.auto_update_cached),
        keep_versions=_count(table, "keep_versions", prefix, defaults.keep_versions),
        prefetch_concurrency=_count(
            table, "prefetch_concurrency", prefix, defaults.prefetch_concurrency
        ),
        upstream_concurrency=_limit(
            table, "upstream_concurrency", prefix, defaults.upstream_concurrency
        ),
    )


def _limit(table: Mapping[str, Any], key: str, prefix: str, default: int) -> int:
    """A whole number of 0 (no limit) or more."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{_join(prefix, key)}: expected a whole number, 0 for no limit, got {_show(value)}"
        )
    return value


def _expiry_days(table: Mapping[str, Any], default: float) -> float:
    value = table.get("expiry_days", default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or value in (float("inf"), float("-inf"))
    ):
        raise ConfigError(f"cache.expiry_days: expected a number of days, got {_show(value)}")
    if value <= 0:
        raise ConfigError(f"cache.expiry_days: expected more than zero days, got {_show(value)}")
    return float(value)


def _max_size(table: Mapping[str, Any], default: int | None) -> int | None:
    # TOML has no null, so the empty string stands for "no cap", as "" stands for "none"
    # in the other keys; 0 is refused rather than read as "no cap" or "store nothing".
    if table.get("max_size") == "":
        return None
    if "max_size" not in table:
        return default
    return _size(table, "max_size", "cache", 0, False)


# -- [upstreams.NAME] ----------------------------------------------------------------------

_UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_UPSTREAM_KEYS = {
    "url", "urls", "ca_file", "allow_insecure", "offline", "protocol", "proxy",
    "upstream_concurrency", "allow",
}
# Paths at the root that are not upstreams: the LXD image API, the URL-import face, the
# health checks (and /metrics, kept free so that the HTTPS port may serve it one day), the status
# page's JSON and the client set-up script.
RESERVED_NAMES = frozenset({"1.0", "import", "healthz", "readyz", "metrics", "status.json", "setup.sh"})


def _parse_upstreams(table: Mapping[str, Any], base_dir: str) -> tuple[UpstreamConfig, ...]:
    if not table:
        raise ConfigError("upstreams: expected at least one [upstreams.NAME] table")
    upstreams = []
    for name, value in table.items():
        prefix = f"upstreams.{name}"
        if not _UPSTREAM_NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise ConfigError(
                f"{prefix}: an upstream name must match [a-z0-9][a-z0-9._-]* and not be one of"
                f" {', '.join(_show(n) for n in sorted(RESERVED_NAMES))} (paths the proxy serves itself)"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix}: expected a table, got {_show(value)}")
        upstreams.append(_parse_upstream(name, value, base_dir))
    return tuple(upstreams)


def _parse_upstream(name: str, table: Mapping[str, Any], base_dir: str) -> UpstreamConfig:
    prefix = f"upstreams.{name}"
    _check_keys(table, prefix, _UPSTREAM_KEYS)
    if "url" not in table and "urls" not in table:
        raise ConfigError(f"{prefix}.url: missing; every upstream needs a base URL")
    if "url" in table and "urls" in table:
        raise ConfigError(
            f"{prefix}: url and urls both given; use url for one base URL, urls for mirrors"
        )
    allow_insecure = _bool(table, "allow_insecure", prefix, False)
    urls: tuple[str, ...] = ()
    if "urls" in table:
        urls = _mirror_urls(_string_list(table, "urls", prefix) or [], f"{prefix}.urls", allow_insecure)
        url = urls[0]
    else:
        url = _upstream_url(_string(table, "url", prefix), f"{prefix}.url", allow_insecure)
    ca_file = _resolve(base_dir, _string(table, "ca_file", prefix))
    if ca_file:
        read_pem_certificates(ca_file, f"{prefix}.ca_file")
    offline = _bool(table, "offline", prefix, False)
    protocol = _string(table, "protocol", prefix, SIMPLESTREAMS)
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"{prefix}.protocol: expected one of {', '.join(PROTOCOLS)}, got {_show(protocol)}"
        )
    if len(urls) > 1 and protocol == LXD:
        raise ConfigError(
            f"{prefix}.urls: mirrors are for simplestreams upstreams; an LXD server upstream "
            f"has one url"
        )
    # "" (as absent) stands for cache.upstream_concurrency, as "" stands for "none" elsewhere.
    concurrency = (
        None if table.get("upstream_concurrency", "") == ""
        else _limit(table, "upstream_concurrency", prefix, 0)
    )
    return UpstreamConfig(
        name=name, url=url, ca_file=ca_file, allow_insecure=allow_insecure, offline=offline,
        protocol=protocol, proxy=_proxy(table, "proxy", prefix), urls=urls,
        upstream_concurrency=concurrency, allow=_networks(table, "allow", prefix),
    )


def _mirror_urls(values: list[str], key: str, allow_insecure: bool) -> tuple[str, ...]:
    """The base URLs of C{urls = [...]}: at least one, each valid, none twice."""
    if not values:
        raise ConfigError(f"{key}: expected at least one base URL")
    urls: list[str] = []
    for value in values:
        url = _upstream_url(value, key, allow_insecure)
        if url in urls:
            raise ConfigError(f"{key}: {_show(value)} is listed twice")
        urls.append(url)
    return tuple(urls)


def _parse_lxd_api(table: Mapping[str, Any], upstreams: tuple[UpstreamConfig, ...]) -> LxdApiConfig:
    _check_keys(table, "lxd_api", {"upstreams"})
    names = _string_list(table, "upstreams", "lxd_api")
    if names is None:
        return LxdApiConfig()
    seen: list[str] = []
    for name in names:
        _check_upstream_name(name, [u.name for u in upstreams], "lxd_api.upstreams: ")
        if name in seen:
            raise ConfigError(f"lxd_api.upstreams: {_show(name)} is listed twice")
        seen.append(name)
    return LxdApiConfig(upstreams=tuple(seen))


def _upstream_url(value: str, key: str, allow_insecure: bool) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"{key}: {_show(value)} is not a valid URL") from None
    if parts.scheme == "http" and not allow_insecure:
        raise ConfigError(
            f"{key}: upstreams must use https://, got {_show(value)} "
            f"(allow_insecure = true permits http:// for tests)"
        )
    if parts.scheme not in ("https", "http"):
        raise ConfigError(f"{key}: expected an https:// URL, got {_show(value)}")
    if not parts.hostname:
        raise ConfigError(f"{key}: {_show(value)} has no host name")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key}: {_show(value)} must not carry credentials")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ConfigError(f"{key}: {_show(value)} must not have a query or fragment")
    # The LXD client strips one trailing slash from a remote URL; so do we, so that
    # "base + / + path" joins the same way on both sides.
    return value[:-1] if value.endswith("/") else value


# -- [[pin]] -------------------------------------------------------------------------------

_PIN_KEYS = {"upstream", "alias", "arch", "type"}
_IMAGE_TYPES = (CONTAINER, VIRTUAL_MACHINE)
# Whitespace or a comma can never be part of an alias: simplestreams products list their
# aliases comma-separated.
_BAD_ALIAS = re.compile(r"[\s,]")


def _parse_pins(value: object, upstreams: tuple[UpstreamConfig, ...]) -> tuple[PinConfig, ...]:
    if value == []:
        return ()
    if not _is_table_array(value):
        raise ConfigError(f"pin: expected [[pin]] tables, got {_show(value)}")
    names = [u.name for u in upstreams]
    pins: list[PinConfig] = []
    # Counted from 1, as an admin counts the [[pin]] tables in the file.
    for number, table in enumerate(value, start=1):
        prefix = f"pin[{number}]"
        pin = _parse_pin(table, prefix, names)
        if pin in pins:
            first = pins.index(pin) + 1
            raise ConfigError(f"{prefix}: pins the same image as pin[{first}]")
        pins.append(pin)
    return tuple(pins)


def _parse_pin(table: Mapping[str, Any], prefix: str, upstreams: list[str]) -> PinConfig:
    _check_keys(table, prefix, _PIN_KEYS)
    for key in ("upstream", "alias"):
        if key not in table:
            raise ConfigError(f"{prefix}.{key}: missing; every pin names an upstream and an alias")
    upstream = _string(table, "upstream", prefix)
    _check_upstream_name(upstream, upstreams, f"{prefix}.upstream: ")
    alias = _string(table, "alias", prefix)
    if not alias or _BAD_ALIAS.search(alias):
        raise ConfigError(
            f'{prefix}.alias: expected an image alias such as "ubuntu/24.04", got {_show(alias)}'
        )
    arch = _string(table, "arch", prefix)
    if arch:
        try:
            arch = lxd_arch(arch)
        except ValueError:
            raise ConfigError(
                f"{prefix}.arch: {_show(arch)} is not an architecture LXD knows; use an LXD or "
                f'stream name such as "x86_64", "amd64", "aarch64" or "arm64", or "" for the '
                f"proxy host's"
            ) from None
    image_type = _string(table, "type", prefix, CONTAINER)
    if image_type not in _IMAGE_TYPES:
        raise ConfigError(
            f'{prefix}.type: expected "{CONTAINER}" or "{VIRTUAL_MACHINE}", got {_show(image_type)}'
        )
    return PinConfig(upstream=upstream, alias=alias, arch=arch, type=image_type)


def _check_upstream_name(name: str, upstreams: Iterable[str] | None, lead: str) -> None:
    if upstreams is None:
        return
    known = list(upstreams)
    if name not in known:
        raise ConfigError(
            f"{lead}{_show(name)} is not a configured upstream; expected one of {', '.join(known)}"
        )


def parse_pin_ref(ref: str, upstreams: Iterable[str] | None = None) -> tuple[str, str]:
    """
    Split an image reference C{"UPSTREAM:ALIAS"}, as C{lxc} writes C{REMOTE:ALIAS}, into
    C{(upstream, alias)}: C{parse_pin_ref("images:ubuntu/24.04") == ("images",
    "ubuntu/24.04")}. The alias may also be a fingerprint.

    @param upstreams: the configured upstream names; when given, the upstream must be one.
    @raise ConfigError: the reference is malformed (no colon, a bad upstream name, an empty
        alias or one with whitespace or a comma) or names an upstream not in C{upstreams}.
    """
    upstream, colon, alias = ref.partition(":")
    if (
        not colon
        or not _UPSTREAM_NAME.fullmatch(upstream)
        or upstream == "1.0"
        or not alias
        or _BAD_ALIAS.search(alias)
    ):
        raise ConfigError(
            f'expected an image reference like "images:ubuntu/24.04", got {_show(ref)}'
        )
    _check_upstream_name(upstream, upstreams, "")
    return upstream, alias
