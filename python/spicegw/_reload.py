"""Watching file-backed certificate material and judging each change.

The policy: poll, compare contents (never mtimes), resolve symlinks on
every read, read certificate and key from the same resolved generation,
and judge each distinct on-disk content exactly once. A pair is accepted
only when it parses, the key matches the leaf and the leaf is inside its
validity window; otherwise the previous pair keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from ._settings import ScopeSettings
from .certs import Material, Source, check_material
from .errors import MaterialError

log = logging.getLogger("runtime.tls")

OK = "ok"
IO_ERROR = "io_error"
PARSE_ERROR = "parse_error"
RESULTS = (OK, IO_ERROR, PARSE_ERROR)


@dataclass(frozen=True)
class Change:
    """The judgement of one new on-disk content of a scope.

    `result` is one of RESULTS, or "unchanged" when the new bytes decode to
    the pair already served (a file rewritten with other line ends).
    """

    scope: str
    result: str
    message: str
    material: Material | None = None


class ScopeWatch:
    """Decides, poll after poll, whether a scope's files hold something new."""

    def __init__(self, settings: ScopeSettings, served: Material, digest: bytes):
        assert settings.cert.path is not None and settings.key.path is not None
        self.settings = settings
        self._cert_path = settings.cert.path
        self._key_path = settings.key.path
        self._served = served
        self._served_digest = digest
        # The content judged last; the same content is never judged twice.
        self._judged_digest = digest
        self._last: Change | None = None

    @classmethod
    def start(cls, settings: ScopeSettings) -> tuple[ScopeWatch, Material]:
        """Loads the startup pair (raising MaterialError) and watches it."""
        cert_pem, key_pem = read_pair(settings.cert, settings.key)
        material = check_material(cert_pem, key_pem, settings.cert, settings.key)
        return cls(settings, material, _digest(cert_pem, key_pem)), material

    @property
    def served(self) -> Material:
        return self._served

    @property
    def last(self) -> Change | None:
        """The judgement of the content on disk at the last check, if that
        content is not what is served (a refused change stays refused)."""
        return self._last

    def check(self) -> Change | None:
        """Looks at the files once; None when there is nothing new."""
        change = self._judge()
        if change is not None:
            self._last = None if change.result in (OK, "unchanged") else change
        return change

    def _judge(self) -> Change | None:
        try:
            pair = _read_stable(self.settings.cert, self.settings.key)
        except MaterialError as err:
            digest = hashlib.sha256(f"io\0{err}".encode()).digest()
            if digest == self._judged_digest:
                return None
            self._judged_digest = digest
            return Change(self.settings.name, IO_ERROR, str(err))
        if pair is None:
            # Caught mid-rotation: the files changed while we read them.
            # Nothing is judged; the next poll sees the settled state.
            return None

        cert_pem, key_pem = pair
        digest = _digest(cert_pem, key_pem)
        if digest == self._judged_digest:
            return None
        self._judged_digest = digest
        if digest == self._served_digest:
            return Change(
                self.settings.name,
                "unchanged",
                "the files hold the served certificate again",
            )

        try:
            material = check_material(
                cert_pem,
                key_pem,
                self.settings.cert,
                self.settings.key,
                require_valid=True,
            )
        except MaterialError as err:
            result = IO_ERROR if err.kind == "io" else PARSE_ERROR
            return Change(self.settings.name, result, str(err))
        if material.bundle.same_as(self._served.bundle):
            self._served_digest = digest
            return Change(
                self.settings.name,
                "unchanged",
                "the files changed but decode to the served certificate and key",
            )
        return Change(self.settings.name, OK, "reloaded", material)

    def accept(self, change: Change) -> None:
        """Records that `change` is now served."""
        assert change.material is not None
        self._served = change.material
        self._served_digest = self._judged_digest


def read_pair(cert: Source, key: Source) -> tuple[bytes, bytes]:
    """Reads both halves, retrying a few times if caught mid-rotation."""
    for _ in range(5):
        pair = _read_stable(cert, key)
        if pair is not None:
            return pair
    return cert.read(), key.read()


def _read_stable(cert: Source, key: Source) -> tuple[bytes, bytes] | None:
    """Certificate and key from one generation, or None when a rotation
    happened while reading.

    Symlinks are resolved on every call (a Kubernetes secret volume swaps
    its `..data` link); if either path resolves differently after the
    reads, or a second read differs, the pair may mix two generations.
    """
    before = _resolved(cert), _resolved(key)
    cert_pem = cert.read()
    key_pem = key.read()
    after = _resolved(cert), _resolved(key)
    if before != after:
        return None
    if cert.read() != cert_pem or key.read() != key_pem:
        return None
    return cert_pem, key_pem


def _resolved(source: Source) -> str | None:
    if source.path is None:
        return None
    return os.path.realpath(source.path)


def _digest(cert_pem: bytes, key_pem: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in (cert_pem, key_pem):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()
