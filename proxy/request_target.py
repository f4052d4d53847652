# -*- test-case-name: tests.test_request_target -*-
"""
Which request-target forms the proxy serves (RFC 9112 section 3.2), answered as nginx does.

  - origin-form (C{/images/streams/v1/index.json}): served;
  - absolute-form (C{https://host:8443/images/...}): served as its path; the authority
    becomes the C{Host} header, as RFC 9112 section 3.2.2 asks of an origin server.  The
    host named is never contacted: this is not a forward proxy;
  - C{CONNECT} (authority-form): 405, with a sentence saying why;
  - asterisk-form (C{OPTIONS *}): 400;
  - anything else not starting with C{/}: 400.

Twisted would answer C{OPTIONS *} with an empty 200 and treat an absolute-form target as a
path that lost its first character (C{ttps://host/...}).
"""

from __future__ import annotations

import contextvars
import re

from twisted.logger import Logger
from twisted.web.server import Request

from proxy.via import INCOMING, LOOP_HEADER, ViaGuard

# The methods every face serves; a face may serve more (see each resource).
READ_METHODS = (b"GET", b"HEAD")

_ABSOLUTE_FORM = re.compile(rb"(?i)https?://([^/?#]*)(.*)", re.DOTALL)


def origin_form(target: bytes) -> tuple[bytes, bytes | None]:
    """
    The origin-form of an absolute-form C{target}, and the authority it named.

    C{origin_form(b"https://h:8443/a?b") == (b"/a?b", b"h:8443")}; a target in any other
    form is returned as it is, with C{None}.
    """
    match = _ABSOLUTE_FORM.fullmatch(target)
    if match is None:
        return target, None
    authority, rest = match.group(1), match.group(2)
    # Userinfo is deprecated in http(s) URIs and never part of Host.
    authority = authority.rpartition(b"@")[2]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest, authority


def refusal(method: bytes, target: bytes) -> tuple[int, str] | None:
    """The status and sentence a request gets for its target form, or None to serve it."""
    if method == b"CONNECT":
        return 405, "CONNECT is not served: this is an image server, not a forward proxy"
    if target == b"*":
        return 400, "the request target * is not served here"
    if not target.startswith(b"/"):
        return 400, "the request target must be a path such as /1.0 or an https:// URL"
    return None


class TargetRequest(Request):
    """A L{Request} that serves or refuses its request-target as the module docstring says."""

    log = Logger()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        origin, authority = origin_form(path)
        # "https:///x" names no host to stand for Host: left as it is, process refuses it.
        if authority:
            self.requestHeaders.setRawHeaders(b"Host", [authority])
            path = origin
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # The site's loop protection (proxy.via), when it has one.
        guard: ViaGuard | None = getattr(getattr(self.channel, "site", None), "via", None)
        if guard is not None:
            self.setHeader(b"Via", guard.entry)
        refused = refusal(self.method, self.uri)
        if refused is None and guard is not None:
            via = self.requestHeaders.getRawHeaders(b"Via") or []
            looped = guard.refusal(via, self.uri) if via else None
            if looped is not None:
                # At once, before any face: a looping request must never join (and so wait
                # for) the download or refresh that caused it.
                self.setHeader(LOOP_HEADER, guard.pseudonym.encode("ascii"))
                self._answer(508, looped, close=False)
                return
            # Whatever this request starts upstream carries its chain (see proxy.via).
            contextvars.copy_context().run(self._process_within, guard.incoming(via))
            return
        if refused is None:
            super().process()
            return
        code, message = refused
        self.log.debug(
            "{code} for {method} {target}",
            code=code, method=self.method.decode("latin-1"), target=self.uri.decode("latin-1"),
        )
        if code == 405:
            self.setHeader(b"Allow", b", ".join(READ_METHODS))
        # A client that sent one of these is not speaking to an image server.
        self._answer(code, message, close=True)

    def _process_within(self, incoming: str) -> None:
        INCOMING.set(incoming)
        super().process()

    def _answer(self, code: int, message: str, *, close: bool) -> None:
        body = f"{message}\n".encode("utf-8")
        self.setResponseCode(code)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        if close:
            self.setHeader(b"Connection", b"close")
            self.channel.persistent = False
        self.write(body)
        self.finish()


__all__ = ["READ_METHODS", "TargetRequest", "origin_form", "refusal"]
