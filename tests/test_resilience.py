"""Workers that are killed, crash in a loop, hang, or run out of
descriptors, and a supervisor killed with connections open; each test
runs a real gateway in front of the echo upstream on loopback, under
bounded load.

A worker is killed with SIGKILL after a SIGSTOP that freezes it long
enough to note which connections it holds: a connection it had
accepted dies with it, and every other failure is a lost connection.

The figures each test measures are printed (run pytest with -s).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from .harness import client_context, free_port, wait_until
from .proc_sockets import is_alive
from .resilience_support import (
    PING_INTERVAL,
    Attempt,
    Burst,
    Kill,
    LimitedGateway,
    NewConnections,
    RefusalProbe,
    Transfer,
    accept_queue,
    all_logged,
    connect_once,
    cpu_seconds,
    listener_of,
    listeners_held,
    logged,
    owner,
    process_state,
    resume_if_stopped,
    stop_and_kill,
    tree_fds,
)

# A replacement must serve within this long after its predecessor died.
REPLACED_WITHIN = 1.0


def _http(port: int, upstream: int) -> tuple[str, ...]:
    return ("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{upstream}")


def _two_workers(gw) -> list[int]:
    found = wait_until(lambda: (pids := gw.worker_pids()) and len(pids) == 2 and pids, 5)
    assert isinstance(found, list)
    return found


def _transfers_on_both(port: int, ca: Path, workers: list[int]) -> dict[int, list[Transfer]]:
    """Long transfers, started until each worker carries at least one
    (the kernel spreads connections by a hash); at most 12."""
    placed: dict[int, list[Transfer]] = {pid: [] for pid in workers}
    for _ in range(12):
        if all(placed.values()):
            break
        transfer = Transfer(port, ca, chunk=32 * 1024, pause=0.02).start()
        assert transfer.client_port is not None and transfer.error is None, transfer
        holder = owner(port, transfer.client_port, workers)
        assert holder is not None, f"no worker holds the transfer from {transfer.client_port}"
        placed[holder].append(transfer)
    assert all(placed.values()), f"the transfers all went to one worker: {placed}"
    return placed


def _replacement(gw, known: list[int]) -> int:
    found = wait_until(lambda: [pid for pid in gw.worker_pids() if pid not in known], 5)
    assert isinstance(found, list) and len(found) == 1, found
    return int(found[0])


# Killing one of two workers under load.

KILLS = 5


def test_killed_workers_lose_only_the_connections_they_had_accepted(
    gateway, tls_args, echo_port, server_pair
):
    """Five times, one of two workers is SIGKILLed while clients keep
    opening new connections, long transfers run on both workers, and
    more clients queue on the victim's socket. The replacement serves
    within a second, the port never refuses, the queued clients are
    served, and only the connections the victim had accepted fail; the
    transfers on the other worker finish byte-exact."""
    ca = server_pair.ca
    port = free_port()
    # At debug level the supervisor logs each fork ("started as pid").
    gw = gateway(*tls_args, "--workers", "2", *_http(port, echo_port), "--log-level", "debug")
    kills: list[Kill] = []
    bursts: list[Attempt] = []
    report: list[str] = []

    with RefusalProbe(port) as probe, NewConnections(port, ca, seconds=90) as load:
        older = None
        for _ in range(KILLS):
            workers = _two_workers(gw)
            placed = _transfers_on_both(port, ca, workers)
            # The older of the two dies, so the slots take turns and the
            # backoff of each stays at its first steps (0.1 s, 0.2 s).
            victim = older if older in workers else workers[0]
            survivor = next(pid for pid in workers if pid != victim)
            burst = Burst(port, ca)

            def queue_some(listener: int, burst: Burst = burst) -> None:
                for _ in range(16):
                    if accept_queue(listener, port) >= 3:
                        return
                    burst.add()

            kill = stop_and_kill(victim, port, queue_some)
            kills.append(kill)

            replacement = _replacement(gw, workers)
            # A new worker holds every slot's socket for the moment between
            # the fork and closing what is not its own.
            mine = {kill.listener}
            wait_until(lambda r=replacement, mine=mine: listeners_held(r, port) == mine, 2)
            # It holds the socket from the fork on: the fd is inherited.
            forked_at, _ = logged(gw, rf"started as pid {replacement}\b", 5)
            listening = forked_at - kill.at
            ready_at, _ = logged(gw, rf"\(pid {replacement}\) is serving again", 5)
            ready = ready_at - kill.at
            wait_until(lambda kill=kill: load.served_since(kill.at_monotonic) >= 20, 10)
            bursts += burst.join()
            wait_until(lambda kill=kill: accept_queue(kill.listener, port) == 0, 5)

            for transfers in placed.values():
                for transfer in transfers:
                    transfer.finish()
            died = [t for t in placed[victim] if kill.took(t)]
            assert died == placed[victim], "a transfer on the victim was not seen as held"
            assert all(t.error for t in died), f"a transfer outlived its worker: {died}"
            lasted = placed[survivor]
            broken = [t for t in lasted if not t.exact]
            assert not broken, f"transfers on the surviving worker broke: {broken}"

            round_attempts = load.finished() + burst.attempts
            failed = [a for a in round_attempts if a.error]
            taken = [a for a in failed if kill.took(a)]
            waited = [a for a in round_attempts if kill.queued_then(a)]
            served = sum(1 for a in waited if a.error is None)
            report.append(
                f"kill {len(kills)}: pid {victim} held {len(kill.held)} connection(s), "
                f"{kill.queued} queued on its socket ({len(waited)} live client(s) waiting, "
                f"{served} served); replacement {replacement} listening after "
                f"{listening:.3f} s, serving after {ready:.3f} s; new connections lost with "
                f"the victim: {len(taken)}; transfers cut {len(died)}, byte-exact on the "
                f"survivor {len(lasted)} ({sum(t.sent for t in lasted) // 1024} KiB)"
            )
            assert ready < REPLACED_WITHIN, report[-1]
            assert waited, f"no client waited on the victim's socket: {report[-1]}"
            assert all(a.error is None for a in waited), f"queued clients failed: {waited}"
            older = survivor

    attempts = load.finished() + bursts
    failed = [a for a in attempts if a.error]
    lost = [a for a in failed if not any(k.took(a) for k in kills)]
    print("\n".join(report))
    print(
        f"{len(attempts)} new connections, {len(failed)} failed, all with a killed worker; "
        f"{probe.probes} probes, {len(probe.refused)} refused"
    )
    assert not lost, f"{len(lost)} connection(s) lost that no killed worker held: {lost[:5]}"
    assert probe.refused == [], f"the port refused {len(probe.refused)} probe(s)"
    assert probe.other == [], probe.other[:5]
    assert all(a.error is None for a in bursts), [a for a in bursts if a.error]


# A crash loop.

CRASHES = 8


def test_a_crash_loop_backs_off_and_forks_a_bounded_number_of_workers(
    gateway, tls_args, echo_port, server_pair
):
    """One worker slot is killed again each time its replacement says it
    is ready, eight times. The respawn delays double from 0.1 s up to
    the 10 s cap, each replacement is forked no sooner than its delay,
    the other slot's worker is untouched, and the supervisor forks
    exactly one worker per death."""
    port = free_port()
    gw = gateway(*tls_args, "--workers", "2", *_http(port, echo_port), "--log-level", "debug")
    victim, other = _two_workers(gw)
    slot = logged(gw, rf"worker (\d+) started as pid {victim}\b")[1].group(1)
    forks = rf"worker {slot} started as pid (\d+)"

    delays: list[float] = []
    gaps: list[float] = []
    boots: list[float] = []
    for n in range(CRASHES):
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        _, match = logged(
            gw, rf"\(pid {victim}\) was killed by SIGKILL.*starting a replacement in ([\d.]+) s"
        )
        delay = float(match.group(1))
        delays.append(delay)
        if n == CRASHES - 1:
            break  # The last replacement would come 10 s later.

        wait_until(lambda n=n: len(all_logged(gw, forks)) >= n + 2, delay + 5)
        forked_at, match = all_logged(gw, forks)[n + 1]
        successor = int(match.group(1))
        ready_at, _ = logged(gw, rf"\(pid {successor}\) is serving again", 5)
        gaps.append(forked_at - killed_at)
        boots.append(ready_at - forked_at)
        victim = successor

    print(
        "respawn delays logged (s): " + ", ".join(f"{d:.1f}" for d in delays) + "; "
        "kill to fork (s): " + ", ".join(f"{g:.3f}" for g in gaps) + "; "
        "fork to ready (s): " + ", ".join(f"{b:.3f}" for b in boots)
    )
    expected = [min(0.1 * 2**n, 10.0) for n in range(CRASHES)]
    assert delays == [round(d, 1) for d in expected], delays
    for delay, gap in zip(delays, gaps, strict=False):
        # Log stamps have millisecond precision; the fork cannot come early.
        assert delay - 0.002 <= gap <= delay + 0.5, f"forked {gap:.3f} s after a {delay} s delay"
    spawned = all_logged(gw, r"worker \d+ started as pid (\d+)")
    assert len(spawned) == 2 + CRASHES - 1, [m.group(0) for _, m in spawned]
    assert gw.worker_pids() == [other], "the other slot's worker was replaced"
    assert gw.proc.poll() is None


# A hung worker.

WORKER_TIMEOUT = 1.0


def test_a_hung_worker_is_killed_and_its_queue_is_served_by_the_replacement(
    gateway, tls_args, echo_port, server_pair
):
    """A worker frozen by SIGSTOP stops answering the supervisor's
    pings; with --worker-timeout 1s it is killed within about two
    seconds (the timeout plus one ping interval), nothing stays stopped,
    and the clients queued on its socket meanwhile are served by its
    replacement."""
    port = free_port()
    gw = gateway(
        *tls_args,
        *("--workers", "2", "--worker-timeout", f"{WORKER_TIMEOUT}s"),
        *_http(port, echo_port),
    )
    victim, survivor = _two_workers(gw)
    listener = listener_of(victim, port)
    burst = Burst(port, server_pair.ca, timeout=15)

    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        wait_until(lambda: process_state(victim) == "T", 5, interval=0.002)
        for _ in range(24):
            if accept_queue(listener, port) >= 3:
                break
            burst.add()
        queued = accept_queue(listener, port)

        noticed_at, _ = logged(gw, rf"\(pid {victim}\) has not answered for \d+ s; killing it", 6)
        wait_until(lambda: not is_alive(victim), 2)
        gone = time.time() - stopped_at
        logged(gw, rf"\(pid {victim}\) was killed by SIGKILL.*starting a replacement", 2)
    finally:
        resume_if_stopped(victim)
    replacement = _replacement(gw, [victim, survivor])
    ready_at, _ = logged(gw, rf"\(pid {replacement}\) is serving again", 5)
    attempts = burst.join()
    served_at = max(a.ended for a in attempts if a.ended is not None)

    detection = noticed_at - stopped_at
    print(
        f"hung worker noticed {detection:.3f} s after SIGSTOP, gone after {gone:.3f} s; "
        f"replacement serving {ready_at - stopped_at:.3f} s after SIGSTOP; "
        f"{queued} client(s) queued on its socket, {len(attempts)} started meanwhile, "
        f"the last served {served_at - attempts[0].started:.3f} s after it connected"
    )
    assert queued >= 1, "no client queued on the hung worker's socket"
    assert detection <= WORKER_TIMEOUT + PING_INTERVAL + 1.0, f"noticed after {detection:.3f} s"
    failed = [a for a in attempts if a.error]
    assert not failed, f"queued clients failed: {failed}"
    assert accept_queue(listener, port) == 0
    stopped = [pid for pid in gw.worker_pids() if process_state(pid) == "T"]
    assert stopped == [] and not is_alive(victim)
    assert sorted(gw.worker_pids()) == sorted([survivor, replacement])


# The supervisor killed with connections open.


def test_supervisor_sigkill_ends_open_connections_at_once(
    gateway, tls_args, echo_port, server_pair
):
    """With long transfers running on both workers and a client that has
    not said hello yet, SIGKILL of the supervisor ends every worker and
    every client connection within 2 s: nothing is left half-open."""
    ca = server_pair.ca
    port = free_port()
    gw = gateway(*tls_args, "--workers", "2", *_http(port, echo_port))
    workers = _two_workers(gw)
    placed = _transfers_on_both(port, ca, workers)
    silent = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        gw.signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: not any(is_alive(pid) for pid in workers), 2)
        workers_gone = time.monotonic() - killed
        try:
            silent_end = repr(silent.recv(1))
        except TimeoutError:
            silent_end = "nothing within 5 s"
        except OSError as err:
            silent_end = repr(err)
        silent_after = time.monotonic() - killed
    finally:
        silent.close()
    transfers = [t for group in placed.values() for t in group]
    wait_until(lambda: all(t.done for t in transfers), 5)
    for transfer in transfers:
        transfer.finish()
    ended = [t.ended - killed for t in transfers if t.ended is not None]

    print(
        f"supervisor SIGKILL: workers gone after {workers_gone:.3f} s; {len(transfers)} "
        f"transfers ended after {max(ended):.3f} s at most; a silent client saw "
        f"{silent_end} after {silent_after:.3f} s"
    )
    assert all(t.error and "TimeoutError" not in t.error for t in transfers), transfers
    assert max(ended) < 2.0
    # An end of stream or a reset, either is an answer; silence is not.
    assert silent_end != "nothing within 5 s" and silent_after < 2.0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            refused = False
    except ConnectionRefusedError:
        refused = True
    assert refused, "something still listens on the port"


# Descriptor exhaustion.

NOFILE = 64
# The worker logs a failing accept at most this often.
ACCEPT_LOG_INTERVAL = 5.0


def test_descriptor_exhaustion_is_logged_sparingly_and_survived(
    processes, tmp_path, tls_args, echo_port, server_pair
):
    """A worker whose descriptor limit is 64 (hard limit, so the
    supervisor cannot raise it) gets more connections than it can hold.
    It says so once per 5 s, keeps retrying without spinning, keeps the
    extra clients waiting in the backlog, and serves a new client within
    2 s once the hogging connections close."""
    port = free_port()
    flags = [*tls_args, "--workers", "1", "--handshake-timeout", "60s", *_http(port, echo_port)]
    gw = LimitedGateway(NOFILE, flags, tmp_path / "limited.log")
    processes.append(gw)
    gw.wait_ready()
    (worker,) = gw.worker_pids()
    limits = Path(f"/proc/{worker}/limits").read_text()
    assert re.search(rf"Max open files\s+{NOFILE}\s+{NOFILE}\s", limits), limits

    # Bare TCP connections that never say hello: one descriptor each in
    # the worker, held until the handshake deadline (60 s).
    hogs: list[socket.socket] = []
    waiting = Burst(port, server_pair.ca, timeout=30)
    try:
        for _ in range(NOFILE + 16):
            hogs.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        first_at, first = logged(gw, r"cannot accept connections: (.*)", 5)
        cpu_before = cpu_seconds(worker)
        wait_until(lambda: tree_fds(gw).get(worker) == NOFILE, 5)
        waiting.add()

        # The next line comes one interval later; how much CPU the worker
        # burns meanwhile tells a paced retry from a busy loop.
        def two_lines() -> list[tuple[float, re.Match[str]]] | None:
            found = all_logged(gw, r"cannot accept connections")
            return found if len(found) >= 2 else None

        lines = wait_until(two_lines, ACCEPT_LOG_INTERVAL + 3)
        cpu_between = cpu_seconds(worker) - cpu_before
        assert waiting.attempts[0].ended is None, waiting.attempts[0]
    finally:
        closed = time.monotonic()
        for hog in hogs:
            hog.close()
    (attempt,) = waiting.join()
    fresh = Attempt(time.monotonic())
    connect_once(port, client_context(server_pair.ca), fresh)
    assert isinstance(lines, list)
    second_at = lines[1][0]

    print(
        f"descriptor limit {NOFILE}: first 'cannot accept' line ({first.group(1)}), the next "
        f"{second_at - first_at:.3f} s later; worker CPU in between {cpu_between:.3f} s; "
        f"the waiting client served {attempt.ended - closed:.3f} s after the hogs closed, "
        f"a new one after {fresh.ended - closed:.3f} s"
    )
    assert "os error 24" in first.group(1)
    assert len(lines) == 2
    assert second_at - first_at >= ACCEPT_LOG_INTERVAL - 0.002
    assert cpu_between < 0.5, f"the worker used {cpu_between:.2f} s of CPU while exhausted"
    assert attempt.error is None, attempt
    assert fresh.error is None, fresh
    assert attempt.ended - closed <= 2.0 and fresh.ended - closed <= 2.0
    assert gw.worker_pids() == [worker] and gw.proc.poll() is None
