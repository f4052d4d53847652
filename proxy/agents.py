"""The User-Agent sent upstream for a client family's metadata.

Some image servers answer LXD and Incus clients with different catalogues, chosen by
User-Agent (images.linuxcontainers.org serves LXD clients a restricted one, PROTOCOLS.md §5.1).
So the proxy keeps each upstream's metadata per client family and refreshes a family's copy with
the User-Agent of the last client of that family it served, or with a stand-in of that family
before any came. Image files are the same bytes for everyone and are fetched under the proxy's
own name.
"""

from __future__ import annotations

from proxy import __version__
from proxy.catalogue import Family
from proxy.lxd_model import client_info

# Sent for a family before any of its clients came (prefetch at start-up, say).
DEFAULT_AGENTS: dict[Family, bytes] = {
    "lxd": f"LXD 5.21 (lxd-image-proxy {__version__})".encode("ascii"),
    "incus": f"Incus 6.0 (lxd-image-proxy {__version__})".encode("ascii"),
}
_PREFIXES: dict[Family, bytes] = {"lxd": b"LXD ", "incus": b"Incus "}
# A User-Agent longer than this is not forwarded: it is no real client's.
MAX_AGENT_BYTES = 512
# User-Agent values whose family is remembered (cleared when full: any client may send any).
_KNOWN_AGENTS = 256


class ClientAgents:
    """The last User-Agent seen from each client family."""

    def __init__(self) -> None:
        self._seen: dict[Family, bytes] = {}
        # User-Agent -> (its family, whether it is a real client's): a fleet sends a few
        # values all day, and this is asked for every catalogue request.
        self._known: dict[bytes | None, tuple[Family, bool]] = {}

    def note(self, user_agent: bytes | None) -> Family:
        """Remember C{user_agent} for its family, and return that family."""
        known = self._known.get(user_agent)
        if known is None:
            family = client_info(user_agent).family
            # Only a real client's: anything else (curl, a browser) is served as LXD but says
            # nothing of what the upstream answers LXD.
            real = bool(
                user_agent
                and user_agent.startswith(_PREFIXES[family])
                and len(user_agent) <= MAX_AGENT_BYTES
                and _printable(user_agent)
            )
            if len(self._known) >= _KNOWN_AGENTS:
                self._known.clear()
            known = self._known[user_agent] = (family, real)
        family, real = known
        if real and user_agent is not None:
            self._seen[family] = user_agent
        return family

    def for_family(self, family: Family) -> bytes:
        return self._seen.get(family, DEFAULT_AGENTS[family])


def _printable(value: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in value)


__all__ = ["ClientAgents", "DEFAULT_AGENTS"]
