# -*- test-case-name: tests.test_access_log -*-
"""
The access log: one structured event per request, emitted once when its response ends.

Twisted's L{Site} writes a combined-log line of its own, with a second timestamp and none of
what an admin of a cache asks first (which face, hit or miss, how long). Here a request carries
an L{AccessNote} that the faces fill in (L{note_face}, L{note_cache}); when the response is
finished, or its connection is lost first, L{log_access} emits one event in the namespace
C{proxy.access} whose fields are the same in the text and the JSON log.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.internet.interfaces import INegotiated, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from proxy.request_target import TargetRequest

# What a response of an image file was to the cache.
HIT = "hit"  # served from a stored file
MISS = "miss"  # the request started the upstream download
JOINED = "joined"  # the request followed a download already in flight
# Not an image file (a catalogue, an API answer, an error), or not known.
NONE = "-"

ACCESS_FORMAT = (
    '{client} "{method} {path}" {status} {bytes} bytes {duration:.3f}s '
    "face={face} cache={cache} via={via} {end}"
)

# The event's log_format: its message is its field C{text}, ACCESS_FORMAT applied to its fields.
TEXT_FORMAT = "{text}"

access = Logger(namespace="proxy.access")


@define
class AccessNote:
    """
    What the access line says of a request besides its request line.

    @ivar face: the part of the proxy that answered: an upstream's name (the simplestreams
        face), C{lxd} (the image API), C{import}, C{root}, or C{-} before routing.
    @ivar cache: L{HIT}, L{MISS}, L{JOINED} or L{NONE}.
    @ivar via: how the request came: C{tls}, C{plain} (plain HTTP: an image file, or a 400
        pointing to https://) or C{-} (not known).
    @ivar started: when the request head was complete (the clock's seconds).
    @ivar logged: the event was emitted, so it never is twice.
    """

    face: str = NONE
    cache: str = NONE
    via: str = NONE
    started: float | None = None
    logged: bool = False


def note_of(request: IRequest) -> AccessNote | None:
    """The note of C{request}; None for a request of a site that keeps none (tests' L{Site})."""
    note = getattr(request, "access", None)
    return note if isinstance(note, AccessNote) else None


def note_face(request: IRequest, face: str) -> None:
    note = note_of(request)
    if note is not None:
        note.face = face


def note_cache(request: IRequest, cache: str) -> None:
    note = note_of(request)
    if note is not None:
        note.cache = cache


def _text(value: bytes | None) -> str:
    # Escaped, so that no byte a client sends can forge a line of the text log or drive a
    # terminal showing it.
    if value is None:
        return "-"
    text = value.decode("ascii", "backslashreplace")
    if text.isprintable():
        # Every request of a well-behaved client: no character to look at one by one.
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def log_access(request: IRequest, note: AccessNote, now: float, *, complete: bool) -> None:
    """
    Emit the access event of C{request} once; C{complete} is false when the connection was
    lost (or aborted) before the response was finished.

    Fields: C{client} (address), C{method}, C{path} (the request target), C{status} (0 when
    no status line was sent), C{bytes} (of body sent), C{duration} (seconds from the end of
    the request head), C{face}, C{cache}, C{via}, C{end} (C{done} or C{aborted}), C{user_agent},
    and C{text}: the line, C{ACCESS_FORMAT} with those fields (the event's format is
    C{TEXT_FORMAT}).
    """
    if note.logged:
        return
    note.logged = True
    address = request.getClientAddress()
    client = getattr(address, "host", None) or str(address)
    started_writing = bool(getattr(request, "startedWriting", False))
    fields = dict(
        client=client,
        method=_text(request.method),
        path=_text(request.uri),
        status=int(getattr(request, "code", 0)) if started_writing else 0,
        bytes=int(getattr(request, "sentLength", 0)),
        duration=max(0.0, now - note.started) if note.started is not None else 0.0,
        face=note.face,
        cache=note.cache,
        via=note.via,
        end="done" if complete else "aborted",
    )
    # The line is formatted here, once, by str.format: an observer formatting ACCESS_FORMAT
    # itself goes through Twisted's Formatter in Python, field by field, a tenth of the CPU
    # of a small catalogue hit. C{text} is what the JSON log calls the formatted message.
    access.info(
        TEXT_FORMAT, text=ACCESS_FORMAT.format_map(fields),
        user_agent=_text(request.getHeader(b"User-Agent")), **fields,
    )


class LoggedRequest(TargetRequest):
    """
    A L{TargetRequest} that carries an L{AccessNote} and logs itself when its connection is
    lost before the response was finished; a finished one is logged by the site
    (L{proxy.channel.ProxySite.log}), which Twisted calls from C{finish}.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access = AccessNote()
        self._clock: IReactorTime | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The site's clock, so that tests on a fake clock see the durations they make.
        self._clock = getattr(getattr(self.channel, "factory", None), "reactor", None)
        if self._clock is not None:
            self.access.started = self._clock.seconds()
        transport = getattr(self.channel, "transport", None)
        if transport is not None:
            # TLS is the only negotiating transport the channel is ever given (proxy.listen).
            self.access.via = "tls" if INegotiated.providedBy(transport) else "plain"
        super().requestReceived(command, path, version)

    def log_finished(self) -> None:
        if self._clock is not None:
            log_access(self, self.access, self._clock.seconds(), complete=True)

    def connectionLost(self, reason: Failure) -> None:
        # A request whose head never ended has no request line to log (the channel logs
        # why it closed such a connection).
        if not self.finished and self.access.started is not None and self._clock is not None:
            log_access(self, self.access, self._clock.seconds(), complete=False)
        super().connectionLost(reason)


__all__ = [
    "LoggedRequest",
    "ACCESS_FORMAT",
    "TEXT_FORMAT",
    "AccessNote",
    "HIT",
    "JOINED",
    "MISS",
    "NONE",
    "log_access",
    "note_cache",
    "note_face",
    "note_of",
]
