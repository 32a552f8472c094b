"""A private key never leaves the gateway: not in its output, its log,
its metrics, its status answers, an error message, or the command line
and environment /proc shows for any of its processes, through a run
full of errors; and a worker can never dump core (a core would hold
the keys).

Four gateways take their keys four ways (files, inline in argv, inline
from an environment variable, a secret in .env); the file-backed one
goes through refused rotations, refused clients and a crashed worker.
Then everything they showed is searched for "PRIVATE KEY" and for
every base64 line of every key the test used.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spicegw import _pki

from .fault_support import client_hello
from .harness import (
    Gateway,
    Process,
    client_context,
    free_port,
    start_upstream,
    tls_connect,
    wait_until,
)
from .resilience_support import logged
from .rotation_files import key_body_lines, make_leaf, put, put_all, write_private

STATUS_PATHS = ("/", "/health", "/v1/ready", "/v1/tls", "/v1/workers", "/metrics", "/nowhere")


class ShellGateway(Gateway):
    """`spicegw run` started by a shell that expands its flags from the
    environment; `exec` keeps one PID."""

    def __init__(self, command: str, log: Path, env: dict[str, str]):
        Process.__init__(self, ["sh", "-c", f"exec {command}", sys.executable], log, env)


def _spicegw(*args: str) -> str:
    """`spicegw ARGS…` to its end: its exit code and all it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "spicegw", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def _request(port: int, ca: Path, method: str, path: str) -> str:
    """One HTTP/1.1 request to the status service; the whole answer."""
    with tls_connect(port, ca) as tls:
        tls.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = bytearray()
        while chunk := tls.recv(65536):
            data += chunk
    return data.decode(errors="replace")


def _proc_text(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_bytes().decode("latin-1")


def _endpoint(port: int, upstream: int) -> tuple[str, ...]:
    return ("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{upstream}")


def _refused_clients(port: int, ca: Path, other_ca: Path) -> list[str]:
    """Clients the gateway turns away, or that turn it away."""
    outcomes = []
    # A client that trusts another CA aborts the handshake.
    try:
        with tls_connect(port, other_ca):
            outcomes.append("a client of another CA got through")
    except ssl.SSLCertVerificationError as err:
        outcomes.append(f"other CA: {err.verify_message}")
    # Plain HTTP on the TLS port.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            outcomes.append(f"plaintext: {raw.recv(4096)!r}")
        except OSError as err:
            outcomes.append(f"plaintext: {err!r}")
    # A ClientHello, then gone.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(client_hello(ca))
    # A TLS 1.2 client whose only cipher suite the gateway does not offer.
    context = client_context(ca, maximum=ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("AES128-SHA")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            outcomes.append("a client with no common cipher got through")
    except (ssl.SSLError, OSError) as err:
        outcomes.append(f"no common cipher: {err!r}")
    return outcomes


def _crash_a_worker(gw: Gateway) -> int:
    """SIGKILLs one worker; returns its replacement once it serves."""
    workers = gw.worker_pids()
    os.kill(workers[0], signal.SIGKILL)
    found = wait_until(lambda: [p for p in gw.worker_pids() if p not in workers], 5)
    assert isinstance(found, list)
    logged(gw, rf"\(pid {found[0]}\) is serving again", 5)
    return int(found[0])


@dataclass
class Tour:
    """What a run full of errors showed, by where it was seen."""

    shown: dict[str, str] = field(default_factory=dict, repr=False)
    keys: list[bytes] = field(default_factory=list, repr=False)  # every key PEM used
    cores: dict[int, str] = field(default_factory=dict)  # worker: core limits


@pytest.fixture(scope="module")
def tour(ca, tmp_path_factory) -> Iterator[Tour]:
    """Runs the four gateways through their errors once for the tests of
    this module, and collects what they showed while still running."""
    folder = tmp_path_factory.mktemp("secrecy")
    started: list[Process] = []
    try:
        yield _run_the_tour(ca, folder, started)
    finally:
        for proc in reversed(started):
            proc.stop()


def _run_the_tour(ca, folder: Path, started: list[Process]) -> Tour:
    tour = Tour()
    shown = tour.shown
    other_ca = folder / "other-ca.pem"
    other_ca.write_bytes(_pki.make_ca("another CA", "elsewhere").cert_pem())
    echo = free_port()
    started.append(start_upstream("echo", echo, folder / "echo.log"))
    gateways: dict[str, Gateway] = {}

    def leaf(name: str) -> tuple[bytes, bytes]:
        cert, key = make_leaf(ca.issued, name)
        tour.keys.append(key)
        return cert, key

    def run(name: str, *args: str) -> Gateway:
        gw = Gateway(list(args), folder / f"{name.replace(' ', '-')}.log")
        started.append(gw)
        gw.wait_ready()
        gateways[name] = gw
        return gw

    # 1. File-backed, through refused rotations, then an accepted one.
    # Files are checked only when asked (`spicegw reload`), so each
    # refusal is also reported to the command that asked.
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    first_cert, first_key = leaf("files-1")
    write_private(cert_file, first_cert)
    write_private(key_file, first_key)
    port, status = free_port(), free_port()
    files = run(
        "files",
        *("--tls-enabled", "true", "--tls-certificate-file", str(cert_file)),
        *("--tls-key-file", str(key_file), "--tls-poll-interval", "3600s"),
        *("--workers", "2", "--metrics", f"127.0.0.1:{status}", "--log-level", "debug"),
        *_endpoint(port, echo),
    )
    client = ("--endpoint", f"https://localhost:{status}", "--tls-root-certificate-file")
    reload = ("reload", *client, str(ca.path))

    _, stranger_key = leaf("stranger")
    next_cert, next_key = leaf("files-2")
    lines = next_key.decode().splitlines()
    refusals = [
        ("mismatched key", [(key_file, stranger_key)]),
        ("truncated key", [(key_file, next_key[: len(next_key) // 2])]),
        ("key on one line", [(key_file, "".join(lines).encode())]),
        (
            "bad base64",
            [(key_file, "\n".join([*lines[:2], "!" + lines[2][1:], *lines[3:]]).encode())],
        ),
        ("cert and key exchanged", [(cert_file, first_key), (key_file, first_cert)]),
        ("key of the next pair first", [(cert_file, first_cert), (key_file, next_key)]),
    ]
    for count, (name, changes) in enumerate(refusals, 1):
        put_all(*changes)
        shown[f"spicegw reload ({name})"] = _spicegw(*reload)
        wait_until(lambda count=count: files.text().count("not reloaded") >= count, 5)
    put(key_file, first_key)
    key_file.chmod(0o644)
    shown["spicegw reload (key readable by all)"] = _spicegw(*reload)
    key_file.chmod(0o600)
    put_all((cert_file, next_cert), (key_file, next_key))
    shown["spicegw reload (good pair)"] = _spicegw(*reload)
    logged(files, r"public certificate reloaded", 5)

    outcomes = _refused_clients(port, ca.path, other_ca)
    assert not any("got through" in outcome for outcome in outcomes), outcomes
    _crash_a_worker(files)
    shown["spicegw status (files)"] = _spicegw("status", *client, str(ca.path))
    shown["spicegw status (untrusted)"] = _spicegw("status", *client, str(other_ca))
    for path in STATUS_PATHS:
        shown[f"GET {path} (files)"] = _request(status, ca.path, "GET", path)
    shown["POST /v1/reload"] = _request(status, ca.path, "POST", "/v1/reload")
    shown["POST /metrics"] = _request(status, ca.path, "POST", "/metrics")
    check_files = ("check", "--tls-enabled", "true", "--tls-certificate-file", str(cert_file))
    stranger_file = folder / "stranger.key"
    write_private(stranger_file, stranger_key)
    for name, key in (("files", key_file), ("mismatched files", stranger_file)):
        shown[f"spicegw check ({name})"] = _spicegw(
            *check_files, "--tls-key-file", str(key), *_endpoint(free_port(), echo)
        )

    # 2. Inline in argv; its worker crashes and is replaced.
    argv_cert, argv_key = leaf("inline-argv")
    port, status = free_port(), free_port()
    inline = run(
        "inline argv",
        *("--tls-enabled", "true", "--tls-certificate", argv_cert.decode()),
        *("--tls-key", argv_key.decode(), "--workers", "1"),
        *("--metrics", f"127.0.0.1:{status}", "--log-level", "debug"),
        *_endpoint(port, echo),
    )
    _refused_clients(port, ca.path, other_ca)
    _crash_a_worker(inline)
    for path in STATUS_PATHS:
        shown[f"GET {path} (inline argv)"] = _request(status, ca.path, "GET", path)
    client = ("--endpoint", f"https://localhost:{status}", "--tls-root-certificate-file")
    shown["spicegw reload (inline)"] = _spicegw("reload", *client, str(ca.path))
    shown["spicegw status (inline)"] = _spicegw("status", *client, str(ca.path))
    _, wrong_key = leaf("inline-wrong")
    shown["spicegw check (inline, mismatched)"] = _spicegw(
        *("check", "--tls-enabled", "true", "--tls-certificate", argv_cert.decode()),
        *("--tls-key", wrong_key.decode(), *_endpoint(free_port(), echo)),
    )

    # 3. Inline from environment variables, as a shell expands them.
    env_cert, env_key = leaf("inline-env")
    port = free_port()
    command = (
        '"$0" -m spicegw run --tls-enabled true --tls-certificate "$SECRECY_CERT" '
        '--tls-key "$SECRECY_KEY" --workers 1 --log-level debug ' + " ".join(_endpoint(port, echo))
    )
    env = {"SECRECY_CERT": env_cert.decode(), "SECRECY_KEY": env_key.decode()}
    from_env = ShellGateway(command, folder / "inline-env.log", env)
    started.append(from_env)
    from_env.wait_ready()
    gateways["inline env"] = from_env
    _refused_clients(port, ca.path, other_ca)

    # 4. Secrets from .env beside the spicepod.
    pod_folder = folder / "pod"
    pod_folder.mkdir()
    secret_cert, secret_key = leaf("from-dotenv")
    dotenv = f'GW_CERT="{secret_cert.decode().strip()}"\nGW_KEY="{secret_key.decode().strip()}"\n'
    write_private(pod_folder / ".env", dotenv.encode())
    port = free_port()
    pod = pod_folder / "spicepod.yaml"
    pod.write_text(
        "runtime:\n  tls:\n    enabled: true\n    certificate: ${secrets:gw_cert}\n"
        "    key: ${secrets:gw_key}\nendpoints:\n  - name: api\n"
        f"    listen: 127.0.0.1:{port}\n    upstream: 127.0.0.1:{echo}\n"
    )
    run("secret", "--config", str(pod), "--workers", "1", "--log-level", "debug")
    _refused_clients(port, ca.path, other_ca)
    shown["spicegw check (secret)"] = _spicegw("check", "--config", str(pod))
    write_private(pod_folder / ".env", dotenv.replace("GW_KEY", "GW_OTHER").encode())
    shown["spicegw check (missing secret)"] = _spicegw("check", "--config", str(pod))

    # Every process of every gateway, as /proc shows it to local users.
    for name, gw in gateways.items():
        shown[f"{name}: output"] = gw.text()
        pids = [gw.pid, *gw.worker_pids()]
        assert len(pids) >= 2, f"{name} has no worker"
        for pid in pids:
            shown[f"{name}: /proc/{pid}/cmdline"] = _proc_text(pid, "cmdline")
            shown[f"{name}: /proc/{pid}/environ"] = _proc_text(pid, "environ")
        for pid in pids[1:]:
            tour.cores[pid] = _core_limits(_proc_text(pid, "limits"))

    # The run went where it should: refusals, crashes, checks that fail.
    assert files.text().count("not reloaded") == len(refusals) + 1, files.text()
    assert "was killed by SIGKILL" in files.text() and "was killed by SIGKILL" in inline.text()
    assert shown["spicegw check (files)"].startswith("exit 0")
    for name in ("mismatched files", "inline, mismatched", "missing secret"):
        assert shown[f"spicegw check ({name})"].startswith("exit 1"), shown
    return tour


def _core_limits(limits: str) -> str:
    match = re.search(r"^Max core file size\s+(\S+)\s+(\S+)", limits, re.MULTILINE)
    assert match is not None, limits
    return f"{match.group(1)} {match.group(2)}"


def test_no_line_of_any_key_appears_in_any_output_or_process(tour):
    """Not one base64 line of any key the gateways were given: in their
    logs, status answers, metrics, command outputs and errors, and in
    the command line and environment of every process."""
    leaks = [
        f"{where}: a line of key {number}"
        for where, text in tour.shown.items()
        for number, key in enumerate(tour.keys)
        if any(line in text for line in key_body_lines(key))
    ]
    lines = sum(len(key_body_lines(key)) for key in tour.keys)
    print(f"{len(tour.shown)} outputs searched for {lines} base64 lines of {len(tour.keys)} keys")
    assert not leaks, leaks


def test_the_words_private_key_appear_nowhere(tour):
    """Not even the PEM label: a log line or an answer saying "PRIVATE
    KEY" is what secret scanners flag, and what a leak looks like."""
    found = []
    for where, text in tour.shown.items():
        for match in re.finditer("PRIVATE KEY", text):
            found.append(f"{where}: …{text[max(0, match.start() - 60) : match.end() + 30]!r}…")
    print("\n".join(found))
    assert not found, f"{len(found)} place(s) say PRIVATE KEY:\n" + "\n".join(found)


def test_inline_keys_are_hidden_from_proc(tour):
    """The gateways given a key inline show stars where it was, in the
    command line and (from the shell) in the environment."""
    hidden = [
        where
        for where, text in tour.shown.items()
        if where.startswith(("inline argv: ", "inline env: ")) and "*" * 64 in text
    ]
    assert any("inline argv" in where and "cmdline" in where for where in hidden), hidden
    assert any("inline env" in where and "environ" in where for where in hidden), hidden


def test_workers_cannot_dump_core(tour):
    print(f"core file size limits (soft hard) by worker: {tour.cores}")
    assert tour.cores and set(tour.cores.values()) == {"0 0"}, tour.cores
