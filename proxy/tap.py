# -*- test-case-name: tests.test_tap -*-
"""twistd plugin glue: command-line options and the service they make.

Reading the configuration happens while the options are parsed, so that a bad file stops
C{twistd} and C{twist} before anything starts: with one sentence naming the key on standard
error and exit status 1, without a traceback and without the usage text both runners print
in front of a usage error (a wrong value is not a wrong command line). The configuration's
C{[log] format} is handed to the runner here too (L{proxy.logs}).
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from proxy import __version__
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.logs import apply_log_format


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Serve LXD and Incus image servers (simplestreams, or LXD servers) through a caching "
        "pull-through proxy over HTTPS (image files also over plain HTTP, as LXD asks first). "
        "Without --config the built-in configuration is used: port 8443 on every IPv4 address, "
        "a self-signed certificate generated in the state directory, one worker process per "
        "CPU, and the upstreams images, ubuntu, ubuntu-daily and linuxcontainers."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the built-in configuration)."],
    ]

    def opt_version(self) -> None:
        """Display the proxy's version (and Twisted's) and exit."""
        from twisted import copyright

        print(f"lxd-image-proxy {__version__} (Twisted {copyright.version})")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            raise SystemExit(f"lxd-image-proxy: {e}") from None
        self["proxy_config"] = config
        # Set by usage.Options when these options are a runner's sub-command.
        apply_log_format(getattr(self, "parent", None), config.log.format)


def makeService(options: Options) -> IService:
    """Build the proxy service from the configuration that option parsing loaded."""
    from twisted.internet import reactor

    from proxy.service import build_service

    config = options["proxy_config"]
    try:
        if config.server.workers > 1:
            # Several processes serve the ports; this one supervises them (proxy.workers).
            from proxy.workers import WorkerSupervisor

            return WorkerSupervisor(config, reactor, options["config"])
        return build_service(config, reactor)
    except ConfigError as e:
        # twistd only reports usage errors raised while parsing options; this is the
        # other way to end with the sentence and no traceback.
        raise SystemExit(f"lxd-image-proxy: {e}") from None
