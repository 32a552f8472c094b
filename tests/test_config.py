"""spicepod.yaml and the flags together: every runtime.tls field, the
precedence of the four places an item can come from, when TLS is on,
and errors that name the file, the line and the key.

Precedence is shown by what a real gateway does: the served certificate
names its source, a key from the wrong source would not match it (the
gateway would refuse to start), and only the winning client CA's client
gets through.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from .config_support import (
    Authority,
    assert_no_key_lines,
    block,
    client_context,
    ended,
    error_line,
    exchange,
    line_of,
    refused,
    spicegw,
    write_pod,
)
from .harness import free_port, tls_connect
from .rotation_files import make_leaf

# Where an item can come from, highest precedence first.
LEVELS = ("CLI file", "CLI inline", "spicepod file", "spicepod inline")


class Sources:
    """For each level: a certificate (all on one key, each naming its
    level), a key (the matching one, or a stranger's), and a client CA
    with a client of its own."""

    def __init__(self, folder: Path, ca):
        self.folder = folder
        self.ca = ca
        shared = ec.generate_private_key(ec.SECP256R1())
        self.certs = [make_leaf(ca.issued, f"cert from {level}", key=shared) for level in LEVELS]
        self.good_key = self.certs[0][1]
        self.keys_used: list[bytes] = []
        self.client_cas = [Authority.create(folder / f"ca{n}", f"CA {n}") for n in range(4)]
        self.clients = [
            authority.client(f"client of CA {n}") for n, authority in enumerate(self.client_cas)
        ]

    def key(self, level: int, winner: int) -> bytes:
        pem = self.good_key if level == winner else make_leaf(self.ca.issued, "stranger")[1]
        self.keys_used.append(pem)
        return pem

    def file(self, name: str, data: bytes) -> Path:
        path = self.folder / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


# Which levels hold each item: (certificate, key, client CA).
PRECEDENCE = {
    "all four": ({0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}),
    "no CLI file": ({1, 2, 3}, {1, 2, 3}, {1, 2, 3}),
    "spicepod only": ({2, 3}, {2, 3}, {2, 3}),
    "spicepod inline only": ({3}, {3}, {3}),
    "mixed: each item its own winner": ({2, 3}, {1, 2, 3}, {0, 3}),
    "mixed: gaps between levels": ({1, 3}, {0, 2}, {1, 2}),
}


@pytest.mark.parametrize("case", list(PRECEDENCE))
def test_precedence_per_item(gateway, tmp_path, ca, echo_port, case):
    cert_levels, key_levels, ca_levels = PRECEDENCE[case]
    sources = Sources(tmp_path, ca)
    key_winner = min(key_levels)
    flags: list[str] = []
    tls = ["    enabled: true", "    client_auth_mode: required"]

    for level in sorted(cert_levels):
        pem = sources.certs[level][0]
        if level == 0:
            flags += ["--tls-certificate-file", str(sources.file("cli-cert.pem", pem))]
        elif level == 1:
            flags += ["--tls-certificate", pem.decode()]
        elif level == 2:
            sources.file("pod-cert.pem", pem)
            # Relative to the spicepod's folder, not to the working directory.
            tls.append("    certificate_file: files/pod-cert.pem")
        else:
            tls.append(f"    certificate: |\n{block(pem, 6)}")
    for level in sorted(key_levels):
        pem = sources.key(level, key_winner)
        if level == 0:
            flags += ["--tls-key-file", str(sources.file("cli.key", pem))]
        elif level == 1:
            flags += ["--tls-key", pem.decode()]
        elif level == 2:
            sources.file("pod.key", pem)
            tls.append("    key_file: files/pod.key")
        else:
            tls.append(f"    key: |\n{block(pem, 6)}")
    for level in sorted(ca_levels):
        authority = sources.client_cas[level]
        if level == 0:
            flags += ["--tls-client-auth-ca-file", str(authority.path)]
        elif level == 1:
            flags += ["--tls-client-auth-ca", authority.path.read_text()]
        elif level == 2:
            tls.append(f"    client_auth_ca_file: {authority.path.relative_to(tmp_path)}")
        else:
            tls.append(f"    client_auth_ca: |\n{block(authority.path.read_bytes(), 6)}")

    pod = write_pod(tmp_path, "runtime:\n  tls:\n" + "\n".join(tls) + "\n")
    port = free_port()
    gw = gateway(
        *("--config", str(pod), "--workers", "1", *flags),
        *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{echo_port}"),
    )

    ca_winner = min(ca_levels)
    through = exchange(port, client_context(ca.path, sources.clients[ca_winner]))
    assert through.ok, f"the client of the {LEVELS[ca_winner]} CA was refused: {through.error}"
    assert through.subject == f"cert from {LEVELS[min(cert_levels)]}"
    for level in ca_levels - {ca_winner}:
        loser = exchange(port, client_context(ca.path, sources.clients[level]))
        assert refused(loser), f"the client of the {LEVELS[level]} CA got through"
    assert_no_key_lines(gw.text(), *sources.keys_used)


def test_client_auth_mode_flag_overrides_the_spicepod(
    gateway, tmp_path, server_pair, ca, echo_port
):
    clients = Authority.create(tmp_path / "clients", "client CA")
    text = f"""\
runtime:
  tls:
    enabled: true
    certificate_file: {server_pair.cert}
    key_file: {server_pair.key}
    client_auth_mode: required
    client_auth_ca_file: {clients.path}
"""
    pod = write_pod(tmp_path, text)
    port = free_port()
    gateway(
        *("--config", str(pod), "--workers", "1", "--tls-client-auth-mode", "request"),
        *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{echo_port}"),
    )
    # request, from the flag: a client without a certificate gets through.
    assert exchange(port, client_context(ca.path)).ok
    assert exchange(port, client_context(ca.path, clients.client("alice"))).ok


# TLS on or off.


@pytest.mark.parametrize(
    "pod_enabled", [None, True, False], ids=["pod-unset", "pod-true", "pod-false"]
)
@pytest.mark.parametrize(
    "flag", [None, "true", "false"], ids=["flag-unset", "flag-true", "flag-false"]
)
def test_tls_is_on_when_the_flag_or_the_spicepod_says_so(
    gateway, tmp_path, server_pair, ca, echo_port, flag, pod_enabled
):
    lines = ["runtime:", "  tls:"]
    if pod_enabled is not None:
        lines.append(f"    enabled: {str(pod_enabled).lower()}")
    lines += [f"    certificate_file: {server_pair.cert}", f"    key_file: {server_pair.key}"]
    pod = write_pod(tmp_path, "\n".join(lines) + "\n")
    port = free_port()
    args = ["--config", str(pod), "--workers", "1"]
    args += ["--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{echo_port}"]
    if flag is not None:
        args += ["--tls-enabled", flag]
    gw = gateway(*args)

    on = flag == "true" or pod_enabled is True
    if on:
        with tls_connect(port, ca.path) as tls:
            tls.sendall(b"over TLS\n")
            assert tls.recv(100) == b"over TLS\n"
        assert "All endpoints secured with TLS using certificate: CN=localhost" in gw.text()
    else:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(b"in plaintext\n")
            assert plain.recv(100) == b"in plaintext\n"
        assert re.search(r"WARN\w* .*plaintext", gw.text()), gw.text()


# Errors that name the file, the line and the key.

HEAD = "version: v1\nkind: Spicepod\nname: errors\n"
ENDPOINT = "endpoints:\n  - name: api\n    listen: 127.0.0.1:1\n    upstream: 127.0.0.1:2\n"

# (document, the key named, what the error says); the line is the one
# marked `# <-`.
BAD_DOCUMENTS = {
    "unknown top-level key": (
        HEAD + "listen_on: 8443  # <-\n" + ENDPOINT,
        "listen_on",
        "unknown key",
    ),
    "unknown key in runtime": (
        HEAD + "runtime:\n  results_cache: {}\n  tls_settings: {}  # <-\n" + ENDPOINT,
        "runtime.tls_settings",
        "unknown key",
    ),
    "unknown key in runtime.tls": (
        HEAD + "runtime:\n  tls:\n    enabled: false\n    certificate_path: x  # <-\n" + ENDPOINT,
        "runtime.tls.certificate_path",
        "unknown key",
    ),
    "unknown key in runtime.node_mtls": (
        HEAD + "runtime:\n  node_mtls:\n    ca_file: x  # <-\n" + ENDPOINT,
        "runtime.node_mtls.ca_file",
        "unknown key",
    ),
    "unknown key in the second endpoint": (
        HEAD + ENDPOINT + "  - name: b\n    listen: 127.0.0.1:3\n    port: 4  # <-\n",
        "endpoints[1].port",
        "unknown key",
    ),
    "unknown key in a secret store": (
        HEAD + "secrets:\n  - from: env\n    name: env\n    path: /x  # <-\n" + ENDPOINT,
        "secrets[0].path",
        "unknown key",
    ),
    "enabled is a number": (
        HEAD + "runtime:\n  tls:\n    enabled: 3  # <-\n" + ENDPOINT,
        "runtime.tls.enabled",
        "expected true or false",
    ),
    "enabled is a word": (
        HEAD + "runtime:\n  tls:\n    enabled: maybe  # <-\n" + ENDPOINT,
        "runtime.tls.enabled",
        "expected true or false",
    ),
    "a file field is a flow list": (
        HEAD + "runtime:\n  tls:\n    certificate_file: [a, b]  # <-\n" + ENDPOINT,
        "runtime.tls.certificate_file",
        "expected a string",
    ),
    # The value starts on the line after its key: the error still points
    # at the key, the line an editor should jump to.
    "a file field is a block list": (
        HEAD + "runtime:\n  tls:\n    key_file:  # <-\n      - a.key\n" + ENDPOINT,
        "runtime.tls.key_file",
        "expected a string",
    ),
    "tls is a string": (
        HEAD + "runtime:\n  tls: on please  # <-\n" + ENDPOINT,
        "runtime.tls",
        "expected a mapping",
    ),
    "endpoints is a mapping": (
        HEAD + "endpoints:  # <-\n  api: {listen: 127.0.0.1:1}\n",
        "endpoints",
        "expected a list",
    ),
    "alpn is a string": (
        HEAD + ENDPOINT + "    alpn: h2  # <-\n",
        "endpoints[0].alpn",
        "expected a list",
    ),
    "proxy_protocol is a number": (
        HEAD + ENDPOINT + "    proxy_protocol: 1  # <-\n",
        "endpoints[0].proxy_protocol",
        "expected true or false",
    ),
    "listen is a number": (
        HEAD + "endpoints:\n  - name: api\n    listen: 8443  # <-\n    upstream: 127.0.0.1:2\n",
        "endpoints[0].listen",
        "expected a string",
    ),
    "client_auth_mode is not a mode": (
        HEAD + "runtime:\n  tls:\n    enabled: true\n    certificate: x\n    key: y\n"
        "    client_auth_mode: sometimes  # <-\n" + ENDPOINT,
        "runtime.tls.client_auth_mode",
        "expected none, request or required",
    ),
}


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_bad_spicepod_names_file_line_and_key(tmp_path, case, crlf):
    text, key, reason = BAD_DOCUMENTS[case]
    pod = write_pod(tmp_path, text, crlf=crlf)
    line = line_of(text, "# <-")

    done = spicegw("check", "--config", str(pod))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    errors = [text for text in output.splitlines() if text.startswith("error:")]
    assert len(errors) == 1, output
    assert f"{pod}:{line}: {key}: " in errors[0], f"expected line {line}: {errors[0]}"
    assert reason in errors[0], errors[0]


def test_run_refuses_a_bad_spicepod_with_one_line(gateway, tmp_path):
    text, key, reason = BAD_DOCUMENTS["unknown key in runtime.tls"]
    pod = write_pod(tmp_path, text)
    code, output = ended(gateway("--config", str(pod), ready=False))
    assert code != 0
    line = error_line(output)
    assert f"{pod}:{line_of(text, '# <-')}: {key}: {reason}" in line, line
    assert "Traceback" not in output


# One spicepod, LF or CRLF: the same settings.


def full_pod(tmp_path: Path, server_pair, client_ca: Authority, ports: dict[str, int]) -> str:
    return f"""\
version: v1
kind: Spicepod
name: line-ends
datasets:
  - from: postgres:orders
    name: orders
secrets:
  - from: env
    name: env
runtime:
  results_cache:
    enabled: true
  tls:
    enabled: true
    certificate: |
{block(server_pair.cert_pem, 6)}
    key_file: "{server_pair.key}"
    client_auth_mode: "request"
    client_auth_ca: |
{block(client_ca.path.read_text(), 6)}
endpoints:
  - name: api
    listen: 127.0.0.1:${{env:SPICEGW_TEST_API_PORT}}
    upstream: '127.0.0.1:{ports["upstream"]}'
    alpn: [h2, http/1.1]
    proxy_protocol: false
  - name: grpc
    listen: 127.0.0.1:{ports["grpc"]}
    upstream: 127.0.0.1:{ports["upstream"]}
    alpn:
      - h2
"""


def test_crlf_spicepod_parses_the_same(gateway, tmp_path, server_pair, ca, echo_port):
    client_ca = Authority.create(tmp_path / "clients", "client CA")
    ports = {"api": free_port(), "grpc": free_port(), "upstream": echo_port}
    env = {"SPICEGW_TEST_API_PORT": str(ports["api"])}
    text = full_pod(tmp_path, server_pair, client_ca, ports)
    lf = write_pod(tmp_path / "lf", text)
    crlf = write_pod(tmp_path / "crlf", text, crlf=True)
    assert b"\r\n" in crlf.read_bytes()

    checked = {}
    for pod in (lf, crlf):
        done = spicegw("check", "--config", str(pod), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        checked[pod] = done.stdout.replace(str(pod), "POD")
    assert checked[lf] == checked[crlf]
    assert (
        f"endpoint api: 127.0.0.1:{ports['api']} (tls, scope public, alpn h2,http/1.1)"
        in (checked[lf])
    )
    assert "client certificates request, 1 trusted CA certificate(s)" in checked[lf]

    gateway("--config", str(crlf), "--workers", "1", env=env)
    alice = client_ca.client("alice")
    for port in (ports["api"], ports["grpc"]):
        outcome = exchange(port, client_context(ca.path, alice, alpn=["h2"]))
        assert outcome.ok, outcome.error
        assert outcome.alpn == "h2"
        assert outcome.subject == "localhost"
    assert exchange(ports["api"], client_context(ca.path)).ok


def test_env_reference_that_is_not_set_is_an_error_naming_it(tmp_path, server_pair):
    text = HEAD + "endpoints:\n  - name: api\n    listen: 127.0.0.1:${env:SPICEGW_TEST_UNSET}\n"
    text += "    upstream: 127.0.0.1:2\n"
    pod = write_pod(tmp_path, text)
    done = spicegw("check", "--config", str(pod))
    assert done.returncode == 1
    assert "SPICEGW_TEST_UNSET" in done.stdout
    assert f"{pod}:{line_of(text, 'listen')}: endpoints[0].listen" in done.stdout


def test_default_spicepod_is_read_from_the_working_directory(tmp_path, server_pair):
    text = (
        f"runtime:\n  tls:\n    enabled: true\n    certificate_file: {server_pair.cert}\n"
        f"    key_file: {server_pair.key}\n" + ENDPOINT
    )
    folder = tmp_path / "here"
    write_pod(folder, text)
    done = spicegw("check", cwd=folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config: spicepod.yaml: ok" in done.stdout
    assert "All endpoints secured with TLS using certificate: CN=localhost" in done.stdout
    # Elsewhere, with no spicepod.yaml, there is nothing to serve.
    assert spicegw("check", cwd=tmp_path).returncode == 1
