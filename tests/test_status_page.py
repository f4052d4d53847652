"""The status page, C{/status.json} and C{/setup.sh} of a running proxy, and the page's rendering.

The loopback tests run the whole proxy in the test's reactor in front of a generated tree served
on 127.0.0.1 (L{tests.helpers.served}); the rendering tests feed L{render_html} a snapshot made
by hand.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from treq import content
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from proxy.client_setup import pinned_pubkey
from proxy.config import ConfigError, parse_config
from proxy.status import (
    CacheUse,
    ClientSetup,
    DownloadState,
    ImageState,
    Status,
    UpstreamState,
    Usage,
    status_json,
)
from proxy.mirrors import MirrorState
from proxy.status_page import age_text, client_address, render_html, size_text
from tests.helpers.logs import Logged
from tests.helpers.served import REQUEST_TIMEOUT_SECONDS, Served, served

reactor: Any = _reactor
ALIAS = "testos/1.0"
BIG_ALIAS = "bigos/1.0"


# -- a running proxy -------------------------------------------------------------------------


async def _fetch_image(s: Served, alias: str) -> None:
    for item in s.tree.image(alias).files:
        code, _ = await s.get(f"/images/{item.path}")
        assert code == 200


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_status_json_shows_upstream_cache_use_stored_image_and_setup_line(tmp_path: Path) -> None:
    async with served(reactor, tmp_path, cache={"max_size": "1GiB"}) as s:
        await _fetch_image(s, ALIAS)
        # The same file again: a hit.
        await _fetch_image(s, ALIAS)
        # Uses reach the records with the usage flush (every usage_flush_interval).
        await s.proxy.cache.flush_usage()
        status = await s.status()

        [upstream] = status["upstreams"]
        assert upstream["name"] == "images" and upstream["online"] is True
        assert upstream["catalogue_checked_at"] is not None
        image = s.tree.image(ALIAS)
        listed = {i["fingerprint"]: i for i in status["images"]}
        assert ALIAS in listed[image.fingerprint]["aliases"]
        assert listed[image.fingerprint]["status"] == "cached"
        assert listed[image.fingerprint]["uses"] >= 1
        assert status["images_total"] == len(status["images"]) == 1
        assert status["cache"]["used_bytes"] == image.size
        assert status["cache"]["max_size"] == 1 << 30
        assert status["cache"]["files"] == 2 and status["cache"]["pinned_files"] == 0
        assert status["usage"]["hits"] == 2 and status["usage"]["misses"] == 2
        assert status["usage"]["hit_ratio"] == 0.5
        assert status["downloads"] == []

        pin = pinned_pubkey(s.proxy.cert_pem.decode("ascii"))
        setup = status["setup"]
        assert setup["pinned_pubkey"] == pin
        assert setup["line"] == (
            f"curl -fsS --pinnedpubkey '{pin}' -k https://localhost:{s.proxy.port}/setup.sh"
            " | sh -s -- images"
        )
        assert setup["fingerprint"] == s.proxy.service.listener.certificate.fingerprint


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_download_in_flight_shows_its_progress_and_followers(tmp_path: Path) -> None:
    async with served(reactor, tmp_path, big_rootfs_bytes=2 * 1024 * 1024) as s:
        root = s.tree.image(BIG_ALIAS).root
        assert root is not None
        s.upstream.resource.hold(root.path)
        url = f"{s.root}/images/{root.path}"
        # Two clients of one download: headers come at once, the body waits upstream.
        responses: list[Any] = []
        for _ in range(2):
            responses.append(await s.client.get(url, unbuffered=True).addTimeout(REQUEST_TIMEOUT_SECONDS, reactor))
        await s.upstream.resource.when_held(root.path).addTimeout(REQUEST_TIMEOUT_SECONDS, reactor)
        try:
            status = await s.status()
            [download] = status["downloads"]
            assert download["upstream"] == "images"
            assert root.path in download["subject"]
            assert download["size"] == root.size
            assert 0 < download["received"] < root.size
            assert download["followers"] == 2
            assert download["background"] is False
            code, page = await s.get("/")
            assert code == 200
            assert b"<progress" in page and root.path.encode() in page
        finally:
            s.upstream.resource.release(root.path)
            bodies = [await content(r).addTimeout(REQUEST_TIMEOUT_SECONDS, reactor) for r in responses]
        assert [hashlib.sha256(b).hexdigest() for b in bodies] == [root.sha256] * 2
        assert (await s.status())["downloads"] == []


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_the_page_is_html_with_the_setup_line_and_only_its_own_script(tmp_path: Path) -> None:
    async with served(reactor, tmp_path) as s:
        d: Deferred[Any] = s.client.get(s.root + "/")
        response = await d.addTimeout(REQUEST_TIMEOUT_SECONDS, reactor)
        page = (await content(response)).decode("utf-8")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"Content-Type") == [b"text/html; charset=utf-8"]
        status = await s.status()
        assert _unescape(_between(page, '<pre id="setup-line"><code>', "</code>")) == status["setup"]["line"]
        csp = response.headers.getRawHeaders(b"Content-Security-Policy")[0].decode()
        [script] = re.findall(r"<script>(.*?)</script>", page, re.S)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in csp
        assert "default-src 'none'" in csp
        # HEAD: the headers of the same page.
        head = await s.client.head(s.root + "/").addTimeout(REQUEST_TIMEOUT_SECONDS, reactor)
        assert head.code == 200
        # What used to be the root's text is still a 405 for other methods.
        post = await s.client.post(s.root + "/status.json").addTimeout(REQUEST_TIMEOUT_SECONDS, reactor)
        assert post.code == 405


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_setup_script_carries_the_served_certificate_and_address(tmp_path: Path) -> None:
    async with served(reactor, tmp_path, names=("images", "ubuntu")) as s:
        code, body = await s.get("/setup.sh")
        assert code == 200
        script = body.decode("utf-8")
        assert script.startswith("#!/bin/sh\n")
        assert f"PROXY='https://localhost:{s.proxy.port}'\n" in script
        assert "UPSTREAMS='images ubuntu'\n" in script
        assert s.proxy.cert_pem.decode("ascii").strip() in script


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_startup_log_gives_the_same_setup_line_as_the_page(tmp_path: Path, logged: Logged) -> None:
    async with served(reactor, tmp_path) as s:
        status = await s.status()
        [event] = logged.matching("client set-up")
        # The log names the address the proxy listens on; the page, the name the browser used.
        assert event["line"] == status["setup"]["line"].replace("https://localhost:", "https://127.0.0.1:")
        assert event["page"] == f"https://127.0.0.1:{s.proxy.port}/"


# -- where clients are told to go -------------------------------------------------------------


def _config(tls_names: list[str] | None = None) -> Any:
    server: dict[str, Any] = {"listen": ["127.0.0.1:0"]}
    if tls_names is not None:
        server["tls_names"] = tls_names
    return parse_config(
        {"server": server, "cache": {"dir": "/nonexistent"}, "upstreams": {"images": {"url": "https://a.test"}}},
        base_dir="/",
    )


def _request(host: bytes | None) -> Request:
    request = DummyRequest([b""])
    if host is not None:
        request.requestHeaders.setRawHeaders(b"Host", [host])
    # A stand-in with the two methods client_address reads.
    return cast(Request, request)


@pytest.mark.parametrize(
    "host, expected",
    [
        (b"cache.lan:8443", ("cache.lan", 8443)),
        (b"10.0.0.5:9443", ("10.0.0.5", 9443)),
        (b"[fd00::1]:8443", ("fd00::1", 8443)),
        # Anything else is not put in a shell script: this host's name instead.
        (b"evil';reboot;':8443", None),
        (b"cache.lan:99999", None),
    ],
)
def test_the_setup_address_is_the_name_the_client_used(host: bytes, expected: tuple[str, int] | None) -> None:
    found = client_address(_request(host), _config())
    if expected is None:
        assert "'" not in found[0] and ";" not in found[0]
    else:
        assert found == expected


def test_the_setup_address_prefers_the_certificates_configured_name() -> None:
    assert client_address(_request(b"10.0.0.5:9443"), _config(["cache.lan"])) == ("cache.lan", 9443)


@pytest.mark.parametrize("name", ["status.json", "setup.sh"])
def test_upstreams_may_not_take_the_pages_names(name: str) -> None:
    with pytest.raises(ConfigError, match=f"upstreams.{re.escape(name)}: an upstream name"):
        parse_config({"upstreams": {name: {"url": "https://a.test"}}}, base_dir="/")


# -- rendering ----------------------------------------------------------------------------------


def _status(**changes: Any) -> Status:
    now = 1_700_000_000.0
    values: dict[str, Any] = dict(
        version="0.1.0",
        generated_at=now,
        setup=ClientSetup(
            line="curl -fsS --pinnedpubkey 'sha256//AAAA' -k https://cache.lan:8443/setup.sh | sh -s -- images",
            proxy_url="https://cache.lan:8443", script_url="https://cache.lan:8443/setup.sh",
            fingerprint="ab" * 32, pinned_pubkey="sha256//AAAA", remotes=("images",),
        ),
        upstreams=(
            UpstreamState("images", "https://images.example", "simplestreams", True, False, None, "", now - 90),
            UpstreamState("down", "https://down.example", "simplestreams", False, False, now - 600,
                          "connection refused", now - 7200),
            UpstreamState("gapped", "https://gapped.example", "simplestreams", False, True, None, "", None),
        ),
        cache=CacheUse(used_bytes=3 << 30, files=10, pinned_files=4, max_size=10 << 30, min_free=0,
                       free_bytes=50 << 30, disk_bytes=100 << 30),
        usage=Usage(hits=3, misses=1, hit_ratio=0.75, bytes_from_cache=1 << 30, bytes_from_upstream=1 << 29,
                    not_stored=0),
        downloads=(DownloadState("images", "images/x/rootfs.squashfs", 1 << 20, 4 << 20, 3, False),),
        downloads_total=1,
        images=(ImageState("images", ("<script>alert(1)</script>", "debian/12"), "f" * 64, "container",
                           "x86_64", "20240101_00:00", 1 << 28, "pinned", 7, now - 30),),
        images_total=1,
        images_as_of=now - 5,
    )
    values.update(changes)
    return Status(**values)


def test_rendering_escapes_every_value_and_reads_without_script() -> None:
    page = render_html(_status())
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;, debian/12" in page
    assert page.count("<script>") == 1
    # Everything a person needs is in the markup itself.
    text = re.sub(r"<script>.*?</script>|<style>.*?</style>|<[^>]+>", " ", page, flags=re.S)
    for expected in (
        "images", "online", "offline", "connection refused", "by configuration",
        "3.0 GiB of 10.0 GiB", "75.0 %", "images/x/rootfs.squashfs", "1.0 MiB of 4.0 MiB", "25 %",
        "debian/12", "pinned", "ffffffffffff", "30 s ago", "ab" * 32, "sha256//AAAA",
    ):
        assert expected in text, expected
    assert "| sh -s -- images" in text


def test_rendering_shows_the_mirrors_and_which_are_down() -> None:
    now = 1_700_000_000.0
    mirrored = UpstreamState(
        "images", "https://a.example", "simplestreams", True, False, None, "", now - 90,
        mirrors=(
            MirrorState("https://a.example", True, "connection refused <x>", now - 20, now + 5),
            MirrorState("https://b.example", False),
        ),
    )
    page = render_html(_status(upstreams=(mirrored,)))
    text = " ".join(
        re.sub(r"<script>.*?</script>|<style>.*?</style>|<[^>]+>", " ", page, flags=re.S).split()
    )
    assert "1 of 2 mirrors up" in text
    assert "down https://a.example (connection refused &lt;x&gt;)" in text
    assert "https://b.example" not in text


def test_rendering_says_what_is_not_known_yet() -> None:
    page = render_html(_status(setup=None, images=(), images_total=0, images_as_of=None, downloads=(),
                               downloads_total=0))
    assert "The server certificate is not loaded yet." in page
    assert "Not listed yet." in page
    assert "None right now." in page


def test_a_long_image_list_says_how_many_are_not_shown() -> None:
    page = render_html(_status(images_total=500))
    assert "The 1 listed are the pinned and most recently used of 500" in page


def test_sizes_and_ages_read_as_people_write_them() -> None:
    assert [size_text(n) for n in (0, 1023, 1024, 5 << 30)] == ["0 B", "1023 B", "1.0 KiB", "5.0 GiB"]
    assert [age_text(100.0 - d, 100.0) for d in (5, 600, 3 * 3600)] == ["5 s ago", "10 min ago", "3 h ago"]
    assert age_text(None, 0.0) == "never"


def _between(text: str, start: str, end: str) -> str:
    head = text.index(start) + len(start)
    return text[head:text.index(end, head)]


def _unescape(text: str) -> str:
    return html.unescape(text)


def test_status_json_is_plain_json() -> None:
    document = json.loads(json.dumps(status_json(_status())))
    assert document["images"][0]["aliases"] == ["<script>alert(1)</script>", "debian/12"]
    assert document["usage"]["hit_ratio"] == 0.75


def test_a_queued_download_is_marked_so() -> None:
    queued = DownloadState("images", "images/y/rootfs.squashfs", 0, 4 << 20, 1, False, queued=True)
    page = render_html(_status(downloads=(queued,)))
    assert "<td>client, queued</td>" in page
    assert status_json(_status(downloads=(queued,)))["downloads"][0]["queued"] is True
