"""Clients that misbehave, on purpose or not: silent, slow, speaking
something other than TLS, many at once, not reading, vanishing mid-way,
and many idle. Each test runs a real gateway with two workers on
loopback; every load is bounded in count and time.

The figures each test measures are printed (run pytest with -s).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
import time

from .fault_support import (
    HANDSHAKE_TIMEOUT,
    ClientLoop,
    Raw,
    abort,
    client_hello,
    descriptors,
    echo_once,
    fd_count,
    open_raw,
    quiet_port,
    rss_kib,
    run_raw,
    start_counting,
    start_gateway,
    wait_stalled,
)
from .harness import client_context, wait_until
from .tls_stream import TlsStream

MIB = 1024 * 1024


def _http(port: int, upstream: int) -> tuple[str, ...]:
    return ("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{upstream}")


def _close_all(clients: list[Raw]) -> None:
    for client in clients:
        client.sock.close()


def _spread(clients: list[Raw], kind: str) -> str:
    lifetimes = sorted(c.lifetime for c in clients if c.kind == kind)
    return f"{kind}: {len(lifetimes)} closed after {lifetimes[0]:.3f}-{lifetimes[-1]:.3f} s"


# Slow and silent clients.

SILENT = 40
TRICKLING = 10  # per pace
PACES = {"a byte per 200 ms": 0.2, "a byte per second": 1.0}


def test_silent_and_trickling_clients_are_cut_at_the_handshake_deadline(
    gateway, tls_args, server_pair, processes, tmp_path
):
    """The handshake deadline runs from accept and is not pushed back by
    progress: a ClientHello trickled a byte every 200 ms (which would
    take 100 s to finish) is cut at the same 1 s as a silent client.
    Meanwhile real clients keep completing whole connections."""
    echo = start_counting(processes, tmp_path, "echo")
    port = quiet_port()
    gw, status = start_gateway(
        gateway,
        tls_args,
        server_pair.ca,
        *_http(port, echo.port),
        *("--handshake-timeout", f"{HANDSHAKE_TIMEOUT}s"),
    )
    workers = gw.worker_pids()
    timeouts_before = status.handshakes("timeout")
    hello = client_hello(server_pair.ca)

    clients: list[Raw] = []
    try:
        with ClientLoop(port, server_pair.ca) as real:
            clients += [open_raw(port, "silent") for _ in range(SILENT)]
            for kind, pace in PACES.items():
                clients += [open_raw(port, kind, hello, pace) for _ in range(TRICKLING)]
            run_raw(clients, seconds=5 * HANDSHAKE_TIMEOUT)
        real.check(at_least=5, slowest=HANDSHAKE_TIMEOUT / 2)
    finally:
        _close_all(clients)

    hanging = [c for c in clients if c.closed is None]
    assert hanging == [], f"{len(hanging)} clients still open after 5 s: {hanging[0]}"
    # A trickler's last byte may meet the closed socket and draw a reset.
    assert {c.how for c in clients if c.kind == "silent"} == {"eof"}
    assert {c.how for c in clients} <= {"eof", "ECONNRESET", "EPIPE"}
    for client in clients:
        assert HANDSHAKE_TIMEOUT * 0.9 <= client.lifetime <= HANDSHAKE_TIMEOUT + 0.6, (
            f"{client.kind} closed after {client.lifetime:.3f} s, {client.sent} bytes sent"
        )
        # Nothing came back: the ClientHello never finished.
        assert client.reply == b"", (client.kind, bytes(client.reply[:16]))

    # Each of them is counted as a timeout, and only them.
    expected = timeouts_before + len(clients)
    wait_until(lambda: status.handshakes("timeout") >= expected, 5)
    assert status.handshakes("timeout") == expected
    assert gw.worker_pids() == workers
    print(*(_spread(clients, kind) for kind in ("silent", *PACES)), sep="\n")
    print(f"real clients meanwhile: {len(real.latencies)}, slowest {max(real.latencies):.3f} s")


SILENT_CROWD = 256
SILENT_CAP = 64


def test_silent_connections_do_not_take_the_handshake_slots_of_real_clients(
    gateway, tls_args, server_pair, processes, tmp_path
):
    """--max-handshakes bounds the handshakes a worker works on at once.
    A connection that has not sent its ClientHello is no handshake yet:
    256 silent connections (twice the 2 x 64 slots) must not keep real
    clients out until the silent ones reach their deadline."""
    echo = start_counting(processes, tmp_path, "echo")
    port = quiet_port()
    start_gateway(
        gateway,
        tls_args,
        server_pair.ca,
        *_http(port, echo.port),
        *("--handshake-timeout", f"{HANDSHAKE_TIMEOUT}s"),
        *("--max-handshakes", str(SILENT_CAP)),
    )

    silent = [open_raw(port, "silent") for _ in range(SILENT_CROWD)]
    try:
        with ClientLoop(port, server_pair.ca) as real:
            run_raw(silent, seconds=5 * HANDSHAKE_TIMEOUT)
        print(
            f"{SILENT_CROWD} silent connections: {len(real.latencies)} real clients served, "
            f"{len(real.failures)} failed meanwhile"
        )
        real.check(at_least=5, slowest=HANDSHAKE_TIMEOUT / 2)
    finally:
        _close_all(silent)
    assert all(c.closed is not None for c in silent), "silent connections outlived the deadline"


# Not TLS, or not a TLS anyone should accept.

JUNK_HANDSHAKE_TIMEOUT = 10.0  # far away, so "fast" cannot mean "at the deadline"
JUNK_EACH = 10
JUNK_CLOSED_WITHIN = 0.5


def _records(content_type: int, message: bytes) -> bytes:
    """`message` cut into TLS records of at most 16 KiB."""
    pieces = [message[i : i + 16384] for i in range(0, len(message), 16384)]
    return b"".join(
        bytes([content_type, 3, 1]) + len(piece).to_bytes(2, "big") + piece for piece in pieces
    )


def _oversized_hello() -> bytes:
    """A ClientHello of 130 KiB, twice what any TLS stack accepts: a
    plausible start, then junk extensions (type 0xfafa) all the way."""
    start = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    junk = b"".join(b"\xfa\xfa\x0f\xfc" + bytes([n % 251]) * 4092 for n in range(33))
    body = start + b"\xff\xff" + junk
    return _records(0x16, b"\x01" + len(body).to_bytes(3, "big") + body)


def _sslv2_hello() -> bytes:
    """An SSL 2.0 CLIENT-HELLO (two-byte header, high bit set), as very
    old clients send it."""
    ciphers = b"\x01\x00\x80\x07\x00\xc0\x03\x00\x80"
    body = b"\x01\x00\x02" + len(ciphers).to_bytes(2, "big") + b"\x00\x00\x00\x10"
    body += ciphers + bytes(range(16))
    return (0x8000 | len(body)).to_bytes(2, "big") + body


JUNK = {
    "random bytes": lambda n: random.Random(n).randbytes(4096),
    "plaintext HTTP": lambda n: b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "SSLv2 hello": lambda n: _sslv2_hello(),
    "oversized ClientHello": lambda n: _oversized_hello(),
    "record claiming 64 KiB": lambda n: b"\x16\x03\x01\xff\xff" + bytes(1024),
}


def _only_alerts(reply: bytes) -> bool:
    """Nothing, or nothing but TLS alert records."""
    while reply:
        if len(reply) < 5 or reply[0] != 0x15:
            return False
        reply = reply[5 + int.from_bytes(reply[3:5], "big") :]
    return True


def test_junk_is_closed_fast_and_never_reaches_the_upstream(
    gateway, tls_args, server_pair, processes, tmp_path
):
    """Each kind of junk ends in an alert or a plain close within
    milliseconds, not at the (10 s) handshake deadline; no worker dies,
    and the upstream never sees a connection for any of it."""
    echo = start_counting(processes, tmp_path, "echo")
    port = quiet_port()
    gw, status = start_gateway(
        gateway,
        tls_args,
        server_pair.ca,
        *_http(port, echo.port),
        *("--handshake-timeout", f"{JUNK_HANDSHAKE_TIMEOUT}s"),
    )
    workers = gw.worker_pids()
    errors_before = status.handshakes("error")
    upstream_before = echo.counts()

    clients: list[Raw] = []
    try:
        for n in range(JUNK_EACH):
            clients += [open_raw(port, kind, make(n)) for kind, make in JUNK.items()]
        run_raw(clients, seconds=3)
    finally:
        _close_all(clients)

    for client in clients:
        assert client.closed is not None, f"{client.kind}: still open after 3 s"
        assert client.how in ("eof", "ECONNRESET", "EPIPE"), (client.kind, client.how)
        assert client.lifetime < JUNK_CLOSED_WITHIN, f"{client.kind}: {client.lifetime:.3f} s"
        assert _only_alerts(bytes(client.reply)), (client.kind, bytes(client.reply[:16]))

    # One real connection behind all of that: when the upstream has
    # counted its bytes, it has counted every connection made before it.
    echo_once(port, server_pair.ca, b"marker")
    echo.wait("received", upstream_before["received"] + len(b"marker"))
    assert echo.counts()["accepted"] == upstream_before["accepted"] + 1, echo.counts()

    expected = errors_before + len(clients)
    wait_until(lambda: status.handshakes("error") >= expected, 5)
    assert status.handshakes("error") == expected
    assert gw.worker_pids() == workers
    assert status.value("spicegw_worker_restarts_total") == 0
    print(*(_spread(clients, kind) for kind in JUNK), sep="\n")


# A crowd of handshakes at once.

CROWD = 2000
WAVES = 2
WAVE_GAP = 0.5 * HANDSHAKE_TIMEOUT
MAX_HANDSHAKES = 64


def _held_at_once(wave: list[Raw]) -> int:
    """How many clients of `wave` the gateway answered before any of them
    could have given its handshake slot back.

    No client finishes its handshake, so a client of the wave frees its
    slot only at its deadline, 1 s after its connect at the earliest;
    until then every client answered holds a slot. (Counting answers
    against closes over the whole run would not do: loopback packets
    queued on different CPUs can arrive out of order, so a close may be
    seen after the answer to the client that took its slot.)"""
    window = min(c.started for c in wave) + 0.9 * HANDSHAKE_TIMEOUT
    return sum(c.first_reply is not None and c.first_reply < window for c in wave)


def test_a_crowd_of_stalled_handshakes_respects_the_cap(
    gateway, tls_args, server_pair, processes, tmp_path
):
    """2,000 clients in two waves of 1,000, half a second apart, each
    sending a real ClientHello and then nothing more. With
    --max-handshakes 64 a worker answers at most 64 at a time (128 over
    two workers), the rest wait for a slot. The second wave gets the
    slots the first wave's clients give back at their deadline, and no
    more. Everyone is closed by the handshake deadline, which counts the
    wait, and real clients are served right afterwards."""
    echo = start_counting(processes, tmp_path, "echo")
    port = quiet_port()
    with descriptors(CROWD + 500):
        gw, status = start_gateway(
            gateway,
            tls_args,
            server_pair.ca,
            *_http(port, echo.port),
            *("--handshake-timeout", f"{HANDSHAKE_TIMEOUT}s"),
            *("--max-handshakes", str(MAX_HANDSHAKES)),
        )
        workers = gw.worker_pids()
        timeouts_before = status.handshakes("timeout")
        hello = client_hello(server_pair.ca)

        clients: list[Raw] = []
        try:
            for wave in range(WAVES):
                delay = wave * WAVE_GAP
                clients += [
                    open_raw(port, f"wave {wave + 1}", hello, delay=delay)
                    for _ in range(CROWD // WAVES)
                ]
            run_raw(clients, seconds=6 * HANDSHAKE_TIMEOUT)
        finally:
            _close_all(clients)

    hanging = [c for c in clients if c.closed is None]
    assert hanging == [], f"{len(hanging)} of {CROWD} clients still open after 6 s"
    # A client closed while still waiting for a slot had its hello left
    # unread, so its close may come as a reset.
    assert {c.how for c in clients} <= {"eof", "ECONNRESET"}, {c.how for c in clients}
    slowest = max(c.lifetime for c in clients)
    assert slowest <= HANDSHAKE_TIMEOUT + 0.75, f"a client was closed after {slowest:.3f} s"

    held = {
        wave: _held_at_once([c for c in clients if c.kind == wave])
        for wave in sorted({c.kind for c in clients})
    }
    for wave, most in held.items():
        assert MAX_HANDSHAKES <= most <= 2 * MAX_HANDSHAKES, f"{wave}: {most} at once"

    # The gateway counted every one of them as a timeout.
    expected = timeouts_before + CROWD
    wait_until(lambda: status.handshakes("timeout") >= expected, 5)
    assert status.handshakes("timeout") == expected

    with ClientLoop(port, server_pair.ca, limit=20) as real:
        wait_until(lambda: len(real.latencies) + len(real.failures) >= 20, 10)
    real.check(at_least=20, slowest=HANDSHAKE_TIMEOUT / 2)
    assert gw.worker_pids() == workers
    answered = sum(c.first_reply is not None for c in clients)
    print(
        f"{CROWD} stalled handshakes: answered at once {held}, {answered} answered "
        f"in all, closed after {min(c.lifetime for c in clients):.3f}-{slowest:.3f} s"
    )


# A client that stops reading.

FLOOD = 200 * MIB
GROWTH_LIMIT_KIB = 20 * 1024


def _pattern_digest(size: int) -> str:
    """SHA-256 of what the flood upstream sends: 0..255 repeated."""
    digest = hashlib.sha256()
    block = bytes(range(256)) * 256
    for _ in range(size // len(block)):
        digest.update(block)
    digest.update(block[: size % len(block)])
    return digest.hexdigest()


def test_a_client_that_stops_reading_holds_the_upstream_back(
    gateway, tls_args, server_pair, processes, tmp_path
):
    """The upstream tries to send 200 MiB to a client that reads nothing.
    The worker must stop reading the upstream once its small per-
    connection buffer is full (backpressure), so its memory stays put;
    everything still arrives, intact, once the client reads again."""
    flood = start_counting(processes, tmp_path, "flood", str(FLOOD))
    port = quiet_port()
    gw, _status = start_gateway(gateway, tls_args, server_pair.ca, *_http(port, flood.port))
    workers = gw.worker_pids()
    before = {pid: rss_kib(pid) for pid in workers}

    baseline = flood.counts()

    with TlsStream(port, server_pair.ca) as stream:
        stream.handshake()
        # One byte to the upstream: the handshake is over and the relay
        # runs; from here on the client reads nothing.
        stream.send(b"!")
        flood.wait("received", baseline["received"] + 1)
        held_at = wait_stalled(flood, "sent") - baseline["sent"]
        growth = {pid: rss_kib(pid) - before[pid] for pid in workers}
        assert held_at < FLOOD // 4, f"the upstream sent {held_at} bytes to a stalled client"
        assert sum(growth.values()) < GROWTH_LIMIT_KIB, f"workers grew by {growth} KiB"

        stream.read_until_eof(timeout=60)
    assert stream.received == FLOOD
    assert stream.received_digest.hexdigest() == _pattern_digest(FLOOD)
    print(
        f"upstream held back after {held_at / MIB:.1f} MiB of {FLOOD // MIB} MiB; "
        f"worker RSS grew {sum(growth.values())} KiB"
    )


# Clients that leave mid-way.

LEAVERS_EACH = 40


def _reset_uploading(stream: TlsStream) -> None:
    stream.send(os.urandom(512 * 1024))
    stream.read_at_least(16 * 1024)
    abort(stream.sock)


def _reset_downloading(stream: TlsStream) -> None:
    stream.send(b"!")
    stream.read_at_least(256 * 1024)
    abort(stream.sock)


def _half_close_then_reset(stream: TlsStream) -> None:
    stream.send(os.urandom(128 * 1024))
    stream.close_write()
    stream.read_at_least(1)
    abort(stream.sock)


def _half_close_to_the_end(stream: TlsStream) -> None:
    stream.send(os.urandom(64 * 1024))
    stream.close_write()
    stream.read_until_eof(timeout=10)
    assert stream.received == stream.sent
    assert stream.clean_eof


def _reset_after_handshake(stream: TlsStream) -> None:
    abort(stream.sock)


LEAVERS = {
    # name: (endpoint, what the client does after its handshake)
    "reset while uploading": ("echo", _reset_uploading),
    "reset while downloading": ("flood", _reset_downloading),
    "half-close, then reset": ("echo", _half_close_then_reset),
    "half-close, read to the end": ("echo", _half_close_to_the_end),
    "reset right after the handshake": ("echo", _reset_after_handshake),
}


def test_clients_that_reset_or_half_close_leave_nothing_behind(
    gateway, tls_args, server_pair, processes, tmp_path
):
    """After 200 connections that end in a half-close or a TCP RST in the
    middle of a transfer, the workers hold as many descriptors as before,
    report no open connection, and the upstreams were let go too. (The
    idle timeout is 300 s: a leaked connection would still be there.)"""
    upstreams = {
        "echo": start_counting(processes, tmp_path, "echo"),
        "flood": start_counting(processes, tmp_path, "flood", str(64 * MIB)),
    }
    ports = {"echo": quiet_port(), "flood": quiet_port()}
    gw, status = start_gateway(
        gateway,
        tls_args,
        server_pair.ca,
        *_http(ports["echo"], upstreams["echo"].port),
        *("--flight", f"127.0.0.1:{ports['flood']}"),
        *("--flight-upstream", f"127.0.0.1:{upstreams['flood'].port}"),
    )
    workers = gw.worker_pids()
    # Before any request to the status endpoint, which the workers serve
    # too (two descriptors each while it lasts).
    fds_before = {pid: fd_count(pid) for pid in workers}

    for _ in range(LEAVERS_EACH):
        for name, (endpoint, leave) in LEAVERS.items():
            with TlsStream(ports[endpoint], server_pair.ca) as stream:
                stream.handshake()
                try:
                    leave(stream)
                except (OSError, AssertionError) as err:
                    raise AssertionError(f"{name}: {err!r}") from err

    for upstream in upstreams.values():
        upstream.wait("open", 0)
    made = LEAVERS_EACH * len(LEAVERS)
    wait_until(lambda: status.settled(accepted=made, open_connections=0), 10)
    wait_until(lambda: {pid: fd_count(pid) for pid in workers} == fds_before, 10)
    assert gw.worker_pids() == workers
    print(f"{made} connections left mid-way; descriptors back to {fds_before}")


# Many idle connections.

IDLE = 10_000
IDLE_SECONDS = 60.0
# design.md §7: at most 16 MiB of worker memory per 1,000 idle connections.
IDLE_KIB_EACH = 16


def _handshake(sock: socket.socket, context: ssl.SSLContext) -> None:
    """A full TLS handshake over a blocking socket, kept in memory BIOs
    so the TLS object can be dropped afterwards and the connection held
    as a bare socket (10,000 SSL objects would weigh on this process)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise EOFError("the gateway closed during the handshake") from None
            incoming.write(data)
    # The client's Finished: the gateway's side ends with it.
    sock.sendall(outgoing.read())


def _added(fds_before: dict[int, int]) -> dict[int, int]:
    """Descriptors each worker holds beyond `fds_before`."""
    return {pid: fd_count(pid) - count for pid, count in fds_before.items()}


def test_ten_thousand_idle_connections_are_held_and_released(
    gateway, tls_args, server_pair, processes, tmp_path
):
    """10,000 finished TLS connections over two workers, each with its
    upstream connection, all held at once, then all let go: the workers
    count them and give back every descriptor. The memory they cost is
    measured (worker RSS growth / connections) against design.md."""
    echo = start_counting(processes, tmp_path, "echo")
    port = quiet_port()
    held: list[socket.socket] = []
    with descriptors(IDLE + 500):
        gw, status = start_gateway(gateway, tls_args, server_pair.ca, *_http(port, echo.port))
        workers = gw.worker_pids()
        fds_before = {pid: fd_count(pid) for pid in workers}
        rss_before = {pid: rss_kib(pid) for pid in workers}
        context = client_context(server_pair.ca)
        started = time.monotonic()
        try:
            for _ in range(IDLE):
                assert time.monotonic() - started < IDLE_SECONDS, f"{len(held)} opened in time"
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(sock)
                _handshake(sock, context)
            opened_in = time.monotonic() - started

            # Every one reached the upstream and is held by a worker, with
            # two descriptors (client and upstream). The status requests
            # hold two more for a moment.
            echo.wait("open", IDLE, timeout=20)
            wait_until(lambda: status.settled(accepted=IDLE, open_connections=IDLE), 10)
            rss_held = {pid: rss_kib(pid) for pid in workers}
            wait_until(lambda: sum(_added(fds_before).values()) == 2 * IDLE, 10)
            per_worker = _added(fds_before)
        finally:
            for sock in held:
                sock.close()

        echo.wait("open", 0, timeout=20)
        wait_until(lambda: status.settled(accepted=IDLE, open_connections=0), 20)
        wait_until(lambda: {pid: fd_count(pid) for pid in workers} == fds_before, 20)
    released_in = time.monotonic() - started - opened_in

    assert gw.worker_pids() == workers
    assert all(count > 0 for count in per_worker.values()), per_worker
    growth = sum(rss_held[pid] - rss_before[pid] for pid in workers)
    each = growth / IDLE
    rss_after = {pid: rss_kib(pid) for pid in workers}
    print(
        f"{IDLE} idle connections opened in {opened_in:.1f} s, released in "
        f"{released_in:.1f} s; worker RSS {rss_before} -> {rss_held} -> {rss_after} KiB; "
        f"{each:.1f} KiB per idle connection; descriptors per worker {per_worker}"
    )
    assert each <= IDLE_KIB_EACH, f"{each:.1f} KiB per idle connection"
