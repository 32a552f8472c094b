"""Certificate material: where it comes from, and checking it before use.

PEM is read by the same Rust code the workers run (`_core.parse_bundle`):
blocks, key formats, the key matching the leaf. The `cryptography`
package then reads the certificates for what an operator wants to know:
subject, validity window, whether the chain is complete.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import _core
from .errors import MaterialError

__all__ = ["Material", "Source", "describe_subject", "load_material"]

# Certificate, key and CA files are a few KiB; a long chain or a CA bundle
# stays far below this. Anything larger is a mistake (or /dev/zero).
MAX_FILE_SIZE = 1024 * 1024
# Clients refuse chains much longer than this; so does the gateway.
MAX_CHAIN = 10

_SUBJECT_ORDER = (
    (NameOID.COMMON_NAME, "CN"),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"),
    (NameOID.ORGANIZATION_NAME, "O"),
    (NameOID.LOCALITY_NAME, "L"),
    (NameOID.STATE_OR_PROVINCE_NAME, "S"),
    (NameOID.COUNTRY_NAME, "C"),
)


@dataclass(frozen=True)
class Source:
    """One half of a certificate pair: a file, or PEM given inline.

    `origin` says where the setting came from (a flag or a config field),
    so that every message can name it.
    """

    what: str  # "certificate", "key" or "client CA"
    origin: str
    path: str | None = None
    inline: str | None = None
    # What messages show instead of the path when it came from a secret.
    shown: str | None = None

    @classmethod
    def file(cls, what: str, path: str, origin: str, *, shown: str | None = None) -> Source:
        return cls(what=what, origin=origin, path=path, shown=shown)

    @classmethod
    def text(cls, what: str, pem: str, origin: str) -> Source:
        return cls(what=what, origin=origin, inline=pem)

    @property
    def is_file(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        """How messages refer to this source."""
        if self.shown is not None:
            return f"{self.what} file '{self.shown}' ({self.origin})"
        if self.path is not None:
            return f"{self.what} file '{self.path}'"
        return f"inline {self.what} ({self.origin})"

    def read(self) -> bytes:
        """The current bytes; a missing or unreadable file is an io error."""
        if self.inline is not None:
            return self.inline.encode()
        assert self.path is not None
        try:
            # O_NONBLOCK: a FIFO put where a certificate belongs must not
            # block the supervisor (it is refused just below).
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            reason = err.strerror or str(err)
            raise MaterialError(f"{self.describe()}: cannot read it: {reason}", kind="io") from None
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "a pipe, device or socket"
            raise MaterialError(f"{self.describe()}: not a regular file ({kind})", kind="io")
        with os.fdopen(fd, "rb") as handle:
            if status.st_size > MAX_FILE_SIZE:
                raise MaterialError(
                    f"{self.describe()}: {status.st_size} bytes, more than the "
                    f"{MAX_FILE_SIZE // 1024} KiB a certificate file may hold"
                )
            try:
                data = handle.read(MAX_FILE_SIZE + 1)
            except OSError as err:
                reason = err.strerror or str(err)
                raise MaterialError(
                    f"{self.describe()}: cannot read it: {reason}", kind="io"
                ) from None
        if len(data) > MAX_FILE_SIZE:
            raise MaterialError(
                f"{self.describe()}: more than the {MAX_FILE_SIZE // 1024} KiB a certificate "
                "file may hold"
            )
        # Only a file that holds a private key must be private: when the
        # certificate was put in the key slot, the PEM check names that,
        # and chmod advice would send the operator the wrong way.
        if self.what == "key" and b"PRIVATE KEY-----" in data:
            _check_private_mode(self, status)
        return data

    def __repr__(self) -> str:
        # Inline material may be a private key: never show it.
        label = self.shown or (self.path if self.path is not None else "<inline>")
        return f"Source({self.what!r}, {label!r}, origin={self.origin!r})"


def _check_private_mode(source: Source, status: os.stat_result) -> None:
    """A private key file must be 0600, or 0640 when owned by root (the
    key then belongs to root and a group such as ssl-cert may read it)."""
    mode = stat.S_IMODE(status.st_mode)
    group_readable_by_root = status.st_uid == 0 and mode & 0o037 == 0
    if mode & 0o077 and not group_readable_by_root:
        raise MaterialError(
            f"{source.describe()}: readable by others (mode {mode:04o}); make it 0600 "
            "(chmod 600), or 0640 owned by root",
            kind="io",
        )


@dataclass(frozen=True)
class Material:
    """A checked chain and key, and what the gateway says about them."""

    bundle: _core.Bundle
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    notes: tuple[str, ...]
    names: tuple[str, ...] = ()
    client_auth: str = "none"
    client_ca: tuple[bytes, ...] = ()

    @property
    def fingerprint(self) -> str:
        return self.bundle.fingerprint

    def frame(self, scope: str, generation: int) -> bytes:
        """The Bundle frame that carries this material to a worker."""
        return self.bundle.frame(scope, generation, self.client_auth, list(self.client_ca))

    def validity_problem(self, now: dt.datetime | None = None) -> str | None:
        """Why the leaf is outside its validity window, or None."""
        now = now or dt.datetime.now(dt.UTC)
        if now > self.not_after:
            return f"certificate expired on {_day(self.not_after)}"
        if now < self.not_before:
            return f"certificate is not valid before {_day(self.not_before)}"
        return None


def load_material(
    cert: Source,
    key: Source,
    *,
    client_auth: str = "none",
    client_ca: Source | None = None,
    require_valid: bool = False,
    now: dt.datetime | None = None,
) -> Material:
    """Reads and checks a pair; raises MaterialError with one line that
    names the source at fault and the reason.

    With `require_valid`, a leaf outside its validity window is refused
    (a reload); without it the caller decides (startup serves an expired
    certificate and says so loudly).
    """
    cert_pem = cert.read()
    key_pem = key.read()
    ca = (client_ca, client_ca.read()) if client_ca is not None else None
    return check_material(
        cert_pem,
        key_pem,
        cert,
        key,
        client_auth=client_auth,
        client_ca=ca,
        require_valid=require_valid,
        now=now,
    )


def check_material(
    cert_pem: bytes,
    key_pem: bytes,
    cert: Source,
    key: Source,
    *,
    client_auth: str = "none",
    client_ca: tuple[Source, bytes] | None = None,
    require_valid: bool = False,
    now: dt.datetime | None = None,
) -> Material:
    """As load_material, for bytes already read."""
    try:
        bundle = _core.parse_bundle(cert_pem, key_pem)
    except _core.PemError as err:
        slot = getattr(err, "slot", "pair")
        if slot == "certificate":
            where = cert.describe()
        elif slot == "key":
            where = key.describe()
        else:
            where = f"{cert.describe()} and {key.describe()}"
        raise MaterialError(f"{where}: {err}") from None

    try:
        chain = [x509.load_der_x509_certificate(der) for der in bundle.certificates]
        leaf = chain[0]
        if len(chain) > MAX_CHAIN:
            raise MaterialError(
                f"{cert.describe()}: {len(chain)} certificates; a chain of more than "
                f"{MAX_CHAIN} is refused by clients"
            )
        _check_server_usage(leaf, cert)
        material = Material(
            bundle=bundle,
            subject=describe_subject(leaf.subject),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            notes=tuple(_chain_notes(chain, cert)),
            names=_names(leaf),
            client_auth=client_auth,
            client_ca=_trust_anchors(*client_ca) if client_ca is not None else (),
        )
    except ValueError as err:
        # cryptography reads fields lazily and is stricter than rustls'
        # parser; refusing what either cannot read keeps what the operator
        # is told and what clients are served the same.
        raise MaterialError(f"{cert.describe()}: certificate is not valid X.509: {err}") from None
    if require_valid:
        problem = material.validity_problem(now)
        if problem is not None:
            raise MaterialError(f"{cert.describe()}: {problem}")
    return material


def _check_server_usage(leaf: x509.Certificate, cert: Source) -> None:
    """A leaf restricted to other uses (a client certificate) would make
    every client refuse the server: refuse it first."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    allowed = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if not allowed & set(usage):
        raise MaterialError(
            f"{cert.describe()}: the certificate is not for servers (its extended key "
            "usage lacks serverAuth); clients would refuse it"
        )


def _trust_anchors(source: Source, pem: bytes) -> tuple[bytes, ...]:
    """The CERTIFICATE blocks of a client CA file, each valid X.509."""
    try:
        blocks = _core.parse_pem(pem)
    except _core.PemError as err:
        raise MaterialError(f"{source.describe()}: {err}") from None
    anchors = tuple(der for label, der in blocks if label == "CERTIFICATE")
    if not anchors:
        found = ", ".join(label for label, _ in blocks)
        raise MaterialError(f"{source.describe()}: no CERTIFICATE block (found {found})")
    for index, der in enumerate(anchors, start=1):
        try:
            x509.load_der_x509_certificate(der)
        except ValueError as err:
            raise MaterialError(
                f"{source.describe()}: certificate #{index} is not valid X.509: {err}"
            ) from None
    return anchors


def _names(leaf: x509.Certificate) -> tuple[str, ...]:
    """The leaf's subjectAltNames: DNS names and IP addresses."""
    try:
        extension = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names = extension.value.get_values_for_type(x509.DNSName)
    addresses = extension.value.get_values_for_type(x509.IPAddress)
    return tuple(names) + tuple(str(address) for address in addresses)


def describe_subject(name: x509.Name) -> str:
    """The subject as the startup line shows it: CN, OU, O, L, S, C in
    that order, only those present, values as written."""
    parts = [
        f"{short}={_printable(str(attribute.value))}"
        for oid, short in _SUBJECT_ORDER
        for attribute in name.get_attributes_for_oid(oid)
    ]
    if parts:
        return ", ".join(parts)
    return name.rfc4514_string() or "(empty subject)"


def _printable(value: str) -> str:
    """The value as written, but control characters escaped: a subject
    must not be able to forge log lines."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode() for char in value
    )


def _chain_notes(chain: list[x509.Certificate], cert: Source) -> list[str]:
    """Facts about the chain worth a line in the log, not errors.

    A file with the leaf alone is fine when clients trust its issuer
    directly (a private CA); when the issuer is an intermediate, clients
    that trust only the root fail with "unknown issuer". We cannot tell
    the two apart from the file, so we say what we see.
    """
    leaf = chain[0]
    if leaf.issuer == leaf.subject:
        return []
    if any(other.subject == leaf.issuer for other in chain[1:]):
        return []
    return [
        f"chain incomplete: the issuer of the leaf "
        f"({describe_subject(leaf.issuer)}) is not in {cert.describe()}; "
        f"fine if clients trust that issuer directly, but if it is an "
        f"intermediate CA, append it after the leaf"
    ]


def _day(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
