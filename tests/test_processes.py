"""The supervisor and its workers as processes: sharing a port, dying,
being replaced, draining, and not outliving the supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from .harness import echo_exactly, free_port, http_get, tls_connect, wait_until
from .proc_sockets import (
    ESTABLISHED,
    LISTEN,
    connection_inode,
    is_alive,
    socket_inodes,
    sockets_held,
    tcp_inodes,
)
from .tls_stream import TlsStream

MIB = 1024 * 1024


def _start(gateway, tls_args, echo_port, *extra: str):
    """A gateway in front of the echo upstream; it and its port."""
    port = free_port()
    listen = ["--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{echo_port}"]
    return gateway(*tls_args, *listen, *extra), port


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_two_workers_listen_on_one_port_and_both_serve(gateway, tls_args, echo_port, server_pair):
    status_port = free_port()
    gw, port = _start(
        gateway, tls_args, echo_port, "--workers", "2", "--metrics", f"127.0.0.1:{status_port}"
    )
    workers = gw.worker_pids()
    assert len(workers) == 2

    # Each worker holds its own listening socket on the port (two sockets
    # in one SO_REUSEPORT group, not one socket shared by both).
    listening = tcp_inodes(port, LISTEN)
    held = [socket_inodes(pid) & listening for pid in workers]
    assert [len(inodes) for inodes in held] == [1, 1], (listening, held)
    assert held[0] != held[1]

    # With 40 connections open at once, the kernel spreads them over both
    # listeners; every connection is held by exactly one worker.
    streams = []
    try:
        for _ in range(40):
            stream = TlsStream(port, server_pair.ca)
            streams.append(stream)
            stream.handshake()
            stream.send(b"hi")
            stream.read_at_least(2, timeout=10)
        per_worker = {pid: sockets_held(pid, port, ESTABLISHED) for pid in workers}
    finally:
        for stream in streams:
            stream.close()
    assert sum(per_worker.values()) == 40, per_worker
    assert all(count > 0 for count in per_worker.values()), per_worker

    # The workers' own counters agree. They arrive about once a second,
    # and count the status requests too, hence "at least".
    def accepted() -> dict[int, int]:
        status, body = http_get(status_port, server_pair.ca, "/v1/workers")
        assert status == 200, body
        return {w["pid"]: w["stats"].get("accepted", 0) for w in json.loads(body)["workers"]}

    wait_until(lambda: all(accepted().get(pid, 0) >= n for pid, n in per_worker.items()), 5)


@dataclass
class Attempt:
    started: float
    error: str | None = None
    worker: int | None = None  # the PID that held the server end


def _handshake_loop(port, ca, gw, attempts: list[Attempt], stop: threading.Event) -> None:
    """One connection after another, each a full handshake and an echo,
    noting which worker served it. Bounded: 3000 attempts or 20 s."""
    deadline = time.monotonic() + 20
    for _ in range(3000):
        if stop.is_set() or time.monotonic() > deadline:
            return
        attempt = Attempt(time.monotonic())
        try:
            with tls_connect(port, ca, timeout=5) as tls:
                echo_exactly(tls, b"ping")
                inode = connection_inode(port, tls.getsockname()[1])
                attempt.worker = next(
                    (pid for pid in gw.worker_pids() if inode in socket_inodes(pid)), None
                )
        except (OSError, EOFError) as err:
            attempt.error = repr(err)
        attempts.append(attempt)


def test_a_killed_worker_is_replaced_while_the_other_serves(
    gateway, tls_args, echo_port, server_pair
):
    gw, port = _start(gateway, tls_args, echo_port, "--workers", "2")
    victim, survivor = gw.worker_pids()
    attempts: list[Attempt] = []
    stop = threading.Event()
    loop = threading.Thread(
        target=_handshake_loop, args=(port, server_pair.ca, gw, attempts, stop), daemon=True
    )
    loop.start()
    try:
        wait_until(lambda: len(attempts) >= 20)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not is_alive(victim), 2)
        dead_at = time.monotonic()

        found = wait_until(lambda: [p for p in gw.worker_pids() if p not in (victim, survivor)], 5)
        assert isinstance(found, list)
        replacement = found[0]
        gw.wait_for_log(rf"\(pid {victim}\) was killed by SIGKILL.*replacement", 5)
        gw.wait_for_log(rf"\(pid {replacement}\) is serving again", 5)

        def served_after_death(pid: int) -> int:
            return sum(1 for a in attempts if a.started > dead_at and a.worker == pid)

        wait_until(
            lambda: served_after_death(survivor) >= 5 and served_after_death(replacement) >= 5
        )
    finally:
        stop.set()
        loop.join(30)

    assert sorted(gw.worker_pids()) == sorted([survivor, replacement])
    # A connection the victim had already accepted dies with it; with one
    # connection at a time that is at most one. Queued connections wait on
    # the slot's listener for the replacement and must not fail.
    at_kill = [a for a in attempts if a.error and a.started <= dead_at]
    after = [a for a in attempts if a.error and a.started > dead_at]
    # Shown with `pytest -rP`: what the kill cost, for the record.
    print(f"{len(attempts)} handshakes, {len(at_kill)} failed around the kill: {at_kill}")
    assert not after, f"failures after the worker died: {after}"
    assert len(at_kill) <= 1, f"failures around the kill: {at_kill}"


def test_sigterm_refuses_new_connections_and_finishes_a_transfer(
    gateway, tls_args, echo_port, server_pair
):
    drain = 20.0
    gw, port = _start(gateway, tls_args, echo_port, "--workers", "2", "--drain-timeout", "20s")
    with TlsStream(port, server_pair.ca) as stream:
        stream.handshake()
        # Part of the echo is still on its way back when the signal comes.
        stream.send(os.urandom(4 * MIB))
        stream.read_at_least(MIB)

        signalled = time.monotonic()
        gw.signal(signal.SIGTERM)
        wait_until(lambda: _refused(port), 2)
        gw.wait_for_log(r"SIGTERM received", 5)

        # The transfer in flight goes on after the listeners are gone.
        for _ in range(8):
            stream.send(os.urandom(MIB))
        stream.close_write()
        stream.read_until_eof(timeout=drain)
        finished = time.monotonic()

    assert stream.received == stream.sent == 12 * MIB
    assert stream.received_digest.hexdigest() == stream.sent_digest.hexdigest()
    assert stream.clean_eof
    assert gw.wait(drain) == 0
    exited = time.monotonic()
    # It leaves as soon as nothing is open, not at the drain deadline.
    assert exited - finished < 5, f"exit took {exited - finished:.1f} s after the last byte"
    assert exited - signalled < drain


def test_sigterm_cuts_an_endless_transfer_at_the_drain_timeout(
    gateway, tls_args, echo_port, server_pair
):
    drain = 1.0
    gw, port = _start(gateway, tls_args, echo_port, "--workers", "1", "--drain-timeout", "1s")
    chunk = os.urandom(64 * 1024)
    with TlsStream(port, server_pair.ca) as stream:
        stream.handshake()
        stream.send(chunk)
        stream.read_at_least(len(chunk))

        signalled = time.monotonic()
        gw.signal(signal.SIGTERM)
        # The client never stops on its own; bounded at 10 s for the test.
        cut_by: str | None = None
        while time.monotonic() - signalled < 10:
            try:
                stream.send(chunk, timeout=10)
            except (OSError, EOFError) as err:
                cut_by = repr(err)
                break
            if stream.eof:
                cut_by = "end of stream"
                break
        cut = time.monotonic() - signalled

    assert cut_by is not None, "the transfer was never cut"
    assert drain * 0.8 <= cut < drain + 3, f"cut after {cut:.2f} s by {cut_by}"
    assert gw.wait(10) == 0
    assert time.monotonic() - signalled < drain + 4


def test_supervisor_sigkill_takes_the_workers_down(gateway, tls_args, echo_port, server_pair):
    gw, port = _start(gateway, tls_args, echo_port, "--workers", "2")
    workers = gw.worker_pids()
    assert len(workers) == 2
    with tls_connect(port, server_pair.ca) as tls:
        echo_exactly(tls, b"ping")

    gw.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not any(is_alive(pid) for pid in workers), 2)
    assert time.monotonic() - killed < 2
    assert _refused(port)
