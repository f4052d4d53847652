# -*- test-case-name: tests.test_tiers -*-
"""
Loop protection between proxies: the C{Via} header (RFC 9110 section 7.6.3).

A proxy's upstream may be another lxd-image-proxy (a tier), whose upstream may, by mistake,
lead back to the first. Without protection such a loop hangs: the looping request joins the
very download or catalogue refresh that is waiting for it, until a timeout.

  - Each proxy has a pseudonym, C{lxd-image-proxy-<12 hex>}, generated once into its state
    directory (L{instance_pseudonym}): stable across restarts, naming no host.
  - Every upstream request carries C{Via}: the chain of the client request that caused it
    (a miss's download, a catalogue refresh that request started or waits for), then
    C{1.1 <pseudonym>}. The chain travels with the work in a context variable
    (L{INCOMING}): Twisted runs a coroutine in a copy of the context it was started in, so a
    download or refresh started for a request carries that request's chain, and background
    work (prefetch, auto-update) carries none.
  - A request whose C{Via} names this proxy is answered C{508} at once (L{ViaGuard}), before
    any face: never a download, never joining one, never waiting.
  - A proxy that gets that C{508} from its upstream NAME, while its own pseudonym is in
    the loop, logs once "upstream NAME leads back to this proxy" and passes the C{508} on
    to a client that is itself a proxy; an end client (no C{Via}), or a proxy outside the
    loop, gets a C{502} naming the loop (L{LoopAnswers}).
  - Every response carries C{Via: 1.1 <pseudonym>} too: which level answered is then visible
    to an operator (curl -v); LXD and Incus clients ignore it.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import secrets
from collections.abc import Sequence

from attrs import define, field
from twisted.logger import Logger

from proxy.errors import ProxyError

PSEUDONYM_FILE = "instance-id"
PSEUDONYM_PREFIX = "lxd-image-proxy-"
PROTOCOL = "1.1"
# RFC 5842 section 7.2: the server "terminated an operation because it encountered an
# infinite loop".
LOOP_DETECTED = 508
# Set on a 508 by the proxy that found itself in the Via: which one, so that each proxy
# down the chain can tell whether it is in the loop.
LOOP_HEADER = b"Lxd-Image-Proxy-Loop"
# A request that went through this many proxies already is refused as a loop all the same
# (one through proxies that drop Via); no sane hierarchy is this deep.
MAX_HOPS = 16
# At most so many distinct loops are remembered for "log once".
_LOGGED_LOOPS = 64

_PSEUDONYM = re.compile(re.escape(PSEUDONYM_PREFIX) + "[0-9a-f]{12}")

# The Via chain of the client request the current work is done for ("" for none, or for
# background work): what the upstream requests it causes carry before this proxy's entry.
INCOMING: contextvars.ContextVar[str] = contextvars.ContextVar("incoming_via", default="")


def instance_pseudonym(directory: str) -> str:
    """
    This proxy's pseudonym, read from C{directory}/instance-id, generated there the first time.

    The file is created whole or not at all (written under a temp name, then linked), so two
    processes starting on one state directory agree on one name.
    """
    path = os.path.join(directory, PSEUDONYM_FILE)
    try:
        with open(path, encoding="ascii") as f:
            name = f.read().strip()
        if _PSEUDONYM.fullmatch(name):
            return name
    except (OSError, UnicodeDecodeError):
        pass
    name = PSEUDONYM_PREFIX + secrets.token_hex(6)
    temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temp, "w", encoding="ascii") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            # Not a name (damaged): replaced.
            os.replace(temp, path)
        else:
            os.link(temp, path)
    except FileExistsError:
        # Another process won the race: its name is the one.
        with open(path, encoding="ascii") as f:
            name = f.read().strip()
    except OSError:
        # A directory this process may not write (an admin command run by another user):
        # a name for this run alone still tells its requests apart from every proxy's.
        pass
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return name


def _split_entries(value: str) -> list[str]:
    """Split one Via field value at the commas outside comments (parentheses)."""
    entries: list[str] = []
    depth = 0
    current: list[str] = []
    for char in value:
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == "," and depth == 0:
            entries.append("".join(current))
            current = []
            continue
        current.append(char)
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def parse_via(values: Sequence[bytes]) -> list[str]:
    """
    The entries of the C{Via} fields C{values}, in order, without their comments:
    C{[b"1.1 a, HTTP/1.1 b (x)"]} gives C{["1.1 a", "HTTP/1.1 b"]}.
    """
    entries: list[str] = []
    for value in values:
        text = value.decode("latin-1")
        for entry in _split_entries(text):
            words = re.sub(r"\(.*\)", "", entry).split()
            if words:
                entries.append(" ".join(words[:2]))
    return entries


def received_by(entry: str) -> str:
    """The received-by part of a Via entry (a host[:port] or a pseudonym), lowercased."""
    words = entry.split()
    return (words[1] if len(words) > 1 else words[0]).lower()


def _message(body: str) -> str:
    """The message of a 508's body: plain text, or the C{error} of LXD's JSON envelope."""
    try:
        envelope = json.loads(body)
    except ValueError:
        return body
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), str):
        return str(envelope["error"])
    return body


def outgoing(pseudonym: str) -> bytes:
    """The Via an upstream request made now carries: the incoming chain, then this proxy."""
    incoming = INCOMING.get()
    own = f"{PROTOCOL} {pseudonym}"
    return (f"{incoming}, {own}" if incoming else own).encode("latin-1")


class UpstreamLoop(ProxyError):
    """
    An upstream answered 508: the request looped. C{code} is 508 to a client that is a proxy
    in the loop (it passes it on), 502 to any other (an end client, a proxy outside).
    """

    code = 502


@define
class ViaGuard:
    """The incoming side: this proxy's entry on responses, and the 508 for a request that looped."""

    pseudonym: str
    log = Logger()
    _logged: set[str] = field(factory=set, init=False)

    @property
    def entry(self) -> bytes:
        return f"{PROTOCOL} {self.pseudonym}".encode("ascii")

    def refusal(self, values: Sequence[bytes], path: bytes) -> str | None:
        """The message of the 508 for a request with the Via fields C{values}, or None."""
        entries = parse_via(values)
        own = self.pseudonym.lower()
        chain = ", ".join(entries)
        if own in (received_by(e) for e in entries):
            others = [received_by(e) for e in entries if received_by(e) != own]
            self._log_once(
                chain,
                "refused {path}: the request came back to this proxy ({own}) through "
                "{others} (Via: {via}); an upstream of these proxies leads back to this one",
                path=path.decode("latin-1"), own=self.pseudonym,
                others=", ".join(others) or "itself", via=chain,
            )
            return (
                f"loop detected: this request has already passed through this proxy, "
                f"{self.pseudonym} (Via: {chain}); an upstream setting leads back to it"
            )
        if len(entries) >= MAX_HOPS:
            self._log_once(
                chain, "refused {path}: it went through {hops} proxies already (Via: {via})",
                path=path.decode("latin-1"), hops=len(entries), via=chain,
            )
            return (
                f"loop detected: this request went through {len(entries)} proxies already "
                f"(Via: {chain})"
            )
        return None

    def incoming(self, values: Sequence[bytes]) -> str:
        """The chain a request with the Via fields C{values} passes on to its upstream requests."""
        return ", ".join(parse_via(values))

    def _log_once(self, key: str, message: str, **fields: object) -> None:
        if key in self._logged:
            return
        if len(self._logged) >= _LOGGED_LOOPS:
            self._logged.clear()
        self._logged.add(key)
        self.log.warn(message, **fields)


@define
class LoopAnswers:
    """The outgoing side: what a 508 from an upstream means here, logged once per upstream."""

    pseudonym: str
    log = Logger()
    _logged: set[str] = field(factory=set, init=False)

    def error(self, upstream: str, detector: str, said: str, incoming: str) -> UpstreamLoop:
        """
        The error for a 508 from C{upstream}, found by the proxy C{detector}, whose message
        was C{said}, for a request made for work whose incoming chain was C{incoming}.
        """
        own = f"{PROTOCOL} {self.pseudonym}"
        sent = f"{incoming}, {own}" if incoming else own
        names = [received_by(e) for e in parse_via([sent.encode("latin-1")])]
        said = " ".join(_message(said).split())[:1000]
        if detector.lower() in names:
            # The loop runs from the detector's entry to this proxy's: this proxy is in it.
            if upstream not in self._logged:
                self._logged.add(upstream)
                self.log.error(
                    "upstream {upstream} leads back to this proxy, {own} (Via: {via}); "
                    "its requests loop until the upstream settings change ({said})",
                    upstream=upstream, own=self.pseudonym, via=sent, said=said,
                )
            code = LOOP_DETECTED if incoming else 502
            # The detector goes with it: the next proxy down tells by it whether it is in
            # the loop too.
            return UpstreamLoop(
                f"upstream {upstream} of {self.pseudonym} leads back to it (Via: {sent}): {said}",
                code, {LOOP_HEADER: detector.encode("latin-1")} if code == LOOP_DETECTED else None,
            )
        return UpstreamLoop(
            f"upstream {upstream} of {self.pseudonym} is in a loop of proxies found by "
            f"{detector or 'one of them'}: {said}"
        )


__all__ = [
    "INCOMING", "LOOP_DETECTED", "LOOP_HEADER", "LoopAnswers", "MAX_HOPS",
    "UpstreamLoop", "ViaGuard", "instance_pseudonym", "outgoing", "parse_via",
]
