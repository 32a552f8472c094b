"""Files and certificates for the reload tests: the operations real
rotations perform (rename from a temporary name, rewrite in place, a
Kubernetes Secret volume's `..data` swap) and certificates made to
order, expired ones included.
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spicegw import _pki


def _private_cases() -> Path:
    """A copy of tests/fixtures/cases whose files only we may read.

    A checkout leaves the fixture keys readable by everyone, and spicegw
    rightly refuses such a key file; the tests use them the way a careful
    operator would.
    """
    source = Path(__file__).resolve().parent / "fixtures" / "cases"
    target = Path(tempfile.mkdtemp(prefix="spicegw-cases-")) / "cases"
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    for path in target.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    atexit.register(shutil.rmtree, target.parent, True)
    return target


CASES = _private_cases()

# The gap between two steps of a rotation: five polls at 200 ms, so
# every intermediate state is seen (the cases' events.sh use 3 s).
GAP = 1.0


def make_leaf(
    ca: _pki.Issued,
    common_name: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[bytes, bytes]:
    """A server certificate for localhost signed by `ca`, as (cert PEM,
    key PEM); the validity window is whatever the caller asks for, so
    an expired certificate is a valid signature on past dates."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def fingerprint(cert_pem: bytes) -> str:
    """Lowercase hex SHA-256 of the first certificate's DER."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def key_body_lines(pem: bytes) -> list[str]:
    """The base64 lines of every block in `pem` (what a leak would show)."""
    lines = pem.decode("ascii", errors="replace").replace("\r", "").split("\n")
    return [line for line in lines if len(line) >= 16 and not line.startswith("-----")]


# File operations of real rotations.


def write_private(path: Path, data: bytes) -> None:
    """Creates `path` with mode 0600, as a careful operator writes keys:
    spicegw refuses a private key file that others may read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def put(path: Path, data: bytes) -> None:
    """Writes a temporary file beside `path`, then renames it over
    `path`: the one atomic step of most rotation tools."""
    temporary = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    write_private(temporary, data)
    os.replace(temporary, path)


def put_all(*changes: tuple[Path, bytes]) -> None:
    """Renames several files in, one right after the other. The
    temporary files are all written first, so the renames follow each
    other within microseconds."""
    renames = []
    for path, data in changes:
        temporary = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        write_private(temporary, data)
        renames.append((temporary, path))
    for temporary, path in renames:
        os.replace(temporary, path)


def rewrite(path: Path, data: bytes) -> None:
    """Truncates `path` and writes `data` into the same inode, as a shell
    redirection (`cat new > cert.pem`) does."""
    with open(path, "r+b") as handle:
        handle.truncate(0)
        handle.write(data)


def pause(seconds: float = GAP) -> None:
    """The gap between two steps of a rotation (not a wait for a result)."""
    time.sleep(seconds)


class SecretVolume:
    """A folder laid out as the kubelet lays out a Secret volume.

    `..<stamp>/name` holds the files of one version, `..data` links to
    the current stamp folder, and each visible name links to
    `..data/name`. An update writes a new stamp folder, renames a new
    link over `..data` (the one atomic step) and deletes the old folder.
    """

    def __init__(self, folder: Path, files: dict[str, bytes]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._count = 0
        stamp = self._write_version(files)
        os.symlink(stamp, folder / "..data")
        for name in files:
            os.symlink(f"..data/{name}", folder / name)

    def path(self, name: str) -> Path:
        return self.folder / name

    def swap(self, files: dict[str, bytes]) -> None:
        old = os.readlink(self.folder / "..data")
        stamp = self._write_version(files)
        os.symlink(stamp, self.folder / "..data_tmp")
        os.replace(self.folder / "..data_tmp", self.folder / "..data")
        shutil.rmtree(self.folder / old)

    def _write_version(self, files: dict[str, bytes]) -> str:
        self._count += 1
        stamp = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._count}{random.randrange(10**6)}"
        (self.folder / stamp).mkdir()
        for name, data in files.items():
            write_private(self.folder / stamp / name, data)
        return stamp
