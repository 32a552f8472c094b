"""What the gateway says and serves at start: the certificate line, file
and inline material, and the --dev defaults."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .harness import Gateway, Process, free_port, http_get, served_subject, tls_file_flags

STARTUP_LINE = re.compile(
    r"^\S+\s+(?P<level>[A-Z]+)\s+\S+: "
    r"All endpoints secured with TLS using certificate: (?P<subject>.*)$",
    re.MULTILINE,
)


def _issue(
    ca, subject: list[x509.NameAttribute[str]], folder: Path, stem: str
) -> tuple[Path, Path]:
    """A localhost server certificate with exactly `subject`, attributes
    in the order given, signed by the test CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.issued.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.issued.key, hashes.SHA256())
    )
    cert_path = folder / f"{stem}.pem"
    key_path = folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _http_args(port: int, upstream: int) -> list[str]:
    listen = ["--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{upstream}"]
    return ["--workers", "1", *listen]


SCRAMBLED = [
    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    x509.NameAttribute(NameOID.LOCALITY_NAME, "Seattle"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Widgets, Inc."),
    x509.NameAttribute(NameOID.COMMON_NAME, "spiced.localhost"),
    x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Washington"),
    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "IT"),
]


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (
            SCRAMBLED,
            "CN=spiced.localhost, OU=IT, O=Widgets, Inc., L=Seattle, S=Washington, C=US",
        ),
        ([x509.NameAttribute(NameOID.COMMON_NAME, "only-cn.localhost")], "CN=only-cn.localhost"),
    ],
    ids=["six-attributes-scrambled", "common-name-only"],
)
def test_startup_line_names_the_certificate(gateway, ca, http_port, tmp_path, subject, expected):
    cert, key = _issue(ca, subject, tmp_path, "subject")
    port = free_port()
    gw = gateway(*tls_file_flags(cert, key), *_http_args(port, http_port))

    lines = STARTUP_LINE.findall(gw.text())
    assert lines == [("INFO", expected)], gw.text()
    # The line describes the certificate actually served.
    common_name = next(a.value for a in subject if a.oid == NameOID.COMMON_NAME)
    assert served_subject(port, ca.path) == common_name


def test_file_material_serves_and_is_watched(gateway, ca, http_port):
    pair = ca.pair("e2e-file.localhost", names=("localhost", "127.0.0.1"), stem="e2e-file")
    port = free_port()
    gw = gateway(*tls_file_flags(pair.cert, pair.key), *_http_args(port, http_port))

    assert served_subject(port, ca.path) == "e2e-file.localhost"
    assert http_get(port, ca.path, "/hello") == (200, b"hello from upstream")
    assert "not hot-reloaded" not in gw.text()


class ShellGateway(Gateway):
    """`spicegw run` started by a shell command line, so that inline PEM
    comes from environment variables the way the Spice docs show it."""

    def __init__(self, command: str, log: Path, env: dict[str, str]):
        # `exec` keeps one PID: the shell becomes the supervisor.
        Process.__init__(self, ["sh", "-c", f"exec {command}", sys.executable], log, env)


def test_inline_material_from_environment_serves_and_is_not_watched(
    ca, http_port, processes, tmp_path
):
    pair = ca.pair("e2e-inline.localhost", names=("localhost", "127.0.0.1"), stem="e2e-inline")
    port = free_port()
    command = (
        '"$0" -m spicegw run --tls-enabled true '
        '--tls-certificate "$SPICEGW_E2E_CERT" --tls-key "$SPICEGW_E2E_KEY" '
        + " ".join(_http_args(port, http_port))
    )
    env = {"SPICEGW_E2E_CERT": pair.cert_pem, "SPICEGW_E2E_KEY": pair.key_pem}
    gw = ShellGateway(command, tmp_path / "inline.log", env)
    processes.append(gw)
    gw.wait_ready()

    assert served_subject(port, ca.path) == "e2e-inline.localhost"
    assert http_get(port, ca.path, "/hello") == (200, b"hello from upstream")
    notice = re.search(r"^\S+\s+INFO\s+.*inline.*not hot-reloaded", gw.text(), re.MULTILINE)
    assert notice, gw.text()
    # The key travels in argv and the environment, never into the log.
    assert pair.key_pem.splitlines()[1] not in gw.text()


def _dev_gateway(gateway, state: Path, port: int) -> tuple[Gateway, Path]:
    listen = ["--http", f"127.0.0.1:{port}", "--workers", "1"]
    gw = gateway("--dev", "--state-dir", str(state), *listen)
    hint = gw.wait_for_log(r"curl --cacert (\S+) https://localhost:(\d+)/health")
    assert int(hint.group(2)) == port
    return gw, Path(hint.group(1))


def test_dev_mode_makes_a_ca_once_and_serves_health(gateway, tmp_path):
    state = tmp_path / "state"
    port = free_port()

    first, ca_path = _dev_gateway(gateway, state, port)
    assert ca_path.is_relative_to(state)
    ca_bytes = ca_path.read_bytes()
    assert "created a development CA" in first.text()
    assert re.search(r"development CA .*for local development only", first.text())
    # The command the log suggests works as printed.
    curl = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca_path), f"https://localhost:{port}/health"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.strip() == "ok"

    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0

    second, second_ca = _dev_gateway(gateway, state, port)
    assert second_ca == ca_path
    assert ca_path.read_bytes() == ca_bytes
    assert "created a development CA" not in second.text()
    assert http_get(port, ca_path, "/health") == (200, b"ok\n")
