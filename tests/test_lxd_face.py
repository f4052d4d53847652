"""
The LXD image API face (C{/1.0}), in memory and deterministic, through the real resource tree.

The proxy is wired as L{CacheService.site} wires it (L{tests.helpers.faces.FaceHarness}): the
simplestreams face and C{/1.0} over one upstream C{up}, a L{ScriptedUpstream} reached through
C{RequestTraversalAgent}, with a L{Clock}. Its catalogue has container and VM images of two
architectures and several versions (C{testos/2.0}) and unified images (C{uni/1.0}). Requests
go through C{StubTreq} as an LXD client sends them; every wait is a bounded loop.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest
import treq
from twisted.web.client import ResponseFailed

from proxy.lxd_face import API_EXTENSIONS
from tests.helpers.faces import (
    CERT_FINGERPRINT,
    CERT_PEM,
    CONTAINER,
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
    assert_error,
    incus_agent,
    lxd_agent,
    parse_multipart,
)
from tests.helpers.harness import Closing
from tests.helpers.scripted import BASE_URL, sha
from tests.helpers.wired import INDEX, TTL

PRODUCTS = "streams/v1/images.json"


@pytest.fixture
def h(tmp_path: Any, closing: Closing) -> FaceHarness:
    return closing(FaceHarness(tmp_path))


def export_path(image: Expected) -> str:
    return f"/1.0/images/{image.fingerprint}/export"


def image_requests(h: FaceHarness) -> list[str]:
    """The upstream requests for image files (not metadata)."""
    return [path for _method, path, _headers in h.upstream.requests if path.startswith("images/")]


def ambiguous_prefix(fingerprints: list[str]) -> str:
    """The longest prefix that starts more than one of C{fingerprints}."""
    best = ""
    for a, b in itertools.combinations(fingerprints, 2):
        shared = 0
        while shared < len(a) and a[shared] == b[shared]:
            shared += 1
        if shared > len(best):
            best = a[:shared]
    assert best, "the catalogue's fingerprints share no prefix"
    return best


def unknown_fingerprint(fingerprints: list[str]) -> str:
    for digit in "0123456789abcdef":
        candidate = digit * 64
        if not any(fp.startswith(candidate[:12]) for fp in fingerprints):
            return candidate
    raise AssertionError("every candidate is taken")


# -- GET /1.0 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/1.0", "/1.0/", "/1.0?project=default"])
def test_server_is_public_and_untrusted(h: FaceHarness, path: str) -> None:
    code, envelope, _ = h.lxd(path)
    assert code == 200
    assert {k: envelope[k] for k in ("type", "status", "status_code", "error_code", "error")} == {
        "type": "sync", "status": "Success", "status_code": 200, "error_code": 0, "error": "",
    }
    server = envelope["metadata"]
    assert server["auth"] == "untrusted"
    assert server["public"] is True
    assert server["api_version"] == "1.0"
    assert server["api_extensions"] == list(API_EXTENSIONS)
    # Clients filter themselves when api_filtering is not offered.
    assert "api_filtering" not in server["api_extensions"]
    assert server["environment"]["certificate"] == CERT_PEM
    assert server["environment"]["certificate_fingerprint"] == CERT_FINGERPRINT
    # Answering it costs no upstream request.
    assert h.upstream.requests == []


def test_head_of_the_server_has_no_body(h: FaceHarness) -> None:
    _, full, _ = h.call("GET", "/1.0")
    code, body, response = h.call("HEAD", "/1.0")
    assert (code, body) == (200, b"")
    assert response.headers.getRawHeaders(b"Content-Length") == [str(len(full)).encode()]


# -- images -----------------------------------------------------------------------------------


def test_images_lists_a_url_per_image(h: FaceHarness) -> None:
    urls = h.metadata_of("/1.0/images")
    assert sorted(urls) == sorted(f"/1.0/images/{i.fingerprint}" for i in h.listed())
    assert len(urls) == len(set(urls))


def test_images_with_recursion_are_image_objects(h: FaceHarness) -> None:
    objects = h.metadata_of("/1.0/images?recursion=1")
    by_fp = {o["fingerprint"]: o for o in objects}
    assert set(by_fp) == {i.fingerprint for i in h.listed()}
    for image in h.listed():
        found = by_fp[image.fingerprint]
        assert found["public"] is True
        assert found["type"] == image.type
        assert found["architecture"] == image.architecture
        assert found["size"] == sum(len(h.files[p]) for p in image.files)
        assert (found["cached"], found["auto_update"]) == (False, False)
        assert found["project"] == "default"
        assert found["profiles"] == ["default"]
        assert found["last_used_at"] == "0001-01-01T00:00:00Z"
        properties = found["properties"]
        assert (properties["os"], properties["architecture"], properties["serial"]) == (
            image.os, image.arch, image.version,
        )
        assert properties["type"] == ("tar.gz" if image.unified else
                                      "squashfs" if image.type == CONTAINER else "disk-kvm.img")
        assert found["update_source"]["server"] == BASE_URL
        assert found["update_source"]["protocol"] == "simplestreams"
    newest = h.image(SPLIT_OS, "amd64", V3)
    assert {a["name"] for a in by_fp[newest.fingerprint]["aliases"]} >= {
        SPLIT_ALIAS, f"{SPLIT_ALIAS}/amd64", f"up/{SPLIT_ALIAS}",
    }
    assert by_fp[h.image(SPLIT_OS, "amd64", V1).fingerprint]["aliases"] == []


def test_cached_and_auto_update_come_from_the_index(h: FaceHarness) -> None:
    stored = h.image(SPLIT_OS, "amd64", V2)
    pinned = h.image(SPLIT_OS, "amd64", V3, VM)
    # Shares its metadata file with the pinned VM image, but its root is not stored.
    half = h.image(SPLIT_OS, "amd64", V3)
    unified = h.image(UNIFIED_OS, "arm64", V1)
    h.store_files(stored.files)
    h.store_files(pinned.files, cached=False)
    h.store_files(unified.files)
    by_fp = {o["fingerprint"]: o for o in h.metadata_of("/1.0/images?recursion=1")}
    flags = {fp: (o["cached"], o["auto_update"]) for fp, o in by_fp.items()}
    assert flags[stored.fingerprint] == (True, False)
    assert flags[pinned.fingerprint] == (False, True)
    assert flags[half.fingerprint] == (False, False)
    assert flags[unified.fingerprint] == (True, False)
    assert flags[h.image(UNIFIED_OS, "amd64", V2).fingerprint] == (False, False)
    # One image answers the same.
    one = h.metadata_of(f"/1.0/images/{pinned.fingerprint}")
    assert (one["cached"], one["auto_update"]) == (False, True)


def test_an_image_by_fingerprint_and_by_a_unique_prefix(h: FaceHarness) -> None:
    image = h.image(SPLIT_OS, "arm64", V2, VM)
    full = h.metadata_of(f"/1.0/images/{image.fingerprint}")
    assert full["fingerprint"] == image.fingerprint
    assert full["type"] == VM and full["architecture"] == "aarch64"
    assert h.metadata_of(f"/1.0/images/{image.fingerprint[:12]}?project=default") == full
    listed = [o for o in h.metadata_of("/1.0/images?recursion=1") if o["fingerprint"] == image.fingerprint]
    assert listed == [full]


def test_the_image_objects_aliases_are_the_clients_names(h: FaceHarness) -> None:
    arm = h.image(SPLIT_OS, "arm64", V2)
    for_amd = h.metadata_of(f"/1.0/images/{arm.fingerprint}", lxd_agent("x86_64"))
    for_arm = h.metadata_of(f"/1.0/images/{arm.fingerprint}", lxd_agent("aarch64"))
    assert SPLIT_ALIAS not in {a["name"] for a in for_amd["aliases"]}
    assert f"{SPLIT_ALIAS}/arm64" in {a["name"] for a in for_amd["aliases"]}
    assert SPLIT_ALIAS in {a["name"] for a in for_arm["aliases"]}


def test_prefix_errors_are_envelopes(h: FaceHarness) -> None:
    fingerprints = [i.fingerprint for i in h.listed()]
    cases = [
        (ambiguous_prefix(fingerprints), 400, "More than one image matches"),
        ("ABCDEF", 400, "hexadecimal"),
        ("xyz", 400, "hexadecimal"),
        ("a" * 65, 400, "longer than 64"),
        (unknown_fingerprint(fingerprints), 404, "not found"),
        (unknown_fingerprint(fingerprints)[:12], 404, "not found"),
    ]
    for prefix, status, message in cases:
        for tail in ("", "/export"):
            code, envelope, _ = h.lxd(f"/1.0/images/{prefix}{tail}")
            assert_error(code, envelope, status)
            assert message.lower() in envelope["error"].lower(), (prefix, envelope)
    assert image_requests(h) == []


# -- aliases ----------------------------------------------------------------------------------


def test_alias_list_names_each_alias_as_lxd_does(h: FaceHarness) -> None:
    urls = h.metadata_of("/1.0/images/aliases")
    entries = h.metadata_of("/1.0/images/aliases?recursion=1")
    names = [e["name"] for e in entries]
    assert {SPLIT_ALIAS, f"{SPLIT_ALIAS}/vm", f"{SPLIT_ALIAS}/arm64", f"{SPLIT_ALIAS}/arm64/vm",
            UNIFIED_ALIAS, f"{UNIFIED_ALIAS}/arm64", f"up/{SPLIT_ALIAS}"} <= set(names)
    # Each name is one path segment, escaped as LXD's api.URL writes it (url.PathEscape).
    assert urls == [f"/1.0/images/aliases/{name.replace('/', '%2F')}" for name in names]
    for url, entry in zip(urls, entries):
        assert h.metadata_of(url) == entry
    # No VM of a unified image for an LXD client: no name for one.
    assert f"{UNIFIED_ALIAS}/vm" not in names
    for entry in entries:
        assert set(entry) == {"name", "description", "type", "target"}
        assert entry["target"] in {i.fingerprint for i in h.listed()}


@pytest.mark.parametrize("escaped", [True, False])
def test_alias_by_name_escaped_or_raw(h: FaceHarness, escaped: bool) -> None:
    name = SPLIT_ALIAS.replace("/", "%2F") if escaped else SPLIT_ALIAS
    entry = h.metadata_of(f"/1.0/images/aliases/{name}?project=default")
    assert entry == {
        "name": SPLIT_ALIAS, "description": "", "type": CONTAINER,
        "target": h.image(SPLIT_OS, "amd64", V3).fingerprint,
    }


@pytest.mark.parametrize(
    ("name", "client_arch", "os", "arch", "version", "type"),
    [
        (SPLIT_ALIAS, None, SPLIT_OS, "amd64", V3, CONTAINER),
        (SPLIT_ALIAS, "x86_64", SPLIT_OS, "amd64", V3, CONTAINER),
        (SPLIT_ALIAS, "aarch64", SPLIT_OS, "arm64", V2, CONTAINER),
        (f"{SPLIT_ALIAS}/vm", "x86_64", SPLIT_OS, "amd64", V3, VM),
        (f"{SPLIT_ALIAS}/vm", "aarch64", SPLIT_OS, "arm64", V2, VM),
        (f"{SPLIT_ALIAS}/arm64", "x86_64", SPLIT_OS, "arm64", V2, CONTAINER),
        (f"{SPLIT_ALIAS}/arm64/vm", "x86_64", SPLIT_OS, "arm64", V2, VM),
        (f"{SPLIT_ALIAS}/amd64", "aarch64", SPLIT_OS, "amd64", V3, CONTAINER),
        (f"up/{SPLIT_ALIAS}/vm", "aarch64", SPLIT_OS, "arm64", V2, VM),
        (UNIFIED_ALIAS, "x86_64", UNIFIED_OS, "amd64", V2, CONTAINER),
        (UNIFIED_ALIAS, "aarch64", UNIFIED_OS, "arm64", V1, CONTAINER),
    ],
)
def test_alias_variants_and_the_client_architecture(
    h: FaceHarness, name: str, client_arch: str | None, os: str, arch: str, version: str, type: str
) -> None:
    headers = lxd_agent(client_arch) if client_arch else None
    escaped = name.replace("/", "%2F")
    entry = h.metadata_of(f"/1.0/images/aliases/{escaped}", headers)
    expected = h.image(os, arch, version, type)
    assert (entry["name"], entry["type"], entry["target"]) == (name, type, expected.fingerprint)
    # The target is an image this face lists.
    assert h.metadata_of(f"/1.0/images/{entry['target']}", headers)["type"] == type


@pytest.mark.parametrize(
    "name", ["nope%2F1.0", f"{UNIFIED_ALIAS}/vm".replace("/", "%2F"), "testos", "testos/2.0/riscv64"]
)
def test_unknown_alias_is_404(h: FaceHarness, name: str) -> None:
    code, envelope, _ = h.lxd(f"/1.0/images/aliases/{name}")
    assert_error(code, envelope, 404)


def test_a_client_of_an_architecture_without_images_gets_no_bare_name(h: FaceHarness) -> None:
    # riscv64 has no image: a bare name would hand it one it cannot run.
    code, envelope, _ = h.lxd(f"/1.0/images/aliases/{SPLIT_ALIAS}", headers=lxd_agent("riscv64"))
    assert_error(code, envelope, 404)
    entry = h.metadata_of(f"/1.0/images/aliases/{SPLIT_ALIAS}%2Famd64", lxd_agent("riscv64"))
    assert entry["target"] == h.image(SPLIT_OS, "amd64", V3).fingerprint


def test_an_incus_client_lists_its_own_images(h: FaceHarness) -> None:
    urls = h.metadata_of("/1.0/images", incus_agent("x86_64"))
    assert sorted(urls) == sorted(f"/1.0/images/{i.fingerprint}" for i in h.listed("incus"))
    entry = h.metadata_of(f"/1.0/images/aliases/{UNIFIED_ALIAS}%2Fvm", incus_agent("x86_64"))
    assert entry["target"] == h.image(UNIFIED_OS, "amd64", V2, VM, family="incus").fingerprint
    # Its catalogue is the one the upstream gives Incus: asked for with the client's User-Agent.
    [agent] = incus_agent("x86_64")[b"User-Agent"]
    asked = [headers.get(b"user-agent") for _m, path, headers in h.upstream.requests if path == INDEX]
    assert asked == [agent]
    # An LXD client then gets the LXD catalogue, fetched for it.
    assert sorted(h.metadata_of("/1.0/images")) == sorted(
        f"/1.0/images/{i.fingerprint}" for i in h.listed()
    )
    assert h.upstream.paths_requested(INDEX) == 2


# -- projects, methods, other endpoints -------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/1.0", "/1.0/images", "/1.0/images?recursion=1", "/1.0/images/aliases",
             f"/1.0/images/aliases/{SPLIT_ALIAS.replace('/', '%2F')}"],
)
def test_the_default_project_or_none_is_served_and_another_is_404(h: FaceHarness, path: str) -> None:
    joiner = "&" if "?" in path else "?"
    plain = h.metadata_of(path)
    assert h.metadata_of(f"{path}{joiner}project=default") == plain
    assert h.metadata_of(f"{path}{joiner}project=") == plain
    code, envelope, _ = h.lxd(f"{path}{joiner}project=other")
    assert_error(code, envelope, 404)


def test_another_project_is_404_for_one_image_and_its_export(h: FaceHarness) -> None:
    image = h.image(UNIFIED_OS, "amd64", V2)
    for path in (f"/1.0/images/{image.fingerprint}", export_path(image)):
        code, envelope, _ = h.lxd(f"{path}?project=other")
        assert_error(code, envelope, 404)
    assert image_requests(h) == []


WRITE_PATHS = [
    "/1.0",
    "/1.0/images",
    "/1.0/images/{fp}",
    "/1.0/images/{fp}/export",
    "/1.0/images/aliases",
    "/1.0/images/aliases/testos%2F2.0",
    "/1.0/images/aliases/testos/2.0",
]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_writes_are_forbidden(h: FaceHarness, method: str) -> None:
    fp = h.image(SPLIT_OS, "amd64", V3).fingerprint
    for template in WRITE_PATHS:
        code, envelope, _ = h.lxd(template.format(fp=fp), method)
        assert_error(code, envelope, 403)
    # Refused before anything is looked up.
    assert h.upstream.requests == []


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_secrets_are_forbidden(h: FaceHarness, method: str) -> None:
    fp = h.image(SPLIT_OS, "amd64", V3).fingerprint
    code, envelope, _ = h.lxd(f"/1.0/images/{fp}/secret", method)
    assert_error(code, envelope, 403)


@pytest.mark.parametrize("method", ["OPTIONS", "PROPFIND", "TRACE"])
def test_other_methods_are_405(h: FaceHarness, method: str) -> None:
    fp = h.image(SPLIT_OS, "amd64", V3).fingerprint
    for path in ("/1.0", "/1.0/images", f"/1.0/images/{fp}", f"/1.0/images/{fp}/export",
                 "/1.0/images/aliases/testos%2F2.0"):
        code, envelope, response = h.lxd(path, method)
        assert_error(code, envelope, 405)
        [allowed] = response.headers.getRawHeaders(b"Allow")
        assert {b"GET", b"HEAD"} <= set(allowed.split(b", "))


@pytest.mark.parametrize(
    "path", ["/1.0/instances", "/1.0/certificates", "/1.0/imagesx", "/1.0/images/{fp}/nothing",
             "/1.0/images/{fp}/export/more", "/1.0/operations/x"],
)
def test_other_endpoints_are_404(h: FaceHarness, path: str) -> None:
    fp = h.image(SPLIT_OS, "amd64", V3).fingerprint
    code, envelope, _ = h.lxd(path.format(fp=fp))
    assert_error(code, envelope, 404)


# -- export -----------------------------------------------------------------------------------


def check_split_export(image: Expected, code: int, body: bytes, response: Any) -> list[bytes]:
    """A split export as LXD sends it; returns the two parts' bytes."""
    assert code == 200
    [content_type] = response.headers.getRawHeaders(b"Content-Type")
    parts = parse_multipart(content_type, body)
    fp = image.fingerprint
    root_name, ext = ("rootfs", ".squashfs") if image.type == CONTAINER else ("rootfs.img", ".qcow2")
    assert [headers for headers, _ in parts] == [
        {"Content-Disposition": f'form-data; name="metadata"; filename="meta-{fp}.tar.xz"',
         "Content-Type": "application/octet-stream"},
        {"Content-Disposition": f'form-data; name="{root_name}"; filename="{fp}{ext}"',
         "Content-Type": "application/octet-stream"},
    ]
    meta, root = (data for _, data in parts)
    assert hashlib.sha256(meta + root).hexdigest() == fp
    assert response.headers.getRawHeaders(b"X-Incus-Type") == [b"incus"]
    return [meta, root]


def check_unified_export(image: Expected, code: int, body: bytes, response: Any) -> None:
    assert code == 200
    assert response.headers.getRawHeaders(b"Content-Type") == [b"application/octet-stream"]
    assert response.headers.getRawHeaders(b"Content-Disposition") == [
        f"inline;filename={image.fingerprint}.tar.gz".encode()
    ]
    assert response.length == len(body)
    assert sha(body) == image.fingerprint


def check_export(image: Expected, code: int, body: bytes, response: Any) -> None:
    if image.unified:
        check_unified_export(image, code, body, response)
    else:
        check_split_export(image, code, body, response)


@pytest.mark.parametrize("type", [CONTAINER, VM])
def test_export_hit_of_a_split_image(h: FaceHarness, type: str) -> None:
    image = h.image(SPLIT_OS, "arm64", V1, type)
    h.store_files(image.files)
    code, body, response = h.call("GET", f"{export_path(image)}?project=default")
    meta, root = check_split_export(image, code, body, response)
    assert (meta, root) == (h.files[image.files[0]], h.files[image.files[1]])
    assert response.length == len(body)
    assert image_requests(h) == []


def test_export_hit_of_a_unified_image(h: FaceHarness) -> None:
    image = h.image(UNIFIED_OS, "amd64", V2)
    h.store_files(image.files)
    code, body, response = h.call("GET", export_path(image))
    check_unified_export(image, code, body, response)
    assert image_requests(h) == []


def test_export_by_a_prefix(h: FaceHarness) -> None:
    image = h.image(UNIFIED_OS, "arm64", V1)
    h.store_files(image.files)
    code, body, response = h.call("GET", f"/1.0/images/{image.fingerprint[:12]}/export")
    check_unified_export(image, code, body, response)


@pytest.mark.parametrize(
    ("os", "arch", "version", "type"),
    [(SPLIT_OS, "amd64", V3, CONTAINER), (SPLIT_OS, "arm64", V2, VM), (UNIFIED_OS, "amd64", V2, CONTAINER)],
)
def test_concurrent_export_misses_fetch_each_file_once_and_store_it(
    h: FaceHarness, os: str, arch: str, version: str, type: str
) -> None:
    image = h.image(os, arch, version, type)
    h.upstream.held_paths.update(image.files)
    pending = [h.proxy.get(f"https://proxy.test{export_path(image)}", unbuffered=True) for _ in range(3)]
    h.settle()
    assert sorted(image_requests(h)) == sorted(image.files)
    # Every client has its status and headers while the files are still coming.
    responses = [h.run(d) for d in pending]
    assert [r.code for r in responses] == [200] * 3
    bodies = [treq.content(r) for r in responses]
    for path in image.files:
        [held] = h.upstream.held[path]
        held.write(h.files[path])
        held.finish()
    h.settle()
    for response, d in zip(responses, bodies):
        check_export(image, 200, h.run(d), response)
    assert sorted(image_requests(h)) == sorted(image.files)
    for path in image.files:
        digest = sha(h.files[path])
        record = h.index.get(digest)
        assert record is not None and record.cached and not record.auto_update
        assert record.paths == (f"up/{path}",)
        assert h.store.exists(digest)
        assert h.index.pending_uses.get(digest) == 3
    stats = h.index.stats()
    assert (stats.hits, stats.misses) == (0, 3)
    assert h.temp_files() == []
    # Now a hit, through either face, without asking the upstream again.
    check_export(image, *h.call("GET", export_path(image)))
    for path in image.files:
        assert h.fetch(path)[:2] == (200, h.files[path])
    assert sorted(image_requests(h)) == sorted(image.files)
    listed = h.metadata_of(f"/1.0/images/{image.fingerprint}")
    assert (listed["cached"], listed["auto_update"]) == (True, False)


def test_export_miss_with_one_file_stored_fetches_only_the_other(h: FaceHarness) -> None:
    container = h.image(SPLIT_OS, "amd64", V2)
    vm = h.image(SPLIT_OS, "amd64", V2, VM)
    h.store_files(container.files)
    # The VM shares the container's metadata file, which is stored.
    check_export(vm, *h.call("GET", export_path(vm)))
    assert image_requests(h) == [vm.files[1]]
    assert h.store.exists(sha(h.files[vm.files[1]]))


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("after_headers", [False, True])
def test_a_corrupt_upstream_file_fails_the_export_and_is_not_stored(
    h: FaceHarness, unified: bool, after_headers: bool
) -> None:
    image = h.image(UNIFIED_OS, "amd64", V2) if unified else h.image(SPLIT_OS, "amd64", V3)
    path = image.files[-1]
    good = h.files[path]
    corrupt = h.files[path] = b"X" + good[1:]
    if after_headers:
        # The client has its 200 before the file has come: the mismatch can only abort the
        # connection, so that the client never takes a short or wrong export for a whole one.
        h.upstream.held_paths.add(path)
        response = h.run(h.proxy.get(f"https://proxy.test{export_path(image)}", unbuffered=True))
        assert response.code == 200
        body = treq.content(response)
        [held] = h.upstream.held[path]
        held.write(corrupt)
        held.finish()
        h.settle()
        with pytest.raises(ResponseFailed):
            h.run(body)
    else:
        code, envelope, _ = h.lxd(export_path(image))
        assert_error(code, envelope, 502)
        assert f"sha256 of {path}" in envelope["error"]
    assert h.index.get(sha(good)) is None
    assert not h.store.exists(sha(good))
    assert h.temp_files() == []
    if not unified:
        # The metadata file verified on its own: kept, as the simplestreams face keeps it.
        assert h.store.exists(sha(h.files[image.files[0]]))
    listed = h.metadata_of(f"/1.0/images/{image.fingerprint}")
    assert (listed["cached"], listed["auto_update"]) == (False, False)
    # A later export fetches the file again, and succeeds once the upstream has it right.
    h.files[path] = good
    h.upstream.held_paths.clear()
    check_export(image, *h.call("GET", export_path(image)))
    assert image_requests(h).count(path) == 2


@pytest.mark.parametrize(("upstream_status", "status"), [(404, 404), (500, 502), (503, 502)])
def test_an_upstream_error_for_a_file_is_an_envelope(
    h: FaceHarness, upstream_status: int, status: int
) -> None:
    image = h.image(SPLIT_OS, "amd64", V3)
    h.upstream.statuses[image.files[1]] = upstream_status
    code, envelope, _ = h.lxd(export_path(image))
    assert_error(code, envelope, status)
    assert image.files[1] in envelope["error"]
    assert h.index.get(sha(h.files[image.files[1]])) is None
    assert h.temp_files() == []


def test_a_hit_after_a_miss_through_the_simplestreams_face_asks_the_upstream_nothing(
    h: FaceHarness,
) -> None:
    image = h.image(SPLIT_OS, "arm64", V2, VM)
    for path in (INDEX, PRODUCTS, *image.files):
        assert h.fetch(path)[:2] == (200, h.files[path])
    before = len(h.upstream.requests)
    check_export(image, *h.call("GET", export_path(image)))
    assert len(h.upstream.requests) == before
    stats = h.index.stats()
    assert stats.hits == 1


def test_hits_through_this_face_count_uses(h: FaceHarness) -> None:
    image = h.image(SPLIT_OS, "amd64", V1)
    h.store_files(image.files)
    h.clock.advance(100)
    sizes = []
    for _ in range(2):
        code, body, response = h.call("GET", export_path(image))
        check_split_export(image, code, body, response)
        sizes.append(len(body))
    digests = [sha(h.files[p]) for p in image.files]
    assert [h.index.pending_uses.get(d) for d in digests] == [2, 2]
    stats = h.index.stats()
    assert (stats.hits, stats.misses) == (2, 0)
    assert stats.bytes_from_cache == stats.bytes_served == sum(sizes)
    h.index.flush_usage()
    for digest in digests:
        record = h.index.get(digest)
        assert record is not None
        assert record.use_count == 2
        assert record.last_used_at == h.clock.seconds()
    listed = h.metadata_of(f"/1.0/images/{image.fingerprint}")
    assert listed["last_used_at"] != "0001-01-01T00:00:00Z"


def test_head_of_an_export_sends_the_headers_only(h: FaceHarness) -> None:
    image = h.image(UNIFIED_OS, "amd64", V1)
    h.store_files(image.files)
    code, body, response = h.call("HEAD", export_path(image))
    assert (code, body) == (200, b"")
    assert response.headers.getRawHeaders(b"Content-Disposition") == [
        f"inline;filename={image.fingerprint}.tar.gz".encode()
    ]


# -- offline ----------------------------------------------------------------------------------


def test_offline_lists_only_images_whose_files_are_all_stored(h: FaceHarness) -> None:
    # The catalogue is held from an earlier listing.
    assert len(h.metadata_of("/1.0/images")) == len(h.listed())
    stored = h.image(SPLIT_OS, "amd64", V2)
    unified = h.image(UNIFIED_OS, "arm64", V1)
    h.store_files(stored.files)
    h.store_files(unified.files)
    # The V3 VM has its metadata file stored only.
    h.store_files(h.image(SPLIT_OS, "amd64", V3, VM).files[:1])
    # The copies are stale by now, and the upstream has gone down: the next listing gets the
    # stale copy at once, and its refresh in the background fails and marks it offline, as
    # any other failure would.
    h.clock.advance(TTL + 1)
    h.upstream_down()
    assert len(h.metadata_of("/1.0/images")) == len(h.listed())
    h.settle()
    assert h.health.offline
    before = len(image_requests(h))

    urls = h.metadata_of("/1.0/images")
    assert sorted(urls) == sorted(f"/1.0/images/{i.fingerprint}" for i in (stored, unified))
    objects = h.metadata_of("/1.0/images?recursion=1")
    assert {o["fingerprint"] for o in objects} == {stored.fingerprint, unified.fingerprint}
    assert all(o["cached"] for o in objects)
    # The names follow: the newest stored version, nothing for what cannot be served.
    entry = h.metadata_of(f"/1.0/images/aliases/{SPLIT_ALIAS.replace('/', '%2F')}")
    assert entry["target"] == stored.fingerprint
    code, envelope, _ = h.lxd(f"/1.0/images/aliases/{SPLIT_ALIAS.replace('/', '%2F')}%2Fvm")
    assert_error(code, envelope, 404)
    # What is listed exports; what is not is not found.
    check_export(stored, *h.call("GET", export_path(stored)))
    missing = h.image(SPLIT_OS, "amd64", V3)
    code, envelope, _ = h.lxd(export_path(missing))
    assert_error(code, envelope, 404)
    # Each listing probed the catalogue; no image file was asked of the upstream.
    assert len(image_requests(h)) == before


def test_forced_offline_without_a_catalogue_is_503(tmp_path: Any) -> None:
    h = FaceHarness(tmp_path, forced_offline=True)
    try:
        code, envelope, response = h.lxd("/1.0/images")
        assert_error(code, envelope, 503)
        assert "offline" in envelope["error"]
        assert response.headers.getRawHeaders(b"Retry-After")
        assert h.upstream.requests == []
        # The server itself still answers.
        assert h.metadata_of("/1.0")["auth"] == "untrusted"
    finally:
        h.close()


def test_head_of_an_export_miss_starts_no_download(h: FaceHarness) -> None:
    image = h.image(SPLIT_OS, "amd64", V1)
    code, body, response = h.call("HEAD", export_path(image))
    assert (code, body) == (200, b"")
    # The same length a GET would send, from the catalogue's sizes alone.
    length = int(response.headers.getRawHeaders(b"Content-Length")[0])
    assert length > sum(len(h.files[path]) for path in image.files)
    assert all(h.upstream_gets(path) == 0 for path in image.files)
    assert not any(h.store.exists(sha(h.files[path])) for path in image.files)
    code, body, _ = h.call("GET", export_path(image))
    assert code == 200 and len(body) == length


def test_clients_of_both_families_taking_turns_parse_each_catalogue_once(
    h: FaceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.metadata

    calls: list[str] = []
    real = proxy.metadata.parse_catalogue

    def counting(data: bytes, family: Any = "lxd") -> Any:
        calls.append(family)
        return real(data, family)

    # Each family's catalogue parses its products file (items and images in one pass).
    monkeypatch.setattr(proxy.metadata, "parse_catalogue", counting)
    for _ in range(3):
        h.metadata_of("/1.0/images", lxd_agent("x86_64"))
        h.metadata_of("/1.0/images", incus_agent("x86_64"))
    assert sorted(calls) == ["incus", "lxd"]
