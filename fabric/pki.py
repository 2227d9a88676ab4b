"""Domain certificate authorities, host certificates, and the mutual-TLS contexts built on them.

Each domain has one CA; every host holds a key and a certificate that CA signed, as NetBackup's hosts do.
"""

from __future__ import annotations

import datetime
import functools
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CA_VALIDITY = datetime.timedelta(days=3650)
HOST_VALIDITY = datetime.timedelta(days=825)
# Clocks of simulated hosts may run a little behind the machine that issued the certificate.
BACKDATE = datetime.timedelta(days=1)


@dataclass(frozen=True)
class HostCredentials:
    """Where one host's certificate, private key and domain CA certificate live on disk."""

    host: str
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class DomainCA:
    """One domain's certificate authority: signs the certificates of that domain's hosts."""

    domain: str
    folder: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.folder / CA_CERT_FILE

    @classmethod
    def create(cls, domain: str, folder: Path) -> "DomainCA":
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fabric CA {domain}")])
        now = _now()
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_cert(folder / CA_CERT_FILE, certificate)
        _write_key(folder / CA_KEY_FILE, key)
        return cls(domain, folder, certificate, key)

    @classmethod
    def load(cls, folder: Path) -> "DomainCA":
        folder = Path(folder)
        certificate = x509.load_pem_x509_certificate((folder / CA_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((folder / CA_KEY_FILE).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{folder / CA_KEY_FILE}: not an EC private key")
        common_name = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        domain = str(common_name).removeprefix("fabric CA ")
        return cls(domain, folder, certificate, key)

    def issue(self, host: str, folder: Path) -> HostCredentials:
        """Make a key and certificate for `host`, good both as TLS server and as TLS client."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        public_key = key.public_key()
        ca_public_key = self.private_key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + HOST_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public_key), critical=False
            )
            .sign(self.private_key, hashes.SHA256())
        )
        cert_path = folder / f"{host}.pem"
        key_path = folder / f"{host}.key"
        _write_cert(cert_path, certificate)
        _write_key(key_path, key)
        return HostCredentials(host=host, cert=cert_path, key=key_path, ca=self.cert_path)


def server_context(creds: HostCredentials, max_tls: str, extra_cas: Iterable[Path] = ()) -> ssl.SSLContext:
    """The receiver's side of mutual TLS: presents `creds` and demands a client certificate.

    `extra_cas` are other domains' CA certificates to trust as well (cross-domain replication).
    Contexts are cached per arguments: building one parses keys and costs milliseconds per leg.
    """
    return _server_context(creds, _check_tls(max_tls), tuple(Path(p) for p in extra_cas))


def client_context(creds: HostCredentials, max_tls: str, extra_cas: Iterable[Path] = ()) -> ssl.SSLContext:
    """The opener's side of mutual TLS: presents `creds` and checks the receiver's host name.

    The caller passes the receiver's host name as `server_hostname` when it starts TLS.
    """
    return _client_context(creds, _check_tls(max_tls), tuple(Path(p) for p in extra_cas))


def clear_context_cache() -> None:
    """Forget cached contexts, e.g. after re-issuing a host's certificate at the same path."""
    _server_context.cache_clear()
    _client_context.cache_clear()


@functools.lru_cache(maxsize=256)
def _server_context(creds: HostCredentials, max_tls: str, extra_cas: tuple[Path, ...]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    _configure(context, creds, max_tls, extra_cas)
    return context


@functools.lru_cache(maxsize=256)
def _client_context(creds: HostCredentials, max_tls: str, extra_cas: tuple[Path, ...]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    _configure(context, creds, max_tls, extra_cas)
    return context


def _configure(context: ssl.SSLContext, creds: HostCredentials, max_tls: str, extra_cas: tuple[Path, ...]) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = TLS_VERSIONS[max_tls]
    # Strict RFC 5280 checks, so a malformed certificate fails here and not only on newer Pythons.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(certfile=creds.cert, keyfile=creds.key)
    for ca in (creds.ca, *extra_cas):
        context.load_verify_locations(cafile=ca)


def _check_tls(max_tls: str) -> str:
    if max_tls not in TLS_VERSIONS:
        raise ValueError(f"max_tls must be one of {sorted(TLS_VERSIONS)}, not {max_tls!r}")
    return max_tls


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_cert(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Create with 0600 from the start, so the key is never readable by others even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
