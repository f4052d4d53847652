# -*- test-case-name: tests.test_client_setup -*-
"""The one-line client set-up: the shell script a host runs to join the cache, and that line.

The line fetches the script with C{curl --pinnedpubkey}, so the host trusts nothing it has not
checked against the key printed by the proxy, and pipes it to C{sh}. The script carries the
proxy's URL and certificate; for C{lxc} and C{incus}, whichever this host has, it writes the
certificate as C{servercerts/REMOTE.crt} in the tool's configuration directory (a simplestreams
remote never fetches the server's certificate itself) and adds each remote chosen, leaving one
that already points at the proxy as it is. Everything here is pure: no I/O, no reactor.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# The script's name at the root of the HTTPS port; reserved, so no upstream may take it.
SETUP_PATH = "setup.sh"
# A remote name the client keeps for itself (LXD's "ubuntu" and "ubuntu-daily" are built in and
# cannot be changed) is added under this prefix instead.
FALLBACK_PREFIX = "cache-"

_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")


def pinned_pubkey(cert_pem: str) -> str:
    """
    The key of the first certificate in C{cert_pem} as curl's C{--pinnedpubkey} takes it:
    C{sha256//} and the base64 of the sha256 of its DER SubjectPublicKeyInfo.
    """
    cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def url_host(host: str) -> str:
    """C{host} as it goes in a URL: an IPv6 address in brackets."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return f"[{address}]" if address.version == 6 else str(address)


def parse_host_header(value: bytes | None) -> tuple[str, int | None] | None:
    """
    The host and port a client reached the proxy by, from its C{Host} header; None when the
    header is absent or anything but a plain name or address (it ends up in a shell script).
    """
    if not value:
        return None
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    port: int | None = None
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:]))):
            return None
        try:
            host = str(ipaddress.IPv6Address(inside))
        except ValueError:
            return None
        if rest:
            port = int(rest[1:])
    else:
        host, colon, port_text = text.partition(":")
        if colon:
            if not _PORT.fullmatch(port_text):
                return None
            port = int(port_text)
        if not _HOST_NAME.fullmatch(host):
            return None
    if port is not None and not 0 < port < 65536:
        return None
    return host, port


def base_url(host: str, port: int) -> str:
    """C{https://HOST:PORT}, the proxy's HTTPS address as clients name it."""
    return f"https://{url_host(host)}:{port}"


def setup_line(proxy_url: str, pin: str, remotes: Sequence[str]) -> str:
    """
    The command an admin runs on a host: fetch the script, checking the proxy's key, and run
    it for C{remotes} (upstream names, each optionally C{UPSTREAM=REMOTE}).
    """
    names = " ".join(remotes)
    return f"curl -fsS --pinnedpubkey '{pin}' -k {proxy_url}/{SETUP_PATH} | sh -s -- {names}"


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def setup_script(proxy_url: str, cert_pem: str, upstreams: Sequence[str]) -> str:
    """
    The POSIX shell script served at C{/setup.sh}: see the module docstring and the script's
    own header. C{proxy_url} is L{base_url}'s; C{upstreams} the configured names.
    """
    return _SCRIPT.format(
        proxy=_sh_quote(proxy_url),
        upstreams=_sh_quote(" ".join(upstreams)),
        cert=_sh_quote(cert_pem.strip()),
        fallback=FALLBACK_PREFIX,
        url_comment=proxy_url,
    )


# Braces of the shell are doubled for str.format.
_SCRIPT = """\
#!/bin/sh
# Joins this host to the lxd-image-proxy at {url_comment}.
#
#   sh setup.sh [UPSTREAM[=REMOTE]]...      (no argument: every upstream)
#
# For lxc and incus, whichever are installed, as the user running it: writes the proxy's
# certificate as servercerts/REMOTE.crt in the tool's configuration directory ($LXD_CONF,
# ~/snap/lxd/common/config for the snap, else ~/.config/lxc; $INCUS_CONF, else
# ~/.config/incus) and adds REMOTE (by default the upstream's name) as a simplestreams
# remote of the proxy's /UPSTREAM. A remote of that name that points elsewhere is replaced;
# one the tool keeps for itself (lxc's ubuntu, ubuntu-daily) is added as {fallback}REMOTE
# instead. Running it again changes nothing but the certificate files.
set -eu

PROXY={proxy}
UPSTREAMS={upstreams}
CERT={cert}

status=0

say() {{
    printf '%s\\n' "$*"
}}

complain() {{
    printf 'setup.sh: %s\\n' "$*" >&2
    status=1
}}

known_upstream() {{
    for known in $UPSTREAMS; do
        if [ "$known" = "$1" ]; then
            return 0
        fi
    done
    return 1
}}

conf_dir() {{
    if [ "$1" = lxc ]; then
        if [ -n "${{LXD_CONF:-}}" ]; then
            say "$LXD_CONF"
        else
            case $(command -v lxc) in
                /snap/*) say "$HOME/snap/lxd/common/config" ;;
                *) say "$HOME/.config/lxc" ;;
            esac
        fi
    elif [ -n "${{INCUS_CONF:-}}" ]; then
        say "$INCUS_CONF"
    else
        say "$HOME/.config/incus"
    fi
}}

# The URL of remote $2 of tool $1, or nothing.
remote_url() {{
    "$1" remote list --format csv 2>/dev/null |
        awk -F, -v name="$2" '{{ sub(/ \\(current\\)$/, "", $1) }} $1 == name {{ print $2; exit }}'
}}

# Point remote $3 of tool $1 at upstream $2.
point_remote() {{
    tool=$1
    url="$PROXY/$2"
    chosen=""
    for name in "$3" "{fallback}$3"; do
        current=$(remote_url "$tool" "$name")
        if [ -z "$current" ] || [ "$current" = "$url" ]; then
            chosen=$name
            break
        fi
        if "$tool" remote remove "$name" >/dev/null 2>&1; then
            say "$tool: remote $name pointed at $current; replacing it"
            current=""
            chosen=$name
            break
        fi
        say "$tool: remote $name ($current) is built in and cannot be changed"
    done
    if [ -z "$chosen" ]; then
        complain "$tool: no free name for remote $3; choose one: $2=NAME"
        return 0
    fi
    dir=$(conf_dir "$tool")
    mkdir -p "$dir/servercerts"
    printf '%s\\n' "$CERT" >"$dir/servercerts/$chosen.crt"
    if [ "$current" = "$url" ]; then
        say "$tool: remote $chosen is set up ($url)"
    elif "$tool" remote add "$chosen" "$url" --protocol simplestreams --public >/dev/null; then
        say "$tool: added remote $chosen ($url)"
    else
        complain "$tool: could not add remote $chosen ($url)"
    fi
}}

# Everything runs from here, the script's last line: a download cut short runs nothing.
main() {{
    if [ "$#" -eq 0 ]; then
        # Word splitting of the configured names is wanted here.
        # shellcheck disable=SC2086
        set -- $UPSTREAMS
    fi

    tools=""
    for tool in lxc incus; do
        if command -v "$tool" >/dev/null 2>&1; then
            tools="$tools $tool"
        fi
    done
    if [ -z "$tools" ]; then
        complain "neither lxc nor incus is installed here"
        exit 1
    fi

    for wanted in "$@"; do
        upstream=${{wanted%%=*}}
        remote=${{wanted#*=}}
        case $remote in
            "" | .* | *[!A-Za-z0-9._-]*)
                complain "$remote is not a usable remote name"
                continue
                ;;
        esac
        if ! known_upstream "$upstream"; then
            complain "$upstream is not an upstream of $PROXY (it has: $UPSTREAMS)"
            continue
        fi
        for tool in $tools; do
            point_remote "$tool" "$upstream" "$remote"
        done
    done
    exit "$status"
}}

main "$@"
"""


__all__ = [
    "FALLBACK_PREFIX",
    "SETUP_PATH",
    "base_url",
    "parse_host_header",
    "pinned_pubkey",
    "setup_line",
    "setup_script",
    "url_host",
]
