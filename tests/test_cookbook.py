"""`spicegw tls init` and `spicegw tls add`: what they write is private
where it must be, has the extensions clients check, and is accepted by
curl, `openssl s_client` and Python's ssl in front of a real gateway.
"""

from __future__ import annotations

import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from spicegw import _pki

from .config_support import client_context, https_get, spicegw
from .harness import Pair, free_port, http_get


@pytest.fixture(scope="module")
def cookbook(tmp_path_factory) -> Path:
    """`tls init` and two `tls add` runs in a fresh folder, with the
    umask a shell usually has (022): the modes are spicegw's choice."""
    folder = tmp_path_factory.mktemp("cookbook")
    steps = [
        ("tls", "init", "--dir", "tls", "--name", "gateway.example"),
        ("tls", "add", "alice", "--dir", "tls"),
        ("tls", "add", "api2", "--server", "--dir", "tls"),
    ]
    for step in steps:
        done = spicegw(*step, cwd=folder, umask=0o022)
        assert done.returncode == 0, done.stdout + done.stderr
    return folder / "tls"


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_private_and_certificates_readable(cookbook):
    for name in ("ca", "server", "alice", "api2"):
        assert mode(cookbook / f"{name}.key") == 0o600, name
        assert mode(cookbook / f"{name}.pem") & 0o077 == 0o044, name
    assert "PRIVATE KEY" in (cookbook / "ca.key").read_text()


def test_the_ca_may_sign_certificates(cookbook):
    ca = load(cookbook / "ca.pem")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert ca.issuer == ca.subject


@pytest.mark.parametrize(
    ("name", "purpose"),
    [
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("api2", ExtendedKeyUsageOID.SERVER_AUTH),
        ("alice", ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_leaves_are_no_cas_and_have_their_purpose(cookbook, name, purpose):
    ca = load(cookbook / "ca.pem")
    leaf = load(cookbook / f"{name}.pem")
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign
    purposes = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(purposes) == [purpose]


def test_server_names(cookbook):
    names = load(cookbook / "server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    dns = names.value.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]
    assert {"localhost", "gateway.example"} <= set(dns)
    assert "127.0.0.1" in ips


def test_init_does_not_replace_an_existing_ca(cookbook):
    before = (cookbook / "ca.key").read_bytes()
    done = spicegw("tls", "init", "--dir", str(cookbook))
    assert done.returncode != 0
    assert "exists" in done.stderr
    assert (cookbook / "ca.key").read_bytes() == before


def test_init_makes_its_folder_but_not_missing_parents(tmp_path):
    typo = tmp_path / "no-such-folder" / "tls"
    done = spicegw("tls", "init", "--dir", str(typo))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"--dir '{typo}'" in lines[0] and "does not exist" in lines[0], lines[0]
    assert not (tmp_path / "no-such-folder").exists()


def cookbook_pair(folder: Path, name: str) -> Pair:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    return Pair(cert, key, folder / "ca.pem", _pki.load_issued(str(cert), str(key)))


def test_curl_openssl_and_python_accept_the_server(gateway, cookbook, http_port):
    port = free_port()
    gateway(
        *("--tls-enabled", "true", "--workers", "1"),
        *("--tls-certificate-file", str(cookbook / "server.pem")),
        *("--tls-key-file", str(cookbook / "server.key")),
        *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{http_port}"),
    )
    ca = cookbook / "ca.pem"

    for url in (f"https://localhost:{port}/hello", f"https://127.0.0.1:{port}/hello"):
        done = subprocess.run(
            [
                *("curl", "--silent", "--show-error", "--fail", "--max-time", "10"),
                *("--cacert", str(ca), "--resolve", f"localhost:{port}:127.0.0.1", url),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hello from upstream"

    done = subprocess.run(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{port}"),
            *("-servername", "localhost", "-verify_hostname", "localhost"),
            *("-CAfile", str(ca), "-verify_return_error"),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verify return code: 0 (ok)" in done.stdout

    assert http_get(port, ca, "/hello") == (200, b"hello from upstream")


def test_a_client_from_tls_add_is_accepted_in_required_mode(gateway, cookbook, http_port):
    port = free_port()
    gateway(
        *("--tls-enabled", "true", "--workers", "1"),
        *("--tls-certificate-file", str(cookbook / "api2.pem")),
        *("--tls-key-file", str(cookbook / "api2.key")),
        *("--tls-client-auth-mode", "required"),
        *("--tls-client-auth-ca-file", str(cookbook / "ca.pem")),
        *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{http_port}"),
    )
    ca = cookbook / "ca.pem"
    alice = cookbook_pair(cookbook, "alice")

    def curl(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *("curl", "--silent", "--show-error", "--fail", "--max-time", "10"),
                *("--cacert", str(ca), *extra, f"https://127.0.0.1:{port}/hello"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    with_cert = curl("--cert", str(alice.cert), "--key", str(alice.key))
    assert with_cert.returncode == 0, with_cert.stderr
    assert with_cert.stdout == "hello from upstream"
    assert curl().returncode != 0

    assert https_get(port, client_context(ca, alice), "/hello") == (200, b"hello from upstream")
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        https_get(port, client_context(ca), "/hello")
