"""Errors that map to an HTTP answer, and the configuration error."""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration cannot be used; the message is one sentence for the admin."""


class ProxyError(Exception):
    """A failure with an HTTP status and a one-line message for the client."""

    code: int = 500

    def __init__(
        self, message: str, code: int | None = None, headers: dict[bytes, bytes] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        # extra response headers, such as Retry-After on a 503
        self.headers: dict[bytes, bytes] = dict(headers or {})


class BadRequest(ProxyError):
    code = 400


class Forbidden(ProxyError):
    code = 403


class NotFound(ProxyError):
    code = 404


class MethodNotAllowed(ProxyError):
    code = 405


class RangeNotSatisfiable(ProxyError):
    code = 416


class UpstreamFailed(ProxyError):
    code = 502


class VerificationFailed(UpstreamFailed):
    """An upstream body did not match the size or sha256 it must have."""


class Unavailable(ProxyError):
    code = 503


class UpstreamTimeout(ProxyError):
    code = 504


class InsufficientStorage(ProxyError):
    """A miss that cannot be received: the cache's file system has no room even for its temp file."""

    code = 507
