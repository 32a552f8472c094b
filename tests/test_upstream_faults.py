"""Upstreams that fail: nothing listening, an immediate reset, a
listener that never completes a connection, and one that reads too
slowly. The gateway must close the affected clients promptly (within
--connect-timeout at worst), keep serving everyone else, pick the
upstream up again the moment it works, and never buffer without bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .fault_support import (
    CONNECT_TIMEOUT,
    ClientLoop,
    Counting,
    echo_once,
    quiet_port,
    rss_kib,
    start_counting,
    start_gateway,
)
from .harness import client_context, wait_until
from .tls_stream import TlsStream

MIB = 1024 * 1024
VICTIMS = 20  # clients of the broken upstream, all at once


@contextlib.contextmanager
def never_accepting(port: int) -> Iterator[None]:
    """A listener on 127.0.0.1:`port` whose accept queue is full: backlog
    0 and one connection queued that nobody accepts. The kernel drops
    further SYNs, so a connect neither succeeds nor fails; only the
    connecting side's own timeout ends it."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(0)
        filler.settimeout(5)
        filler.connect(("127.0.0.1", port))
        yield
    finally:
        filler.close()
        listener.close()


@dataclass
class Victim:
    """A client of the broken upstream: its handshake with the gateway
    succeeds, then the gateway has nothing to relay it to."""

    closed_after: float | None = None  # from the finished handshake
    how: str = ""


def _victim(port: int, context: ssl.SSLContext) -> Victim:
    victim = Victim()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        shook = time.monotonic()
        try:
            data = tls.recv(1024)
            victim.how = "eof" if not data else f"data {data[:20]!r}"
        except (ssl.SSLEOFError, ConnectionResetError) as err:
            victim.how = type(err).__name__
        except TimeoutError:
            victim.how = "still open after 10 s"
            return victim
        victim.closed_after = time.monotonic() - shook
    return victim


def _victims(port: int, ca: Path) -> list[Victim]:
    context = client_context(ca)
    with ThreadPoolExecutor(VICTIMS) as pool:
        return list(pool.map(lambda _: _victim(port, context), range(VICTIMS)))


FAULTS = ("refused", "reset", "never accepts")


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_upstream_closes_its_clients_and_recovers_at_once(
    fault, gateway, tls_args, server_pair, processes, tmp_path
):
    """Rounds of 20 clients at once reach an endpoint whose upstream is
    broken. Each is closed promptly: at once when the upstream refuses
    or resets, at --connect-timeout (1 s) when it never answers. Clients
    of another endpoint, with a healthy upstream, are served throughout
    without delay. Once the upstream works, the very next client is
    served."""
    bad_port = quiet_port()
    healthy = start_counting(processes, tmp_path, "echo")
    with contextlib.ExitStack() as fault_stays:
        broken: Counting | None = None
        if fault == "reset":
            broken = start_counting(processes, tmp_path, "reset", port=bad_port)
            fault_stays.callback(broken.process.stop)
        elif fault == "never accepts":
            fault_stays.enter_context(never_accepting(bad_port))

        http, flight = quiet_port(), quiet_port()
        gw, status = start_gateway(
            gateway,
            tls_args,
            server_pair.ca,
            *("--http", f"127.0.0.1:{http}", "--http-upstream", f"127.0.0.1:{bad_port}"),
            *("--flight", f"127.0.0.1:{flight}", "--flight-upstream", f"127.0.0.1:{healthy.port}"),
            *("--connect-timeout", f"{CONNECT_TIMEOUT}s"),
        )
        workers = gw.worker_pids()
        connect_errors = status.value("spicegw_upstream_connect_errors_total")
        reached = broken.counts()["accepted"] if broken else 0

        # Rounds of victims until a second has passed (a round of
        # refusals lasts milliseconds), while the other endpoint is used.
        victims: list[Victim] = []
        with ClientLoop(flight, server_pair.ca) as others:
            started = time.monotonic()
            for _ in range(60):
                victims += _victims(http, server_pair.ca)
                if time.monotonic() - started >= 1.0:
                    break
            # Bounds are generous: they tell "served" from "stuck behind the
        # broken upstream", not how fast a loaded CI machine is.
        others.check(at_least=5, slowest=2.0)

        if broken is not None:
            # A reset comes after the connection was made: the upstream
            # saw every client, and the gateway gave up on each one.
            broken.wait("accepted", reached + len(victims))

    for victim in victims:
        assert victim.closed_after is not None, victim.how
        assert victim.how in ("eof", "SSLEOFError", "ConnectionResetError"), victim.how
    slowest = max(v.closed_after for v in victims if v.closed_after is not None)
    fastest = min(v.closed_after for v in victims if v.closed_after is not None)
    if fault == "never accepts":
        assert fastest >= CONNECT_TIMEOUT * 0.9, f"closed after {fastest:.3f} s"
        assert slowest <= CONNECT_TIMEOUT + 2.0, f"closed after {slowest:.3f} s"
    else:
        assert slowest < CONNECT_TIMEOUT, f"closed after {slowest:.3f} s"

    # Every failed connect is counted. (A reset is left out: it counts
    # or not depending on whether it lands before the worker looks at
    # its new connection, a race the test cannot steer.)
    if fault != "reset":
        expected = connect_errors + len(victims)
        wait_until(lambda: status.value("spicegw_upstream_connect_errors_total") >= expected, 5)
        assert status.value("spicegw_upstream_connect_errors_total") == expected

    # The upstream comes back: the first client after that is served.
    start_counting(processes, tmp_path, "echo", port=bad_port)
    started = time.monotonic()
    echo_once(http, server_pair.ca)
    recovered = time.monotonic() - started
    assert recovered < 0.5
    assert gw.worker_pids() == workers
    print(
        f"{fault}: {len(victims)} clients closed after {fastest:.3f}-{slowest:.3f} s; others' "
        f"slowest {max(others.latencies):.3f} s; first client after repair {recovered:.3f} s"
    )


# An upstream that reads slowly.

PUSH = 200 * MIB
PUSH_SECONDS = 4.0
GROWTH_LIMIT_KIB = 20 * 1024


def test_a_slow_upstream_holds_the_client_back(gateway, tls_args, server_pair, processes, tmp_path):
    """The upstream reads 16 KiB every 50 ms (320 KiB/s) while the client
    tries to send 200 MiB for 4 s. The worker must stop reading the
    client while the upstream is behind (backpressure), so the client
    gets little out and the worker's memory does not grow with it."""
    slow = start_counting(processes, tmp_path, "slow")
    port = quiet_port()
    gw, _status = start_gateway(
        gateway,
        tls_args,
        server_pair.ca,
        *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{slow.port}"),
    )
    workers = gw.worker_pids()
    before = {pid: rss_kib(pid) for pid in workers}
    received_before = slow.counts()["received"]
    chunk = os.urandom(MIB)

    with TlsStream(port, server_pair.ca) as stream:
        stream.handshake()
        deadline = time.monotonic() + PUSH_SECONDS
        while stream.sent < PUSH and (left := deadline - time.monotonic()) > 0:
            try:
                stream.send(chunk, timeout=left)
            except TimeoutError:
                break  # Held back until the end: what this test wants to see.
        growth = {pid: rss_kib(pid) - before[pid] for pid in workers}
        upstream_got = slow.counts()["received"] - received_before

    assert stream.sent < PUSH // 4, f"the client pushed {stream.sent} bytes in {PUSH_SECONDS} s"
    assert upstream_got > 0, "the upstream was never fed"
    assert sum(growth.values()) < GROWTH_LIMIT_KIB, f"workers grew by {growth} KiB"
    print(
        f"slow upstream: client got {stream.sent / MIB:.0f} MiB out in {PUSH_SECONDS} s, the "
        f"upstream read {upstream_got / MIB:.1f} MiB; worker RSS grew {sum(growth.values())} KiB"
    )
