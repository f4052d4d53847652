"""
The status page in a real browser: headless Chromium (Debian's C{chromium}) loads it from a
proxy running in the test's reactor in front of a loopback upstream, the test reads the DOM it
rendered, and a screenshot is kept as C{tests/artifacts/status-page.png}.

Chromium is kept on loopback: every name but C{localhost} resolves to nothing and any other
connection goes to a dead proxy port; its background services are off.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.web.server import Request

from tests.e2e.lxd import DEAD_PROXY, run_process
from tests.helpers.served import REQUEST_TIMEOUT_SECONDS, Served, served

reactor: Any = _reactor
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
BROWSER_TIMEOUT_SECONDS = 120.0
ALIAS = "testos/1.0"
BIG_ALIAS = "bigos/1.0"

pytestmark = [pytest.mark.loopback, pytest.mark.browser]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (apt-get install chromium)")


async def _browse(profile: Path, *args: str) -> str:
    argv = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        # The proxy's certificate is self-signed; what is under test is the page, not TLS.
        "--ignore-certificate-errors",
        f"--user-data-dir={profile}",
        f"--proxy-server={DEAD_PROXY}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-domain-reliability", "--disable-breakpad",
        "--enable-logging=stderr", "--v=0",
        *args,
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(profile), "LANG": "C.UTF-8"}
    result = await run_process(argv, env, BROWSER_TIMEOUT_SECONDS)
    assert result.code == 0, result.err[-4000:]
    assert "Content Security Policy" not in result.err, result.err[-4000:]
    return result.out


def _count_pages(s: Served) -> list[str]:
    """The methods and paths of the requests that reach the proxy from now on."""
    seen: list[str] = []
    site = s.proxy.service.listener.site
    original = site.getResourceFor

    def counting(request: Request) -> Any:
        seen.append(request.path.decode("utf-8", "replace"))
        return original(request)

    site.getResourceFor = counting  # type: ignore[method-assign]
    return seen


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def _section(dom: str, name: str) -> str:
    match = re.search(rf'<section id="{name}".*?</section>', dom, re.S)
    assert match is not None, f"no section {name} in the DOM"
    return match.group(0)


@pytest_twisted.ensureDeferred
async def test_chromium_renders_upstreams_images_downloads_and_the_setup_line(tmp_path: Path) -> None:
    _chromium()
    async with served(reactor, tmp_path, big_rootfs_bytes=2 * 1024 * 1024) as s:
        for item in s.tree.image(ALIAS).files:
            code, _ = await s.get(f"/images/{item.path}")
            assert code == 200
        # A download in flight while the browser looks: held upstream after its first chunk.
        root = s.tree.image(BIG_ALIAS).root
        assert root is not None
        s.upstream.resource.hold(root.path)
        following = await s.client.get(f"{s.root}/images/{root.path}", unbuffered=True).addTimeout(
            REQUEST_TIMEOUT_SECONDS, reactor
        )
        try:
            await s.upstream.resource.when_held(root.path).addTimeout(REQUEST_TIMEOUT_SECONDS, reactor)
            line = (await s.status())["setup"]["line"]
            seen = _count_pages(s)
            # Long enough in the page's own time for its refresh to run at least once.
            dom = await _browse(tmp_path / "profile", "--virtual-time-budget=7000", "--dump-dom", s.root + "/")

            assert _text(_section(dom, "setup")).count(line) == 1
            upstreams = _text(_section(dom, "upstreams"))
            assert "images" in upstreams and s.upstream.url in upstreams and "online" in upstreams
            images = _text(_section(dom, "images"))
            assert ALIAS in images and "cached" in images
            downloads = _text(_section(dom, "downloads"))
            assert root.path in downloads and "client" in downloads
            assert "<progress" in _section(dom, "downloads")
            # The script refreshed the live sections under the page's content security policy.
            assert seen.count("/") >= 2, seen

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            shot.unlink(missing_ok=True)
            await _browse(
                tmp_path / "profile", "--hide-scrollbars", "--window-size=1280,1400",
                f"--screenshot={shot}", s.root + "/",
            )
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            print(f"status page screenshot: {shot}")
        finally:
            s.upstream.resource.release(root.path)
            await treq.content(following).addTimeout(REQUEST_TIMEOUT_SECONDS, reactor)
