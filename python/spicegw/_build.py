"""From flags and spicepod.yaml to Settings.

Precedence, per item (certificate, key, client CA): a file flag, then an
inline flag, then a file field of spicepod.yaml, then an inline field.
TLS is on when `--tls-enabled true` or `runtime.tls.enabled: true`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import _config, _devmode
from ._addresses import parse_listen, parse_upstream
from ._settings import CLUSTER, PUBLIC, Endpoint, Limits, ScopeSettings, Settings
from .certs import Source
from .errors import ConfigError

log = logging.getLogger("runtime")

DEFAULT_HTTP = "127.0.0.1:8090"
DEFAULT_FLIGHT = "127.0.0.1:50051"
DEFAULT_CLUSTER = "127.0.0.1:50052"
DEFAULT_CONFIG = "spicepod.yaml"
# ALPN offered per built-in endpoint: a TCP relay can only promise what
# the plaintext upstream speaks. Arrow Flight is gRPC, always HTTP/2.
ALPN_HTTP = ("http/1.1",)
ALPN_GRPC = ("h2",)
CLIENT_AUTH_MODES = ("none", "request", "required")


@dataclass(frozen=True)
class _Candidate:
    """One place an item may come from, in precedence order."""

    value: str | None
    is_file: bool
    origin: str
    shown: str | None = None


def load_spicepod(args: argparse.Namespace) -> _config.Spicepod | None:
    """--config PATH, else ./spicepod.yaml when present."""
    if args.config is not None:
        return _config.load(Path(args.config))
    default = Path(DEFAULT_CONFIG)
    if default.is_file():
        return _config.load(default)
    return None


def build(args: argparse.Namespace, pod: _config.Spicepod | None) -> Settings:
    """Turns `spicegw run` (or `check`) flags and the spicepod into
    settings; raises ConfigError naming the flag or field at fault."""
    dev = None
    if args.dev:
        dev = _devmode.ensure(_devmode.state_dir(args.state_dir))
        if dev.created:
            log.info(
                "created a development CA and localhost certificate in %s",
                os.path.dirname(dev.ca_path),
            )

    tls = pod.tls if pod else {}
    cert = _pick(
        "certificate",
        _Candidate(args.tls_certificate_file, True, "--tls-certificate-file"),
        _Candidate(args.tls_certificate, False, "--tls-certificate"),
        *_pod_candidates(tls, "certificate_file", "certificate"),
    )
    key = _pick(
        "key",
        _Candidate(args.tls_key_file, True, "--tls-key-file"),
        _Candidate(args.tls_key, False, "--tls-key"),
        *_pod_candidates(tls, "key_file", "key"),
    )
    if dev is not None and cert is None and key is None:
        cert = Source.file("certificate", dev.cert_path, "--dev")
        key = Source.file("key", dev.key_path, "--dev")

    enabled = bool(args.tls_enabled) or bool(pod and pod.tls_enabled)
    if args.tls_enabled is False and pod is not None and pod.tls_enabled:
        log.warning(
            "--tls-enabled false, but %s sets runtime.tls.enabled: true; TLS is on "
            "when either says so",
            pod.path,
        )
    if args.tls_enabled is None and (pod is None or pod.tls_enabled is None):
        enabled = dev is not None

    scopes: list[ScopeSettings] = []
    if enabled:
        _require_pair(cert, key)
        assert cert is not None and key is not None
        mode, client_ca = _client_auth(args, tls)
        scopes.append(ScopeSettings(PUBLIC, cert, key, mode, client_ca))
    else:
        if cert is not None or key is not None:
            log.warning(
                "certificate material is given but TLS is off; add --tls-enabled true to use it"
            )
        if args.tls_client_auth_mode not in (None, "none"):
            raise ConfigError("--tls-client-auth-mode needs TLS: add --tls-enabled true")

    cluster = _node_mtls(args, pod)
    if cluster is not None:
        scopes.append(cluster)

    endpoints = _endpoints(args, pod, dev, public=enabled, cluster=cluster is not None)

    if dev is not None and enabled:
        http = next((e for e in endpoints if e.name == "http"), None)
        log.info(
            "development mode: the certificate is for localhost and signed by the "
            "development CA %s; use it for local development only, never in production",
            dev.ca_path,
        )
        if http is not None:
            log.info(
                "try: curl --cacert %s https://localhost:%d/health",
                dev.ca_path,
                http.listen.port,
            )

    return Settings(
        endpoints=tuple(endpoints),
        scopes=tuple(scopes),
        workers=args.workers,
        limits=Limits(
            handshake_timeout=args.handshake_timeout,
            connect_timeout=args.connect_timeout,
            idle_timeout=args.idle_timeout,
            max_handshakes=args.max_handshakes,
        ),
        drain_timeout=args.drain_timeout,
        worker_timeout=args.worker_timeout,
        poll_interval=args.tls_poll_interval,
        ticket_rotation=args.tls_ticket_rotation,
        dev=dev,
    )


def _pod_candidates(
    fields: dict[str, _config.Value], file_key: str, inline_key: str
) -> list[_Candidate]:
    found = []
    for name, is_file in ((file_key, True), (inline_key, False)):
        value = fields.get(name)
        if value is not None:
            found.append(_Candidate(value.text, is_file, value.origin, value.shown))
    return found


def _pick(what: str, *candidates: _Candidate) -> Source | None:
    """The first candidate that is set; later ones are noted as unused."""
    present = [c for c in candidates if c.value is not None]
    if not present:
        return None
    chosen = present[0]
    for other in present[1:]:
        log.info("%s: %s takes precedence over %s", what, chosen.origin, other.origin)
    assert chosen.value is not None
    if not chosen.value.strip():
        raise ConfigError(f"{chosen.origin}: the {what} is empty")
    if chosen.is_file:
        return Source.file(what, chosen.value, chosen.origin, shown=chosen.shown)
    return Source.text(what, chosen.value, chosen.origin)


def _require_pair(cert: Source | None, key: Source | None) -> None:
    if cert is None and key is None:
        raise ConfigError(
            "TLS is enabled but has no certificate and key: give --tls-certificate-file "
            "and --tls-key-file (or --tls-certificate and --tls-key, or runtime.tls in "
            "spicepod.yaml)"
        )
    if cert is None:
        raise ConfigError(
            f"a TLS key is given ({key.origin if key else ''}) but no certificate: add "
            "--tls-certificate-file (or --tls-certificate)"
        )
    if key is None:
        raise ConfigError(
            f"a TLS certificate is given ({cert.origin}) but no key: add --tls-key-file "
            "(or --tls-key)"
        )


def _client_auth(
    args: argparse.Namespace, tls: dict[str, _config.Value]
) -> tuple[str, Source | None]:
    mode = args.tls_client_auth_mode
    mode_origin = "--tls-client-auth-mode"
    if mode is None and "client_auth_mode" in tls:
        mode, mode_origin = tls["client_auth_mode"].text, tls["client_auth_mode"].origin
        if mode not in CLIENT_AUTH_MODES:
            raise ConfigError(f"{mode_origin}: expected none, request or required")
    mode = mode or "none"
    ca = _pick(
        "client CA",
        _Candidate(args.tls_client_auth_ca_file, True, "--tls-client-auth-ca-file"),
        _Candidate(args.tls_client_auth_ca, False, "--tls-client-auth-ca"),
        *_pod_candidates(tls, "client_auth_ca_file", "client_auth_ca"),
    )
    if mode != "none" and ca is None:
        raise ConfigError(
            f"{mode_origin} {mode} needs the CA that signs client certificates: "
            "add --tls-client-auth-ca-file (or runtime.tls.client_auth_ca_file)"
        )
    if mode == "none" and ca is not None:
        raise ConfigError(
            f"a client CA is given ({ca.origin}) but client authentication is off: "
            "set --tls-client-auth-mode request or required"
        )
    return mode, ca


_NODE_MTLS_FLAGS = (
    ("ca_certificate_file", "--node-mtls-ca-certificate-file"),
    ("certificate_file", "--node-mtls-certificate-file"),
    ("key_file", "--node-mtls-key-file"),
)


def _node_mtls(args: argparse.Namespace, pod: _config.Spicepod | None) -> ScopeSettings | None:
    """The cluster scope: CA, certificate and key, all three or none."""
    fields = pod.node_mtls if pod else {}
    items: dict[str, tuple[str, str]] = {}
    shown: dict[str, str] = {}
    for name, flag in _NODE_MTLS_FLAGS:
        value = getattr(args, "node_mtls_" + name)
        if value is not None:
            items[name] = (value, flag)
        elif name in fields:
            field = fields[name]
            items[name] = (field.text, field.origin)
            if field.shown is not None:
                shown[name] = field.shown
    if not items:
        return None
    missing = [flag for name, flag in _NODE_MTLS_FLAGS if name not in items]
    if missing:
        given = ", ".join(origin for _, origin in items.values())
        raise ConfigError(
            f"node mTLS needs all three files; {given} given, missing {', '.join(missing)}"
        )
    ca_path, ca_origin = items["ca_certificate_file"]
    cert_path, cert_origin = items["certificate_file"]
    key_path, key_origin = items["key_file"]
    return ScopeSettings(
        CLUSTER,
        Source.file("certificate", cert_path, cert_origin, shown=shown.get("certificate_file")),
        Source.file("key", key_path, key_origin, shown=shown.get("key_file")),
        "required",
        Source.file("client CA", ca_path, ca_origin, shown=shown.get("ca_certificate_file")),
    )


def _endpoints(
    args: argparse.Namespace,
    pod: _config.Spicepod | None,
    dev: _devmode.DevMaterial | None,
    *,
    public: bool,
    cluster: bool,
) -> list[Endpoint]:
    public_scope = PUBLIC if public else None
    if args.cluster_upstream is not None and not cluster:
        raise ConfigError(
            "--cluster-upstream needs node mTLS: give --node-mtls-ca-certificate-file, "
            "--node-mtls-certificate-file and --node-mtls-key-file"
        )
    # The built-in endpoints: (name, listen flag, upstream flag, scope,
    # ALPN); each is served when its upstream is given. The status port's
    # upstream is the gateway itself, and --dev serves it on --http.
    builtin = (
        ("http", "--http", "--http-upstream", public_scope, ALPN_HTTP),
        ("flight", "--flight", "--flight-upstream", public_scope, ALPN_GRPC),
        ("cluster", "--cluster", "--cluster-upstream", CLUSTER, ALPN_GRPC),
        ("metrics", "--metrics", None, public_scope, ALPN_HTTP),
    )
    endpoints: list[Endpoint] = []
    for name, listen_flag, upstream_flag, scope, alpn in builtin:
        listen = getattr(args, name)
        upstream = getattr(args, f"{name}_upstream", None)
        if name == "metrics":
            wanted = listen is not None
        elif name == "http":
            wanted = upstream is not None or dev is not None
        else:
            wanted = upstream is not None
        if not wanted:
            continue
        endpoints.append(
            Endpoint(
                name=name,
                listen=parse_listen(listen, listen_flag),
                upstream=(
                    parse_upstream(upstream, upstream_flag)
                    if upstream is not None and upstream_flag is not None
                    else None
                ),
                scope=scope,
                alpn=alpn,
                origin=listen_flag,
            )
        )
    for entry in pod.endpoints if pod else []:
        if entry.scope == CLUSTER and not cluster:
            raise ConfigError(
                f"{entry.origin}: scope cluster needs node mTLS (runtime.node_mtls or "
                "the --node-mtls-* flags)"
            )
        endpoints.append(
            Endpoint(
                name=entry.name,
                listen=parse_listen(entry.listen.text, entry.listen.origin, entry.listen.shown),
                upstream=parse_upstream(
                    entry.upstream.text, entry.upstream.origin, entry.upstream.shown
                ),
                scope=CLUSTER if entry.scope == CLUSTER else public_scope,
                alpn=entry.alpn,
                proxy_protocol=entry.proxy_protocol,
                origin=entry.origin,
            )
        )
    if not endpoints:
        raise ConfigError(
            "nothing to serve: give --http-upstream or --flight-upstream, endpoints in "
            "spicepod.yaml (or try --dev)"
        )
    _check_distinct(endpoints)
    _check_no_loop(endpoints)
    return endpoints


def _check_no_loop(endpoints: list[Endpoint]) -> None:
    """An upstream that is one of the gateway's own listeners would relay
    every connection to itself until descriptors run out."""
    listening = {(e.listen.host, e.listen.port) for e in endpoints}
    wildcard_ports = {e.listen.port for e in endpoints if e.listen.host in ("0.0.0.0", "::")}
    for endpoint in endpoints:
        if endpoint.upstream is None:
            continue
        for address in endpoint.upstream.tcp:
            host, _, port_text = address.rpartition(":")
            host, port = host.strip("[]"), int(port_text)
            local = host.startswith("127.") or host == "::1"
            if (host, port) in listening or (local and port in wildcard_ports):
                raise ConfigError(
                    f"{endpoint.origin}: the upstream {endpoint.upstream} is the gateway's own "
                    "listener; connections would loop back into it"
                )


def _check_distinct(endpoints: list[Endpoint]) -> None:
    names: dict[str, Endpoint] = {}
    addresses: dict[tuple[str, int], Endpoint] = {}
    for endpoint in endpoints:
        if endpoint.name in names:
            raise ConfigError(
                f"{endpoint.origin}: endpoint name '{endpoint.name}' is also used by "
                f"{names[endpoint.name].origin}"
            )
        names[endpoint.name] = endpoint
        key = (endpoint.listen.host, endpoint.listen.port)
        other = addresses.get(key)
        if other is not None:
            raise ConfigError(
                f"{endpoint.origin} {endpoint.listen.display}: the same address as {other.origin}"
            )
        addresses[key] = endpoint
