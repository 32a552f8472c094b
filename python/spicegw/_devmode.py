"""`spicegw run --dev`: a development CA and a localhost certificate,
made once into the state folder and reused on later runs."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from . import _pki
from .errors import ConfigError

# A leaf this close to expiry is replaced (the CA is kept, so clients
# that trust it keep working).
_RENEW_BEFORE = dt.timedelta(days=30)
_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevMaterial:
    ca_path: str
    cert_path: str
    key_path: str
    created: bool


def state_dir(explicit: str | None = None) -> str:
    """--state-dir, else $SPICEGW_STATE_DIR, else the XDG state folder."""
    if explicit:
        return explicit
    if os.environ.get("SPICEGW_STATE_DIR"):
        return os.environ["SPICEGW_STATE_DIR"]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "spicegw")


def ensure(state: str) -> DevMaterial:
    """The development CA and localhost pair, made if missing or stale.

    Raises ConfigError when the state folder cannot be used.
    """
    try:
        return _ensure(state)
    except OSError as err:
        where = err.filename or state
        raise ConfigError(f"--state-dir '{state}': cannot use {where}: {err.strerror}") from None


def _ensure(state: str) -> DevMaterial:
    folder = os.path.join(state, "dev")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    ca_cert = os.path.join(folder, "ca.pem")
    ca_key = os.path.join(folder, "ca.key")
    cert = os.path.join(folder, "localhost.pem")
    key = os.path.join(folder, "localhost.key")

    created = False
    if os.path.exists(ca_cert) and os.path.exists(ca_key):
        try:
            ca = _pki.load_issued(ca_cert, ca_key)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"development CA '{ca_cert}' is unusable ({err}); delete {folder} to make a new one"
            ) from None
        if not _pki.matches(ca):
            raise ConfigError(
                f"development CA '{ca_cert}' does not match its key '{ca_key}'; delete "
                f"{folder} to make a new one"
            )
    else:
        ca = _pki.make_ca("spicegw development CA", "spicegw development")
        _pki.write_file(ca_key, ca.key_pem(), private=True)
        _pki.write_file(ca_cert, ca.cert_pem())
        created = True

    if created or not _leaf_usable(cert, key, ca):
        leaf = _pki.issue(ca, "localhost", names=_NAMES, organization="spicegw development")
        _pki.write_file(key, leaf.key_pem(), private=True)
        # The CA follows the leaf, so the file is a whole chain.
        _pki.write_file(cert, leaf.cert_pem() + ca.cert_pem())
        created = True
    return DevMaterial(ca_cert, cert, key, created)


def _leaf_usable(cert_path: str, key_path: str, ca: _pki.Issued) -> bool:
    try:
        leaf = _pki.load_issued(cert_path, key_path)
    except (OSError, ValueError, TypeError):
        return False
    now = dt.datetime.now(dt.UTC)
    return (
        _pki.matches(leaf)
        and leaf.cert.issuer == ca.cert.subject
        and leaf.cert.not_valid_after_utc - now > _RENEW_BEFORE
    )
