"""Server certificates for the benches: leaves for `localhost` and
127.0.0.1, ECDSA P-256 or RSA-2048, signed by one throwaway CA.

spicegw's own `_pki` makes ECDSA leaves only; the RSA leaf is built here
with the same extensions, so the two differ in the key alone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spicegw import _pki

NAMES = ("localhost", "127.0.0.1")
LEAF_DAYS = 30


@dataclass(frozen=True)
class ServerCert:
    """A leaf and its key on disk, with the CA that signed it."""

    kind: str  # "ecdsa" or "rsa"
    cert: Path
    key: Path
    ca: Path
    # SHA-256 of the leaf's DER, hex: what a client sees served.
    fingerprint: str


@dataclass(frozen=True)
class Authority:
    issued: _pki.Issued
    path: Path


def make_ca(folder: Path) -> Authority:
    folder.mkdir(parents=True, exist_ok=True)
    issued = _pki.make_ca("spicegw bench CA")
    path = folder / "ca.pem"
    path.write_bytes(issued.cert_pem())
    return Authority(issued, path)


def make_server_cert(folder: Path, ca: Authority, kind: str, stem: str) -> ServerCert:
    """A `localhost` leaf of `kind` written to `folder`/`stem`.pem/.key."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "ecdsa":
        issued = _pki.issue(ca.issued, "localhost", names=NAMES)
        cert, key_pem = issued.cert, issued.key_pem()
    elif kind == "rsa":
        cert, key_pem = _rsa_leaf(ca.issued)
    else:
        raise ValueError(f"unknown key kind {kind!r}")

    cert_path = folder / f"{stem}.pem"
    key_path = folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    return ServerCert(kind, cert_path, key_path, ca.path, fingerprint)


def _rsa_leaf(ca: _pki.Issued) -> tuple[x509.Certificate, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert, key_pem
