"""One load client process: full TLS connections, one after another.

Usage: load_client.py --port PORT --ca PEM --connections N --deadline S
                      [--name LABEL]

Each connection is a TCP connect, a full TLS 1.3 handshake (the client
keeps no session, so nothing resumes), one request line, the reply read
to the end of stream, and close. Every connection is checked: TLS 1.3,
not resumed, and the reply equal to what the upstream must send for this
request. The process stops after N connections or S seconds, whichever
comes first, and prints one JSON object with the counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import ssl
import sys
import time

# Must match benches/upstream.py.
RESPONSE_PREFIX = b"OK "

# One connection's whole life may not take longer than this.
SOCKET_TIMEOUT = 10.0

# Error messages kept verbatim in the report, so a failure can be read.
MAX_SAMPLES = 5


def connect_once(context: ssl.SSLContext, port: int, request: bytes) -> tuple[str, bool, bytes]:
    """One full connection; returns (TLS version, resumed, reply)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            version = tls.version() or ""
            resumed = bool(tls.session_reused)
            tls.sendall(request)
            reply = bytearray()
            while chunk := tls.recv(4096):
                reply += chunk
    finally:
        raw.close()
    return version, resumed, bytes(reply)


def run(args: argparse.Namespace) -> dict[str, object]:
    # One context for all connections. Sessions are never handed back to
    # wrap_socket, and OpenSSL's client-side cache is off by default, so
    # each handshake is a full one; `resumed` below proves it.
    context = ssl.create_default_context(cafile=args.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3

    ok = 0
    resumed = 0
    failures: collections.Counter[str] = collections.Counter()
    samples: list[str] = []
    versions: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    stop_at = started + args.deadline

    for index in range(args.connections):
        if time.monotonic() > stop_at:
            break
        request = f"GET {args.name} {index:07d}\n".encode()
        try:
            version, reused, reply = connect_once(context, args.port, request)
        except (OSError, ssl.SSLError) as err:
            failures[type(err).__name__] += 1
            if len(samples) < MAX_SAMPLES:
                samples.append(f"connection {index}: {err!r}")
            continue

        versions[version] += 1
        if reused:
            resumed += 1
        if reply != RESPONSE_PREFIX + request:
            failures["wrong reply"] += 1
            if len(samples) < MAX_SAMPLES:
                samples.append(f"connection {index}: sent {request!r}, got {reply!r}")
            continue
        ok += 1

    return {
        "name": args.name,
        "ok": ok,
        "attempted": ok + sum(failures.values()),
        "resumed": resumed,
        "failures": dict(failures),
        "samples": samples,
        "versions": dict(versions),
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--deadline", type=float, required=True)
    parser.add_argument("--name", default="client")
    json.dump(run(parser.parse_args()), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
