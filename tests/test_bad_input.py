"""Every bad input ends `spicegw run` quickly, with one line on stderr
that names the flag or file and the reason, a non-zero exit code and
no traceback."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .harness import free_port, tls_file_flags

# Start-up refusals must be quick: an operator should not wait for them.
LIMIT = 2.0


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_spicegw(args: list[str], cwd: Path) -> Outcome:
    """Runs `spicegw run ARGS` to its end. A run that is still going after
    10 s (it started serving instead of refusing) is ended by its PID."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spicegw", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"spicegw kept running with {args}:\n{stderr}") from None
    return Outcome(proc.returncode, stdout, stderr, time.monotonic() - started)


def assert_refused(outcome: Outcome, names: str, cause: str) -> None:
    """One line that contains `names` and matches `cause`."""
    everything = outcome.stdout + outcome.stderr
    assert "Traceback" not in everything, everything
    assert outcome.code != 0, everything
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr:\n{outcome.stderr}"
    assert names in lines[0], lines[0]
    assert re.search(cause, lines[0], re.IGNORECASE), lines[0]
    assert outcome.seconds < LIMIT, f"took {outcome.seconds:.2f} s"
    print(f"{outcome.seconds:.2f} s, exit {outcome.code}: {lines[0]}")


@dataclass(frozen=True)
class Files:
    """Good material with a complete chain (no start-up notes), and a
    folder for bad material."""

    cert: Path
    key: Path
    folder: Path


@pytest.fixture
def files(server_pair, ca, tmp_path) -> Files:
    cert = tmp_path / "chain.pem"
    cert.write_bytes(server_pair.cert.read_bytes() + ca.path.read_bytes())
    return Files(cert, server_pair.key, tmp_path)


def endpoint(port: int | None = None) -> list[str]:
    return [
        "--workers",
        "1",
        "--http",
        f"127.0.0.1:{port or free_port()}",
        "--http-upstream",
        f"127.0.0.1:{free_port()}",
    ]


def _missing(files: Files) -> tuple[list[str], str]:
    path = files.folder / "nowhere.pem"
    return tls_file_flags(path, files.key), str(path)


def _directory(files: Files) -> tuple[list[str], str]:
    # Unreadable even for root: a directory where the key should be.
    path = files.folder / "a-directory.key"
    path.mkdir()
    return tls_file_flags(files.cert, path), str(path)


def _write(files: Files, name: str, data: bytes) -> Path:
    path = files.folder / name
    path.write_bytes(data)
    return path


def _not_pem(files: Files) -> tuple[list[str], str]:
    path = _write(files, "notes.pem", b"this is not a certificate\n")
    return tls_file_flags(path, files.key), str(path)


def _truncated(files: Files) -> tuple[list[str], str]:
    text = files.cert.read_bytes()
    path = _write(files, "truncated.pem", text[: len(text) // 3])
    return tls_file_flags(path, files.key), str(path)


def _empty_key(files: Files) -> tuple[list[str], str]:
    path = _write(files, "empty.key", b"")
    return tls_file_flags(files.cert, path), str(path)


def _other_key(files: Files, ca) -> tuple[list[str], str]:
    other = ca.pair("e2e-other", stem="e2e-other")
    return tls_file_flags(files.cert, other.key), str(other.key)


def _encrypted(files: Files, server_pair, private_format) -> tuple[list[str], str]:
    key = server_pair.issued.key.private_bytes(
        serialization.Encoding.PEM,
        private_format,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    path = _write(files, "encrypted.key", key)
    return tls_file_flags(files.cert, path), str(path)


CASES: dict[str, tuple[Callable[..., tuple[list[str], str]], str]] = {
    "missing file": (_missing, r"no such file"),
    "directory as key file": (_directory, r"directory"),
    "not PEM": (_not_pem, r"PEM"),
    "truncated PEM": (_truncated, r"END|truncated|incomplete"),
    "empty key file": (_empty_key, r"empty"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_files_are_named(case, files, tmp_path):
    make, cause = CASES[case]
    args, named = make(files)
    assert_refused(run_spicegw([*args, *endpoint()], tmp_path), named, cause)


def test_a_key_that_does_not_match_is_named(files, ca, tmp_path):
    args, named = _other_key(files, ca)
    assert_refused(run_spicegw([*args, *endpoint()], tmp_path), named, r"does not match|mismatch")


@pytest.mark.parametrize(
    "private_format",
    [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL],
    ids=["pkcs8", "traditional"],
)
def test_an_encrypted_key_is_refused_without_a_prompt(files, server_pair, tmp_path, private_format):
    args, named = _encrypted(files, server_pair, private_format)
    # stdin is not a terminal here, but a prompt would still block: the
    # 10 s guard in run_spicegw turns that into a failure.
    assert_refused(run_spicegw([*args, *endpoint()], tmp_path), named, r"encrypted")


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode(), b""]
    )


def test_a_damaged_key_is_called_damaged_not_unsupported(files, tmp_path):
    # One byte changed inside the P-256 private scalar (after the PKCS#8
    # and SEC1 headers): still PEM, still DER, no longer a consistent key.
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    der[40] ^= 0x01
    path = _write(files, "damaged.key", _pem("PRIVATE KEY", bytes(der)))
    outcome = run_spicegw([*tls_file_flags(files.cert, path), *endpoint()], tmp_path)
    assert_refused(outcome, str(path), r"damaged: its ECDSA P-256 key data does not decode")


def test_a_small_rsa_key_is_named_with_its_size(files, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = _write(files, "small.key", pem)
    outcome = run_spicegw([*tls_file_flags(files.cert, path), *endpoint()], tmp_path)
    assert_refused(outcome, str(path), r"RSA key smaller than 2048 bits")


def test_an_unreadable_file_is_named(files, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a mode 000 file; the directory case covers unreadable input")
    key = files.folder / "locked.key"
    key.write_bytes(files.key.read_bytes())
    key.chmod(0)
    try:
        outcome = run_spicegw([*tls_file_flags(files.cert, key), *endpoint()], tmp_path)
    finally:
        key.chmod(0o600)
    assert_refused(outcome, str(key), r"permission denied")


def test_tls_enabled_without_material_is_refused(tmp_path):
    outcome = run_spicegw(["--tls-enabled", "true", *endpoint()], tmp_path)
    # TLS may be switched on by the flag or by spicepod.yaml, so the line
    # names what is missing: the flags that would supply the material.
    assert_refused(outcome, "--tls-certificate-file", r"no certificate")


def test_an_address_in_use_is_named(files, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        outcome = run_spicegw([*tls_file_flags(files.cert, files.key), *endpoint(port)], tmp_path)
    assert_refused(outcome, f"--http 127.0.0.1:{port}", r"in use")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--workers", "abc"),
        ("--workers", "0"),
        ("--tls-enabled", "yes"),
        ("--http", "nonsense"),
        ("--http", "127.0.0.1:99999"),
        ("--http-upstream", "nonsense"),
        ("--drain-timeout", "soon"),
    ],
)
def test_a_malformed_flag_value_is_named(files, tmp_path, flag, value):
    args = [*tls_file_flags(files.cert, files.key), *endpoint()]
    # The bad value comes last, so it is the one argparse keeps.
    outcome = run_spicegw([*args, flag, value], tmp_path)
    assert_refused(outcome, flag, re.escape(value))
