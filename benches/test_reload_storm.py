"""Full TLS 1.3 connections while the certificate rotates every second.

Per peer, phases of SPICEGW_BENCH_STORM_SECONDS each under the same
load: a baseline, then SPICEGW_BENCH_STORM_ROUNDS times a storm and
another baseline. During a storm a new certificate (a fresh leaf each
time, so no two in a row are alike) is put in place once a second, the
way each peer takes one:

- spicegw: the files are renamed in; it polls them every 2 s (its
  default), so it takes about every other rotation;
- nginx: the files are renamed in, then SIGHUP to the master (what
  `nginx -s reload` sends): a new worker starts, the old one drains;
- HAProxy: the combined file is renamed in, then SIGUSR2 to the master
  (master-worker reload): the master re-executes itself and starts a new
  worker, the old one drains.

The asyncio proxy loads its certificate once and is skipped. Reported:
connections that failed during the storms, workers that died, the
change in throughput and in CPU per connection of each storm against the
mean of the baselines on either side (median over storms), and
whether the peer ends up serving the last certificate. Only spicegw's
baselines must be clean; what happens in the storm is reported, not
asserted.
"""

from __future__ import annotations

import hashlib
import math
import re
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from . import knobs
from .certs import Authority, ServerCert, make_server_cert
from .measure import REPLY, REQUEST, Sample, check, measure
from .report import Summary
from .stage import Peer, PeerSet, StartPeers

CONCURRENCY = max(knobs.CONCURRENCY)
SECONDS = knobs.STORM_SECONDS
STORMS = knobs.STORM_ROUNDS
ROTATIONS = math.ceil(SECONDS)
# Far more than a phase can make: the phase ends on its deadline.
CAP = 10_000_000
LOAD = {
    "connections": CAP,
    "concurrency": CONCURRENCY,
    "max_seconds": SECONDS,
    "request": REQUEST,
    "expect_prefix": REPLY,
}

# How long after the storm a peer may take to serve the last certificate:
# spicegw's poll is 2 s.
CONVERGE_SECONDS = 5.0

RELOADED = {
    "spicegw": re.compile(r"workers serve public generation \d+"),
    "haproxy": re.compile(r"Loading success"),
}

# What each peer logs when a worker ends other than by a clean exit.
CRASHED = {
    "spicegw": re.compile(r"worker \d+ \(pid \d+\) .*; starting a replacement"),
    "nginx": re.compile(r"worker process \d+ exited on signal \d+"),
    "haproxy": re.compile(r"(Former|Current) worker \(\d+\) exited with code (?!0 )\d+.*"),
}


@pytest.fixture(scope="module")
def peers(start_peers: StartPeers, ecdsa_cert: ServerCert) -> PeerSet:
    return start_peers(ecdsa_cert, 1)


@pytest.fixture(scope="module")
def rotations(module_dir: Path, authority: Authority) -> list[list[ServerCert]]:
    """A batch of fresh certificates per storm, none used twice."""
    folder = module_dir / "rotations"
    batches = []
    for storm_index in range(STORMS):
        names = [f"rotation-{storm_index}-{n}" for n in range(ROTATIONS)]
        batches.append([make_server_cert(folder, authority, "ecdsa", name) for name in names])
    return batches


def reloads_seen(peer: Peer) -> int | None:
    """Reloads the peer's log reports so far; None where it says none."""
    pattern = RELOADED.get(peer.name)
    return None if pattern is None else len(pattern.findall(peer.process.text()))


def crashes(peer: Peer) -> list[str]:
    """Log lines so far about workers that died rather than exited."""
    return [match.group(0) for match in CRASHED[peer.name].finditer(peer.process.text())]


def served_fingerprint(port: int, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True) or b""
    return hashlib.sha256(der).hexdigest()


def converged(peer: Peer, cert: ServerCert) -> float | None:
    """Seconds until `peer` serves `cert`, or None within CONVERGE_SECONDS."""
    started = time.monotonic()
    while time.monotonic() - started < CONVERGE_SECONDS:
        try:
            if served_fingerprint(peer.port, cert.ca) == cert.fingerprint:
                return time.monotonic() - started
        except OSError:
            pass  # Mid-reload; the next try tells.
        time.sleep(0.1)
    return None


def storm(peer: Peer, certs: list[ServerCert]) -> Callable[[subprocess.Popen[str]], None]:
    """A rotation every second, half a second into each, while the load
    runs; at most one per certificate."""

    def rotate(load: subprocess.Popen[str]) -> None:
        started = time.monotonic()
        for index, cert in enumerate(certs):
            wait = started + 0.5 + index - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if load.poll() is not None or time.monotonic() - started > SECONDS:
                return
            peer.rotate(cert)

    return rotate


@pytest.mark.timeout(900)
def test_reload_storm(
    benchmark: BenchmarkFixture,
    peers: PeerSet,
    rotations: list[list[ServerCert]],
    ecdsa_cert: ServerCert,
    summary: Summary,
) -> None:
    figure = summary.figure(
        "storm",
        f"Certificate rotated every second under load (c={CONCURRENCY}, full TLS 1.3): "
        f"{STORMS} storm(s) of {SECONDS:g} s, each against the baselines before and after it",
        "",
    )
    figure.skipped.update(peers.skipped)
    reloading = {name: peer for name, peer in peers.peers.items() if peer.reload_how}
    for name in peers.peers.keys() - reloading.keys():
        figure.skipped[name] = "loads its certificate once at start; nothing to reload"
    failed = figure.row("failed connections in the storm", "count", digits=0, ratio=False)
    died = figure.row("workers that died (crash, signal)", "count", digits=0, ratio=False)
    rate = figure.row("throughput in the storm", "conn/s", digits=0)
    rate_change = figure.row("throughput change", "%", ratio=False)
    cpu_change = figure.row("CPU per connection change", "%", ratio=False)
    figure.note(
        "Where the load core is full (spicegw), the server core has slack: a reload that "
        "costs CPU but blocks nothing shows in CPU per connection, not in throughput."
    )

    def run_peer(peer: Peer) -> None:
        reloads_before = reloads_seen(peer)
        crashed_before = len(crashes(peer))
        calm = [measure(peer, "connect", ecdsa_cert.ca, **LOAD)]
        storms: list[Sample] = []
        for batch in rotations:
            rotating = storm(peer, batch)
            storms.append(measure(peer, "connect", ecdsa_cert.ca, during=rotating, **LOAD))
            calm.append(measure(peer, "connect", ecdsa_cert.ca, **LOAD))
        settle = converged(peer, rotations[-1][-1])
        if peer.name == "spicegw":
            for sample in calm:
                check(peer, sample.report, version="TLSv1_3")

        # Each storm against the mean of the baselines on either side.
        for index, stormy in enumerate(storms):
            around = calm[index : index + 2]
            calm_rate = statistics.mean(s.report["connections_per_second"] for s in around)
            calm_cpu = statistics.mean(
                s.cpu_seconds / s.report["connections"]["ok"] for s in around
            )
            ok = max(stormy.report["connections"]["ok"], 1)
            storm_rate = stormy.report["connections_per_second"]
            rate.cell(peer.name).add(storm_rate, stormy.elsewhere)
            rate_change.cell(peer.name).add(100 * (storm_rate / calm_rate - 1))
            cpu_change.cell(peer.name).add(100 * (stormy.cpu_seconds / ok / calm_cpu - 1))

        failed.cell(peer.name).add(sum(s.report["connections"]["failed"] for s in storms))
        crashed = crashes(peer)[crashed_before:]
        died.cell(peer.name).add(len(crashed))
        died.cell(peer.name).info["log_lines"] = crashed
        seen = reloads_seen(peer)
        if seen is not None and reloads_before is not None:
            seen -= reloads_before
        failed.cell(peer.name).info.update(
            {
                "how": peer.reload_how,
                "failures": [s.report["failures"] for s in storms],
                "failure_details": [s.report["failure_details"] for s in storms],
                "baseline_failures": [s.report["connections"]["failed"] for s in calm],
                "baseline_connections_per_second": [
                    s.report["connections_per_second"] for s in calm
                ],
                "storm_connections_per_second": [
                    s.report["connections_per_second"] for s in storms
                ],
                "reloads_seen_in_log": seen,
                "serves_last_certificate_after_s": None if settle is None else round(settle, 2),
                "cpu_precise": [s.precise for s in storms],
                "notable_log_lines": peer.notable_log_lines()[-10:],
            }
        )
        if settle is None:
            note = f"did not serve the last certificate within {CONVERGE_SECONDS:g} s"
            failed.cell(peer.name).note = note

    def run_all() -> None:
        for peer in reloading.values():
            run_peer(peer)

    benchmark.pedantic(run_all, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    benchmark.extra_info.update(figure.extra_info())
