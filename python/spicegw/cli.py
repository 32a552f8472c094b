"""The `spicegw` command line."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import _build, _client, _cookbook, _core, _inspect, _listeners, _logging, _scrub
from ._reload import load_scope
from .errors import EXIT_CONFIG, SpicegwError
from .supervisor import Supervisor

log = logging.getLogger("runtime")

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and no usage dump, and no flag
    abbreviations (`--tls-en` is a typo, not --tls-enabled)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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
    """A duration: plain seconds, or with a unit: 500ms, 10s, 5m, 1h."""
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
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
            f"expected a duration such as 10, 10s, 500ms or 1h, got {text!r}"
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
    _add_serving_flags(run)
    check = commands.add_parser(
        "check",
        help="dry run: check configuration, secrets and certificates",
        description="Check everything `run` would load, print the startup line, and "
        "exit 0 when all is well, 1 otherwise.",
    )
    _add_serving_flags(check)

    cookbook = commands.add_parser("tls", help="make a CA and certificates (the TLS cookbook)")
    steps = cookbook.add_subparsers(dest="tls_command", required=True, parser_class=_Parser)
    init = steps.add_parser("init", help="create a CA and a server certificate")
    init.add_argument("--dir", default="tls", metavar="PATH", help="(default %(default)s)")
    init.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP for the server certificate (repeatable)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing CA")
    add = steps.add_parser("add", help="issue a certificate signed by the CA")
    add.add_argument("cert_name", metavar="NAME")
    add.add_argument("--dir", default="tls", metavar="PATH", help="(default %(default)s)")
    add.add_argument(
        "--server",
        action="store_true",
        help="a server certificate (default: a client certificate)",
    )
    add.add_argument("--name", action="append", default=[], metavar="NAME")

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


def _add_serving_flags(command: argparse.ArgumentParser) -> None:
    """Flags shared by `run` and `check`."""
    command.add_argument(
        "--config",
        metavar="PATH",
        help=f"spicepod.yaml to read (default ./{_build.DEFAULT_CONFIG} when present)",
    )
    tls = command.add_argument_group("TLS")
    tls.add_argument("--tls-enabled", type=_boolean, metavar="true|false")
    tls.add_argument("--tls-certificate-file", metavar="PATH")
    tls.add_argument("--tls-key-file", metavar="PATH")
    tls.add_argument("--tls-certificate", metavar="PEM", help="inline PEM, loaded once")
    tls.add_argument("--tls-key", metavar="PEM", help="inline PEM, loaded once")
    tls.add_argument("--tls-client-auth-mode", choices=_build.CLIENT_AUTH_MODES)
    tls.add_argument("--tls-client-auth-ca-file", metavar="PATH")
    tls.add_argument("--tls-client-auth-ca", metavar="PEM")
    tls.add_argument("--node-mtls-ca-certificate-file", metavar="PATH")
    tls.add_argument("--node-mtls-certificate-file", metavar="PATH")
    tls.add_argument("--node-mtls-key-file", metavar="PATH")

    endpoints = command.add_argument_group("endpoints")
    endpoints.add_argument("--http", default=_build.DEFAULT_HTTP, metavar="ADDR")
    endpoints.add_argument("--http-upstream", metavar="ADDR")
    endpoints.add_argument("--flight", default=_build.DEFAULT_FLIGHT, metavar="ADDR")
    endpoints.add_argument("--flight-upstream", metavar="ADDR")
    endpoints.add_argument("--cluster", default=_build.DEFAULT_CLUSTER, metavar="ADDR")
    endpoints.add_argument("--cluster-upstream", metavar="ADDR")
    endpoints.add_argument("--metrics", metavar="ADDR", help="the gateway's own status and metrics")

    process = command.add_argument_group("processes and limits")
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
        "--tls-ticket-rotation",
        type=_seconds,
        default=3600.0,
        metavar="DURATION",
        help="session ticket key lifetime; the previous key stays valid one more period",
    )
    process.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # `spicegw run -- --tls-enabled true …`, as with `spice run --`.
    arguments = [arg for arg in arguments if arg != "--"]
    args = build_parser().parse_args(arguments)
    _logging.setup(args.log_level if args.command in ("run", "check") else "info")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _inspect.check(args)
        if args.command == "tls":
            return _cookbook.run(args)
        if args.command == "status":
            return _client.print_status(_client_options(args))
        if args.command == "reload":
            return _client.print_reload(_client_options(args))
    except SpicegwError as err:
        sys.stderr.write(f"spicegw: error: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return EXIT_CONFIG


def _run(args: argparse.Namespace) -> int:
    # Until the supervisor's handlers are in place, a SIGHUP (a reload
    # request) must not kill a gateway that is starting; and no process
    # holding keys may dump core.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    settings = _build.build(args, _build.load_spicepod(args))
    _hide_inline_keys()
    _raise_fd_limit()
    # Load and probe everything first: a startup that fails says one line.
    loaded = {scope.name: load_scope(scope) for scope in settings.scopes}
    for endpoint in settings.endpoints:
        _listeners.probe(endpoint)

    for scope in settings.scopes:
        material, watch = loaded[scope.name]
        for note in material.notes:
            log.info("%s", note)
        problem = material.validity_problem()
        if problem is not None:
            log.error(
                "%s: %s; serving it anyway, but clients will refuse it",
                scope.cert.describe(),
                problem,
            )
        if watch is None:
            log.info(
                "the %s certificate comes from inline PEM or a secret; it is loaded "
                "once and not hot-reloaded",
                scope.name,
            )
    if not settings.tls:
        log.warning(
            "TLS is disabled: every endpoint serves plaintext "
            "(enable it with --tls-enabled true and a certificate)"
        )
    return Supervisor(settings, loaded).run()


def _raise_fd_limit() -> None:
    """Every connection costs a worker two descriptors; the soft limit
    (often 1024) would cap a worker near 500 connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the descriptor limit from %d: %s", soft, err)
            return
    log.debug("descriptor limit: %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _hide_inline_keys() -> None:
    try:
        hidden = _scrub.scrub_private_keys()
    except OSError as err:
        log.warning(
            "a private key given inline may stay visible in ps and /proc: cannot "
            "rewrite this process's command line (%s)",
            err.strerror or err,
        )
        return
    if hidden:
        log.info(
            "hid inline private key material in %d place(s) of this process's "
            "command line and environment (ps, /proc)",
            hidden,
        )


def _client_options(args: argparse.Namespace) -> _client.ClientOptions:
    return _client.ClientOptions(
        endpoint=args.endpoint,
        root_certificate_file=args.tls_root_certificate_file,
        client_certificate_file=args.client_tls_certificate_file,
        client_key_file=args.client_tls_key_file,
        timeout=args.timeout,
    )
