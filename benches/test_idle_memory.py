"""Memory per idle connection, one worker per peer.

spicegw-load's `idle` mode opens SPICEGW_BENCH_IDLE TLS connections
(handshake done, each peer connected to the upstream, nothing sent) and
holds them. The figure is the growth of the resident memory (RSS) of the
peer's process tree from before the connections to while they are held,
per 1,000 connections. At the end each connection must still be open.

Once per peer, on peers started for this module: memory a process got
back from an earlier, larger load would be handed out again without
growing its RSS. Kernel socket buffers are not in RSS and not counted.
"""

from __future__ import annotations

import time

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from . import knobs, loadgen, procstat
from .certs import ServerCert
from .measure import REPLY, REQUEST, check, measure
from .report import Summary
from .stage import Peer, PeerSet, StartPeers

MIB = 1024 * 1024
CONCURRENCY = max(knobs.CONCURRENCY)
WARMUP_CONNECTIONS = 200

# Held long enough for the RSS to settle and be read after the client
# says its connections are open.
HOLD_SECONDS = 6.0
SETTLE_SECONDS = 3.0


@pytest.fixture(scope="module")
def peers(start_peers: StartPeers, ecdsa_cert: ServerCert) -> PeerSet:
    return start_peers(ecdsa_cert, 1)


def settled_rss(peer: Peer) -> int:
    """The tree's RSS once two readings a quarter second apart agree to
    within 1 %, or after SETTLE_SECONDS."""
    deadline = time.monotonic() + SETTLE_SECONDS
    last = procstat.rss_bytes(peer.pids())
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = procstat.rss_bytes(peer.pids())
        if abs(now - last) <= 0.01 * last:
            return now
        last = now
    return last


def hold_idle(peer: Peer, cert: ServerCert) -> tuple[int, int, int, dict[str, object]]:
    """RSS before and while holding, the connections held, the report."""
    warm = measure(
        peer,
        "connect",
        cert.ca,
        connections=WARMUP_CONNECTIONS,
        concurrency=CONCURRENCY,
        request=REQUEST,
        expect_prefix=REPLY,
    )
    check(peer, warm.report, version="TLSv1_3")
    pids = peer.pids()
    procstat.wait_idle(pids)
    before = settled_rss(peer)

    max_seconds = 60.0 + HOLD_SECONDS
    proc = loadgen.start(
        "idle",
        peer.port,
        cert.ca,
        connections=knobs.IDLE_CONNECTIONS,
        concurrency=CONCURRENCY,
        hold_seconds=HOLD_SECONDS,
        max_seconds=max_seconds,
        timeout=30,
    )
    try:
        held = loadgen.wait_holding(proc, timeout=max_seconds)
        during = settled_rss(peer)
        tree = peer.pids()
    finally:
        report = loadgen.finish(proc, max_seconds)
    assert tree == pids, f"{peer.name}: process tree changed, {pids} -> {tree}"
    assert report["exit_code"] == 0 and report["alive"] == knobs.IDLE_CONNECTIONS, (
        f"{peer.name}: {report['alive']} of {knobs.IDLE_CONNECTIONS} idle connections "
        f"survived: {report['failure_details']}\n{peer.log_tail()}"
    )
    return before, during, held, report


@pytest.mark.timeout(600)
def test_memory_per_idle_connection(
    benchmark: BenchmarkFixture, peers: PeerSet, ecdsa_cert: ServerCert, summary: Summary
) -> None:
    figure = summary.figure(
        "idle",
        f"Resident memory of the process tree per 1,000 idle TLS connections, "
        f"{knobs.IDLE_CONNECTIONS} held (MiB, 1 worker)",
        "lower is better",
    )
    figure.skipped.update(peers.skipped)
    figure.note("One measurement per peer, on peers started fresh for it.")
    per_thousand = figure.row("per 1,000 idle connections", "MiB")
    at_rest = figure.row("whole tree at rest", "MiB")

    def measure_all() -> None:
        for peer in peers.peers.values():
            before, during, held, report = hold_idle(peer, ecdsa_cert)
            cell = per_thousand.cell(peer.name)
            cell.add((during - before) / MIB / held * 1000)
            cell.info.update(
                {
                    "rss_before_mib": round(before / MIB, 1),
                    "rss_holding_mib": round(during / MIB, 1),
                    "held": held,
                    "open_seconds": report["open_seconds"],
                    "processes": len(peer.pids()),
                }
            )
            at_rest.cell(peer.name).add(before / MIB)

    # Once: a second pass would reuse memory the first one freed.
    benchmark.pedantic(measure_all, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    benchmark.extra_info.update(figure.extra_info())
