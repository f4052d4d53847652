"""The events a test logged (the C{logged} fixture of C{tests/conftest.py}), and ways to pick them."""

from __future__ import annotations

from twisted.logger import LogEvent, LogLevel, formatEvent


class Logged(list[LogEvent]):
    """Every event published on C{globalLogPublisher} while the test ran, in order."""

    def matching(self, text: str, *, level: LogLevel | None = None) -> list[LogEvent]:
        """The events whose format contains C{text} (of C{level}, when given)."""
        return [e for e in self.at(level) if text in e.get("log_format", "")]

    def starting(self, text: str, *, level: LogLevel | None = None) -> list[LogEvent]:
        """The events whose format starts with C{text} (of C{level}, when given)."""
        return [e for e in self.at(level) if e.get("log_format", "").startswith(text)]

    def lines(self, level: LogLevel, namespace: str | None = None) -> list[str]:
        """The formatted messages of C{level} (from C{namespace}, when given)."""
        return [
            formatEvent(e) for e in self.at(level)
            if namespace is None or e.get("log_namespace") == namespace
        ]

    def texts(self) -> list[str]:
        """Every event formatted."""
        return [formatEvent(e) for e in self]

    def failures(self) -> list[LogEvent]:
        """The events that carry a failure."""
        return [e for e in self if "log_failure" in e]

    def at(self, level: LogLevel | None) -> list[LogEvent]:
        """The events of C{level} (all of them, for C{None})."""
        return [e for e in self if level is None or e.get("log_level") is level]
