# -*- test-case-name: tests.test_tls -*-
"""TLS for both sides: the proxy's server certificate and the trust used towards upstreams.

The LXD client only speaks TLS 1.3, and when it pins a self-signed certificate it sets the
TLS server name to the certificate's first DNS subject alternative name; the generated
certificate therefore lists DNS names first, the configured ones before the host's.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
# Twisted defines the trust-root interface only in this private module.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.ssl import CertificateOptions, TLSVersion, platformTrust
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from proxy.config import is_dns_name, read_pem_certificates, read_pem_private_key

log = Logger()

CERT_FILE_NAME = "server.crt"
KEY_FILE_NAME = "server.key"
TLS_DIR_NAME = "tls"
CERT_LIFETIME = datetime.timedelta(days=3650)
# Backdate a little so that a client whose clock is behind ours still accepts the cert.
CERT_BACKDATE = datetime.timedelta(days=1)

PathLike = str | FilePath[str]


def _path(value: PathLike) -> FilePath[str]:
    return value if isinstance(value, FilePath) else FilePath(value)


def host_names() -> list[str]:
    """The names of this host usable as DNS SANs: short name, then fully qualified name."""
    names = []
    for candidate in (socket.gethostname(), socket.getfqdn()):
        name = candidate.strip().lower().rstrip(".")
        if is_dns_name(name):
            names.append(name)
    return names


def certificate_names(
    configured: Iterable[str], hosts: Sequence[str] | None = None
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """
    The subject alternative names of the generated certificate, as (DNS names, addresses).

    DNS names come in this order: the configured ones, the host's names (L{host_names}
    unless C{hosts} is given), then C{localhost}; addresses: the configured ones, then
    C{127.0.0.1} and C{::1}.  Duplicates are dropped, keeping the first.
    """
    dns: list[str] = []
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    everything = [*configured, *(host_names() if hosts is None else hosts), "localhost"]
    for name in [*everything, "127.0.0.1", "::1"]:
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            lowered = name.lower()
            if lowered not in dns:
                dns.append(lowered)
        else:
            if address not in addresses:
                addresses.append(address)
    return dns, addresses


def ensure_server_certificate(
    state_dir: FilePath[str], names: Iterable[str], hosts: Sequence[str] | None = None
) -> tuple[FilePath[str], FilePath[str]]:
    """
    Make sure a self-signed server certificate exists under C{state_dir/tls/} and return
    the paths of its certificate and key.

    A certificate is generated when there is none, when the pair on disk cannot be read or
    does not match, or when it lacks one of the configured C{names}; otherwise the existing
    one is kept, so that clients which pinned it keep working across restarts and host
    renames.  The key file is created with mode 0600.

    @param names: the configured extra names (C{server.tls_names}).
    @param hosts: the host's own names, by default L{host_names}.
    """
    tls_dir = state_dir.child(TLS_DIR_NAME)
    cert_path = tls_dir.child(CERT_FILE_NAME)
    key_path = tls_dir.child(KEY_FILE_NAME)
    wanted = list(names)
    reason = _reason_to_regenerate(cert_path, key_path, wanted)
    if reason is None:
        return cert_path, key_path
    dns, addresses = certificate_names(wanted, hosts)
    tls_dir.makedirs(ignoreExistingDirectory=True)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed(key, dns, addresses)
    # Key first: a crash between the two writes leaves a mismatched pair, which the next
    # start notices and replaces, rather than a certificate without its key.
    _write_atomically(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    log.info(
        "generated a self-signed certificate ({reason}) in {path} for {names}, "
        "sha256 fingerprint {fingerprint}",
        reason=reason,
        path=cert_path.path,
        names=", ".join([*dns, *map(str, addresses)]),
        fingerprint=certificate_fingerprint(cert_path),
    )
    return cert_path, key_path


def _reason_to_regenerate(
    cert_path: FilePath[str], key_path: FilePath[str], names: Sequence[str]
) -> str | None:
    if not cert_path.exists() or not key_path.exists():
        return "none yet"
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.getContent())
        key = serialization.load_pem_private_key(key_path.getContent(), password=None)
    except (OSError, ValueError, TypeError):
        return "the existing one could not be read"
    if key.public_key() != certificate.public_key():
        return "the existing key does not match"
    if certificate.not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc):
        return "the existing one has expired"
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "the existing one has no names"
    present = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    present_addresses = set(san.get_values_for_type(x509.IPAddress))
    for name in names:
        try:
            missing = ipaddress.ip_address(name) not in present_addresses
        except ValueError:
            missing = name.lower() not in present
        if missing:
            return f"the existing one lacks {name}"
    return None


def _self_signed(
    key: ec.EllipticCurvePrivateKey,
    dns: Sequence[str],
    addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lxd-image-proxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, dns[0]),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    public_key = key.public_key()
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    san += [x509.IPAddress(a) for a in addresses]
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write_atomically(path: FilePath[str], data: bytes, mode: int) -> None:
    """Write C{data} to a new file beside C{path}, created with C{mode}, then rename it over."""
    temporary = path.temporarySibling(".tmp")
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary.path, path.path)
    except BaseException:
        if temporary.exists():
            temporary.remove()
        raise


def server_tls_options(cert_path: PathLike, key_path: PathLike) -> CertificateOptions:
    """
    Server-side TLS options from PEM files: TLS 1.2 and 1.3 (LXD requires 1.3).

    Certificates after the first in C{cert_path} are sent as the chain.

    @raise ConfigError: a file cannot be read or holds no certificate or key.
    """
    # Any: Twisted's annotations still name pyOpenSSL's X509 and PKey, which pyOpenSSL has
    # deprecated; CertificateOptions hands the objects to pyOpenSSL, which takes
    # cryptography's own certificate and key objects.
    chain: list[Any] = list(read_pem_certificates(_path(cert_path).path, "server.tls_cert"))
    private_key: Any = read_pem_private_key(_path(key_path).path, "server.tls_key")
    return CertificateOptions(
        privateKey=private_key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def certificate_fingerprint(cert_path: PathLike) -> str:
    """The SHA-256 of the first certificate's DER encoding, as lower-case hex (as LXD shows it)."""
    certificate = x509.load_pem_x509_certificate(_path(cert_path).getContent())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


@implementer(IOpenSSLTrustRoot)
@frozen
class PlatformTrustWithExtraRoots:
    """
    The platform's trust store plus some extra roots.

    Twisted's own trust roots are either the platform's or a given list, never both; this
    one loads the platform's default verify paths and then adds each extra certificate to
    the same store.
    """

    extra: tuple[x509.Certificate, ...]

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        platformTrust()._addCACertsToContext(context)
        store = context.get_cert_store()
        assert store is not None
        for certificate in self.extra:
            store.add_cert(crypto.X509.from_cryptography(certificate))


def upstream_tls_policy(ca_file: str | None) -> IPolicyForHTTPS:
    """
    The TLS policy for one upstream: the system trust store, plus the PEM roots in
    C{ca_file} when given; the host name (or IP address) is checked by service_identity
    through L{twisted.internet.ssl.optionsForClientTLS}.

    @raise ConfigError: C{ca_file} cannot be read or holds no certificate.
    """
    if not ca_file:
        return BrowserLikePolicyForHTTPS(platformTrust())
    extra = tuple(read_pem_certificates(ca_file, "ca_file"))
    return BrowserLikePolicyForHTTPS(PlatformTrustWithExtraRoots(extra))
