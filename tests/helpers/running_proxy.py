"""Run the whole proxy service in the test's reactor, in front of loopback upstreams."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from attrs import define
from twisted.internet.defer import Deferred

from proxy.config import parse_config
from proxy.service import ProxyService, build_service


@define
class RunningProxy:
    service: ProxyService
    port: int
    cert_pem: bytes
    state_dir: Path
    # The metrics listener's port, None when it is off.
    metrics_port: int | None = None

    def url(self, upstream: str) -> str:
        # "localhost" is the generated certificate's first DNS name, which the LXD client checks.
        return f"https://localhost:{self.port}/{upstream}"

    @property
    def cache(self) -> Any:
        return self.service.cache

    async def stop(self) -> None:
        await self.service.stopService()


async def start_proxy(
    reactor: Any,
    state_dir: Path,
    upstreams: Mapping[str, tuple[str, bytes]],
    cache: Mapping[str, Any] | None = None,
    *,
    upstream_options: Mapping[str, Mapping[str, Any]] | None = None,
    pins: list[Mapping[str, Any]] | None = None,
    server: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> RunningProxy:
    """
    Start a proxy on 127.0.0.1 with an ephemeral port.

    @param upstreams: name -> (base URL, PEM of the CA that signed its certificate).
    @param cache: extra C{[cache]} keys.
    @param upstream_options: name -> extra C{[upstreams.NAME]} keys (such as C{offline}).
    @param pins: C{[[pin]]} tables.
    @param server: extra C{[server]} keys (such as C{request_head_timeout}).
    @param metrics: C{[metrics]} keys; the listener is on an ephemeral loopback port unless
        they say otherwise.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    tables: dict[str, Any] = {}
    for name, (url, ca_pem) in upstreams.items():
        ca_file = state_dir.parent / f"{state_dir.name}-{name}-ca.pem"
        ca_file.write_bytes(ca_pem)
        tables[name] = {"url": url, "ca_file": str(ca_file), **(upstream_options or {}).get(name, {})}
        if "urls" in tables[name]:
            # Mirrors replace the one base URL.
            del tables[name]["url"]
    document: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "tls_names": ["localhost"], **(server or {})},
        "cache": {"dir": str(state_dir), **(cache or {})},
        "upstreams": tables,
        # A port of its own per proxy: the default one is fixed.
        "metrics": {"listen": ["127.0.0.1:0"], **(metrics or {})},
    }
    if pins:
        document["pin"] = list(pins)
    config = parse_config(document, base_dir=str(state_dir))
    service = build_service(config, reactor)
    service.privilegedStartService()
    service.startService()
    ready: Deferred[list[int]] = service.listener.ready
    ports = await ready.addTimeout(10, reactor)
    metrics_ports = await service.metrics_listener.ready.addTimeout(10, reactor)
    cert_pem = Path(service.listener.cert_path).read_bytes()
    return RunningProxy(service, ports[0], cert_pem, state_dir, metrics_ports[0] if metrics_ports else None)
