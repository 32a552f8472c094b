"""Bytes through the gateway: exact in both directions, end of stream
passed on both ways, and both TLS versions."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import subprocess

import pytest

from .harness import free_port, start_upstream, tls_connect, wait_until
from .tls_stream import TlsStream

MIB = 1024 * 1024


def _serve(gateway, tls_args, upstream: int) -> int:
    """Starts a one-worker gateway in front of `upstream`; its port."""
    port = free_port()
    listen = ["--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{upstream}"]
    gateway(*tls_args, "--workers", "1", *listen)
    return port


@pytest.fixture
def echo_gateway(gateway, tls_args, echo_port) -> int:
    return _serve(gateway, tls_args, echo_port)


def _halfclose_gateway(gateway, tls_args, processes, tmp_path, mode: str):
    """A gateway in front of tests/servers/halfclose_upstream.py MODE."""
    upstream_port = free_port()
    upstream = start_upstream("halfclose", upstream_port, tmp_path / f"{mode}.log", mode)
    processes.append(upstream)
    return _serve(gateway, tls_args, upstream_port), upstream


def test_100_mib_cross_both_ways_unchanged(echo_gateway, server_pair):
    """Sends 100 MiB of random bytes while reading the echo at the same
    time, so both directions are busy at once. What comes back must hash
    to what was sent: a byte changed, lost or reordered on either leg
    would show."""
    with TlsStream(echo_gateway, server_pair.ca) as stream:
        stream.handshake()
        for _ in range(100):
            stream.send(os.urandom(MIB), timeout=60)
        # Everything sent; the bytes still on their way back follow.
        stream.close_write()
        stream.read_until_eof(timeout=60)

    assert stream.sent == 100 * MIB
    assert stream.received == stream.sent
    assert stream.received_digest.hexdigest() == stream.sent_digest.hexdigest()
    assert stream.clean_eof, "the gateway ended the stream without close_notify"


def test_client_half_close_reaches_the_upstream(
    gateway, tls_args, processes, tmp_path, server_pair
):
    """The `digest` upstream answers only after it reads end of stream:
    the answer arrives only if the client's close_notify became a FIN."""
    port, _ = _halfclose_gateway(gateway, tls_args, processes, tmp_path, "digest")
    payload = os.urandom(3 * MIB)

    with TlsStream(port, server_pair.ca, keep=True) as stream:
        stream.handshake()
        stream.send(payload)
        stream.close_write()
        stream.read_until_eof(timeout=10)

    assert bytes(stream.data or b"") == hashlib.sha256(payload).hexdigest().encode()
    assert stream.clean_eof


def test_upstream_half_close_reaches_the_client(
    gateway, tls_args, processes, tmp_path, server_pair
):
    """The `speak-first` upstream greets and ends its side at once. The
    client must see the end of stream while it can still send, and the
    upstream must still receive everything the client sends after that."""
    port, upstream = _halfclose_gateway(gateway, tls_args, processes, tmp_path, "speak-first")
    payload = os.urandom(2 * MIB)

    with TlsStream(port, server_pair.ca, keep=True) as stream:
        stream.handshake()
        stream.read_until_eof(timeout=10)
        assert bytes(stream.data or b"") == b"hello, this side is done talking\n"
        assert stream.clean_eof, "the upstream's FIN should arrive as close_notify"

        stream.send(payload)
        stream.close_write()
        line = wait_until(
            lambda: re.search(r"received (\d+) bytes sha256 (\w+)", upstream.text()), 10
        )

    assert isinstance(line, re.Match)
    assert int(line.group(1)) == len(payload)
    assert line.group(2) == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize(
    ("version", "name"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
)
def test_python_client_negotiates_each_version(echo_gateway, server_pair, version, name):
    with tls_connect(echo_gateway, server_pair.ca, minimum=version, maximum=version) as tls:
        assert tls.version() == name
        tls.sendall(b"ping")
        reply = b""
        while len(reply) < 4 and (chunk := tls.recv(4 - len(reply))):
            reply += chunk
    assert reply == b"ping"


@pytest.mark.parametrize(("flag", "name"), [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_openssl_s_client_verifies_each_version(
    gateway, tls_args, http_port, server_pair, flag, name
):
    port = _serve(gateway, tls_args, http_port)
    request = b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            flag,
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(server_pair.ca),
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
            # Keep reading after the request is written, until the
            # upstream closes.
            "-ign_eof",
        ],
        input=request,
        capture_output=True,
        timeout=20,
    )
    text = out.stdout.decode(errors="replace")
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert "Verification: OK" in text
    assert "Verify return code: 0 (ok)" in text
    assert re.search(rf"Protocol\s*:\s*{re.escape(name)}\b", text)
    assert "hello from upstream" in text
