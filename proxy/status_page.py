# -*- test-case-name: tests.test_status_page -*-
"""The HTTPS port's pages for people and scripts: C{/} (HTML), C{/status.json} and C{/setup.sh}.

The page is rendered on the server from a L{Status} snapshot, every value escaped, and reads
whole without JavaScript; a few lines of script re-fetch it every few seconds and swap in the
sections marked C{data-live} (downloads, cache use, upstreams), so progress moves. A content
security policy allows that one script (by its hash) and nothing else.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import socket
from html import escape

from twisted.web.server import Request

from proxy.client_networks import client_host
from proxy.client_setup import SETUP_PATH, parse_host_header, setup_script
from proxy.config import Config
from proxy.errors import Unavailable
from proxy.status import DownloadState, ImageState, Status, StatusSource, UpstreamState, status_json
from proxy.web import AsyncResource

STATUS_JSON_PATH = "status.json"
REFRESH_MILLISECONDS = 3000

# Swaps in the live sections of a fresh copy of the page; nothing else.
_SCRIPT = (
    "setInterval(async () => { try {"
    " const r = await fetch(location.pathname, {cache: 'no-store'}); if (!r.ok) return;"
    " const d = new DOMParser().parseFromString(await r.text(), 'text/html');"
    " for (const e of document.querySelectorAll('[data-live]')) {"
    " const n = d.getElementById(e.id); if (n) e.replaceWith(n); }"
    " } catch (e) {} }, %d);" % (REFRESH_MILLISECONDS,)
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("ascii")).digest()).decode("ascii")
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; connect-src 'self'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
).encode("ascii")

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; padding: 0 1em;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: 0.25em 0.6em;
border-bottom: 1px solid #ddd; vertical-align: top; } th { background: #f4f4f6; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f4f4f6; padding: 0.8em; overflow-x: auto; white-space: pre-wrap;
      word-break: break-all; }
.ok { color: #1a7f37; } .bad { color: #cf222e; font-weight: 600; } .muted { color: #6e6e73; }
progress { width: 10em; } #cache th { width: 16em; }
"""


def client_address(request: Request, config: Config) -> tuple[str, int]:
    """
    The host and port clients should use: the certificate's first configured name
    (C{server.tls_names}), else the name this request came by (its C{Host} header), else this
    host's name; the port this request came to.
    """
    parsed = parse_host_header(request.getHeader(b"Host"))
    port = parsed[1] if parsed is not None and parsed[1] is not None else None
    if port is None:
        port = int(getattr(request.getHost(), "port", 0) or 8443)
    if config.server.tls_names:
        return config.server.tls_names[0], port
    if parsed is not None:
        return parsed[0], port
    return socket.gethostname(), port


class _FromStatus(AsyncResource):
    """A page made from the status source for the host and port this request came to."""

    isLeaf = True

    def __init__(self, source: StatusSource, config: Config) -> None:
        super().__init__()
        self._source = source
        self._config = config

    async def handle(self, request: Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        return await self.body(request, *client_address(request, self._config))

    async def body(self, request: Request, host: str, port: int) -> bytes:
        raise NotImplementedError


class StatusPage(_FromStatus):
    """C{/}: the status page."""

    async def body(self, request: Request, host: str, port: int) -> bytes:
        status = await self._source.snapshot(host, port, client_host(request))
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", _CSP)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return render_html(status).encode("utf-8")


class StatusJson(_FromStatus):
    """C{/status.json}: the same snapshot for scripts."""

    async def body(self, request: Request, host: str, port: int) -> bytes:
        status = await self._source.snapshot(host, port, client_host(request))
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(status_json(status), indent=1).encode("utf-8") + b"\n"


class SetupScript(_FromStatus):
    """C{/setup.sh}: the client set-up script, for hosts that reach the proxy as this one did."""

    async def body(self, request: Request, host: str, port: int) -> bytes:
        setup = self._source.setup(host, port, client_host(request))
        pem = self._source.certificate_pem()
        if setup is None or not pem:
            raise Unavailable("the server certificate is not loaded yet")
        request.setHeader(b"Content-Type", b"text/x-shellscript; charset=utf-8")
        return setup_script(setup.proxy_url, pem, setup.remotes).encode("utf-8")


# -- rendering ------------------------------------------------------------------------------


def size_text(n: int | None) -> str:
    """Bytes in binary units, as the README and the admin command write sizes."""
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def age_text(when: float | None, now: float) -> str:
    """How long ago C{when} was, coarsely: C{"42 s ago"}, C{"3 min ago"}, C{"2 h ago"}."""
    if when is None:
        return "never"
    seconds = max(0, int(now - when))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def _utc(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _time(when: float | None, now: float) -> str:
    """An age, with the exact time on hover and for machines."""
    if when is None:
        return '<span class="muted">never</span>'
    iso = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat()
    return f'<time datetime="{escape(iso)}" title="{escape(_utc(when))}">{escape(age_text(when, now))}</time>'


def _upstream_row(u: UpstreamState, now: float) -> str:
    if u.forced:
        state = '<span class="bad">offline</span> by configuration'
    elif not u.online:
        since = f" since {_time(u.offline_since, now)}" if u.offline_since is not None else ""
        why = f" ({escape(u.reason)})" if u.reason else ""
        state = f'<span class="bad">offline</span>{since}{why}'
    else:
        state = '<span class="ok">online</span>'
    via = f" via {escape(u.via)}" if u.via else ""
    if u.mirrors:
        down = [m for m in u.mirrors if m.down]
        state += f"; {len(u.mirrors) - len(down)} of {len(u.mirrors)} mirrors up" + "".join(
            f'<br><span class="bad">down</span> {escape(m.url)}'
            + (f" ({escape(m.reason)})" if m.reason else "")
            for m in down
        )
    return (
        f'<tr data-upstream="{escape(u.name)}"><td>{escape(u.name)}</td><td>{escape(u.url)}{via}</td>'
        f"<td>{escape(u.protocol)}</td><td>{state}</td>"
        f"<td>{_time(u.catalogue_checked_at, now)}</td></tr>"
    )


def _download_row(d: DownloadState) -> str:
    if d.size > 0:
        percent = min(100.0, 100.0 * d.received / d.size)
        bar = f'<progress max="{d.size}" value="{min(d.received, d.size)}">{percent:.0f} %</progress> {percent:.0f} %'
        amount = f"{size_text(d.received)} of {size_text(d.size)}"
    else:
        bar = ""
        amount = size_text(d.received)
    kind = ("prefetch" if d.background else "client") + (", queued" if d.queued else "")
    return (
        f"<tr><td>{escape(d.upstream)}</td><td>{escape(d.subject)}</td><td>{kind}</td>"
        f'<td class="n">{amount}</td><td>{bar}</td><td class="n">{d.followers}</td></tr>'
    )


def _image_row(i: ImageState, now: float) -> str:
    aliases = ", ".join(i.aliases) if i.aliases else "-"
    return (
        f"<tr><td>{escape(i.upstream)}</td><td>{escape(aliases)}</td>"
        f'<td><code title="{escape(i.fingerprint)}">{escape(i.fingerprint[:12])}</code></td>'
        f"<td>{escape(i.type)}</td><td>{escape(i.architecture)}</td><td>{escape(i.version)}</td>"
        f'<td class="n">{size_text(i.size)}</td><td>{escape(i.status)}</td>'
        f'<td class="n">{i.uses}</td><td>{_time(i.last_used_at, now)}</td></tr>'
    )


def _table(head: list[str], rows: list[str], empty: str, numeric: frozenset[int] = frozenset()) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    cells = "".join(
        f'<th class="n">{escape(h)}</th>' if n in numeric else f"<th>{escape(h)}</th>"
        for n, h in enumerate(head)
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(status: Status) -> str:
    """The whole page for C{status}."""
    now = status.generated_at
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>lxd-image-proxy</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>lxd-image-proxy <span class=\"muted\">{escape(status.version)}</span></h1>",
        f'<p class="muted" id="generated" data-live>As of {escape(_utc(now))}. '
        f'The same data as JSON: <a href="/{STATUS_JSON_PATH}">{STATUS_JSON_PATH}</a>.</p>',
    ]
    parts.append('<section id="setup"><h2>Add a host</h2>')
    setup = status.setup
    if setup is None:
        parts.append('<p class="muted">The server certificate is not loaded yet.</p>')
    else:
        parts.append(
            "<p>Run this on an LXD or Incus host, as the user whose <code>lxc</code> or "
            "<code>incus</code> should use the cache. It checks the proxy's key before it "
            "trusts anything, stores the certificate for each remote and adds the remotes "
            "(running it again is harmless):</p>"
            f'<pre id="setup-line"><code>{escape(setup.line)}</code></pre>'
            f"<p>Certificate sha256 fingerprint: <code id=\"fingerprint\">{escape(setup.fingerprint)}</code>"
            f"<br>Public key pin: <code>{escape(setup.pinned_pubkey)}</code>"
            f'<br>The script alone: <a href="/{SETUP_PATH}">{escape(setup.script_url)}</a>; '
            "give <code>UPSTREAM=NAME</code> to choose a remote's name.</p>"
        )
    parts.append("</section>")

    parts.append('<section id="upstreams" data-live><h2>Upstreams</h2>')
    parts.append(_table(
        ["name", "URL", "protocol", "state", "catalogue checked"],
        [_upstream_row(u, now) for u in status.upstreams], "No upstream is configured.",
    ))
    parts.append("</section>")

    cache, usage = status.cache, status.usage
    cap = f" of {size_text(cache.max_size)} (<code>max_size</code>)" if cache.max_size else " (no <code>max_size</code>)"
    free = size_text(cache.free_bytes)
    if cache.disk_bytes is not None:
        free += f" of {size_text(cache.disk_bytes)}"
    keep = f"; <code>min_free</code> keeps {size_text(cache.min_free)}" if cache.min_free else ""
    ratio = f"{usage.hit_ratio * 100:.1f} %" if usage.hit_ratio is not None else "no request yet"
    pinned = str(cache.pinned_files) if cache.pinned_files is not None else "not counted yet"
    meter = ""
    if cache.max_size:
        meter = f' <meter min="0" max="{cache.max_size}" value="{min(cache.used_bytes, cache.max_size)}"></meter>'
    parts.append(
        '<section id="cache" data-live><h2>Cache</h2><table><tbody>'
        f"<tr><th>stored</th><td>{size_text(cache.used_bytes)}{cap}{meter}</td></tr>"
        f"<tr><th>files</th><td>{cache.files} ({pinned} pinned)</td></tr>"
        f"<tr><th>free on its file system</th><td>{free}{keep}</td></tr>"
        f"<tr><th>hit ratio</th><td>{ratio} ({usage.hits} hits, {usage.misses} misses)</td></tr>"
        f"<tr><th>served from the cache</th><td>{size_text(usage.bytes_from_cache)}</td></tr>"
        f"<tr><th>fetched from upstreams</th><td>{size_text(usage.bytes_from_upstream)}</td></tr>"
        f"<tr><th>not stored for lack of room</th><td>{usage.not_stored}</td></tr>"
        "</tbody></table></section>"
    )

    parts.append('<section id="downloads" data-live><h2>Downloads in progress</h2>')
    parts.append(_table(
        ["upstream", "file", "for", "received", "progress", "clients following"],
        [_download_row(d) for d in status.downloads], "None right now.", frozenset({3, 5}),
    ))
    if status.downloads_total > len(status.downloads):
        parts.append(f'<p class="muted">and {status.downloads_total - len(status.downloads)} more.</p>')
    parts.append("</section>")

    parts.append('<section id="images"><h2>Stored images</h2>')
    if status.images_as_of is None:
        parts.append('<p class="muted">Not listed yet.</p>')
    else:
        parts.append(_table(
            ["upstream", "aliases", "fingerprint", "type", "architecture", "version", "size",
             "state", "uses", "last used"],
            [_image_row(i, now) for i in status.images], "No image is stored yet.",
            frozenset({6, 8}),
        ))
        shown = len(status.images)
        more = (
            f" The {shown} listed are the pinned and most recently used of {status.images_total};"
            " <code>lxd-image-proxy list</code> shows them all."
            if status.images_total > shown else ""
        )
        parts.append(f'<p class="muted">As found {escape(age_text(status.images_as_of, now))}.{more}</p>')
    parts.append("</section>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    return "".join(parts)


__all__ = [
    "STATUS_JSON_PATH",
    "SetupScript",
    "StatusJson",
    "StatusPage",
    "age_text",
    "client_address",
    "render_html",
    "size_text",
]
