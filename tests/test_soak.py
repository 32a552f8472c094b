"""A short soak: new connections and long transfers through a gateway
with two workers for SPICEGW_SOAK_SECONDS (default 60), while its
certificate is rotated every few seconds and a worker is killed now
and then. docs/soak.md says how to run a long one and what to read in
its report.

Every transfer the killed workers did not hold ends byte-exact, every
new connection they had not accepted succeeds, the descriptors of the
process tree come back to where they started, and the growth of its
memory is measured (and only loosely bounded: a minute is too short to
tell a slow leak from warm-up; an hour is not).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import pytest

from .fault_support import rss_kib
from .harness import free_port, http_get, tls_connect, wait_until
from .reload_support import common_name
from .resilience_support import (
    Kill,
    NewConnections,
    TransferLoop,
    all_logged,
    slope_per_minute,
    stop_and_kill,
    tree_fds,
    tree_rss_kib,
)
from .rotation_files import make_leaf, put_all, write_private

SECONDS = float(os.environ.get("SPICEGW_SOAK_SECONDS", "60"))
ROTATE_EVERY = 3.0
KILL_EVERY = 15.0
SAMPLE_EVERY = 1.0
# Memory samples of the first part are warm-up (allocator pools, session
# caches, a replacement filling up) and stay out of the fit.
WARM_UP = min(10.0, SECONDS / 4)
# Descriptors the tree may hold beyond its start once the load is gone.
FD_MARGIN = 4
# A generous bound: 16 MiB per minute is 1 GiB per hour.
RSS_SLOPE_BOUND_KIB = 16 * 1024


@pytest.mark.timeout(SECONDS + 150)
def test_soak(ca, gateway, echo_port, tmp_path):
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert, key = make_leaf(ca.issued, "soak-0")
    write_private(cert_file, cert)
    write_private(key_file, key)
    port, status = free_port(), free_port()
    gw = gateway(
        *("--tls-enabled", "true", "--tls-certificate-file", str(cert_file)),
        *("--tls-key-file", str(key_file), "--tls-poll-interval", "200ms"),
        *("--workers", "2", "--metrics", f"127.0.0.1:{status}"),
        *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{echo_port}"),
    )
    fds_start = tree_fds(gw)
    samples: list[tuple[float, float]] = []
    supervisor: list[tuple[float, float]] = []
    kills: list[Kill] = []
    rotations = 0
    older: int | None = None

    budget = SECONDS + 60
    load = NewConnections(
        port, ca.path, limit=int(SECONDS * 200), seconds=budget, spacing=0.01, keep_successes=False
    )
    loops = [TransferLoop(port, ca.path, limit=int(SECONDS * 10), seconds=budget) for _ in range(2)]
    with contextlib.ExitStack() as running:
        # Entered last, stopped first: the transfers under way finish.
        running.enter_context(load)
        for loop in loops:
            running.enter_context(loop)

        began = time.monotonic()
        end = began + SECONDS
        next_sample, next_rotation, next_kill = began, began + ROTATE_EVERY, began + KILL_EVERY
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                samples.append((now - began, tree_rss_kib(gw)))
                supervisor.append((now - began, rss_kib(gw.pid)))
                # The status service answers all along.
                assert http_get(status, ca.path, "/metrics")[0] == 200
                next_sample += SAMPLE_EVERY
            if now >= next_rotation:
                rotations += 1
                cert, key = make_leaf(ca.issued, f"soak-{rotations}")
                put_all((cert_file, cert), (key_file, key))
                next_rotation += ROTATE_EVERY
            if now >= next_kill:
                workers = gw.worker_pids()
                if len(workers) == 2:
                    # The older worker dies, so the slots take turns.
                    victim = older if older in workers else workers[0]
                    kills.append(stop_and_kill(victim, port))
                    older = next(pid for pid in workers if pid != victim)
                next_kill += KILL_EVERY
            # Pacing the schedule, not waiting for a condition.
            time.sleep(max(0.0, min(next_sample, next_rotation, next_kill, end) - now))
        elapsed = time.monotonic() - began

    # The last certificate is served; every rotation was taken once.
    last = f"soak-{rotations}"
    wait_until(lambda: _served(port, ca.path) == last, 5)
    wait_until(lambda: len(all_logged(gw, r"public certificate reloaded")) == rotations, 5)

    # Descriptors come back once the connections are gone.
    def settled() -> dict[int, int] | None:
        now = tree_fds(gw)
        return now if len(now) == 3 and sum(now.values()) <= sum(fds_start.values()) else None

    try:
        fds_end = wait_until(settled, 10)
    except AssertionError:
        fds_end = tree_fds(gw)  # Not back to the start; judged against the margin below.
    assert isinstance(fds_end, dict)

    failed = load.finished()
    made = load.succeeded + len(failed)
    lost = [a for a in failed if not any(k.took(a) for k in kills)]
    transfers = [t for loop in loops for t in loop.transfers]
    cut = [t for t in transfers if any(k.took(t) for k in kills)]
    broken = [t for t in transfers if all(t is not c for c in cut) and not t.exact]
    after_warm_up = [s for s in samples if s[0] >= WARM_UP]
    slope = slope_per_minute(after_warm_up)
    # Warm-up flattens out, a leak does not: the two halves tell them apart.
    half = len(after_warm_up) // 2
    halves = [slope_per_minute(after_warm_up[:half]), slope_per_minute(after_warm_up[half:])]
    supervisor_slope = slope_per_minute([s for s in supervisor if s[0] >= WARM_UP])
    per_kill = [
        sum(1 for a in failed if k.took(a)) + sum(1 for t in cut if k.took(t)) for k in kills
    ]
    print(
        f"soak of {elapsed:.0f} s: {made} new connections "
        f"({made / elapsed:.0f}/s), {len(failed)} failed, of which {len(lost)} not "
        f"on a killed worker; {len(transfers)} transfers "
        f"({sum(t.received for t in transfers) // (1024 * 1024)} MiB echoed), {len(cut)} cut "
        f"by a kill, {len(broken)} broken otherwise; {rotations} rotations; {len(kills)} kills, "
        f"connections lost per kill {per_kill}, queued at the kill "
        f"{[k.queued for k in kills]}\n"
        f"descriptors (supervisor first) at start {list(fds_start.values())}, at end "
        f"{list(fds_end.values())}; RSS of the tree {samples[0][1]:.0f} -> "
        f"{samples[-1][1]:.0f} KiB, slope after {WARM_UP:.0f} s {slope:+.0f} KiB/min "
        f"(first half {halves[0]:+.0f}, second half {halves[1]:+.0f}; supervisor alone "
        f"{supervisor_slope:+.0f} KiB/min)"
    )
    assert not lost, f"{len(lost)} new connection(s) failed on no killed worker: {lost[:5]}"
    assert not broken, f"{len(broken)} transfer(s) not byte-exact: {broken[:5]}"
    assert all(t.error for t in cut), "a transfer outlived the worker that carried it"
    assert made >= SECONDS * 5, "the load was too thin to mean anything"
    assert len(transfers) - len(cut) >= SECONDS / 10
    assert len(kills) == math.ceil(SECONDS / KILL_EVERY) - 1
    assert sum(fds_end.values()) <= sum(fds_start.values()) + FD_MARGIN, (fds_start, fds_end)
    assert slope < RSS_SLOPE_BOUND_KIB, f"memory grows {slope:.0f} KiB/min"


def _served(port: int, ca) -> str | None:
    try:
        with tls_connect(port, ca, timeout=5) as tls:
            return common_name(tls.getpeercert())
    except OSError:
        return None
