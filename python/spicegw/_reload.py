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
        """Loads the startup material (raising MaterialError) and watches it."""
        files = read_files(settings)
        material = _check(settings, files, require_valid=False)
        return cls(settings, material, _digest(files)), material

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
            files = _read_stable(self.settings)
        except MaterialError as err:
            digest = hashlib.sha256(f"io\0{err}".encode()).digest()
            if digest == self._judged_digest:
                return None
            self._judged_digest = digest
            return Change(self.settings.name, IO_ERROR, str(err))
        if files is None:
            # Caught mid-rotation: the files changed while we read them.
            # Nothing is judged; the next poll sees the settled state.
            return None

        digest = _digest(files)
        if digest == self._judged_digest:
            return None
        self._judged_digest = digest
        # After a refused change, good files again are a recovery: counted
        # ok and pushed, even when they hold the pair already served.
        recovering = self._last is not None
        if digest == self._served_digest:
            if recovering:
                return Change(
                    self.settings.name, OK, "reloaded (the served pair again)", self._served
                )
            return None

        try:
            material = _check(self.settings, files, require_valid=True)
        except MaterialError as err:
            result = IO_ERROR if err.kind == "io" else PARSE_ERROR
            return Change(self.settings.name, result, str(err))
        if (
            not recovering
            and material.bundle.same_as(self._served.bundle)
            and material.client_ca == self._served.client_ca
        ):
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


def load_scope(settings: ScopeSettings) -> tuple[Material, ScopeWatch | None]:
    """A scope's startup material, watched when it is file-backed.

    Errors name the scope: "scope cluster: certificate file '…': …".
    """
    try:
        if settings.reloadable:
            watch, material = ScopeWatch.start(settings)
            return material, watch
        return _check(settings, read_files(settings), require_valid=False), None
    except MaterialError as err:
        raise MaterialError(f"scope {settings.name}: {err}", kind=err.kind) from None


def read_files(settings: ScopeSettings) -> tuple[bytes, ...]:
    """Reads every source of a scope, retrying if caught mid-rotation."""
    for _ in range(5):
        files = _read_stable(settings)
        if files is not None:
            return files
    return tuple(source.read() for source in _sources(settings))


def _sources(settings: ScopeSettings) -> tuple[Source, ...]:
    if settings.client_ca is None:
        return settings.cert, settings.key
    return settings.cert, settings.key, settings.client_ca


def _check(settings: ScopeSettings, files: tuple[bytes, ...], *, require_valid: bool) -> Material:
    ca = (settings.client_ca, files[2]) if settings.client_ca is not None else None
    return check_material(
        files[0],
        files[1],
        settings.cert,
        settings.key,
        client_auth=settings.client_auth,
        client_ca=ca,
        require_valid=require_valid,
    )


def _read_stable(settings: ScopeSettings) -> tuple[bytes, ...] | None:
    """Every source from one generation, or None when a rotation happened
    while reading.

    Symlinks are resolved on every call (a Kubernetes secret volume swaps
    its `..data` link); if any path resolves differently after the reads,
    or a second read differs, the set may mix two generations.
    """
    sources = _sources(settings)
    before = [_resolved(source) for source in sources]
    first = tuple(source.read() for source in sources)
    after = [_resolved(source) for source in sources]
    if before != after:
        return None
    if tuple(source.read() for source in sources) != first:
        return None
    return first


def _resolved(source: Source) -> str | None:
    if source.path is None:
        return None
    return os.path.realpath(source.path)


def _digest(files: tuple[bytes, ...]) -> bytes:
    digest = hashlib.sha256()
    for part in files:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()
