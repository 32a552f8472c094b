"""Helpers for the configuration, secrets, client-auth and cluster tests:
spicepod.yaml files written to order, a witness upstream that counts
connections and decodes PROXY v2 headers, clients with and without a
certificate, and the `spicegw` command run to its end.

Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spicegw import _pki

from .harness import SERVERS, Gateway, Pair, Process, free_port, make_pair, wait_until
from .reload_support import Live
from .rotation_files import key_body_lines

# A client refused by the gateway sees one of these: an alert during the
# handshake, an alert on its first read (TLS 1.3 sends the client's
# certificate after the client already considers the handshake done),
# or a closed connection.
REFUSALS = (ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError)


# Certificate authorities and pairs on disk.


@dataclass(frozen=True)
class Authority:
    """A CA written to `path`, able to issue client certificates."""

    issued: _pki.Issued
    path: Path
    folder: Path

    @classmethod
    def create(cls, folder: Path, name: str) -> Authority:
        folder.mkdir(parents=True, exist_ok=True)
        issued = _pki.make_ca(name, "spicegw tests")
        path = folder / f"{name.replace(' ', '_')}.pem"
        path.write_bytes(issued.cert_pem())
        return cls(issued, path, folder)

    def client(self, common_name: str) -> Pair:
        return make_pair(self.folder, self.issued, self.path, common_name, names=(), client=True)


# spicepod.yaml.


def write_pod(folder: Path, text: str, *, crlf: bool = False, name: str = "spicepod.yaml") -> Path:
    """Writes a spicepod; `crlf` turns every line end into CR LF."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    data = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes(data.encode())
    return path


def block(pem: str | bytes, indent: int) -> str:
    """PEM as the body of a YAML literal block (`key: |`), indented."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    pad = " " * indent
    return "\n".join(pad + line for line in text.strip().splitlines())


def line_of(text: str, marker: str) -> int:
    """The 1-based number of the only line of `text` holding `marker`."""
    numbers = [n for n, line in enumerate(text.splitlines(), start=1) if marker in line]
    assert len(numbers) == 1, f"{marker!r} is on lines {numbers}"
    return numbers[0]


# The spicegw command, run to its end.


def spicegw(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    umask: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """`spicegw ARGS…` to its end; `umask` replaces the tests' 077 for
    the child, so file modes show what spicegw chose."""
    command = [sys.executable, "-m", "spicegw", *args]
    if umask is not None:
        # Through a shell: no code of ours runs between fork and exec.
        command = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def ended(gw: Gateway, timeout: float = 20.0) -> tuple[int, str]:
    """Waits for a gateway that must refuse to start; (exit code, output)."""
    try:
        code = gw.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the gateway did not exit:\n{gw.text()}") from None
    return code, gw.text()


def error_line(text: str) -> str:
    """The one `spicegw: error:` line of a failed command."""
    lines = [line for line in text.splitlines() if line.startswith("spicegw: error:")]
    assert len(lines) == 1, f"expected one error line:\n{text}"
    return lines[0]


# The witness upstream.


@dataclass
class Witness:
    """A running witness_upstream.py."""

    port: int
    status: Path
    process: Process

    def accepted(self) -> int:
        value = json.loads(self.status.read_text())["accepted"]
        assert isinstance(value, int)
        return value

    def wait_accepted(self, count: int, timeout: float = 5.0) -> None:
        try:
            wait_until(lambda: self.accepted() >= count, timeout)
        except AssertionError:
            raise AssertionError(
                f"the upstream accepted {self.accepted()} connection(s), expected {count}"
            ) from None
        assert self.accepted() == count, f"{self.accepted()} connections, expected {count}"


def start_witness(
    processes: list[Process], folder: Path, *, proxy_protocol: bool = False, name: str = "witness"
) -> Witness:
    """Starts the witness on a quiet port; ready once its status file
    exists (written after it listens), so no probe connection is counted."""
    port = free_port()
    status = folder / f"{name}.json"
    args = [sys.executable, str(SERVERS / "witness_upstream.py"), str(port), str(status)]
    if proxy_protocol:
        args.append("--proxy-protocol")
    process = Process(args, folder / f"{name}.log")
    processes.append(process)

    def up() -> bool:
        if process.proc.poll() is not None:
            raise AssertionError(f"the witness exited:\n{process.text()}")
        return status.exists()

    wait_until(up, 10)
    return Witness(port, status, process)


# Clients.


def client_context(
    trust: Path,
    cert: Pair | None = None,
    *,
    version: ssl.TLSVersion | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """Trusts `trust`; presents `cert` when given; pins `version`."""
    context = ssl.create_default_context(cafile=str(trust))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    if version is not None:
        context.minimum_version = version
        context.maximum_version = version
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


@dataclass
class Outcome:
    """One client's attempt at an exchange through the gateway."""

    ok: bool
    error: str = ""
    header: dict[str, object] | None = None
    local_port: int = 0
    version: str | None = None
    alpn: str | None = None
    subject: str | None = None


def exchange(
    port: int,
    context: ssl.SSLContext,
    *,
    proxy_protocol: bool = False,
    server_name: str = "localhost",
    message: bytes = b"ping through the gateway\n",
    timeout: float = 10.0,
) -> Outcome:
    """Connects, sends `message` and reads it back (after the witness's
    header line when `proxy_protocol`). A refusal at any step is an
    Outcome with ok False, never an exception."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    local_port = raw.getsockname()[1]
    try:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            outcome = Outcome(
                ok=False,
                local_port=local_port,
                version=tls.version(),
                alpn=tls.selected_alpn_protocol(),
                subject=_common_name(tls.getpeercert()),
            )
            tls.sendall(message)
            received = _read(tls, proxy_protocol, len(message))
            if proxy_protocol:
                line, _, received = received.partition(b"\n")
                outcome.header = json.loads(line)
            if received != message:
                outcome.error = f"echo differs: {received!r}"
                return outcome
            outcome.ok = True
            return outcome
    except ssl.SSLCertVerificationError:
        raise  # the client does not trust the gateway: a mistake in the test
    except REFUSALS as err:
        return Outcome(ok=False, error=repr(err), local_port=local_port)
    finally:
        raw.close()


def _read(tls: ssl.SSLSocket, line_first: bool, size: int) -> bytes:
    data = b""
    deadline = time.monotonic() + 10
    for _ in range(10_000):
        if time.monotonic() > deadline:
            break
        if line_first and b"\n" in data:
            if len(data.partition(b"\n")[2]) >= size:
                return data
        elif not line_first and len(data) >= size:
            return data
        chunk = tls.recv(65536)
        if not chunk:
            raise EOFError(f"closed after {len(data)} bytes")
        data += chunk
    raise AssertionError("the exchange did not finish in time")


def _common_name(cert: dict[str, object] | None) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):  # type: ignore[union-attr]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def refused(outcome: Outcome) -> bool:
    return not outcome.ok and outcome.error != "" and "echo differs" not in outcome.error


def https_get(port: int, context: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 GET over TLS with `context` (which may carry a client
    certificate); returns (status, body)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        tls.sendall(request.encode())
        data = bytearray()
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class MutualLive(Live):
    """A Live whose status service wants a client certificate: counters
    and status are fetched with `context`."""

    context: ssl.SSLContext

    def metrics_text(self) -> str:
        status, body = https_get(self.metrics, self.context, "/metrics")
        assert status == 200, body
        return body.decode()

    def tls_status(self) -> dict[str, object]:
        status, body = https_get(self.metrics, self.context, "/v1/tls")
        assert status == 200, body
        value = json.loads(body)
        assert isinstance(value, dict)
        return value


def assert_no_key_lines(text: str, *pems: bytes) -> None:
    """No base64 line of any of `pems` appears in `text`. (`check` names
    a key's format, "PRIVATE KEY", which is no key material.)"""
    for pem in pems:
        for line in key_body_lines(pem):
            assert line not in text, "a base64 line of a private key was printed"
