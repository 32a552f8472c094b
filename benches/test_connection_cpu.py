"""Server CPU per connection: spicegw (one worker) against a plain
asyncio + ssl proxy, in the same run, with the same certificate,
upstream and load client.

A connection is a TCP accept, a full TLS 1.3 handshake (ECDSA P-256
certificate, X25519, no resumption), the upstream connect, one request
line up and one reply down, and the close. Server CPU is user + system
time of the whole server process tree, read from /proc before and after
each round. Rounds alternate the order of the peers, so a slow spell of
the machine falls on both.

The pytest-benchmark timing of this test is the wall time of one round
of both peers; it follows the load client's speed and is not the figure
of merit. The figures are in `extra_info` and in the table printed at
the end of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tests.harness import Pair

from . import procstat
from .report import PeerFigures, Round, Summary
from .stage import SERVER_CPU, Peer, options

HERE = Path(__file__).resolve().parent

# Connections per peer per round, rounds, and load client processes;
# the environment may override them for a quick or a longer run.
CONNECTIONS = int(os.environ.get("SPICEGW_BENCH_CONNECTIONS", "4000"))
ROUNDS = int(os.environ.get("SPICEGW_BENCH_ROUNDS", "7"))
CLIENTS = int(os.environ.get("SPICEGW_BENCH_CLIENTS", "4"))

# Connections per peer before the first round, not measured: first
# allocations, page faults and lazily built state are paid here.
WARMUP_CONNECTIONS = 400

# A load client stops by itself after this many seconds; the bench waits
# a little longer before it ends the client by PID and fails.
CLIENT_DEADLINE = 60.0
CLIENT_GRACE = 15.0


def client_command(peer: Peer, ca: Path, connections: int, name: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "load_client.py"),
        *options(
            {
                "--port": peer.port,
                "--ca": ca,
                "--connections": connections,
                "--deadline": CLIENT_DEADLINE,
                "--name": name,
            }
        ),
    ]


def run_clients(peer: Peer, ca: Path, connections: int) -> tuple[float, list[dict[str, Any]]]:
    """Spreads `connections` over CLIENTS processes (on the load CPU, as
    this process is) and returns the wall time and their reports."""
    shares = [connections // CLIENTS + (i < connections % CLIENTS) for i in range(CLIENTS)]
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            client_command(peer, ca, share, f"{peer.name}-{index}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for index, share in enumerate(shares)
    ]

    reports = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=CLIENT_DEADLINE + CLIENT_GRACE)
            assert proc.returncode == 0, f"load client failed ({proc.returncode}):\n{err.decode()}"
            reports.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return time.monotonic() - started, reports


def check(peer: Peer, reports: list[dict[str, Any]], connections: int) -> None:
    """Every connection completed, fully handshaken, with the right reply."""
    ok = sum(report["ok"] for report in reports)
    problems = [
        f"{report['name']}: failures {report['failures']}, resumed {report['resumed']}, "
        f"versions {report['versions']}, samples {report['samples']}"
        for report in reports
        if report["failures"] or report["resumed"] or set(report["versions"]) != {"TLSv1.3"}
    ]
    assert ok == connections and not problems, (
        f"{peer.name}: {ok} of {connections} connections succeeded\n"
        + "\n".join(problems)
        + f"\n--- {peer.name} log ---\n{peer.process.text()[-4000:]}"
    )


def measure(peer: Peer, ca: Path, connections: int) -> Round:
    """One round against one peer."""
    pids = peer.pids()
    procstat.wait_idle(pids)
    before = procstat.cpu_ticks(pids)
    busy_before = procstat.cpu_busy_ticks(SERVER_CPU)

    seconds, reports = run_clients(peer, ca, connections)

    # The servers close their side last; let that work land in the round.
    procstat.wait_idle(pids)
    assert peer.pids() == pids, (
        f"{peer.name}: process tree changed during the round, {pids} -> {peer.pids()} "
        f"(a worker died or was replaced)\n{peer.process.text()[-4000:]}"
    )
    after = procstat.cpu_ticks(pids)
    busy = procstat.cpu_busy_ticks(SERVER_CPU) - busy_before
    check(peer, reports, connections)

    ticks = sum(after[pid] - before[pid] for pid in pids)
    return Round(
        us_per_connection=ticks * procstat.TICK_SECONDS * 1e6 / connections,
        seconds=seconds,
        elsewhere=(busy - ticks) / max(ticks, 1),
    )


@pytest.mark.timeout(300)
def test_server_cpu_per_connection(
    benchmark: BenchmarkFixture, peers: dict[str, Peer], server_pair: Pair, summary: Summary
) -> None:
    ca = server_pair.ca
    figures = {name: PeerFigures(name, CONNECTIONS) for name in peers}

    for peer in peers.values():
        measure(peer, ca, WARMUP_CONNECTIONS)

    def one_round() -> None:
        order = list(peers.values())
        if figures["spicegw"].rounds % 2:
            order.reverse()
        for peer in order:
            figures[peer.name].add(measure(peer, ca, CONNECTIONS))

    # pytest-benchmark ships no type hints.
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)  # type: ignore[no-untyped-call]

    ratio = figures["spicegw"].median_us / figures["asyncio"].median_us
    notable = {name: peer.notable_log_lines() for name, peer in peers.items()}
    benchmark.extra_info.update(
        {
            "figure": "server CPU µs per connection (user+system, process tree), median",
            "clients": CLIENTS,
            **{
                name: {**figures[name].extra_info(), "notable_log_lines": lines[:20]}
                for name, lines in notable.items()
            },
            "ratio_spicegw_over_asyncio": round(ratio, 3),
            "speedup": round(1 / ratio, 2),
        }
    )

    summary.peers.extend(figures.values())
    summary.notes.append(
        f"ratio spicegw/asyncio {ratio:.3f}   speedup (asyncio/spicegw) {1 / ratio:.2f}x"
    )
    summary.notes.append(
        f"{CLIENTS} load client processes; notable server log lines: "
        + ", ".join(f"{name} {len(lines)}" for name, lines in notable.items())
    )
