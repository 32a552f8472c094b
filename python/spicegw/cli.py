"""The `spicegw` command line."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import _client, _core, _devmode, _logging
from ._addresses import parse_listen, parse_upstream
from ._reload import ScopeWatch
from ._settings import PUBLIC, Endpoint, Limits, ScopeSettings, Settings
from .certs import Material, Source, load_material
from .errors import EXIT_CONFIG, ConfigError, SpicegwError
from .supervisor import Supervisor

log = logging.getLogger("runtime")

DEFAULT_HTTP = "127.0.0.1:8090"
DEFAULT_FLIGHT = "127.0.0.1:50051"
# ALPN offered per built-in endpoint: a TCP relay can only promise what
# the plaintext upstream speaks. Arrow Flight is gRPC, always HTTP/2.
ALPN_HTTP = ("http/1.1",)
ALPN_FLIGHT = ("h2",)
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and no usage dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _seconds(text: str) -> float:
    """A duration: plain seconds, or with a unit: 500ms, 10s, 5m."""
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0))
    value = text.strip()
    factor = 1.0
    for suffix, scale in units:
        if value.endswith(suffix):
            value, factor = value[: -len(suffix)], scale
            break
    try:
        seconds = float(value) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 10, 10s or 500ms, got {text!r}"
        ) from None
    if not seconds > 0 or seconds > 86400 * 365:
        raise argparse.ArgumentTypeError(f"duration out of range: {text!r}")
    return seconds


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spicegw",
        description="TLS gateway in front of plaintext services.",
    )
    parser.add_argument("--version", action="version", version=f"spicegw {_core.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser(
        "run",
        help="serve the endpoints",
        description="Serve the endpoints. Flags after -- are accepted too.",
    )
    tls = run.add_argument_group("TLS")
    tls.add_argument("--tls-enabled", type=_boolean, metavar="true|false")
    tls.add_argument("--tls-certificate-file", metavar="PATH")
    tls.add_argument("--tls-key-file", metavar="PATH")
    tls.add_argument("--tls-certificate", metavar="PEM", help="inline PEM, loaded once")
    tls.add_argument("--tls-key", metavar="PEM", help="inline PEM, loaded once")

    endpoints = run.add_argument_group("endpoints")
    endpoints.add_argument("--http", default=DEFAULT_HTTP, metavar="ADDR")
    endpoints.add_argument("--http-upstream", metavar="ADDR")
    endpoints.add_argument("--flight", default=DEFAULT_FLIGHT, metavar="ADDR")
    endpoints.add_argument("--flight-upstream", metavar="ADDR")
    endpoints.add_argument("--metrics", metavar="ADDR", help="the gateway's own status and metrics")

    process = run.add_argument_group("processes and limits")
    process.add_argument("--workers", type=_positive, default=os.cpu_count() or 1)
    process.add_argument("--dev", action="store_true", help="embedded default for trying it out")
    process.add_argument("--state-dir", metavar="PATH", help="where --dev keeps its CA")
    process.add_argument("--handshake-timeout", type=_seconds, default=10.0, metavar="DURATION")
    process.add_argument("--connect-timeout", type=_seconds, default=5.0, metavar="DURATION")
    process.add_argument("--idle-timeout", type=_seconds, default=300.0, metavar="DURATION")
    process.add_argument("--drain-timeout", type=_seconds, default=30.0, metavar="DURATION")
    process.add_argument("--worker-timeout", type=_seconds, default=10.0, metavar="DURATION")
    process.add_argument("--max-handshakes", type=_positive, default=1024, metavar="N")
    process.add_argument(
        "--tls-poll-interval",
        type=_seconds,
        default=2.0,
        metavar="DURATION",
        help="how often certificate files are checked for changes",
    )
    process.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )

    for name, text in (
        ("status", "show what a running gateway serves"),
        ("reload", "make a running gateway check its certificate files now"),
    ):
        client = commands.add_parser(name, help=text, description=text)
        client.add_argument(
            "--endpoint",
            default=_client.DEFAULT_ENDPOINT,
            metavar="URL",
            help="the gateway's --metrics address (default %(default)s)",
        )
        client.add_argument("--tls-root-certificate-file", metavar="PATH")
        client.add_argument("--client-tls-certificate-file", metavar="PATH")
        client.add_argument("--client-tls-key-file", metavar="PATH")
        client.add_argument("--timeout", type=_seconds, default=10.0, metavar="DURATION")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # `spicegw run -- --tls-enabled true …`, as with `spice run --`.
    arguments = [arg for arg in arguments if arg != "--"]
    args = build_parser().parse_args(arguments)
    _logging.setup(args.log_level if args.command == "run" else "info")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status(_client_options(args))
        if args.command == "reload":
            return _reload(_client_options(args))
    except SpicegwError as err:
        sys.stderr.write(f"spicegw: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return EXIT_CONFIG


def _run(args: argparse.Namespace) -> int:
    settings = run_settings(args)
    loaded: dict[str, tuple[Material, ScopeWatch | None]] = {}
    for scope in settings.scopes:
        watch: ScopeWatch | None = None
        if scope.reloadable:
            watch, material = ScopeWatch.start(scope)
        else:
            material = load_material(scope.cert, scope.key)
        for note in material.notes:
            log.info("%s", note)
        problem = material.validity_problem()
        if problem is not None:
            log.error(
                "%s: %s; serving it anyway, but clients will refuse it",
                scope.cert.describe(),
                problem,
            )
        if not scope.reloadable:
            log.info(
                "the %s certificate comes from inline PEM; it is loaded once and not hot-reloaded",
                scope.name,
            )
        loaded[scope.name] = (material, watch)
    if not settings.tls:
        log.warning(
            "TLS is disabled: every endpoint serves plaintext "
            "(enable it with --tls-enabled true and a certificate)"
        )
    for endpoint in settings.endpoints:
        _check_bindable(endpoint)
    return Supervisor(settings, loaded).run()


def _client_options(args: argparse.Namespace) -> _client.ClientOptions:
    return _client.ClientOptions(
        endpoint=args.endpoint,
        root_certificate_file=args.tls_root_certificate_file,
        client_certificate_file=args.client_tls_certificate_file,
        client_key_file=args.client_tls_key_file,
        timeout=args.timeout,
    )


def _status(options: _client.ClientOptions) -> int:
    ready = _client.get_json(options, "/v1/ready")
    tls = _client.get_json(options, "/v1/tls")
    print(
        f"{options.endpoint}: {ready.get('ready_workers')}/{ready.get('workers')} workers "
        f"ready, TLS {'on' if tls.get('tls') else 'off'}"
    )
    scopes = tls.get("scopes")
    for name, scope in scopes.items() if isinstance(scopes, dict) else []:
        if not isinstance(scope, dict):
            continue
        workers = scope.get("workers")
        workers = workers if isinstance(workers, list) else []
        current = sum(1 for w in workers if w.get("generation") == scope.get("generation"))
        print(
            f"{name}: {scope.get('subject')}; generation {scope.get('generation')}, "
            f"sha256 {scope.get('fingerprint')}, valid until {scope.get('not_after')}, "
            f"{'hot-reloaded' if scope.get('reloadable') else 'inline (not reloaded)'}; "
            f"{current}/{len(workers)} workers serve it"
        )
    return 0 if ready.get("ready") else 1


def _reload(options: _client.ClientOptions) -> int:
    answer = _client.post_json(options, "/v1/reload")
    scopes = answer.get("scopes")
    if not isinstance(scopes, dict) or not scopes:
        print(answer.get("message", "nothing to reload"))
        return 0
    failed = False
    for name, outcome in scopes.items():
        result = outcome.get("result")
        if result in ("ok", "unchanged"):
            generation = outcome.get("generation")
            serving, total = (
                _client.wait_for_generation(options, name, generation)
                if isinstance(generation, int)
                else (0, 0)
            )
            print(
                f"{name}: {result}: {outcome.get('message')}; serving generation "
                f"{generation}, {outcome.get('subject')}, sha256 {outcome.get('fingerprint')} "
                f"({serving}/{total} workers)"
            )
            failed |= serving < total
        elif result == "inline":
            print(f"{name}: {outcome.get('message')}")
        else:
            failed = True
            print(
                f"{name}: rejected ({result}): {outcome.get('message')}; still serving "
                f"generation {outcome.get('generation')}, sha256 {outcome.get('fingerprint')}"
            )
    return 1 if failed else 0


def run_settings(args: argparse.Namespace) -> Settings:
    """Turns `spicegw run` flags into settings; raises ConfigError."""
    dev = None
    if args.dev:
        dev = _devmode.ensure(_devmode.state_dir(args.state_dir))
        if dev.created:
            log.info(
                "created a development CA and localhost certificate in %s",
                os.path.dirname(dev.ca_path),
            )

    cert = _source(
        "certificate",
        args.tls_certificate_file,
        args.tls_certificate,
        "--tls-certificate-file",
        "--tls-certificate",
    )
    key = _source("key", args.tls_key_file, args.tls_key, "--tls-key-file", "--tls-key")
    if dev is not None and cert is None and key is None:
        cert = Source.file("certificate", dev.cert_path, "--dev")
        key = Source.file("key", dev.key_path, "--dev")

    enabled = args.tls_enabled
    if enabled is None:
        enabled = dev is not None
    scopes: tuple[ScopeSettings, ...] = ()
    if enabled:
        if cert is None and key is None:
            raise ConfigError(
                "--tls-enabled true needs a certificate and key: give "
                "--tls-certificate-file and --tls-key-file "
                "(or --tls-certificate and --tls-key)"
            )
        if cert is None:
            raise ConfigError(
                "a TLS key is given but no certificate: add --tls-certificate-file "
                "(or --tls-certificate)"
            )
        if key is None:
            raise ConfigError(
                "a TLS certificate is given but no key: add --tls-key-file (or --tls-key)"
            )
        scopes = (ScopeSettings(PUBLIC, cert, key),)
    elif cert is not None or key is not None:
        log.warning(
            "certificate material is given but TLS is off; add --tls-enabled true to use it"
        )

    scope = PUBLIC if enabled else None
    endpoints: list[Endpoint] = []
    http_upstream = args.http_upstream
    if http_upstream is not None or dev is not None:
        endpoints.append(
            Endpoint(
                name="http",
                listen=parse_listen(args.http, "--http"),
                upstream=(
                    parse_upstream(http_upstream, "--http-upstream")
                    if http_upstream is not None
                    else None
                ),
                scope=scope,
                alpn=ALPN_HTTP,
                origin="--http",
            )
        )
    if args.flight_upstream is not None:
        endpoints.append(
            Endpoint(
                name="flight",
                listen=parse_listen(args.flight, "--flight"),
                upstream=parse_upstream(args.flight_upstream, "--flight-upstream"),
                scope=scope,
                alpn=ALPN_FLIGHT,
                origin="--flight",
            )
        )
    if args.metrics is not None:
        endpoints.append(
            Endpoint(
                name="metrics",
                listen=parse_listen(args.metrics, "--metrics"),
                upstream=None,
                scope=scope,
                alpn=ALPN_HTTP,
                origin="--metrics",
            )
        )
    if not endpoints:
        raise ConfigError(
            "nothing to serve: give --http-upstream or --flight-upstream (or try --dev)"
        )
    _check_distinct(endpoints)

    if dev is not None and enabled:
        http = next(e for e in endpoints if e.name == "http")
        log.info(
            "development mode: the certificate is for localhost and signed by the "
            "development CA %s; use it for local development only, never in "
            "production",
            dev.ca_path,
        )
        log.info("try: curl --cacert %s https://localhost:%d/health", dev.ca_path, http.listen.port)

    return Settings(
        endpoints=tuple(endpoints),
        scopes=scopes,
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
        dev=dev,
    )


def _source(
    what: str, path: str | None, inline: str | None, file_flag: str, inline_flag: str
) -> Source | None:
    """One half of the pair from flags; a file wins over inline PEM."""
    if path is not None:
        if inline is not None:
            log.info("%s takes precedence over %s", file_flag, inline_flag)
        if not path:
            raise ConfigError(f"{file_flag}: the path is empty")
        return Source.file(what, path, file_flag)
    if inline is not None:
        if not inline.strip():
            raise ConfigError(f"{inline_flag}: the PEM text is empty")
        return Source.text(what, inline, inline_flag)
    return None


def _check_distinct(endpoints: list[Endpoint]) -> None:
    seen: dict[tuple[str, int], Endpoint] = {}
    for endpoint in endpoints:
        key = (endpoint.listen.host, endpoint.listen.port)
        other = seen.get(key)
        if other is not None:
            raise ConfigError(
                f"{endpoint.origin} {endpoint.listen}: the same address as {other.origin}"
            )
        seen[key] = endpoint


def _check_bindable(endpoint: Endpoint) -> None:
    """Fails fast, with the flag named, when an address is taken.

    The probe binds without SO_REUSEPORT, so a port held by any process,
    another spicegw included, is reported instead of silently shared.
    """
    family = socket.AF_INET6 if ":" in endpoint.listen.host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((endpoint.listen.host, endpoint.listen.port))
    except OSError as err:
        reason = {
            errno.EADDRINUSE: "address already in use",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "address not available on this host",
        }.get(err.errno or 0, err.strerror or str(err))
        raise ConfigError(f"{endpoint.origin} {endpoint.listen}: {reason}") from None
    finally:
        probe.close()
