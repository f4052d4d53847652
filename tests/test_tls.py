"""TLS: the generated server certificate, server options, and upstream trust."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from proxy.errors import ConfigError
from proxy.tls import (
    PlatformTrustWithExtraRoots,
    certificate_fingerprint,
    certificate_names,
    ensure_server_certificate,
    server_tls_options,
    upstream_tls_policy,
)
from tests.helpers.certs import CA, make_ca

reactor: Any = _reactor
TIMEOUT_SECONDS = 10
HOSTS = ["builder", "builder.example.net"]


def load(path: FilePath[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.getContent())


def sans(certificate: x509.Certificate) -> tuple[list[str], list[str]]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        san.get_values_for_type(x509.DNSName),
        [str(a) for a in san.get_values_for_type(x509.IPAddress)],
    )


# -- the generated certificate -------------------------------------------------------------


def test_certificate_names_order() -> None:
    dns, addresses = certificate_names(
        ["Proxy.Example", "10.1.2.3", "builder", "::1"], hosts=HOSTS
    )
    assert dns == ["proxy.example", "builder", "builder.example.net", "localhost"]
    assert [str(a) for a in addresses] == ["10.1.2.3", "::1", "127.0.0.1"]


def test_certificate_names_default_hosts() -> None:
    dns, _ = certificate_names([])
    host = socket.gethostname().lower()
    assert dns[-1] == "localhost"
    assert host in dns or not host


def test_generate(tmp_path: Path) -> None:
    state = FilePath(str(tmp_path))
    cert_path, key_path = ensure_server_certificate(state, ["proxy.test", "192.0.2.7"], HOSTS)
    assert cert_path == state.child("tls").child("server.crt")
    assert key_path == state.child("tls").child("server.key")
    assert stat.S_IMODE(os.stat(key_path.path).st_mode) == 0o600
    assert sorted(p.basename() for p in state.child("tls").children()) == [
        "server.crt",
        "server.key",
    ]

    certificate = load(cert_path)
    # The first DNS SAN is what the LXD client checks: the configured name comes first.
    assert sans(certificate) == (
        ["proxy.test", "builder", "builder.example.net", "localhost"],
        ["192.0.2.7", "127.0.0.1", "::1"],
    )
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)
    assert certificate.not_valid_before_utc <= datetime.datetime.now(datetime.timezone.utc)
    key = serialization.load_pem_private_key(key_path.getContent(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == certificate.public_key()


def test_kept_across_starts(tmp_path: Path) -> None:
    state = FilePath(str(tmp_path))
    cert_path, _ = ensure_server_certificate(state, ["proxy.test"], HOSTS)
    first = certificate_fingerprint(cert_path)
    # Same names, fewer names, or a renamed host: the pinned certificate stays.
    ensure_server_certificate(state, ["proxy.test"], HOSTS)
    ensure_server_certificate(state, [], ["renamed"])
    assert certificate_fingerprint(cert_path) == first


@pytest.mark.parametrize("added", ["new.test", "NEW.test", "198.51.100.1"])
def test_regenerated_for_a_new_name(tmp_path: Path, added: str) -> None:
    state = FilePath(str(tmp_path))
    cert_path, _ = ensure_server_certificate(state, ["proxy.test"], HOSTS)
    first = certificate_fingerprint(cert_path)
    ensure_server_certificate(state, ["proxy.test", added], HOSTS)
    assert certificate_fingerprint(cert_path) != first
    dns, addresses = sans(load(cert_path))
    assert added.lower() in dns + addresses


def test_regenerated_when_broken(tmp_path: Path) -> None:
    state = FilePath(str(tmp_path))
    cert_path, key_path = ensure_server_certificate(state, [], HOSTS)
    first = certificate_fingerprint(cert_path)

    # A key that does not match, as a crash between the two writes could leave.
    other = ec.generate_private_key(ec.SECP256R1())
    key_path.setContent(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ensure_server_certificate(state, [], HOSTS)
    second = certificate_fingerprint(cert_path)
    assert second != first

    cert_path.setContent(b"garbage")
    ensure_server_certificate(state, [], HOSTS)
    assert certificate_fingerprint(cert_path) not in (first, second)

    key_path.remove()
    ensure_server_certificate(state, [], HOSTS)
    assert key_path.exists()


def test_fingerprint(tmp_path: Path) -> None:
    cert_path, _ = ensure_server_certificate(FilePath(str(tmp_path)), [], HOSTS)
    der = load(cert_path).public_bytes(serialization.Encoding.DER)
    assert certificate_fingerprint(cert_path) == hashlib.sha256(der).hexdigest()
    assert certificate_fingerprint(cert_path.path) == hashlib.sha256(der).hexdigest()


def test_server_options_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError):
        server_tls_options(str(tmp_path / "missing.pem"), str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError):
        server_tls_options(str(tmp_path / "junk.pem"), str(tmp_path / "junk.pem"))


def test_upstream_policy_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError):
        upstream_tls_policy(str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError):
        upstream_tls_policy(str(tmp_path / "junk.pem"))


# -- real loopback TLS ---------------------------------------------------------------------


class Greeter(Protocol):
    """Server side: says hello once the connection is up (sent after the handshake)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello\n")


@implementer(IHandshakeListener)
class Handshake(Protocol):
    """Client side: fires C{done} with the greeting, or fails with the reason it was lost."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()
        self.received = b""

    def handshakeCompleted(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"\n") and not self.done.called:
            self.done.callback(self.received)
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


def listen_tls_server(cert_path: str, key_path: str) -> IListeningPort:
    port: IListeningPort = reactor.listenSSL(
        0,
        Factory.forProtocol(Greeter),
        server_tls_options(cert_path, key_path),
        interface="127.0.0.1",
    )
    return port


async def connect(port: IListeningPort, hostname: str, ca_file: str | None) -> bytes:
    """Connect to 127.0.0.1:port, verifying the server as C{hostname} with the upstream policy."""
    policy = upstream_tls_policy(ca_file)
    creator = policy.creatorForNetloc(hostname.encode("ascii"), port.getHost().port)  # type: ignore[attr-defined]
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
    protocol = Handshake()
    await endpoint.connect(Factory.forProtocol(lambda: protocol)).addTimeout(TIMEOUT_SECONDS, reactor)
    return await protocol.done.addTimeout(TIMEOUT_SECONDS, reactor)


@pytest.fixture
def issued(tmp_path: Path) -> tuple[CA, str, str, str]:
    """A test CA, its PEM file, and a server cert + key it issued for localhost/127.0.0.1."""
    ca = make_ca()
    cert_pem, key_pem = ca.issue(["localhost", "127.0.0.1"])
    paths = tmp_path / "ca.pem", tmp_path / "server.crt", tmp_path / "server.key"
    for path, data in zip(paths, (ca.cert_pem, cert_pem, key_pem)):
        path.write_bytes(data)
    return ca, *(str(p) for p in paths)  # type: ignore[return-value]


@pytest_twisted.ensureDeferred
async def test_upstream_trust(issued: tuple[CA, str, str, str]) -> None:
    _, ca_file, cert_file, key_file = issued
    port = listen_tls_server(cert_file, key_file)
    try:
        assert await connect(port, "localhost", ca_file) == b"hello\n"
        # An IP address is checked against the IP SANs.
        assert await connect(port, "127.0.0.1", ca_file) == b"hello\n"
        # The test CA is not a system root: without ca_file the server is refused.
        with pytest.raises(SSL.Error, match="certificate verify failed"):
            await connect(port, "localhost", None)
        # A trusted certificate for another name or address is refused too.
        with pytest.raises(VerificationError, match="DNSMismatch"):
            await connect(port, "other.test", ca_file)
        with pytest.raises(VerificationError, match="IPAddressMismatch"):
            await connect(port, "127.0.0.2", ca_file)
    finally:
        await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_upstream_trust_keeps_the_system_roots(
    issued: tuple[CA, str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ca_file, the platform roots still count (OpenSSL reads them from SSL_CERT_FILE)."""
    _, ca_file, _, _ = issued
    system_ca = make_ca("system root")
    (tmp_path / "system.pem").write_bytes(system_ca.cert_pem)
    cert_pem, key_pem = system_ca.issue(["localhost"])
    (tmp_path / "sys.crt").write_bytes(cert_pem)
    (tmp_path / "sys.key").write_bytes(key_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
    port = listen_tls_server(str(tmp_path / "sys.crt"), str(tmp_path / "sys.key"))
    try:
        assert await connect(port, "localhost", None) == b"hello\n"
        assert await connect(port, "localhost", ca_file) == b"hello\n"
    finally:
        await maybeDeferred(port.stopListening)


def test_trust_root_type(issued: tuple[CA, str, str, str]) -> None:
    _, ca_file, _, _ = issued
    policy = upstream_tls_policy(ca_file)
    root = policy._trustRoot  # type: ignore[attr-defined]
    assert isinstance(root, PlatformTrustWithExtraRoots)
    assert [c.subject for c in root.extra] == [
        x509.load_pem_x509_certificate(Path(ca_file).read_bytes()).subject
    ]


def _stdlib_client(port: int, cafile: str, server_hostname: str, version: ssl.TLSVersion) -> tuple[str, bytes]:
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = version
    context.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_SECONDS) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            negotiated = tls.version() or ""
            return negotiated, tls.recv(100)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_generated_certificate_serves_tls13_and_tls12(tmp_path: Path) -> None:
    """
    A client that pins the generated certificate (as LXD does, with the first DNS SAN as
    the server name) completes TLS 1.3 and TLS 1.2 handshakes.
    """
    cert_path, key_path = ensure_server_certificate(FilePath(str(tmp_path)), ["proxy.test"], HOSTS)
    port = listen_tls_server(cert_path.path, key_path.path)
    number = port.getHost().port  # type: ignore[attr-defined]
    try:
        for version, name in [(ssl.TLSVersion.TLSv1_3, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")]:
            result = await deferToThread(
                _stdlib_client, number, cert_path.path, "proxy.test", version
            ).addTimeout(TIMEOUT_SECONDS, reactor)
            assert result == (name, b"hello\n")
        # A TLS 1.1 client is refused.
        with pytest.raises(ssl.SSLError):
            await deferToThread(
                _stdlib_client, number, cert_path.path, "proxy.test", ssl.TLSVersion.TLSv1_1
            ).addTimeout(TIMEOUT_SECONDS, reactor)
    finally:
        await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_certificate_chain_is_sent(tmp_path: Path) -> None:
    """Certificates after the first in tls_cert go out as the chain."""
    root = make_ca("root")
    cert_pem, key_pem = root.issue(["localhost"])
    (tmp_path / "chain.pem").write_bytes(cert_pem + root.cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    options = server_tls_options(str(tmp_path / "chain.pem"), str(tmp_path / "key.pem"))
    assert len(options.extraCertChain) == 1
