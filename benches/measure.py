"""One load run against one peer, and what the peer spent on it.

`measure()` waits until the peer's process tree is quiet, samples its
CPU time, runs spicegw-load to the end, waits for the tree to be quiet
again (the servers close their side last, and that work belongs to the
run), and samples again. Around the run it also reads how busy each core
was, which tells whether the load or the server set the pace and whether
something else ran on the server core.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import loadgen, procstat
from .stage import LOAD_CPU, SERVER_CPU, Peer

# What `serve` answers a line with, and the request every connection of
# the connection figures sends (escapes are spicegw-load's).
REQUEST = r"GET /bench\n"
REPLY = r"OK GET /bench\n"


@dataclass(frozen=True)
class Sample:
    cpu_seconds: float
    # False when the tree changed during the run (see procstat.CpuDelta).
    precise: bool
    # Wall time of the load run, from start to report.
    seconds: float
    # Server core time during the load run not spent by the peer, as a
    # share of the peer's own: interrupts, softirqs, and whatever else ran
    # there. A few per cent is the kernel's share of the traffic; much more
    # means another program ran on the server core and the figure is
    # suspect. /proc/stat counts in ticks: a short run reads coarsely.
    elsewhere: float
    # Shares of wall time: the peer's CPU, and the load core's busy time.
    # A load core near 100 % with a server below it means the client set
    # the pace.
    server_busy: float
    load_busy: float
    # CPU seconds per process of the tree, when `precise`.
    per_process: dict[int, float]
    report: dict[str, Any]


def measure(
    peer: Peer,
    mode: str,
    ca: Path,
    *,
    during: Callable[[subprocess.Popen[str]], None] | None = None,
    **load: Any,
) -> Sample:
    """Runs `spicegw-load MODE` against `peer` with the `load` options;
    `during`, when given, runs while the load does (it gets the load's
    process and must return by the time that ends)."""
    pids = peer.pids()
    procstat.wait_idle(pids)
    before = procstat.sample(pids)
    server_before = procstat.cpu_busy_ticks(SERVER_CPU)
    load_before = procstat.cpu_busy_ticks(LOAD_CPU)
    started = time.monotonic()

    max_seconds = float(load.setdefault("max_seconds", 60.0))
    proc = loadgen.start(mode, peer.port, ca, **load)
    try:
        if during is not None:
            during(proc)
    finally:
        report = loadgen.finish(proc, max_seconds)
    seconds = time.monotonic() - started
    load_busy = procstat.cpu_busy_ticks(LOAD_CPU) - load_before
    server_busy = procstat.cpu_busy_ticks(SERVER_CPU) - server_before

    procstat.wait_idle(peer.pids())
    after = procstat.sample(peer.pids())
    delta = procstat.cpu_seconds(before, after)
    assert peer.alive(), f"{peer.name} exited during the run\n{peer.log_tail()}"

    per_process = {}
    if delta.precise:
        per_process = {pid: (after.ns[pid] - before.ns[pid]) / 1e9 for pid in after.ns}
    busy_seconds = server_busy * procstat.TICK_SECONDS
    return Sample(
        cpu_seconds=delta.seconds,
        precise=delta.precise,
        seconds=seconds,
        elsewhere=max(busy_seconds - delta.seconds, 0.0) / max(delta.seconds, 1e-9),
        server_busy=delta.seconds / seconds,
        load_busy=load_busy * procstat.TICK_SECONDS / seconds,
        per_process=per_process,
        report=report,
    )


def check(peer: Peer, report: dict[str, Any], *, version: str, resumed: bool = False) -> None:
    """Every connection of a connect or resume run succeeded with the
    right TLS version, group and kind of handshake; all that were asked
    for, unless the run was meant to end on its deadline."""
    counts = report["connections"]
    # A run cut by its deadline attempted fewer than it requested.
    wanted = counts["attempted"] if report.get("deadline_reached") else counts["requested"]
    problems = []
    if report.get("exit_code") != 0 or counts["failed"] or counts["ok"] != wanted:
        problems.append(f"connections {counts}, failures {report['failure_details']}")
    if set(report["protocol_versions"]) != {version}:
        problems.append(f"versions {report['protocol_versions']}")
    if set(report["key_exchange_groups"]) != {"X25519"}:
        problems.append(f"groups {report['key_exchange_groups']}")
    if not resumed and report["resumed"]:
        problems.append(f"{report['resumed']} connections resumed")
    assert not problems, f"{peer.name}: " + "; ".join(problems) + "\n" + peer.log_tail()


def suites(report: dict[str, Any]) -> str:
    """The negotiated cipher suite(s), as rustls names them."""
    return ", ".join(sorted(report["cipher_suites"]))


def in_turn(peers: dict[str, Peer], round_index: int) -> list[Peer]:
    """The peers in the order of one round: each round starts one peer
    later, so a slow spell of the machine falls on all of them."""
    order = list(peers.values())
    if not order:
        return []
    shift = round_index % len(order)
    return order[shift:] + order[:shift]
