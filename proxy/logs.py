# -*- test-case-name: tests.test_logs -*-
"""
The log's output format (C{[log] format}), set up through the runner that starts the proxy.

Both runners choose their log observer from their own options before the proxy's service
starts: C{twistd} from C{--logger} (a factory called without arguments; its default is a text
observer on C{--logfile} or standard output), C{python -m twisted} from C{--log-format} (text
on a terminal, JSON otherwise). The proxy's options are parsed as a sub-command of theirs, so
L{apply_log_format} sets the runner's option from the configuration (see there for which
choice wins), and the systemd unit needs no change to log JSON.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    eventAsJSON,
    formatEvent,
)
from twisted.python.logfile import LogFile

TEXT = "text"
JSON = "json"


def _json_line(event: LogEvent) -> str:
    # The message as text too, so that a shipper need not know Twisted's format strings.
    return eventAsJSON({**event, "text": formatEvent(event)}) + "\n"


def json_observer(out: IO[Any]) -> ILogObserver:
    """
    One JSON object per line (JSON Lines, without the record separator that Twisted's
    C{jsonFileLogObserver} puts first): every field of the event (C{log_time},
    C{log_level}, C{log_namespace}, C{log_format} and the event's own), plus C{text}, the
    message as the text log shows it.
    """
    return FileLogObserver(out, _json_line)


def _twistd_output(options: MutableMapping[str, Any]) -> IO[Any]:
    """Where twistd's own text observer would write (see twisted.application.app.AppLogger)."""
    name = options.get("logfile") or ""
    if not name and not options.get("nodaemon", True):
        # twistd's default for a daemon (UnixAppLogger).
        name = "twistd.log"
    if not name or name == "-":
        return sys.stdout
    return LogFile.fromFullPath(name)


def apply_log_format(runner: MutableMapping[str, Any] | None, format: str) -> None:
    """
    Make the runner whose parsed options are C{runner} log in C{format}.

    Under C{twistd} a C{--logger} or C{--syslog} on its command line wins. C{python -m
    twisted} chooses text or JSON on its own (C{--log-format}, or text only on a terminal)
    and cannot tell its default from a choice made on its command line, so there C{"json"}
    is applied and C{"text"} leaves its choice as it is. C{runner} is C{None} when the
    proxy's options are parsed on their own (tests).
    """
    if runner is None:
        return
    if "logFile" in runner:
        # python -m twisted: its observer factory is called with its --log-file.
        if format == JSON:
            runner["fileLogObserverFactory"] = json_observer
            runner["logFormat"] = JSON
        return
    if "logger" in runner:
        # twistd: its text observer is the default. It imports --logger by name once every
        # option is parsed, so the name goes in, and the options where its factory finds them.
        if format == JSON and not runner.get("logger") and not runner.get("syslog"):
            global _twistd_options
            _twistd_options = runner
            runner["logger"] = f"{__name__}.{twistd_json_observer.__name__}"


# The options of the twistd that runs this process, once apply_log_format saw them.
_twistd_options: MutableMapping[str, Any] | None = None


def twistd_json_observer() -> ILogObserver:
    """
    The JSON observer for twistd's C{--logger} (a factory it calls without arguments):
    written where twistd would write its text log (C{--logfile}, C{twistd.log} for a
    daemon, else standard output).
    """
    return json_observer(_twistd_output(_twistd_options or {}))


__all__ = ["JSON", "TEXT", "apply_log_format", "json_observer", "twistd_json_observer"]
