# -*- test-case-name: tests.test_tap -*-
"""twistd plugin glue: command-line options and the service they make.

Reading the configuration happens while the options are parsed, so that a bad file is a
usage error: both C{twistd} and C{twist} print it as one sentence and exit non-zero,
without a traceback.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from proxy.config import load_config
from proxy.errors import ConfigError


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Serve LXD and Incus image servers (simplestreams) through a caching pull-through "
        "proxy over HTTPS. Without --config the built-in configuration is used: port 8443 "
        "on every IPv4 address, a self-signed certificate generated in the state directory, and "
        "the upstreams images, ubuntu, ubuntu-daily and linuxcontainers."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the built-in configuration)."],
    ]

    def postOptions(self) -> None:
        try:
            self["proxy_config"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """Build the proxy service from the configuration that option parsing loaded."""
    from twisted.internet import reactor

    from proxy.service import build_service

    try:
        return build_service(options["proxy_config"], reactor)
    except ConfigError as e:
        # twistd only reports usage errors raised while parsing options; this is the
        # other way to end with the sentence and no traceback.
        raise SystemExit(f"lxd-image-proxy: {e}") from None
