"""Helpers for the hostile-client and upstream-fault tests: ports that
thousands of connections cannot collide with, the descriptor limit, a
worker's memory and descriptors from /proc, the gateway's own counters,
an upstream that counts what reaches it, a loop of well-behaved
clients, and raw TCP clients driven by one selector.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import resource
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .harness import (
    Gateway,
    Process,
    client_context,
    echo_exactly,
    http_get,
    start_upstream,
    wait_until,
)

# The deadlines these tests give the gateway, as flags and in seconds.
HANDSHAKE_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0


def quiet_port() -> int:
    """A free port below the kernel's ephemeral range.

    These tests open thousands of connections, each from an ephemeral
    port; a listening port picked from that range could be taken as a
    source port (or sit in TIME_WAIT) between the pick and the bind.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = random.sample(range(10000, low), k=min(200, low - 10000))
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port between 10000 and {low}")


@contextlib.contextmanager
def descriptors(needed: int) -> Iterator[None]:
    """Raises this process's soft RLIMIT_NOFILE to the hard limit for the
    duration; skips the test when even the hard limit is below `needed`.
    A gateway started inside inherits the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target < needed:
        pytest.skip(f"this test needs {needed} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def abort(sock: socket.socket) -> None:
    """Closes with a TCP RST instead of a FIN (SO_LINGER, zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def client_hello(ca: Path) -> bytes:
    """The first flight of a real TLS client (Python's ssl): one record
    holding a ClientHello for localhost."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass  # The hello is written; the answer would come next.
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and hello[5:6] == b"\x01", hello[:8]
    return hello


def echo_once(port: int, ca: Path, message: bytes = b"ping", timeout: float = 5.0) -> None:
    """One whole connection: handshake, `message` out and back, close."""
    context = client_context(ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        echo_exactly(tls, message)


# The gateway.


def start_gateway(
    gateway, tls_args: list[str], ca: Path, *endpoints: str, workers: int = 2
) -> tuple[Gateway, Status]:
    """`spicegw run` with `endpoints` (flags) and a metrics endpoint."""
    status_port = quiet_port()
    gw = gateway(
        *tls_args,
        *("--workers", str(workers), "--metrics", f"127.0.0.1:{status_port}"),
        *endpoints,
    )
    return gw, Status(status_port, ca)


_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)


@dataclass
class Status:
    """The gateway's /metrics, read over TLS."""

    port: int
    ca: Path

    def metrics(self) -> dict[tuple[str, str], float]:
        """Every sample, keyed by (name, labels as written)."""
        status, body = http_get(self.port, self.ca, "/metrics")
        assert status == 200, body
        return {
            (name, labels or ""): float(value)
            for name, labels, value in _SAMPLE.findall(body.decode())
        }

    def handshakes(self, result: str) -> int:
        version = {"ok": "1.3"}.get(result, "unknown")
        labels = f'result="{result}",version="{version}"'
        return int(self.metrics()[("runtime_tls_handshakes_total", labels)])

    def value(self, name: str) -> int:
        return int(self.metrics()[(name, "")])

    def settled(self, accepted: int, open_connections: int) -> bool:
        """True once a worker report counts at least `accepted`
        connections and shows `open_connections` open. Workers report
        about once a second, so a report that predates the traffic
        would show nothing open and prove nothing."""
        metrics = self.metrics()
        return (
            metrics[("spicegw_connections_accepted_total", "")] >= accepted
            and metrics[("spicegw_open_connections", "")] == open_connections
        )


# An upstream that counts.


@dataclass
class Counting:
    """tests/servers/counting_upstream.py and its status file."""

    port: int
    process: Process
    status: Path

    def counts(self) -> dict[str, int]:
        try:
            return dict(json.loads(self.status.read_text()))
        except FileNotFoundError:
            return {}

    def wait(self, key: str, want: int, timeout: float = 10.0) -> dict[str, int]:
        """Waits until counts()[key] == want; returns the counts."""
        wait_until(lambda: self.counts().get(key) == want, timeout)
        return self.counts()


def wait_stalled(counting: Counting, key: str, quiet: float = 0.5, timeout: float = 20.0) -> int:
    """Waits until counts()[key] has not moved for `quiet` seconds (the
    upstream is held back, or done); returns its value."""
    last, since = -1, time.monotonic()

    def stalled() -> bool:
        nonlocal last, since
        value = counting.counts().get(key, 0)
        if value != last:
            last, since = value, time.monotonic()
        return time.monotonic() - since >= quiet

    wait_until(stalled, timeout)
    return last


def start_counting(
    processes: list[Process], folder: Path, mode: str, *extra: str, port: int | None = None
) -> Counting:
    port = port or quiet_port()
    status = folder / f"counting-{mode}-{port}.json"
    log = folder / f"counting-{mode}-{port}.log"
    proc = start_upstream("counting", port, log, mode, str(status), *extra)
    processes.append(proc)
    counting = Counting(port, proc, status)
    # The harness's readiness probe is the first connection it counts.
    wait_until(lambda: counting.counts().get("accepted", 0) >= 1, 10)
    counting.wait("open", 0)
    return counting


class ClientLoop:
    """Real clients, one after another in a background thread, each a
    whole connection through the gateway (see `echo_once`), until
    stopped; bounded by `limit` connections and `seconds`.

    `latencies` holds the time each good connection took, `failures` a
    line for each one that failed.
    """

    def __init__(self, port: int, ca: Path, *, limit: int = 1000, seconds: float = 30.0):
        self.port = port
        self.ca = ca
        self.limit = limit
        self.seconds = seconds
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client-loop", daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        wait_until(lambda: self.latencies or self.failures, 10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive(), "the client loop did not stop"

    def check(self, at_least: int, slowest: float) -> None:
        """No connection failed, at least `at_least` succeeded, none took
        longer than `slowest` seconds."""
        self.stop()
        assert self.failures == [], f"{len(self.failures)} failed: {self.failures[:5]}"
        took = ", ".join(f"{latency:.3f}" for latency in sorted(self.latencies)[-3:])
        assert self.latencies and max(self.latencies) < slowest, f"the slowest took {took} s"
        assert len(self.latencies) >= at_least, f"only {len(self.latencies)} connections"

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for _ in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            started = time.monotonic()
            try:
                echo_once(self.port, self.ca)
                self.latencies.append(time.monotonic() - started)
            except (OSError, EOFError) as err:
                self.failures.append(f"{time.monotonic() - started:.3f} s: {err!r}")
            self._stop.wait(0.01)


# Raw clients: bytes on a TCP connection, no TLS stack.


@dataclass
class Raw:
    """One raw TCP client and what became of it. Times are monotonic."""

    kind: str
    payload: bytes
    interval: float | None  # None: send it all at once; else a byte per interval
    sock: socket.socket
    started: float  # connect() was called, or will be (see `open_raw`)
    port: int = 0
    opened: float | None = None  # the TCP handshake completed
    sent: int = 0
    reply: bytearray = field(default_factory=bytearray)
    first_reply: float | None = None
    closed: float | None = None
    how: str = ""  # "eof" or the error that ended it

    @property
    def lifetime(self) -> float:
        """From the TCP handshake to the gateway's close."""
        assert self.opened is not None and self.closed is not None, self
        return self.closed - self.opened


def open_raw(
    port: int,
    kind: str,
    payload: bytes = b"",
    interval: float | None = None,
    delay: float = 0.0,
) -> Raw:
    """A client whose non-blocking connect starts now, or `delay` seconds
    from now (inside `run_raw`); `run_raw` completes it."""
    sock = socket.socket()
    sock.setblocking(False)
    # Queue less than the oversized payloads, so a close shows at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    client = Raw(kind, payload, interval, sock, time.monotonic() + delay, port)
    if delay <= 0:
        _connect(client)
    return client


def _connect(client: Raw) -> None:
    client.started = time.monotonic()
    err = client.sock.connect_ex(("127.0.0.1", client.port))
    assert err in (0, errno.EINPROGRESS), os.strerror(err)


def run_raw(clients: list[Raw], seconds: float) -> None:
    """Drives `clients` in one thread until the gateway has closed all of
    them or `seconds` passed; connects those whose time has come, sends
    what is due, reads what comes."""
    by_fd = {client.sock.fileno(): client for client in clients}
    now = time.monotonic()
    later = sorted((c for c in clients if c.started > now), key=lambda c: c.started)
    deadline = now + seconds
    with selectors.DefaultSelector() as selector:
        for client in clients:
            if client.started <= now:
                selector.register(client.sock, selectors.EVENT_WRITE, client)
        while (selector.get_map() or later) and time.monotonic() < deadline:
            while later and later[0].started <= time.monotonic():
                client = later.pop(0)
                _connect(client)
                selector.register(client.sock, selectors.EVENT_WRITE, client)
            ready = selector.select(0.02)
            # One time for the whole batch: events seen together get the
            # same time rather than an order they may not have had.
            now = time.monotonic()
            for key, mask in ready:
                client = by_fd[key.fd]
                if client.opened is None:
                    _connected(client, selector, now)
                    continue
                if mask & selectors.EVENT_READ:
                    _receive(client, selector, now)
            for key in list(selector.get_map().values()):
                client = key.data
                if client.opened is not None and client.closed is None:
                    _send_due(client, selector, now)


def _connected(client: Raw, selector: selectors.BaseSelector, now: float) -> None:
    err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        _end(client, selector, now, errno.errorcode.get(err, str(err)))
        return
    client.opened = now
    selector.modify(client.sock, selectors.EVENT_READ, client)
    _send_due(client, selector, now)


def _receive(client: Raw, selector: selectors.BaseSelector, now: float) -> None:
    try:
        data = client.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError as err:
        _end(client, selector, now, errno.errorcode.get(err.errno or 0, repr(err)))
        return
    if not data:
        _end(client, selector, now, "eof")
        return
    if client.first_reply is None:
        client.first_reply = now
    client.reply += data


def _send_due(client: Raw, selector: selectors.BaseSelector, now: float) -> None:
    assert client.opened is not None
    if client.interval is None:
        due = len(client.payload)
    else:
        due = min(len(client.payload), int((now - client.opened) / client.interval) + 1)
    if client.sent >= due:
        return
    try:
        client.sent += client.sock.send(client.payload[client.sent : due])
    except BlockingIOError:
        pass  # The socket buffer is full; try again on the next round.
    except OSError as err:
        _end(client, selector, now, errno.errorcode.get(err.errno or 0, repr(err)))


def _end(client: Raw, selector: selectors.BaseSelector, now: float, how: str) -> None:
    client.closed = now
    client.how = how
    selector.unregister(client.sock)
