"""
Smoke test of the e2e harness: the real C{lxc} client and a real LXD daemon
against a plain HTTPS simplestreams server (C{twisted.web.static.File} over
the tree of L{tests.helpers.tree}) running in the test's reactor.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
# No stubs or py.typed marker in pytest-twisted.
import pytest_twisted  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import PrivateCertificate
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.http import Request
from twisted.web.server import Site
from twisted.web.static import File

from tests.e2e.lxd import (
    CommandTimeout,
    LxcClient,
    LxdDaemon,
    mounts_under,
    run_process,
    running_daemon,
)
from tests.helpers.tree import Tree, build_tree

ALIAS = "testos/1.0"


def make_certificate() -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM, key PEM) for DNS:localhost then IP:127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class _PlainFile(File):
    """
    C{static.File} without its C{.gz}/C{.bz2} C{Content-Encoding}: Go
    transparently gunzips a body so labelled, so a C{.tar.gz} image file would
    reach LXD decompressed and fail its sha256.
    """

    contentEncodings: dict[str, str] = {}


@attrs.define
class Recorder:
    """What reached the server: HTTP requests and the raw opening bytes of every connection."""

    requests: list[dict[str, Any]] = attrs.field(factory=list)
    connections: list[dict[str, Any]] = attrs.field(factory=list)


class _RecordingSite(Site):
    def __init__(self, resource: _PlainFile, recorder: Recorder) -> None:
        super().__init__(resource)
        self.recorder = recorder

    def log(self, request: Request) -> None:
        self.recorder.requests.append(
            {
                "method": request.method.decode(),
                "path": request.uri.decode(),
                "code": request.code,
                "user_agent": (request.getHeader("user-agent") or ""),
                "tls": request.isSecure(),
            }
        )


class _Sniffer(ProtocolWrapper):
    """Record the first bytes each way, below TLS, to see plain HTTP sent to the TLS port."""

    def connectionMade(self) -> None:
        self.record: dict[str, Any] = {"received": b"", "sent": b""}
        factory = self.factory
        assert isinstance(factory, _SniffingFactory)
        factory.recorder.connections.append(self.record)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if not self.record["received"]:
            self.record["received"] = data[:1024]
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        if not self.record["sent"]:
            self.record["sent"] = data[:1024]
        super().write(data)


class _SniffingFactory(WrappingFactory):
    protocol = _Sniffer

    def __init__(self, wrapped: TLSMemoryBIOFactory, recorder: Recorder) -> None:
        super().__init__(wrapped)
        self.recorder = recorder


@attrs.frozen
class Served:
    url: str
    cert_pem: bytes
    tree: Tree
    recorder: Recorder


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    if shutil.which("mksquashfs") is None:
        pytest.skip("mksquashfs is not installed (apt-get install squashfs-tools)")
    tree = build_tree(tmp_path / "tree")
    cert_pem, key_pem = make_certificate()
    recorder = Recorder()
    options = PrivateCertificate.loadPEM(key_pem + cert_pem).options()
    site = _RecordingSite(_PlainFile(str(tree.root)), recorder)
    tls_factory = TLSMemoryBIOFactory(options, False, site)
    endpoint = TCP4ServerEndpoint(_reactor, 0, interface="127.0.0.1")
    port: IListeningPort = await endpoint.listen(_SniffingFactory(tls_factory, recorder))
    try:
        url = f"https://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        yield Served(url, cert_pem, tree, recorder)
    finally:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped


@pytest_twisted.async_yield_fixture
async def lxd_daemon() -> AsyncIterator[LxdDaemon]:
    async with running_daemon() as daemon:
        yield daemon


def _report(recorder: Recorder) -> str:
    return json.dumps(
        {
            "requests": recorder.requests,
            "connections": [
                {k: repr(v) for k, v in c.items()} for c in recorder.connections
            ],
        },
        indent=1,
    )


def _plain_http_attempts(recorder: Recorder) -> int:
    return sum(1 for c in recorder.connections if c["received"].startswith(b"GET "))


@pytest.mark.loopback
@pytest.mark.lxc
@pytest_twisted.ensureDeferred
async def test_client_lists_and_exports(served: Served, tmp_path: Path) -> None:
    """The real client reads the tree through a pinned self-signed certificate."""
    if shutil.which("lxc") is None:
        pytest.skip("lxc is not installed (apt-get install lxd-client)")
    tree = served.tree
    client = LxcClient(tmp_path / "lxc")
    await client.add_simplestreams_remote("t", served.url, served.cert_pem)

    images = await client.image_list("t")
    listed = sorted(i["fingerprint"] for i in images)
    assert listed == sorted(i.fingerprint for i in tree.images), _report(served.recorder)

    image = tree.image(ALIAS)
    info = await client.image_info(f"t:{ALIAS}")
    assert f"Fingerprint: {image.fingerprint}" in info

    files = await client.image_export(f"t:{ALIAS}", tmp_path / "export")
    digests = sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    assert digests == sorted(f.sha256 for f in image.files)
    # Each file is tried over plain HTTP on the TLS port first; the TLS-only
    # port closes those connections and the client falls back to HTTPS.
    assert _plain_http_attempts(served.recorder) == len(image.files), _report(served.recorder)


@pytest.mark.loopback
@pytest.mark.lxc
@pytest.mark.lxd
@pytest_twisted.ensureDeferred
async def test_daemon_copies_image(served: Served, lxd_daemon: LxdDaemon) -> None:
    """The daemon downloads from 127.0.0.1 despite its dead proxy, with the client's pinned cert."""
    image = served.tree.image(ALIAS)
    client = lxd_daemon.client()
    await client.add_simplestreams_remote("t", served.url, served.cert_pem)
    assert await client.image_list("local") == []
    before = len(served.recorder.requests)

    await client.image_copy(f"t:{ALIAS}", "local")

    images = await client.image_list("local")
    assert [i["fingerprint"] for i in images] == [image.fingerprint], _report(served.recorder)
    daemon_requests = served.recorder.requests[before:]
    paths = [r["path"] for r in daemon_requests]
    for item in image.files:
        assert "/" + item.path in paths, _report(served.recorder)
    # The daemon's User-Agent names its storage driver; the client's does not.
    assert all(r["user_agent"].endswith("(dir 1)") for r in daemon_requests), paths


@pytest.mark.loopback
@pytest.mark.lxc
@pytest.mark.lxd
@pytest_twisted.ensureDeferred
async def test_daemon_creates_instance_from_remote(
    served: Served, lxd_daemon: LxdDaemon
) -> None:
    """C{lxc init} from the remote works (starting an instance does not, here)."""
    image = served.tree.image(ALIAS)
    client = lxd_daemon.client()
    await client.add_simplestreams_remote("t", served.url, served.cert_pem)

    await client.run("init", f"t:{ALIAS}", "c1", check=True)

    images = await client.image_list("local")
    assert [(i["fingerprint"], i["cached"]) for i in images] == [(image.fingerprint, True)]
    listed = json.loads((await client.run("list", "--format", "json", check=True)).out)
    assert [(c["name"], c["status"]) for c in listed] == [("c1", "Stopped")]


@pytest_twisted.ensureDeferred
async def test_command_timeout_kills() -> None:
    """A command past its limit is killed and reported with its output so far."""
    started = _reactor.seconds()
    with pytest.raises(CommandTimeout) as caught:
        await run_process(
            ["/bin/sh", "-c", "echo partial; exec sleep 30"], {"PATH": "/usr/bin:/bin"}, 0.5
        )
    assert _reactor.seconds() - started < 10
    assert caught.value.result.out == "partial\n"
    assert caught.value.result.code == 128 + 9


@pytest.mark.lxd
@pytest_twisted.ensureDeferred
async def test_daemon_stop_cleans_up() -> None:
    """stop() ends the daemon, unmounts its tmpfs mounts and removes its directory, twice over."""
    LxdDaemon.skip_if_unavailable()
    daemon = LxdDaemon.temporary()
    try:
        await daemon.start()
        pid = daemon.pid
        assert pid is not None
        assert mounts_under(daemon.base_dir) != []
    finally:
        await daemon.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert mounts_under(daemon.base_dir) == []
    assert not daemon.base_dir.exists()
    await daemon.stop()
