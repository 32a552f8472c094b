"""The figures that need more than one worker: resumption across workers
and scaling from one worker to two. All workers stay on the one server
core, so two workers cannot go faster than one here; what these show is
whether tickets work across workers and what a second worker costs.

Resumption: spicegw-load's `resume` mode primes one session per lane
with a full handshake, then every connection must resume (a full
handshake counts as failed). Each connection is a new TCP connection,
so SO_REUSEPORT spreads them over the worker processes of spicegw and
nginx, and about half resume on a worker other than the one that issued
their ticket. spicegw must resume every one, on both workers. HAProxy's
workers are threads of one process; the asyncio proxy is one process and
is measured as it is, which the tables say.

Scaling: connections per CPU-second (the inverse of CPU per connection)
of full TLS 1.3 connections with one and with two workers.
"""

from __future__ import annotations

import statistics

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from . import knobs
from .certs import ServerCert
from .measure import REPLY, REQUEST, Sample, check, measure, suites
from .report import Summary
from .stage import Peer, PeerSet, StartPeers

CONCURRENCY = max(knobs.CONCURRENCY)
WARMUP_CONNECTIONS = 200
LOAD = {"concurrency": CONCURRENCY, "request": REQUEST, "expect_prefix": REPLY}

ONE_PROCESS = "1 worker: one process, whose ticket keys no other process shares"
THREADS = "HAProxy's second worker is a second thread of its one worker process."


@pytest.fixture(scope="module")
def one_worker(start_peers: StartPeers, ecdsa_cert: ServerCert) -> PeerSet:
    peers = start_peers(ecdsa_cert, 1)
    for peer in peers.peers.values():
        check(peer, warm_up(peer, ecdsa_cert), version="TLSv1_3")
    return peers


@pytest.fixture(scope="module")
def two_workers(start_peers: StartPeers, ecdsa_cert: ServerCert) -> PeerSet:
    peers = start_peers(ecdsa_cert, 2)
    for peer in peers.peers.values():
        check(peer, warm_up(peer, ecdsa_cert), version="TLSv1_3")
    return peers


def warm_up(peer: Peer, cert: ServerCert) -> dict[str, object]:
    return measure(peer, "connect", cert.ca, connections=WARMUP_CONNECTIONS, **LOAD).report


def worker_shares(peer: Peer, sample: Sample) -> list[float]:
    """Each worker process's share of the workers' CPU in a run (the
    supervisor or master left out); empty when the tree changed."""
    workers = {pid: cpu for pid, cpu in sample.per_process.items() if pid != peer.pid}
    total = sum(workers.values())
    if not total:
        return []
    return sorted(round(cpu / total, 3) for cpu in workers.values())


@pytest.mark.timeout(900)
def test_resumed_across_workers(
    benchmark: BenchmarkFixture,
    two_workers: PeerSet,
    one_worker: PeerSet,
    ecdsa_cert: ServerCert,
    summary: Summary,
) -> None:
    figure = summary.figure(
        "resume",
        "Server CPU per resumed TLS 1.3 connection, tickets issued by one worker and "
        "redeemed at any (µs, 2 workers on one core)",
        "lower is better",
    )
    figure.note(THREADS)
    figure.skipped.update(
        {name: why for name, why in two_workers.skipped.items() if name not in one_worker.peers}
    )
    targets = dict(two_workers.peers)
    if "asyncio" in one_worker.peers and "asyncio" not in targets:
        targets["asyncio"] = one_worker.peers["asyncio"]

    label = f"resumed c={CONCURRENCY}"
    cpu_row = figure.row(label, "µs")
    rate_row = figure.row("resumed of requested", "%", ratio=False)
    samples: dict[str, list[Sample]] = {name: [] for name in targets}

    def one_round() -> None:
        order = list(targets.values())
        shift = len(samples[order[0].name]) % len(order)
        for peer in order[shift:] + order[:shift]:
            sample = measure(peer, "resume", ecdsa_cert.ca, connections=knobs.CONNECTIONS, **LOAD)
            samples[peer.name].append(sample)
            primed = sample.report["priming"]["connections"]["ok"]
            cpu_row.cell(peer.name).add(
                sample.cpu_seconds * 1e6 / (knobs.CONNECTIONS + primed), sample.elsewhere
            )
            rate_row.cell(peer.name).add(100 * sample.report["resumed"] / knobs.CONNECTIONS)

    benchmark.pedantic(one_round, rounds=knobs.ROUNDS, iterations=1)  # type: ignore[no-untyped-call]

    for name, taken in samples.items():
        peer = targets[name]
        last = taken[-1].report
        info = {
            "workers": peer.workers,
            "shape": peer.shape,
            "failures": last["failures"],
            "failure_details": last["failure_details"],
            "priming": last["priming"]["connections"],
            "worker_cpu_shares_rounds": [worker_shares(peer, s) for s in taken],
            "cipher_suites": suites(last),
        }
        cpu_row.cell(name).info.update(info)
        if peer.workers == 1:
            cpu_row.cell(name).note = ONE_PROCESS

    # spicegw's own contract: every resumption succeeds, on both workers.
    for sample in samples.get("spicegw", []):
        peer = targets["spicegw"]
        check(peer, sample.report, version="TLSv1_3", resumed=True)
        assert sample.report["resumed"] == knobs.CONNECTIONS, sample.report
        shares = worker_shares(peer, sample)
        assert len(shares) == 2 and min(shares) > 0.2, (
            f"resumed connections did not reach both workers: CPU shares {shares}"
        )
    benchmark.extra_info.update(figure.extra_info())


@pytest.mark.timeout(900)
def test_scaling_one_to_two_workers(
    benchmark: BenchmarkFixture,
    one_worker: PeerSet,
    two_workers: PeerSet,
    ecdsa_cert: ServerCert,
    summary: Summary,
) -> None:
    figure = summary.figure(
        "scaling",
        f"Full TLS 1.3 connections per CPU-second, c={CONCURRENCY}, all workers on one core",
        "higher is better",
    )
    figure.note(THREADS)
    figure.skipped.update(
        {name: why for name, why in one_worker.skipped.items() if name not in two_workers.peers}
    )
    rows = {1: figure.row("1 worker", "conn/CPU-s", digits=0)}
    rows[2] = figure.row("2 workers", "conn/CPU-s", digits=0)
    targets = [(1, peer) for peer in one_worker.peers.values()]
    targets += [(2, peer) for peer in two_workers.peers.values()]
    done: list[int] = []

    def one_round() -> None:
        shift = len(done) % len(targets)
        for workers, peer in targets[shift:] + targets[:shift]:
            sample = measure(peer, "connect", ecdsa_cert.ca, connections=knobs.CONNECTIONS, **LOAD)
            check(peer, sample.report, version="TLSv1_3")
            cell = rows[workers].cell(peer.name)
            cell.add(knobs.CONNECTIONS / sample.cpu_seconds, sample.elsewhere)
            cell.info.setdefault("connections_per_second_rounds", []).append(
                sample.report["connections_per_second"]
            )
        done.append(1)

    benchmark.pedantic(one_round, rounds=knobs.ROUNDS, iterations=1)  # type: ignore[no-untyped-call]

    change = figure.row("2 workers ÷ 1 worker", "×", digits=2, ratio=False)
    for name, cell in rows[1].cells.items():
        two = rows[2].cells.get(name)
        if two is None:
            cell.note = ONE_PROCESS
            continue
        change.cell(name).add(two.median / cell.median)
    for cell in [*rows[1].cells.values(), *rows[2].cells.values()]:
        rates = cell.info["connections_per_second_rounds"]
        cell.info["connections_per_second_median"] = statistics.median(rates)
    benchmark.extra_info.update(figure.extra_info())
