"""Server CPU per connection, every peer side by side with one worker on
one core: the figure of merit of design.md §7.

A connection is a TCP accept, a full handshake (X25519, no resumption:
spicegw-load turns it off and fails any connection that resumes), the
upstream connect, one request line up and its reply down, and the close.
It is measured with an ECDSA P-256 certificate over TLS 1.3 and TLS 1.2,
and with an RSA-2048 certificate over TLS 1.3, each at every client
concurrency of SPICEGW_BENCH_CONCURRENCY (the same for every peer).

Server CPU is user + system time of the peer's whole process tree. The
pytest-benchmark timing is the wall time of one round of all peers; it
follows the load client and is not the figure.
"""

from __future__ import annotations

import statistics

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from . import knobs
from .certs import ServerCert
from .measure import REPLY, REQUEST, Sample, check, in_turn, measure, suites
from .report import Figure, Summary
from .stage import PeerSet, StartPeers

# Connections per peer before a case's rounds, not measured: first
# allocations, page faults and lazily built state are paid here.
WARMUP_CONNECTIONS = 200

VERSION_NAMES = {"1.3": "TLSv1_3", "1.2": "TLSv1_2"}


@pytest.fixture(scope="module")
def ecdsa_peers(start_peers: StartPeers, ecdsa_cert: ServerCert) -> PeerSet:
    return start_peers(ecdsa_cert, 1)


@pytest.fixture(scope="module")
def rsa_peers(start_peers: StartPeers, rsa_cert: ServerCert) -> PeerSet:
    return start_peers(rsa_cert, 1)


def figure(summary: Summary) -> Figure:
    found = summary.figure(
        "handshake",
        "Server CPU per connection: accept, full handshake, upstream connect, "
        "one request relayed, close (µs, 1 worker)",
        "lower is better",
    )
    found.note(
        "Cipher suites are in summary.json per peer: nginx and HAProxy are set to "
        "spicegw's order (AES-128-GCM first); Python's ssl cannot order TLS 1.3 "
        "suites, so asyncio takes the client's first choice (AES-256-GCM)."
    )
    found.note(
        "TLS 1.2 rows: the client offers X25519 and P-256, since OpenSSL servers refuse a "
        "P-256 certificate to a TLS 1.2 client whose groups leave P-256 out; X25519 is "
        "what every connection negotiated."
    )
    return found


def run_case(
    benchmark: BenchmarkFixture,
    peer_set: PeerSet,
    cert: ServerCert,
    version: str,
    concurrency: int,
    summary: Summary,
) -> None:
    found = figure(summary)
    found.skipped.update(peer_set.skipped)
    label = f"{cert.kind.upper()} TLS {version} c={concurrency}"
    row = found.row(label, "µs")
    load = {
        "concurrency": concurrency,
        "tls12": version == "1.2",
        # In TLS 1.2 the client's groups also name the curves it accepts
        # in certificates, and OpenSSL servers hold to that: with X25519
        # alone they refuse a P-256 certificate. The exchange itself must
        # still be X25519 (`check` looks).
        "groups": "X25519,secp256r1" if version == "1.2" else "X25519",
        "request": REQUEST,
        "expect_prefix": REPLY,
    }
    samples: dict[str, list[Sample]] = {name: [] for name in peer_set.peers}
    done: list[int] = []

    for peer in peer_set.peers.values():
        warm = measure(peer, "connect", cert.ca, connections=WARMUP_CONNECTIONS, **load)
        check(peer, warm.report, version=VERSION_NAMES[version])

    def one_round() -> None:
        for peer in in_turn(peer_set.peers, len(done)):
            sample = measure(peer, "connect", cert.ca, connections=knobs.CONNECTIONS, **load)
            check(peer, sample.report, version=VERSION_NAMES[version])
            samples[peer.name].append(sample)
            row.cell(peer.name).add(sample.cpu_seconds * 1e6 / knobs.CONNECTIONS, sample.elsewhere)
        done.append(1)

    # pytest-benchmark ships no type hints.
    benchmark.pedantic(one_round, rounds=knobs.ROUNDS, iterations=1)  # type: ignore[no-untyped-call]

    for name, taken in samples.items():
        peer = peer_set.peers[name]
        row.cell(name).info.update(
            {
                "connections_per_second": round(
                    statistics.median(s.report["connections_per_second"] for s in taken), 1
                ),
                "server_core_busy": round(statistics.median(s.server_busy for s in taken), 3),
                "load_core_busy": round(statistics.median(s.load_busy for s in taken), 3),
                "cipher_suites": suites(taken[-1].report),
                "shape": peer.shape,
                "notable_log_lines": peer.notable_log_lines()[:10],
            }
        )
    benchmark.extra_info.update(found.extra_info([label]))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("concurrency", knobs.CONCURRENCY)
@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_full_handshake_ecdsa(
    benchmark: BenchmarkFixture,
    ecdsa_peers: PeerSet,
    ecdsa_cert: ServerCert,
    summary: Summary,
    version: str,
    concurrency: int,
) -> None:
    run_case(benchmark, ecdsa_peers, ecdsa_cert, version, concurrency, summary)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("concurrency", knobs.CONCURRENCY)
def test_full_handshake_rsa(
    benchmark: BenchmarkFixture,
    rsa_peers: PeerSet,
    rsa_cert: ServerCert,
    summary: Summary,
    concurrency: int,
) -> None:
    run_case(benchmark, rsa_peers, rsa_cert, "1.3", concurrency, summary)
