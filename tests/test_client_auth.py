"""Client certificates on public endpoints: who gets through in request
and required mode, that a refused client never reaches the upstream,
which settings are inconsistent, and what the upstream learns about
the verified client through PROXY protocol v2.
"""

from __future__ import annotations

import ssl

import pytest

from .config_support import (
    Authority,
    client_context,
    ended,
    error_line,
    exchange,
    refused,
    start_witness,
    write_pod,
)
from .harness import free_port, wait_until
from .reload_support import Live


@pytest.fixture
def authorities(tmp_path):
    """The CA clients must come from, and one the gateway never trusts."""
    return Authority.create(tmp_path / "clients", "client CA"), Authority.create(
        tmp_path / "other", "other CA"
    )


def client_auth_flags(mode: str, client_ca: Authority) -> list[str]:
    return ["--tls-client-auth-mode", mode, "--tls-client-auth-ca-file", str(client_ca.path)]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("mode", ["request", "required"])
def test_who_gets_through_and_refused_clients_never_reach_the_upstream(
    gateway, processes, tmp_path, tls_args, ca, authorities, mode, version
):
    client_ca, other = authorities
    witness = start_witness(processes, tmp_path)
    port = free_port()
    gateway(
        *tls_args,
        *client_auth_flags(mode, client_ca),
        *("--workers", "2", "--http", f"127.0.0.1:{port}"),
        *("--http-upstream", f"127.0.0.1:{witness.port}"),
    )
    trusted = client_context(ca.path, client_ca.client("alice"), version=version)
    anonymous = client_context(ca.path, version=version)
    stranger = client_context(ca.path, other.client("mallory"), version=version)

    # Each refusal is followed by a client that gets through: its upstream
    # connection is opened after the refused handshake ended, so an upstream
    # connection made for the refused one would already be counted.
    expected = 0
    for name, context, allowed in [
        ("the CA's client", trusted, True),
        ("another CA's client", stranger, False),
        ("a client without a certificate", anonymous, mode == "request"),
    ]:
        outcome = exchange(port, context)
        if allowed:
            assert outcome.ok, f"{name} was refused: {outcome.error}"
            expected += 1
        else:
            assert refused(outcome), f"{name} got through in {mode} mode"
            follow = exchange(port, trusted)
            assert follow.ok, follow.error
            expected += 1
        witness.wait_accepted(expected)


@pytest.mark.parametrize("mode", ["request", "required"])
def test_client_auth_from_spicepod_with_inline_ca(
    gateway, processes, tmp_path, ca, authorities, mode
):
    client_ca, other = authorities
    witness = start_witness(processes, tmp_path)
    port = free_port()
    server = ca.pair("localhost", stem="pod-server")
    ca_pem = "\n".join("      " + line for line in client_ca.path.read_text().strip().splitlines())
    pod = write_pod(
        tmp_path / "pod",
        f"""\
version: v1
kind: Spicepod
name: client-auth
runtime:
  tls:
    enabled: true
    certificate_file: {server.cert}
    key_file: {server.key}
    client_auth_mode: {mode}
    client_auth_ca: |
{ca_pem}
endpoints:
  - name: api
    listen: 127.0.0.1:{port}
    upstream: 127.0.0.1:{witness.port}
""",
    )
    gateway("--config", str(pod), "--workers", "1")
    assert exchange(port, client_context(ca.path, client_ca.client("alice"))).ok
    assert refused(exchange(port, client_context(ca.path, other.client("mallory"))))
    anonymous = exchange(port, client_context(ca.path))
    assert anonymous.ok is (mode == "request"), anonymous.error
    witness.wait_accepted(1 + anonymous.ok)


def test_refused_clients_are_counted_as_failed_handshakes(
    gateway, processes, tmp_path, tls_args, ca, authorities
):
    """The refusal happens in the handshake, where the gateway counts it."""
    client_ca, other = authorities
    witness = start_witness(processes, tmp_path)
    port, metrics = free_port(), free_port()
    gw = gateway(
        *tls_args,
        *client_auth_flags("request", client_ca),
        *("--workers", "1", "--http", f"127.0.0.1:{port}"),
        *("--http-upstream", f"127.0.0.1:{witness.port}", "--metrics", f"127.0.0.1:{metrics}"),
    )
    # The status service shares the public scope and its client auth.
    live = Live(gw, port, metrics, ca.path, None, None)
    for _ in range(3):
        assert refused(exchange(port, client_context(ca.path, other.client("mallory"))))

    def errors() -> float:
        text = live.metrics_text()
        for line in text.splitlines():
            if line.startswith('runtime_tls_handshakes_total{result="error"'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    wait_until(lambda: errors() >= 3, 5)
    assert witness.accepted() == 0


# Inconsistent settings.

INCONSISTENT = {
    "required without a CA": (["--tls-client-auth-mode", "required"], "needs the CA"),
    "request without a CA": (["--tls-client-auth-mode", "request"], "needs the CA"),
    "a CA file with mode none": (
        ["--tls-client-auth-mode", "none", "--tls-client-auth-ca-file", "{ca}"],
        "client authentication is off",
    ),
    "a CA file and no mode": (
        ["--tls-client-auth-ca-file", "{ca}"],
        "client authentication is off",
    ),
    "an inline CA with mode none": (
        ["--tls-client-auth-ca", "{ca_pem}"],
        "client authentication is off",
    ),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_inconsistent_client_auth_flags_refuse_to_start(gateway, tls_args, ca, echo_port, case):
    flags, reason = INCONSISTENT[case]
    flags = [f.format(ca=ca.path, ca_pem=ca.path.read_text()) for f in flags]
    gw = gateway(
        *tls_args,
        *flags,
        *("--http", f"127.0.0.1:{free_port()}", "--http-upstream", f"127.0.0.1:{echo_port}"),
        ready=False,
    )
    code, text = ended(gw)
    assert code != 0
    line = error_line(text)
    assert reason in line, line
    assert "--tls-client-auth" in line, line
    assert "Traceback" not in text and "worker(s) ready" not in text


POD_INCONSISTENT = {
    "required without a CA": ("client_auth_mode: required", "needs the CA"),
    "a CA with mode none": (
        "client_auth_mode: none\n    client_auth_ca_file: {ca}",
        "client authentication is off",
    ),
}


@pytest.mark.parametrize("case", list(POD_INCONSISTENT))
def test_inconsistent_client_auth_in_spicepod_refuses_to_start(
    gateway, tmp_path, server_pair, ca, echo_port, case
):
    fields, reason = POD_INCONSISTENT[case]
    text = f"""\
runtime:
  tls:
    enabled: true
    certificate_file: {server_pair.cert}
    key_file: {server_pair.key}
    {fields.format(ca=ca.path)}
endpoints:
  - name: api
    listen: 127.0.0.1:{free_port()}
    upstream: 127.0.0.1:{echo_port}
"""
    pod = write_pod(tmp_path, text)
    code, output = ended(gateway("--config", str(pod), ready=False))
    assert code != 0
    line = error_line(output)
    assert reason in line, line
    assert "runtime.tls.client_auth" in line, line


# What the upstream learns through PROXY protocol v2.


def proxy_pod(tmp_path, server_pair, client_ca: Authority, mode: str, port: int, upstream: int):
    return write_pod(
        tmp_path / "pod",
        f"""\
runtime:
  tls:
    enabled: true
    certificate_file: {server_pair.cert}
    key_file: {server_pair.key}
    client_auth_mode: {mode}
    client_auth_ca_file: {client_ca.path}
endpoints:
  - name: api
    listen: 127.0.0.1:{port}
    upstream: 127.0.0.1:{upstream}
    alpn: [h2, http/1.1]
    proxy_protocol: true
""",
    )


@pytest.mark.parametrize(
    ("version", "name"),
    [(ssl.TLSVersion.TLSv1_3, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")],
)
def test_verified_client_identity_reaches_the_upstream(
    gateway, processes, tmp_path, server_pair, ca, authorities, version, name
):
    client_ca, _ = authorities
    witness = start_witness(processes, tmp_path, proxy_protocol=True)
    port = free_port()
    pod = proxy_pod(tmp_path, server_pair, client_ca, "required", port, witness.port)
    gateway("--config", str(pod), "--workers", "1")

    context = client_context(
        ca.path, client_ca.client("alice.example"), version=version, alpn=["http/1.1"]
    )
    outcome = exchange(port, context, proxy_protocol=True)
    assert outcome.ok, outcome.error
    header = outcome.header
    assert header is not None and "error" not in header, header
    assert header["command"] == "PROXY"
    assert header["family"] == "TCP4"
    assert header["source"] == f"127.0.0.1:{outcome.local_port}"
    assert header["destination"] == f"127.0.0.1:{port}"
    assert header["alpn"] == "http/1.1" == outcome.alpn
    assert header["authority"] == "localhost"
    tls = header["ssl"]
    assert isinstance(tls, dict)
    assert tls["version"] == name == outcome.version
    assert tls["cn"] == "alice.example"
    assert tls["cipher"], tls
    # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS, verified.
    assert tls["client"] == 0x07
    assert tls["verify"] == 0
    witness.wait_accepted(1)


def test_client_without_a_certificate_has_no_identity_in_the_header(
    gateway, processes, tmp_path, server_pair, ca, authorities
):
    client_ca, other = authorities
    witness = start_witness(processes, tmp_path, proxy_protocol=True)
    port = free_port()
    pod = proxy_pod(tmp_path, server_pair, client_ca, "request", port, witness.port)
    gateway("--config", str(pod), "--workers", "1")

    outcome = exchange(port, client_context(ca.path, alpn=["h2"]), proxy_protocol=True)
    assert outcome.ok, outcome.error
    header = outcome.header
    assert header is not None and "error" not in header, header
    assert header["alpn"] == "h2"
    assert header["authority"] == "localhost"
    tls = header["ssl"]
    assert isinstance(tls, dict)
    assert "cn" not in tls, tls
    assert tls["client"] == 0x01  # PP2_CLIENT_SSL only: no certificate
    assert tls["verify"] != 0
    assert tls["version"] == outcome.version

    # A certificate from another CA is refused before any header is sent.
    assert refused(exchange(port, client_context(ca.path, other.client("mallory"))))
    follow = exchange(port, client_context(ca.path), proxy_protocol=True)
    assert follow.ok, follow.error
    witness.wait_accepted(2)


def test_no_sni_means_no_authority_tlv(gateway, processes, tmp_path, server_pair, ca, authorities):
    """A client connecting by IP address sends no SNI: nothing to report."""
    client_ca, _ = authorities
    witness = start_witness(processes, tmp_path, proxy_protocol=True)
    port = free_port()
    pod = proxy_pod(tmp_path, server_pair, client_ca, "required", port, witness.port)
    gateway("--config", str(pod), "--workers", "1")

    context = client_context(ca.path, client_ca.client("bob"))
    outcome = exchange(port, context, proxy_protocol=True, server_name="127.0.0.1")
    assert outcome.ok, outcome.error
    header = outcome.header
    assert header is not None and "error" not in header, header
    assert "authority" not in header, header
    assert header["ssl"]["cn"] == "bob"  # type: ignore[index]
