"""Relay CPU per gigabyte, each direction on its own, one worker per peer.

upstream → client: the client asks the upstream for SPICEGW_BENCH_BULK_BYTES
(`SOURCE n`) and reads them all: the peer reads plaintext and encrypts.
client → upstream: the client sends as many bytes (`SINK n`); the
upstream checks every byte against the pattern and answers `OK n` only
once all arrived, which the client waits for: the peer decrypts.

One TLS 1.3 connection per transfer, its handshake included (a fraction
of a millisecond against tens of milliseconds of relay). The upstream is
spicegw-load's `serve`, on the load core with the client.
"""

from __future__ import annotations

import statistics

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from . import knobs
from .certs import ServerCert
from .measure import Sample, in_turn, measure, suites
from .report import Summary
from .stage import Peer, PeerSet, StartPeers

GB = 1e9
SIZE = knobs.BULK_BYTES
ENCRYPT = "upstream→client, encrypt"
DECRYPT = "client→upstream, decrypt"

# Warm-up transfers, not measured: buffers and code paths.
WARMUP_BYTES = 1_000_000


def transfer(direction: str, size: int) -> dict[str, object]:
    """spicegw-load `bulk` options for one transfer of `size` bytes."""
    if direction == ENCRYPT:
        return {"request": rf"SOURCE {size}\n", "download": size}
    # The upstream's reply, `OK <size>` and a newline, comes once every
    # byte arrived intact; reading it is what ends the transfer.
    return {"request": rf"SINK {size}\n", "upload": size, "download": len(f"OK {size}\n")}


@pytest.fixture(scope="module")
def peers(start_peers: StartPeers, ecdsa_cert: ServerCert) -> PeerSet:
    return start_peers(ecdsa_cert, 1)


def check_transfer(peer: Peer, sample: Sample) -> None:
    report = sample.report
    assert report["exit_code"] == 0 and report["connections"]["ok"] == 1, (
        f"{peer.name}: transfer failed: {report['failure_details']}\n{peer.log_tail()}"
    )
    assert report["resumed"] == 0 and set(report["protocol_versions"]) == {"TLSv1_3"}, report


@pytest.mark.timeout(900)
@pytest.mark.parametrize("direction", [ENCRYPT, DECRYPT])
def test_bulk_relay_cpu_per_gb(
    benchmark: BenchmarkFixture,
    peers: PeerSet,
    ecdsa_cert: ServerCert,
    summary: Summary,
    direction: str,
) -> None:
    figure = summary.figure(
        "bulk",
        f"Relay CPU per GB, one TLS 1.3 connection moving {SIZE / 1e6:g} MB each way "
        "on its own (CPU-s, 1 worker)",
        "lower is better",
    )
    figure.skipped.update(peers.skipped)
    row = figure.row(direction, "CPU-s/GB", digits=3)
    samples: dict[str, list[Sample]] = {name: [] for name in peers.peers}
    load = transfer(direction, SIZE)

    for peer in peers.peers.values():
        warm = transfer(direction, WARMUP_BYTES)
        check_transfer(peer, measure(peer, "bulk", ecdsa_cert.ca, **warm))

    done: list[int] = []

    def one_round() -> None:
        for peer in in_turn(peers.peers, len(done)):
            sample = measure(peer, "bulk", ecdsa_cert.ca, **load)
            check_transfer(peer, sample)
            samples[peer.name].append(sample)
            row.cell(peer.name).add(sample.cpu_seconds / (SIZE / GB), sample.elsewhere)
        done.append(1)

    benchmark.pedantic(one_round, rounds=knobs.BULK_ROUNDS, iterations=1)  # type: ignore[no-untyped-call]

    key = "download" if direction == ENCRYPT else "upload"
    for name, taken in samples.items():
        rates = [s.report[key]["mib_per_second"] for s in taken]
        row.cell(name).info.update(
            {
                "mib_per_second_median": statistics.median(rates),
                "server_core_busy": round(statistics.median(s.server_busy for s in taken), 3),
                "load_core_busy": round(statistics.median(s.load_busy for s in taken), 3),
                "cipher_suites": suites(taken[-1].report),
                "precise": all(s.precise for s in taken),
            }
        )
    benchmark.extra_info.update(figure.extra_info([direction]))
