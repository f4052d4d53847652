"""
Tiers: a proxy whose upstream is another lxd-image-proxy, and loop protection (C{proxy.via}).

Real proxies on loopback, each the parent's certificate pinned by C{ca_file}, in front of the
real HTTPS test upstream; the client is treq. The real C{lxc} client drives the same shapes in
C{tests/e2e/test_tiers_lxc.py}.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.filepath import FilePath
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from proxy.tls import ensure_server_certificate
from proxy.via import (
    INCOMING, LOOP_HEADER, MAX_HOPS, LoopAnswers, PSEUDONYM_FILE, ViaGuard, instance_pseudonym, outgoing,
    parse_via,
)
from tests.helpers.certs import make_ca
from tests.helpers.logs import Logged
from tests.helpers.proxy_process import https_client
from tests.helpers.running_proxy import RunningProxy, start_proxy
from tests.helpers.tree import Tree, build_tree
from tests.helpers.upstream import RunningUpstream, start_https_upstream

reactor: Any = _reactor
ALIAS = "testos/1.0"
INDEX = "streams/v1/index.json"
LXD_AGENT = b"LXD 5.0.2 (Linux; x86_64; 6.1.0; debian; 12)"
INCUS_AGENT = b"Incus 6.0.1 (Linux; x86_64; 6.1.0; debian; 12)"


# -- the pieces, pure ------------------------------------------------------------------------------


def test_the_pseudonym_is_made_once_and_kept(tmp_path: Path) -> None:
    first = instance_pseudonym(str(tmp_path))
    assert re.fullmatch(r"lxd-image-proxy-[0-9a-f]{12}", first)
    assert instance_pseudonym(str(tmp_path)) == first
    assert (tmp_path / PSEUDONYM_FILE).read_text().strip() == first
    # Another state directory, another proxy.
    assert instance_pseudonym(str(tmp_path / "other")) != first
    # A damaged file is replaced, not trusted.
    (tmp_path / PSEUDONYM_FILE).write_text("not a name\n")
    again = instance_pseudonym(str(tmp_path))
    assert again != "not a name" and re.fullmatch(r"lxd-image-proxy-[0-9a-f]{12}", again)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(PSEUDONYM_FILE + ".")] == []


def test_via_is_parsed_as_rfc_9110_says() -> None:
    assert parse_via([b"1.1 a, HTTP/1.1 b:8443 (comment, with a comma)", b"1.0 c"]) == [
        "1.1 a", "HTTP/1.1 b:8443", "1.0 c",
    ]
    assert parse_via([b""]) == []


def test_upstream_requests_carry_the_incoming_chain_then_this_proxy() -> None:
    assert outgoing("lxd-image-proxy-aaaaaaaaaaaa") == b"1.1 lxd-image-proxy-aaaaaaaaaaaa"
    token = INCOMING.set("1.1 branch, 1.1 squid")
    try:
        assert outgoing("me") == b"1.1 branch, 1.1 squid, 1.1 me"
    finally:
        INCOMING.reset(token)


def test_the_guard_refuses_its_own_name_and_too_long_chains() -> None:
    guard = ViaGuard("lxd-image-proxy-aaaaaaaaaaaa")
    assert guard.refusal([b"1.1 lxd-image-proxy-bbbbbbbbbbbb"], b"/x") is None
    message = guard.refusal(
        [b"1.1 lxd-image-proxy-AAAAAAAAAAAA, 1.1 lxd-image-proxy-bbbbbbbbbbbb"], b"/x"
    )
    assert message is not None and "lxd-image-proxy-aaaaaaaaaaaa" in message
    hops = ", ".join(f"1.1 p{n}" for n in range(MAX_HOPS)).encode()
    assert guard.refusal([hops], b"/x") is not None


def test_a_508_is_passed_on_only_inside_the_loop(logged: Logged) -> None:
    answers = LoopAnswers("lxd-image-proxy-bbbbbbbbbbbb")
    said = json.dumps({"type": "error", "error_code": 508, "error": "loop detected: x"})
    # A client that is a proxy in the loop (the detector A asked this proxy B): 508, passed on
    # with the detector's name, and logged once per upstream.
    inside = answers.error("images", "lxd-image-proxy-aaaaaaaaaaaa", said, "1.1 lxd-image-proxy-aaaaaaaaaaaa")
    assert inside.code == 508 and inside.headers == {LOOP_HEADER: b"lxd-image-proxy-aaaaaaaaaaaa"}
    assert "loop detected: x" in inside.message and '{"type"' not in inside.message
    answers.error("images", "lxd-image-proxy-aaaaaaaaaaaa", said, "1.1 lxd-image-proxy-aaaaaaaaaaaa")
    assert len(logged.matching("leads back to this proxy")) == 1
    # An end client of a proxy in the loop: 502.
    assert answers.error("images", "lxd-image-proxy-bbbbbbbbbbbb", said, "").code == 502
    # A proxy outside the loop (the detector is not in its chain): 502, nothing claimed.
    outside = answers.error("images", "lxd-image-proxy-cccccccccccc", said, "1.1 branch")
    assert outside.code == 502 and "in a loop of proxies" in outside.message
    assert len(logged.matching("leads back to this proxy")) == 1


# -- real proxies on loopback ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _count_requests(proxy: RunningProxy) -> list[tuple[str, dict[str, str]]]:
    """Every request that reaches C{proxy}'s resources: its path and some headers."""
    seen: list[tuple[str, dict[str, str]]] = []
    site = proxy.service.listener.site
    original = site.getResourceFor

    def counting(request: Request) -> Any:
        headers = {
            name: (request.getHeader(name.encode()) or b"").decode("latin-1")
            for name in ("Via", "User-Agent")
        }
        seen.append((request.path.decode("utf-8", "replace"), headers))
        return original(request)

    site.getResourceFor = counting  # type: ignore[method-assign]
    return seen


def _pseudonym(proxy: RunningProxy) -> str:
    return (proxy.state_dir / PSEUDONYM_FILE).read_text().strip()


async def start_child(
    state: Path, parent: RunningProxy, *, name: str = "images", lxd: bool = False,
    port: int | None = None,
) -> RunningProxy:
    """A proxy whose upstream C{name} is C{parent}: its simplestreams face, or its LXD face."""
    url = f"https://localhost:{parent.port}" if lxd else parent.url(name)
    return await start_proxy(
        reactor, state, {name: (url, parent.cert_pem)},
        upstream_options={name: {"protocol": "lxd"}} if lxd else None,
        server={"listen": [f"127.0.0.1:{port}"]} if port else None,
    )


@attrs.define
class Tiers:
    tree: Tree
    top: RunningUpstream
    regional: RunningProxy
    branch: RunningProxy
    at_regional: list[tuple[str, dict[str, str]]]
    client: Any

    def top_gets(self, path: str) -> int:
        return int(self.top.resource.count(path))

    def regional_gets(self, path: str) -> int:
        return sum(1 for p, _ in self.at_regional if p == f"/images/{path}")

    async def get(self, path: str, agent: bytes = LXD_AGENT, proxy: RunningProxy | None = None) -> Any:
        proxy = proxy or self.branch
        client = self.client if proxy is self.branch else https_client(proxy.cert_pem)
        response = await client.get(
            f"{proxy.url('images')}/{path}", headers=Headers({b"User-Agent": [agent]})
        ).addTimeout(30, reactor)
        body = await treq.content(response).addTimeout(30, reactor)
        return response, body


@pytest_twisted.async_yield_fixture
async def tiers(tmp_path: Path) -> AsyncIterator[Tiers]:
    tree = build_tree(tmp_path / "tree")
    ca = make_ca("top upstream CA")
    top = start_https_upstream(reactor, tree.root, ca)
    regional = branch = None
    try:
        regional = await start_proxy(reactor, tmp_path / "regional", {"images": (top.url, ca.cert_pem)})
        at_regional = _count_requests(regional)
        branch = await start_child(tmp_path / "branch", regional)
        yield Tiers(tree, top, regional, branch, at_regional, https_client(branch.cert_pem))
    finally:
        if branch is not None:
            await branch.stop()
        # A test may have stopped it (the branch then serves alone).
        if regional is not None and regional.service.running:
            await regional.stop()
        await top.stop()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_branch_fetches_each_file_once_at_each_level(tiers: Tiers) -> None:
    image = tiers.tree.image(ALIAS)
    response, body = await tiers.get(INDEX)
    assert response.code == 200
    # Which level answered is visible to an operator.
    assert response.headers.getRawHeaders(b"Via") == [f"1.1 {_pseudonym(tiers.branch)}".encode()]
    results = await gatherResults([
        Deferred.fromCoroutine(tiers.get(item.path)) for item in image.files for _ in range(4)
    ]).addTimeout(60, reactor)
    for (response, body), item in zip(results, [i for i in image.files for _ in range(4)]):
        assert response.code == 200 and _sha256(body) == item.sha256
    for item in image.files:
        assert tiers.top_gets(item.path) == 1
        assert tiers.regional_gets(item.path) == 1
        assert tiers.branch.cache.store.exists(item.sha256)
        assert tiers.regional.cache.store.exists(item.sha256)
    # The top upstream saw the whole chain: the branch, then the regional proxy.
    chain = f"1.1 {_pseudonym(tiers.branch)}, 1.1 {_pseudonym(tiers.regional)}"
    for request in tiers.top.resource.requests:
        assert request.header("Via") == chain, request.path


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_the_client_family_reaches_the_top(tiers: Tiers) -> None:
    response, _ = await tiers.get(INDEX, agent=INCUS_AGENT)
    assert response.code == 200
    response, _ = await tiers.get(INDEX, agent=LXD_AGENT)
    assert response.code == 200
    agents = [r.header("User-Agent") or "" for r in tiers.top.resource.requests if r.path == INDEX]
    # Each family's catalogue is asked for with that family's client's User-Agent, at each level.
    assert sorted(agents) == sorted([INCUS_AGENT.decode(), LXD_AGENT.decode()])
    at_regional = sorted(h["User-Agent"] for p, h in tiers.at_regional if p == f"/images/{INDEX}")
    assert at_regional == sorted([INCUS_AGENT.decode(), LXD_AGENT.decode()])


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_each_level_serves_what_it_stored_when_the_level_above_is_gone(tiers: Tiers) -> None:
    image = tiers.tree.image(ALIAS)
    await tiers.get(INDEX)
    for item in image.files:
        response, body = await tiers.get(item.path)
        assert response.code == 200
    await tiers.top.stop()
    # The regional proxy without its upstream, then the branch without the regional one.
    for proxy in (tiers.regional, tiers.branch):
        if proxy is tiers.branch:
            await tiers.regional.stop()
        for item in image.files:
            response, body = await tiers.get(item.path, proxy=proxy)
            assert response.code == 200 and _sha256(body) == item.sha256
        response, body = await tiers.get(INDEX, proxy=proxy)
        assert response.code == 200 and b"products" in body


async def _two_in_a_loop(tmp_path: Path, *, lxd: bool = False) -> tuple[RunningProxy, RunningProxy]:
    """Proxies A and B, each the other's upstream C{images} (through its LXD face, with C{lxd})."""
    port_a = _free_port()
    cert_a, _ = ensure_server_certificate(FilePath(str(tmp_path / "a")), ["localhost"])
    b = await start_proxy(
        reactor, tmp_path / "b",
        {"images": (f"https://localhost:{port_a}" + ("" if lxd else "/images"), cert_a.getContent())},
        upstream_options={"images": {"protocol": "lxd"}} if lxd else None,
    )
    try:
        a = await start_child(tmp_path / "a", b, port=port_a, lxd=lxd)
    except BaseException:
        await b.stop()
        raise
    return a, b


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_two_proxies_upstream_of_each_other_fail_at_once(tmp_path: Path, logged: Logged) -> None:
    a, b = await _two_in_a_loop(tmp_path)
    try:
        client = https_client(a.cert_pem)
        started = time.monotonic()
        responses = await gatherResults([
            client.get(a.url("images") + "/" + INDEX, headers=Headers({b"User-Agent": [LXD_AGENT]}))
            for _ in range(3)
        ]).addTimeout(10, reactor)
        bodies = [await treq.content(r) for r in responses]
        assert time.monotonic() - started < 2.0
        for response, body in zip(responses, bodies):
            # The client is not a proxy: a 502, naming the loop.
            assert response.code == 502, body
            assert b"leads back" in body and _pseudonym(a).encode() in body
        leads_back = [e for e in logged.matching("leads back to this proxy") if e["log_level"] is LogLevel.error]
        # Once per proxy and upstream, however many requests looped.
        assert sorted(e["upstream"] for e in leads_back) == ["images", "images"]
        assert {e["own"] for e in leads_back} == {_pseudonym(a), _pseudonym(b)}
        assert len(logged.matching("came back to this proxy")) == 1
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_loop_through_the_lxd_faces_fails_at_once(tmp_path: Path, logged: Logged) -> None:
    a, b = await _two_in_a_loop(tmp_path, lxd=True)
    try:
        client = https_client(a.cert_pem)
        started = time.monotonic()
        response = await client.get(
            f"https://localhost:{a.port}/1.0/images?recursion=1",
            headers=Headers({b"User-Agent": [LXD_AGENT]}),
        ).addTimeout(10, reactor)
        envelope = json.loads(await treq.content(response))
        assert time.monotonic() - started < 2.0
        assert response.code == 502 and envelope["error_code"] == 502
        # The loop in words, not an envelope within an envelope.
        assert "leads back" in envelope["error"] and '{"type"' not in envelope["error"]
        assert {e["own"] for e in logged.matching("leads back to this proxy")} == {
            _pseudonym(a), _pseudonym(b),
        }
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_download_that_loops_fails_at_once_and_never_joins_itself(
    tmp_path: Path, logged: Logged,
) -> None:
    """
    A and B hold the catalogue (from a real upstream); then B's upstream becomes A: a miss at
    A asks B, B asks A, A answers 508 before joining its own download: A's clients get a 502.
    """
    tree = build_tree(tmp_path / "tree")
    ca = make_ca("top upstream CA")
    top = start_https_upstream(reactor, tree.root, ca)
    port_a = _free_port()
    b = await start_proxy(reactor, tmp_path / "b", {"images": (top.url, ca.cert_pem)})
    a = await start_child(tmp_path / "a", b, port=port_a)
    client = https_client(a.cert_pem)
    try:
        for path in (INDEX, tree.products_file.path):
            response = await client.get(f"{a.url('images')}/{path}").addTimeout(30, reactor)
            await treq.content(response)
            assert response.code == 200, path
        await b.stop()
        b = await start_proxy(
            reactor, tmp_path / "b",
            {"images": (f"https://localhost:{port_a}/images", a.cert_pem)},
            server={"listen": [f"127.0.0.1:{b.port}"]},
        )
        # A's kept connections led to the B that stopped.
        await a.cache.client.close()
        item = tree.image(ALIAS).files[-1]
        started = time.monotonic()
        responses = await gatherResults([
            client.get(f"{a.url('images')}/{item.path}") for _ in range(3)
        ]).addTimeout(10, reactor)
        bodies = [await treq.content(r) for r in responses]
        assert time.monotonic() - started < 2.0
        for response, body in zip(responses, bodies):
            assert response.code == 502, body
            assert b"leads back" in body
        assert top.resource.count(item.path) == 0
        assert not a.cache.store.exists(item.sha256) and not b.cache.store.exists(item.sha256)
        assert {e["upstream"] for e in logged.matching("leads back to this proxy")} == {"images"}
        # Background work (prefetch) carries this proxy's Via too, and fails the same way.
        fetched = a.cache.fetcher.get("images", (await a.cache.metadata["images"].item(item.path)),
                                      background=True)
        with pytest.raises(Exception, match="leads back"):
            await Deferred.fromCoroutine(_done(fetched)).addTimeout(10, reactor)
    finally:
        await a.stop()
        await b.stop()
        await top.stop()


async def _done(fetched: Any) -> None:
    await fetched.when_done()


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_each_level_verifies_what_comes_from_above(tiers: Tiers) -> None:
    item = tiers.tree.image(ALIAS).files[-1]
    await tiers.get(INDEX)
    # The top sends wrong bytes once: the regional proxy does not pass them off as the file
    # (its last byte is held back until verified, the connection cut), so the branch never
    # stores them; its download starts again and its client gets the right file.
    tiers.top.resource.corrupt(item.path, times=1)
    response, body = await tiers.get(item.path)
    assert response.code == 200 and _sha256(body) == item.sha256
    assert tiers.top_gets(item.path) == 2
    for proxy in (tiers.regional, tiers.branch):
        assert proxy.cache.store.exists(item.sha256)
        assert _sha256(proxy.cache.store.path_for(item.sha256).getContent()) == item.sha256


@pytest.mark.loopback
@pytest_twisted.ensureDeferred
async def test_a_background_refresh_carries_the_via_of_the_request_that_started_it(
    tmp_path: Path,
) -> None:
    tree = build_tree(tmp_path / "tree")
    ca = make_ca("top upstream CA")
    top = start_https_upstream(reactor, tree.root, ca)
    proxy = await start_proxy(
        reactor, tmp_path / "p", {"images": (top.url, ca.cert_pem)}, cache={"metadata_ttl": "0.2s"},
    )
    try:
        client = https_client(proxy.cert_pem)
        url = f"{proxy.url('images')}/{INDEX}"
        await treq.content(await client.get(url).addTimeout(10, reactor))
        await deferLater(reactor, 0.3, lambda: None)
        # Expired: served at once, refreshed in the background (stale while revalidate).
        child = "1.1 lxd-image-proxy-bbbbbbbbbbbb"
        response = await client.get(url, headers=Headers({b"Via": [child.encode()]}))
        assert response.code == 200
        await treq.content(response)
        for _ in range(50):
            if top.resource.count(INDEX) == 2:
                break
            await deferLater(reactor, 0.05, lambda: None)
        vias = [r.header("Via") for r in top.resource.requests if r.path == INDEX]
        assert vias == [f"1.1 {_pseudonym(proxy)}", f"{child}, 1.1 {_pseudonym(proxy)}"]
    finally:
        await proxy.stop()
        await top.stop()
