"""
Direct URL import (C{/import/UPSTREAM/REF}), in memory and deterministic, through the real
resource tree.

As C{lxc image import https://HOST:PORT/import/up/REF} does it (PROTOCOLS.md §3): a C{HEAD}
whose answer must carry C{LXD-Image-Hash} and C{LXD-Image-URL} (C{Incus-Image-*} for Incus),
then a C{GET} of that URL, whose body must hash to the announced value. The proxy is
L{tests.helpers.faces.FaceHarness}: the upstream C{up} with split images (container and VM, two
architectures, several versions) and unified ones.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.faces import (
    CONTAINER,
    PROXY,
    SPLIT_ALIAS,
    SPLIT_OS,
    UNIFIED_ALIAS,
    UNIFIED_OS,
    V1,
    V2,
    V3,
    VM,
    Expected,
    FaceHarness,
    incus_agent,
    lxd_agent,
)
from tests.helpers.harness import Closing
from tests.helpers.scripted import sha

HEADERS = (b"LXD-Image-Hash", b"LXD-Image-URL", b"Incus-Image-Hash", b"Incus-Image-URL")


@pytest.fixture
def h(tmp_path: Any, closing: Closing) -> FaceHarness:
    return closing(FaceHarness(tmp_path))


def lxd_daemon(*architectures: str) -> dict[bytes, list[bytes]]:
    """What an LXD daemon sends with its HEAD (lxd/images.go ImageDownload)."""
    headers = lxd_agent(architectures[0])
    headers[b"LXD-Server-Architectures"] = [", ".join(architectures).encode()]
    headers[b"LXD-Server-Version"] = [b"5.21"]
    return headers


def incus_daemon(*architectures: str) -> dict[bytes, list[bytes]]:
    headers = incus_agent(architectures[0])
    headers[b"Incus-Server-Architectures"] = [", ".join(architectures).encode()]
    headers[b"Incus-Server-Version"] = [b"6.0"]
    return headers


def answer(response: Any) -> tuple[str, str]:
    """The hash and URL announced, the same under both families' names."""
    values = {name: response.headers.getRawHeaders(name) for name in HEADERS}
    assert all(v is not None and len(v) == 1 for v in values.values()), values
    image_hash, url, incus_hash, incus_url = (values[name][0].decode() for name in HEADERS)
    assert (incus_hash, incus_url) == (image_hash, url)
    return image_hash, url


def download(h: FaceHarness, url: str, host: str = PROXY) -> bytes:
    """What the daemon then GETs: the announced URL, through the proxy."""
    prefix = f"https://{host}/"
    assert url.startswith(prefix), url
    code, body, _ = h.call("GET", "/" + url[len(prefix):], host=host)
    assert code == 200
    return body


def expect_import(h: FaceHarness, response: Any, image: Expected, *, host: str = PROXY) -> None:
    image_hash, url = answer(response)
    assert image_hash == image.fingerprint
    [path] = image.files
    assert url == f"https://{host}/up/{path}"
    assert sha(download(h, url, host)) == image.fingerprint


@pytest.mark.parametrize("method", ["HEAD", "GET"])
@pytest.mark.parametrize("prefix_length", [64, 12])
def test_a_unified_image_by_fingerprint_or_prefix(
    h: FaceHarness, method: str, prefix_length: int
) -> None:
    image = h.image(UNIFIED_OS, "arm64", V1)
    ref = image.fingerprint[:prefix_length]
    code, body, response = h.call(method, f"/import/up/{ref}", headers=lxd_daemon("x86_64"))
    assert code == 200
    image_hash, url = answer(response)
    if method == "HEAD":
        assert body == b""
    else:
        assert body == f"{image_hash} {url}\n".encode()
    # Named by its fingerprint, the image is the same whatever the importing server runs on.
    expect_import(h, response, image)


@pytest.mark.parametrize(
    ("architectures", "arch", "version"),
    [(("aarch64", "x86_64"), "arm64", V1), (("x86_64", "aarch64"), "amd64", V2),
     (("x86_64",), "amd64", V2)],
)
def test_an_alias_for_the_first_architecture_the_server_names(
    h: FaceHarness, architectures: tuple[str, ...], arch: str, version: str
) -> None:
    code, _, response = h.call(
        "HEAD", f"/import/up/{UNIFIED_ALIAS}", headers=lxd_daemon(*architectures)
    )
    assert code == 200
    expect_import(h, response, h.image(UNIFIED_OS, arch, version))


def test_an_escaped_alias_is_the_same(h: FaceHarness) -> None:
    escaped = UNIFIED_ALIAS.replace("/", "%2F")
    code, _, response = h.call("HEAD", f"/import/up/{escaped}", headers=lxd_daemon("aarch64"))
    assert code == 200
    expect_import(h, response, h.image(UNIFIED_OS, "arm64", V1))


def test_an_alias_for_an_incus_server(h: FaceHarness) -> None:
    # Incus lists only its own unified files (incus_combined.tar.gz), here VMs only.
    code, _, response = h.call(
        "HEAD", f"/import/up/{UNIFIED_ALIAS}?type=virtual-machine",
        headers=incus_daemon("aarch64", "x86_64"),
    )
    assert code == 200
    expect_import(h, response, h.image(UNIFIED_OS, "arm64", V1, VM, family="incus"))
    code, _, _ = h.call("HEAD", f"/import/up/{UNIFIED_ALIAS}", headers=incus_daemon("x86_64"))
    assert code == 404


def test_arch_in_the_query_wins(h: FaceHarness) -> None:
    code, _, response = h.call(
        "HEAD", f"/import/up/{UNIFIED_ALIAS}?arch=arm64", headers=lxd_daemon("x86_64")
    )
    assert code == 200
    expect_import(h, response, h.image(UNIFIED_OS, "arm64", V1))


def test_an_alias_naming_its_architecture_wins(h: FaceHarness) -> None:
    code, _, response = h.call(
        "HEAD", f"/import/up/{UNIFIED_ALIAS}/arm64", headers=lxd_daemon("x86_64")
    )
    assert code == 200
    expect_import(h, response, h.image(UNIFIED_OS, "arm64", V1))


def test_without_server_architectures_the_user_agent_names_it(h: FaceHarness) -> None:
    code, _, response = h.call("HEAD", f"/import/up/{UNIFIED_ALIAS}", headers=lxd_agent("aarch64"))
    assert code == 200
    expect_import(h, response, h.image(UNIFIED_OS, "arm64", V1))
    # Nothing at all: the proxy's own architecture.
    code, _, response = h.call("HEAD", f"/import/up/{UNIFIED_ALIAS}")
    assert code == 200
    expect_import(h, response, h.image(UNIFIED_OS, "amd64", V2))


@pytest.mark.parametrize(
    "ref",
    [SPLIT_ALIAS, f"{SPLIT_ALIAS}?type=virtual-machine", f"{SPLIT_ALIAS}/amd64", "{fp}", "{fp12}"],
)
def test_a_split_image_is_400_with_a_clear_message(h: FaceHarness, ref: str) -> None:
    image = h.image(SPLIT_OS, "amd64", V3, VM)
    path = f"/import/up/{ref.format(fp=image.fingerprint, fp12=image.fingerprint[:12])}"
    for method in ("HEAD", "GET"):
        code, body, response = h.call(method, path, headers=lxd_daemon("x86_64"))
        assert code == 400
        assert response.headers.getRawHeaders(b"LXD-Image-Hash") is None
        assert response.headers.getRawHeaders(b"LXD-Image-URL") is None
    text = body.decode()
    assert "split image" in text and "lxc image copy" in text
    assert text.count("\n") == 1
    assert [p for _m, p, _h in h.upstream.requests if p.startswith("images/")] == []


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/import/nope/" + UNIFIED_ALIAS, 404),
        ("/import/up/nope/1.0", 404),
        ("/import/up/" + "0" * 64, 404),
        (f"/import/up/{UNIFIED_ALIAS}?arch=riscv64", 404),
        (f"/import/up/{UNIFIED_ALIAS}?arch=pdp11", 400),
        (f"/import/up/{UNIFIED_ALIAS}?type=vm", 400),
        (f"/import/up/{UNIFIED_ALIAS}/vm", 404),
        ("/import/up", 404),
        ("/import/up/", 404),
        ("/import/", 404),
    ],
)
def test_what_cannot_be_imported(h: FaceHarness, path: str, status: int) -> None:
    code, body, response = h.call("HEAD", path, headers=lxd_daemon("x86_64"))
    assert code == status
    assert response.headers.getRawHeaders(b"LXD-Image-Hash") is None
    code, body, _ = h.call("GET", path, headers=lxd_daemon("x86_64"))
    assert code == status and body.endswith(b"\n") and body.count(b"\n") == 1


def test_an_ambiguous_prefix_is_400(h: FaceHarness) -> None:
    fingerprints = sorted(i.fingerprint for i in h.listed())
    shared = next(
        a[:1] for a, b in zip(fingerprints, fingerprints[1:]) if a[:1] == b[:1]
    )
    code, body, _ = h.call("GET", f"/import/up/{shared}", headers=lxd_daemon("x86_64"))
    assert code == 400 and b"more than one image" in body


@pytest.mark.parametrize(
    "host", ["evil.test/x", "user@evil.test", "evil.test:8443/../x", "evil test", "evil.test:8443#x",
             "evil.test:123456", "[::1]evil"],
)
def test_a_bad_host_header_is_not_put_into_the_url(h: FaceHarness, host: str) -> None:
    image = h.image(UNIFIED_OS, "amd64", V2)
    headers = lxd_daemon("x86_64")
    headers[b"Host"] = [host.encode()]
    code, _, response = h.call("HEAD", f"/import/up/{image.fingerprint}", headers=headers)
    assert code == 200
    _, url = answer(response)
    assert "evil" not in url and "@" not in url
    # The address the request reached, with its port.
    assert url == f"https://localhost:8443/up/{image.files[0]}"


@pytest.mark.parametrize("host", ["cache.lan:8443", "cache.lan", "10.0.0.5:443", "[fd00::5]:8443"])
def test_the_url_names_the_host_the_client_used(h: FaceHarness, host: str) -> None:
    image = h.image(UNIFIED_OS, "arm64", V1)
    headers = lxd_daemon("x86_64")
    headers[b"Host"] = [host.encode()]
    code, _, response = h.call("HEAD", f"/import/up/{image.fingerprint}", headers=headers)
    assert code == 200
    _, url = answer(response)
    assert url == f"https://{host}/up/{image.files[0]}"


def test_the_download_is_cached_like_any_other_file(h: FaceHarness) -> None:
    image = h.image(UNIFIED_OS, "amd64", V1)
    code, _, response = h.call("HEAD", f"/import/up/{image.fingerprint}")
    _, url = answer(response)
    for _ in range(2):
        assert sha(download(h, url)) == image.fingerprint
    [path] = image.files
    assert h.upstream_gets(path) == 1
    record = h.index.get(image.fingerprint)
    assert record is not None and record.cached
    # And the LXD face knows it as stored.
    listed = h.metadata_of(f"/1.0/images/{image.fingerprint}")
    assert (listed["type"], listed["cached"], listed["auto_update"]) == (CONTAINER, True, False)
