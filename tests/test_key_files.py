"""Private key files: refused when others may read them, and a key the
gateway may not read on reload (as a non-root user) is an io_error that
keeps the old pair serving."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Process, free_port, http_get, served_subject, wait_until
from .rotation_files import make_leaf, put


def _serve_flags(cert: Path, key: Path, port: int) -> list[str]:
    return [
        "--tls-enabled", "true",
        "--tls-certificate-file", str(cert), "--tls-key-file", str(key),
        "--http", f"127.0.0.1:{port}", "--http-upstream", "127.0.0.1:9",
    ]  # fmt: skip


def _refusal(cert: Path, key: Path) -> str:
    """Starts spicegw on these files and returns its one line of refusal."""
    done = subprocess.run(
        [sys.executable, "-m", "spicegw", "run", *_serve_flags(cert, key, free_port())],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620])
def test_a_key_others_may_read_is_refused_at_start(ca, tmp_path, mode):
    cert_pem, key_pem = make_leaf(ca.issued, "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(mode)
    line = _refusal(cert, key)
    assert f"'{key}'" in line
    assert f"mode {mode:04o}" in line
    assert "0600" in line


def test_exchanged_files_are_named_before_any_mode_advice(ca, tmp_path):
    # What `tls init` writes, given the wrong way round: the "key" file is
    # a 0644 certificate, so its mode is no fault and must not be blamed.
    cert_pem, key_pem = make_leaf(ca.issued, "localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(cert_pem)
    cert.chmod(0o644)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    line = _refusal(key, cert)
    assert "look exchanged" in line
    assert "mode" not in line


def test_a_key_0640_owned_by_root_is_accepted(gateway, ca, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can own a file as root")
    cert_pem, key_pem = make_leaf(ca.issued, "root owned")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o640)
    port = free_port()
    gateway(*_serve_flags(cert, key, port))
    assert served_subject(port, ca.path) == "root owned"


@pytest.fixture
def nobody_folder() -> Iterator[tuple[pwd.struct_passwd, Path]]:
    """A folder the unprivileged user `nobody` owns and can work in."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the gateway as another user")
    nobody = pwd.getpwnam("nobody")
    folder = Path(tempfile.mkdtemp(prefix="spicegw-nobody-"))
    folder.chmod(0o755)
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    try:
        yield nobody, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _reloads(metrics: int, ca: Path, result: str) -> int:
    _, body = http_get(metrics, ca, "/metrics")
    needle = f'runtime_tls_reload_total{{result="{result}",scope="public"}} '
    for line in body.decode().splitlines():
        if line.startswith(needle):
            return int(line[len(needle) :])
    raise AssertionError(f"{needle!r} not in /metrics")


def test_a_key_the_gateway_may_not_read_is_an_io_error_on_reload(ca, processes, nobody_folder):
    nobody, folder = nobody_folder
    old, new = make_leaf(ca.issued, "nobody old"), make_leaf(ca.issued, "nobody new")
    cert, key = folder / "cert.pem", folder / "key.pem"

    def give(path: Path, data: bytes) -> None:
        put(path, data)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)

    give(cert, old[0])
    give(key, old[1])
    port, metrics = free_port(), free_port()
    as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
    gateway = Process(
        [
            *as_nobody, "--clear-groups", sys.executable, "-m", "spicegw", "run",
            "--workers", "2", *_serve_flags(cert, key, port),
            "--metrics", f"127.0.0.1:{metrics}", "--tls-poll-interval", "200ms",
        ],
        folder / "gateway.log",
        env={"HOME": str(folder)},
    )  # fmt: skip
    processes.append(gateway)
    gateway.wait_for_log(r"worker\(s\) ready", timeout=20)
    assert served_subject(port, ca.path) == "nobody old"

    # The key now belongs to root alone: the gateway's user cannot read it.
    os.chown(key, 0, 0)
    found = gateway.wait_for_log(r"not reloaded \(io_error\): [^\n]*", timeout=10)
    assert f"'{key}'" in found.group(0)
    assert "Permission denied" in found.group(0)
    wait_until(lambda: _reloads(metrics, ca.path, "io_error") == 1, timeout=5)
    assert _reloads(metrics, ca.path, "parse_error") == 0
    assert served_subject(port, ca.path) == "nobody old"

    # Readable again, with a new pair: served, and nothing counted twice.
    give(key, new[1])
    give(cert, new[0])
    wait_until(lambda: served_subject(port, ca.path) == "nobody new", timeout=5)
    assert _reloads(metrics, ca.path, "io_error") == 1
    assert _reloads(metrics, ca.path, "ok") == 1
