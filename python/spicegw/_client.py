"""Talking to a running gateway's status service (`spicegw status`,
`spicegw reload`), always verifying it: there is no insecure fallback."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from .errors import SpicegwError

DEFAULT_ENDPOINT = "https://localhost:9090"


class ClientError(SpicegwError):
    """The gateway could not be reached, verified or understood."""


@dataclass(frozen=True)
class ClientOptions:
    endpoint: str = DEFAULT_ENDPOINT
    root_certificate_file: str | None = None
    client_certificate_file: str | None = None
    client_key_file: str | None = None
    timeout: float = 10.0


def request(options: ClientOptions, method: str, path: str) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) or raises ClientError."""
    url = urllib.parse.urlsplit(options.endpoint)
    if url.scheme not in ("https", "http") or not url.hostname:
        raise ClientError(
            f"--endpoint '{options.endpoint}': expected https://HOST:PORT (or http:// "
            "for a gateway running without TLS)"
        )
    port = url.port or (443 if url.scheme == "https" else 80)
    connection: http.client.HTTPConnection
    if url.scheme == "https":
        connection = http.client.HTTPSConnection(
            url.hostname, port, timeout=options.timeout, context=_context(options)
        )
    else:
        connection = http.client.HTTPConnection(url.hostname, port, timeout=options.timeout)
    try:
        connection.request(method, path, headers={"Content-Length": "0"})
        response = connection.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as err:
        raise ClientError(
            f"{options.endpoint}: the answer is not HTTP ({type(err).__name__}); is this the "
            "gateway's --metrics address, and does the scheme (https or http) match?"
        ) from None
    except ssl.SSLCertVerificationError as err:
        raise ClientError(
            f"{options.endpoint}: the gateway's certificate is not trusted "
            f"({err.verify_message}); pass its CA with --tls-root-certificate-file"
        ) from None
    except ssl.SSLError as err:
        raise ClientError(f"{options.endpoint}: TLS failed: {err.reason or err}") from None
    except OSError as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ClientError(
            f"cannot reach {options.endpoint}: {reason} (is spicegw running with "
            f"--metrics {url.hostname}:{port}?)"
        ) from None
    finally:
        connection.close()


def _context(options: ClientOptions) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=options.root_certificate_file)
    except (OSError, ssl.SSLError) as err:
        raise ClientError(
            f"--tls-root-certificate-file '{options.root_certificate_file}': "
            f"cannot use it: {getattr(err, 'strerror', None) or err}"
        ) from None
    if options.client_certificate_file or options.client_key_file:
        if not (options.client_certificate_file and options.client_key_file):
            raise ClientError("--client-tls-certificate-file and --client-tls-key-file go together")
        try:
            context.load_cert_chain(options.client_certificate_file, options.client_key_file)
        except (OSError, ssl.SSLError) as err:
            raise ClientError(
                f"--client-tls-certificate-file '{options.client_certificate_file}': "
                f"cannot use it: {getattr(err, 'strerror', None) or err}"
            ) from None
    return context


def get_json(options: ClientOptions, path: str) -> dict[str, object]:
    status, body = request(options, "GET", path)
    return _decode(options, path, status, body, (200, 503))


def post_json(options: ClientOptions, path: str) -> dict[str, object]:
    status, body = request(options, "POST", path)
    return _decode(options, path, status, body, (200,))


def _decode(
    options: ClientOptions, path: str, status: int, body: bytes, expected: tuple[int, ...]
) -> dict[str, object]:
    if status not in expected:
        text = body[:200].decode("utf-8", "replace").strip().splitlines()
        raise ClientError(f"{options.endpoint}{path}: HTTP {status}: {text[0] if text else ''}")
    try:
        value = json.loads(body)
    except ValueError:
        raise ClientError(f"{options.endpoint}{path}: the answer is not JSON") from None
    if not isinstance(value, dict):
        raise ClientError(f"{options.endpoint}{path}: unexpected answer")
    return value


def wait_for_generation(
    options: ClientOptions, scope: str, generation: int, timeout: float = 10.0
) -> tuple[int, int]:
    """Polls /v1/tls until every worker serves `generation` of `scope`;
    returns (serving, total) as last seen."""
    deadline = time.monotonic() + timeout
    while True:
        status = get_json(options, "/v1/tls")
        scopes = status.get("scopes")
        entry = scopes.get(scope) if isinstance(scopes, dict) else None
        workers = entry.get("workers") if isinstance(entry, dict) else None
        workers = workers if isinstance(workers, list) else []
        serving = sum(
            1 for w in workers if isinstance(w, dict) and w.get("generation") == generation
        )
        if (workers and serving == len(workers)) or time.monotonic() > deadline:
            return serving, len(workers)
        time.sleep(0.1)


def print_status(options: ClientOptions) -> int:
    ready = get_json(options, "/v1/ready")
    tls = get_json(options, "/v1/tls")
    if "ready" not in ready or "scopes" not in tls:
        raise ClientError(f"{options.endpoint}: the answer is not from a spicegw status service")
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
        refused = scope.get("refused")
        if isinstance(refused, dict):
            print(
                f"{name}: the files on disk are refused ({refused.get('result')}): "
                f"{refused.get('message')}"
            )
    return 0 if ready.get("ready") else 1


def print_reload(options: ClientOptions) -> int:
    answer = post_json(options, "/v1/reload")
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
                wait_for_generation(options, name, generation)
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
