"""`spicegw tls init` and `spicegw tls add NAME`: a CA, a server
certificate and client certificates for trying TLS and mTLS."""

from __future__ import annotations

import argparse
import os
import re

from . import _pki
from .errors import ConfigError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def run(args: argparse.Namespace) -> int:
    try:
        if args.tls_command == "init":
            return _init(args.dir, args.name, force=args.force)
        return _add(args.dir, args.cert_name, args.name, server=args.server)
    except OSError as err:
        where = err.filename or args.dir
        raise ConfigError(f"--dir '{args.dir}': cannot write {where}: {err.strerror}") from None


def _init(folder: str, extra_names: list[str], *, force: bool) -> int:
    ca_cert = os.path.join(folder, "ca.pem")
    if os.path.exists(ca_cert) and not force:
        raise ConfigError(
            f"{ca_cert} exists; use `spicegw tls add` to issue more certificates, or "
            "--force to start over with a new CA"
        )
    # The folder itself is made, not missing parents: a mistyped --dir
    # should not quietly grow a tree holding a CA key somewhere unexpected.
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise ConfigError(f"--dir '{folder}': its parent folder {parent} does not exist")
    os.makedirs(folder, mode=0o755, exist_ok=True)
    ca = _pki.make_ca("spicegw CA", "spicegw")
    _pki.write_file(os.path.join(folder, "ca.key"), ca.key_pem(), private=True)
    _pki.write_file(ca_cert, ca.cert_pem())
    print(f"CA:     {ca_cert} (key {os.path.join(folder, 'ca.key')}, mode 0600)")
    _issue(folder, "server", ca, [*_DEFAULT_SERVER_NAMES, *extra_names], server=True)
    print(
        "next:   spicegw run --tls-enabled true "
        f"--tls-certificate-file {os.path.join(folder, 'server.pem')} "
        f"--tls-key-file {os.path.join(folder, 'server.key')} …"
    )
    return 0


def _add(folder: str, name: str, extra_names: list[str], *, server: bool) -> int:
    if not _SAFE_NAME.match(name):
        raise ConfigError(f"NAME '{name}': use letters, digits, '.', '-' and '_'")
    ca_cert = os.path.join(folder, "ca.pem")
    ca_key = os.path.join(folder, "ca.key")
    try:
        ca = _pki.load_issued(ca_cert, ca_key)
    except FileNotFoundError:
        raise ConfigError(
            f"no CA in {folder}: run `spicegw tls init --dir {folder}` first"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{ca_cert}: cannot use the CA: {err}") from None
    if os.path.exists(os.path.join(folder, f"{name}.pem")):
        raise ConfigError(f"{os.path.join(folder, name + '.pem')} exists; pick another NAME")
    names = [*_DEFAULT_SERVER_NAMES, *extra_names] if server else extra_names
    _issue(folder, name, ca, names, server=server)
    return 0


def _issue(folder: str, name: str, ca: _pki.Issued, names: list[str], *, server: bool) -> None:
    leaf = _pki.issue(ca, name, names=names, server=server, client=not server)
    cert_path = os.path.join(folder, f"{name}.pem")
    key_path = os.path.join(folder, f"{name}.key")
    _pki.write_file(key_path, leaf.key_pem(), private=True)
    # A server certificate file holds the chain: the leaf, then the CA, so
    # clients that trust the CA need nothing else.
    chain = leaf.cert_pem() + (ca.cert_pem() if server else b"")
    _pki.write_file(cert_path, chain)
    role = "server" if server else "client"
    shown = f", names {', '.join(names)}" if names else ""
    print(f"{role}: {cert_path} (key {key_path}, mode 0600{shown})")
