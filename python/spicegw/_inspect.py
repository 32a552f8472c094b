"""`spicegw check`: everything `run` would load, checked and reported,
without serving anything."""

from __future__ import annotations

import argparse
import datetime as dt

from . import _build
from ._reload import load_scope
from ._settings import Endpoint, ScopeSettings
from .certs import Material
from .errors import SpicegwError

# A certificate this close to its end gets a warning (not a failure).
_EXPIRY_WARNING = dt.timedelta(days=30)


def check(args: argparse.Namespace) -> int:
    """Prints one line per finding; 0 when nothing is wrong, 1 otherwise."""
    try:
        pod = _build.load_spicepod(args)
        settings = _build.build(args, pod)
    except SpicegwError as err:
        print(f"error: {err}")
        return 1
    print(f"config: {pod.path if pod else 'flags only (no spicepod.yaml)'}: ok")

    failures = 0
    subject = None
    for scope in settings.scopes:
        try:
            material, _ = load_scope(scope)
        except SpicegwError as err:
            print(f"error: {err}")
            failures += 1
            continue
        failures += _report_scope(scope, material, settings.endpoints)
        if scope.name == "public":
            subject = material.subject

    for endpoint in settings.endpoints:
        scheme = "tls" if endpoint.scope else "plaintext"
        alpn = ",".join(endpoint.alpn) or "none"
        print(
            f"endpoint {endpoint.name}: {endpoint.listen.display} ({scheme}, scope "
            f"{endpoint.scope or '-'}, alpn {alpn}) -> {endpoint.describe_upstream()}"
        )
    if subject is not None:
        print(f"All endpoints secured with TLS using certificate: {subject}")
    elif not settings.tls:
        print("warning: TLS is disabled: every endpoint would serve plaintext")
    print("check: ok" if failures == 0 else f"check: {failures} problem(s)")
    return 0 if failures == 0 else 1


def _report_scope(scope: ScopeSettings, material: Material, endpoints: tuple[Endpoint, ...]) -> int:
    name = scope.name
    chain = len(material.bundle.certificates)
    print(
        f"{name}: {scope.cert.describe()}: {material.subject}, chain of {chain} "
        f"certificate(s), sha256 {material.fingerprint}"
    )
    print(f"{name}: {scope.key.describe()}: {material.bundle.key_format}, matches the leaf")
    print(
        f"{name}: valid from {material.not_before:%Y-%m-%d %H:%M} to "
        f"{material.not_after:%Y-%m-%d %H:%M} UTC; "
        f"{'hot-reloaded' if scope.reloadable else 'loaded once (inline or secret)'}"
    )
    print(f"{name}: names: {', '.join(material.names) or 'none (no subjectAltName)'}")
    for note in material.notes:
        print(f"{name}: note: {note}")
    if scope.client_auth != "none":
        print(
            f"{name}: client certificates {scope.client_auth}, "
            f"{len(material.client_ca)} trusted CA certificate(s)"
        )

    failures = 0
    problem = material.validity_problem()
    if problem is not None:
        print(f"error: {name}: {scope.cert.describe()}: {problem}")
        failures += 1
    elif material.not_after - dt.datetime.now(dt.UTC) < _EXPIRY_WARNING:
        print(f"warning: {name}: the certificate expires on {material.not_after:%Y-%m-%d}")
    for endpoint in endpoints:
        host = endpoint.listen.host
        if endpoint.scope != name or host in ("0.0.0.0", "::"):
            continue
        covered = host in material.names or (
            host in ("127.0.0.1", "::1") and "localhost" in material.names
        )
        if not covered:
            print(
                f"warning: {name}: endpoint {endpoint.name} listens on {host}, which the "
                "certificate does not name; clients must connect by a name it has"
            )
    return failures
