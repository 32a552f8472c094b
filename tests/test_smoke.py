"""The shortest path through the product: a gateway in front of an HTTP
server, reached with curl."""

from __future__ import annotations

import subprocess

from .harness import free_port


def test_curl_reaches_the_upstream_through_tls(gateway, tls_args, http_port, server_pair):
    port = free_port()
    gateway(
        *tls_args,
        "--workers",
        "2",
        "--http",
        f"127.0.0.1:{port}",
        "--http-upstream",
        f"127.0.0.1:{http_port}",
    )
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(server_pair.ca), f"https://localhost:{port}/hello"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert out.stdout == "hello from upstream"
