"""Helpers for the resilience and soak tests: clients that keep opening
new connections or keep long transfers going while workers die, a kill
that first notes which connections its victim holds, the gateway's log
times, and its process tree as /proc shows it.

Every loop here is bounded in count and in time and stops by itself.
The only sleeps pace a loop; every wait for a condition polls it
against a deadline.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

from .harness import Gateway, client_context, echo_exactly, wait_until
from .proc_sockets import ESTABLISHED, LISTEN, connection_inode, is_alive, socket_inodes, tcp_inodes
from .tls_stream import TlsStream

KIB = 1024
MIB = 1024 * KIB

# The supervisor pings this often; a hung worker is noticed on a ping.
PING_INTERVAL = 1.0


# The log.

_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z\s+\w+\s+\S+: (.*)$", re.MULTILINE)


def log_time(stamp: str) -> float:
    """The wall-clock time (epoch seconds) of a log line's UTC stamp."""
    moment = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f")
    return moment.replace(tzinfo=dt.UTC).timestamp()


def all_logged(gw: Gateway, pattern: str) -> list[tuple[float, re.Match[str]]]:
    """Every log line whose message matches `pattern`, with the time it
    was written (epoch seconds, millisecond precision)."""
    regex = re.compile(pattern)
    found = []
    for line in _LINE.finditer(gw.text()):
        match = regex.search(line.group(2))
        if match is not None:
            found.append((log_time(line.group(1)), match))
    return found


def logged(gw: Gateway, pattern: str, timeout: float = 10.0) -> tuple[float, re.Match[str]]:
    """Waits for the first log line whose message matches `pattern`;
    returns when it was written and the match."""

    def first() -> tuple[float, re.Match[str]] | None:
        found = all_logged(gw, pattern)
        if not found and gw.proc.poll() is not None:
            raise AssertionError(f"the gateway exited before logging {pattern!r}:\n{gw.text()}")
        return found[0] if found else None

    result = wait_until(first, timeout)
    assert isinstance(result, tuple)
    return result


# Sockets seen from /proc.


@dataclass(frozen=True)
class TcpRow:
    local_port: int
    remote_port: int
    state: str
    rx_queue: int  # for a listener: connections waiting to be accepted
    inode: int


def tcp_rows(port: int) -> list[TcpRow]:
    """IPv4 TCP sockets whose local port is `port`, from /proc/net/tcp."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port != port:
            continue
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        rx_queue = int(fields[4].split(":")[1], 16)
        rows.append(TcpRow(local_port, remote_port, fields[3], rx_queue, int(fields[9])))
    return rows


def listeners_held(pid: int, port: int) -> set[int]:
    """Inodes of the listening sockets on `port` that `pid` holds."""
    return socket_inodes(pid) & tcp_inodes(port, LISTEN)


def listener_of(pid: int, port: int) -> int:
    """The inode of the one listening socket on `port` that `pid` holds."""
    held = listeners_held(pid, port)
    assert len(held) == 1, f"pid {pid} holds listeners {held} on port {port}"
    return held.pop()


def accept_queue(listener: int, port: int) -> int:
    """Connections waiting in the accept queue of listener `listener`."""
    for row in tcp_rows(port):
        if row.inode == listener and row.state == LISTEN:
            return row.rx_queue
    raise AssertionError(f"listener {listener} on port {port} is gone")


def owner(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the gateway's end of the connection a client
    opened from `client_port`."""
    inode = connection_inode(port, client_port)
    if inode is None:
        return None
    return next((pid for pid in pids if inode in socket_inodes(pid)), None)


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` ("T" when stopped), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


# The process tree.


def tree(gw: Gateway) -> list[int]:
    """The supervisor and its workers."""
    return [gw.pid, *gw.worker_pids()]


def _fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def _rss_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None  # A zombie has no memory left to show.


def tree_fds(gw: Gateway) -> dict[int, int]:
    """Open descriptors per process of the tree."""
    counts = {pid: _fd_count(pid) for pid in tree(gw)}
    return {pid: count for pid, count in counts.items() if count is not None}


def tree_rss_kib(gw: Gateway) -> int:
    """Resident memory of the whole tree, in KiB."""
    return sum(kib for pid in tree(gw) if (kib := _rss_kib(pid)) is not None)


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, per minute."""
    assert len(samples) >= 2, samples
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    assert spread > 0, samples
    covariance = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return covariance / spread * 60


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); the list starts at 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Killing a worker and knowing what it held.


class Connection(Protocol):
    """A client connection as the tests record it (an `Attempt`, a
    `Transfer`): when it started and ended (monotonic), from which port."""

    started: float
    ended: float | None
    client_port: int | None


@dataclass
class Kill:
    """One SIGKILL of a worker and what it held at that moment."""

    victim: int
    at: float  # epoch seconds, to compare with log stamps
    at_monotonic: float
    frozen_at: float  # monotonic; when the victim was seen stopped
    held: set[int]  # client ports of the connections the victim had accepted
    listener: int  # the inode of its slot's listening socket
    queued: int  # connections waiting in that socket's accept queue
    # Client ports of open connections no process had accepted yet: with
    # the victim frozen, nearly all of them wait on its socket.
    waiting: set[int]

    def open_then(self, conn: Connection) -> bool:
        """True when `conn` was open while the victim was frozen (client
        ports are reused, so a port alone does not name a connection).
        A client may see the reset before the killing thread reads the
        clock again, hence the freeze, not the kill, as the lower bound
        of its end."""
        return conn.started < self.at_monotonic and (
            conn.ended is None or conn.ended >= self.frozen_at
        )

    def queued_then(self, conn: Connection) -> bool:
        """True for a connection that waited in an accept queue when the
        victim was killed."""
        return self.open_then(conn) and conn.client_port in self.waiting

    def took(self, conn: Connection) -> bool:
        """True for a connection the victim had accepted: open at the
        kill, from a port whose server end the victim held."""
        return self.open_then(conn) and conn.client_port in self.held


def stop_and_kill(
    victim: int, port: int, while_stopped: Callable[[int], None] | None = None
) -> Kill:
    """SIGKILLs worker `victim`, first freezing it with SIGSTOP to note
    which connections it holds, so that every failure afterwards can be
    put down to the kill or not.

    While it is stopped, its slot's listener still takes connections
    into its accept queue (the supervisor keeps the socket open).
    `while_stopped`, given the listener's inode, may add clients then;
    otherwise the freeze lasts a few tens of milliseconds.
    """
    listener = listener_of(victim, port)
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(victim) in ("T", None), 5, interval=0.002)
        frozen_at = time.monotonic()
        if while_stopped is not None:
            while_stopped(listener)
        held_inodes = socket_inodes(victim)
        # The kernel hands /proc/net/tcp out a page at a time and resumes
        # by position, so a row can be skipped when other sockets come and
        # go meanwhile (thousands do in a long soak). The victim's rows
        # stay put while it is frozen: the union of a few reads has them.
        held: set[int] = set()
        waiting: set[int] = set()
        for _ in range(4):
            rows = tcp_rows(port)
            found = {row.remote_port for row in rows if row.inode and row.inode in held_inodes}
            waiting |= {
                row.remote_port for row in rows if row.state == ESTABLISHED and not row.inode
            }
            if held and found <= held:
                break
            held |= found
        queued = accept_queue(listener, port)
        os.kill(victim, signal.SIGKILL)
        killed = Kill(
            victim, time.time(), time.monotonic(), frozen_at, held, listener, queued, waiting
        )
    finally:
        resume_if_stopped(victim)
    wait_until(lambda: not is_alive(victim), 5)
    return killed


def resume_if_stopped(pid: int) -> None:
    """Teardown for a test that SIGSTOPs `pid`: never leave it stopped."""
    if process_state(pid) == "T":
        os.kill(pid, signal.SIGCONT)


# New connections, one after another.


@dataclass
class Attempt:
    """One new connection: TCP connect, full handshake, an echo, close."""

    started: float
    client_port: int | None = None
    subject: str | None = None  # the CN the gateway presented
    error: str | None = None
    ended: float | None = None


def _common_name(cert: dict[str, object] | None) -> str:
    assert cert is not None
    for rdn in cert["subject"]:  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def connect_once(
    port: int, context: ssl.SSLContext, attempt: Attempt, timeout: float = 10.0
) -> None:
    """Fills in `attempt`: a whole connection through the gateway to the
    echo upstream. The client port is noted as soon as TCP connects."""
    message = f"ping {attempt.started:.6f}\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            attempt.client_port = raw.getsockname()[1]
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                attempt.subject = _common_name(tls.getpeercert())
                echo_exactly(tls, message)
    except (OSError, EOFError) as err:
        attempt.error = repr(err)
    attempt.ended = time.monotonic()


class NewConnections:
    """`threads` clients, each making whole connections one after another
    (see `connect_once`) until stopped; bounded by `limit` connections
    per thread and `seconds`.

    Every attempt is kept in `attempts`, or with `keep_successes=False`
    (a long soak) only the failed ones, the others just counted.
    """

    def __init__(
        self,
        port: int,
        ca: Path,
        *,
        threads: int = 2,
        limit: int = 5000,
        seconds: float = 60.0,
        spacing: float = 0.005,
        keep_successes: bool = True,
    ) -> None:
        self.port = port
        self.context = client_context(ca)
        self.limit = limit
        self.seconds = seconds
        self.spacing = spacing
        self.keep_successes = keep_successes
        self.attempts: list[Attempt] = []
        self.succeeded = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"new-connections-{n}", daemon=True)
            for n in range(threads)
        ]

    def __enter__(self) -> NewConnections:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: self.succeeded or self.finished(), 10)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)
            assert not thread.is_alive(), "a client thread did not stop"

    def finished(self) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.ended is not None]

    def served_since(self, moment: float) -> int:
        return sum(1 for a in self.finished() if a.started > moment and a.error is None)

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for _ in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            attempt = Attempt(time.monotonic())
            connect_once(self.port, self.context, attempt)
            with self._lock:
                if attempt.error is None:
                    self.succeeded += 1
                if attempt.error is not None or self.keep_successes:
                    self.attempts.append(attempt)
            self._stop.wait(self.spacing)


class Burst:
    """Clients started one at a time, each in its own thread, each one
    whole connection (see `connect_once`) with a long timeout: what
    arrives while a worker is stopped or replaced."""

    def __init__(self, port: int, ca: Path, timeout: float = 20.0) -> None:
        self.port = port
        self.context = client_context(ca)
        self.timeout = timeout
        self.attempts: list[Attempt] = []
        self._threads: list[threading.Thread] = []

    def add(self) -> Attempt:
        """Starts one more client; returns once its TCP connect is done
        (the kernel queues it even when no worker accepts)."""
        attempt = Attempt(time.monotonic())
        thread = threading.Thread(
            target=connect_once,
            args=(self.port, self.context, attempt, self.timeout),
            daemon=True,
        )
        self.attempts.append(attempt)
        self._threads.append(thread)
        thread.start()
        wait_until(lambda: attempt.client_port is not None or attempt.ended is not None, 5)
        return attempt

    def join(self) -> list[Attempt]:
        deadline = time.monotonic() + self.timeout + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), "a burst client did not finish"
        return self.attempts


# Probing for refused connections.


class RefusalProbe:
    """Opens and closes a bare TCP connection every `interval` seconds,
    counting refusals: a port without any listener refuses. Bounded by
    `limit` probes and `seconds`."""

    def __init__(
        self, port: int, *, interval: float = 0.01, limit: int = 20000, seconds: float = 120.0
    ):
        self.port = port
        self.interval = interval
        self.limit = limit
        self.seconds = seconds
        self.probes = 0
        self.refused: list[float] = []
        self.other: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refusal-probe", daemon=True)

    def __enter__(self) -> RefusalProbe:
        self._thread.start()
        wait_until(lambda: self.probes > 0, 5)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the probe did not stop"

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for _ in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    pass
            except ConnectionRefusedError:
                self.refused.append(time.monotonic())
            except OSError as err:
                self.other.append(repr(err))
            self.probes += 1
            self._stop.wait(self.interval)


# Long transfers.


@dataclass
class Transfer:
    """One long echo transfer through the gateway, in its own thread:
    chunks out and back until told to finish (or out of budget), then a
    half-close and the rest of the echo. Byte-exact when `exact`."""

    port: int
    ca: Path
    chunk: int = 64 * KIB
    pause: float = 0.01
    max_chunks: int = 4000
    seconds: float = 60.0
    started: float = field(default_factory=time.monotonic)
    client_port: int | None = None
    error: str | None = None
    sent: int = 0
    received: int = 0
    exact: bool = False
    done: bool = False
    ended: float | None = None
    _finish: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self, wait: bool = True) -> Transfer:
        """Starts the thread; with `wait`, returns once a chunk came back."""
        self._thread = threading.Thread(target=self._run, name="transfer", daemon=True)
        self._thread.start()
        if wait:
            wait_until(lambda: self.received >= self.chunk or self.done, 10)
        return self

    def finish(self) -> None:
        """Asks for the end; returns once the transfer is over."""
        self._finish.set()
        self.join()

    def join(self) -> None:
        """Waits for the transfer to end by itself (its budget)."""
        assert self._thread is not None
        self._thread.join(self.seconds + 40)
        assert not self._thread.is_alive(), "a transfer did not end"

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        stream: TlsStream | None = None
        try:
            stream = TlsStream(self.port, self.ca)
            self.client_port = stream.sock.getsockname()[1]
            stream.handshake()
            for _ in range(self.max_chunks):
                if self._finish.is_set() or time.monotonic() > deadline:
                    break
                stream.send(os.urandom(self.chunk), timeout=10)
                stream.read_at_least(stream.sent, timeout=10)
                self.sent, self.received = stream.sent, stream.received
                self._finish.wait(self.pause)
            stream.close_write()
            stream.read_until_eof(timeout=20)
            self.sent, self.received = stream.sent, stream.received
            self.exact = (
                stream.received == stream.sent
                and stream.received_digest.digest() == stream.sent_digest.digest()
                and stream.clean_eof
            )
            if not self.exact:
                self.error = (
                    f"sent {stream.sent}, received {stream.received}, clean end {stream.clean_eof}"
                )
        except (OSError, EOFError) as err:
            self.error = repr(err)
        finally:
            if stream is not None:
                stream.close()
            self.ended = time.monotonic()
            self.done = True


class TransferLoop:
    """Long transfers one after another in a background thread, each of
    a random number of chunks (`smallest` to `largest`), until stopped;
    bounded by `limit` transfers and `seconds`."""

    def __init__(
        self,
        port: int,
        ca: Path,
        *,
        smallest: int = 16,
        largest: int = 128,
        limit: int = 2000,
        seconds: float = 120.0,
    ) -> None:
        self.port = port
        self.ca = ca
        self.sizes = (smallest, largest)
        self.limit = limit
        self.seconds = seconds
        self.transfers: list[Transfer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-loop", daemon=True)

    def __enter__(self) -> TransferLoop:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Lets the transfer under way finish, then starts no other."""
        self._stop.set()
        self._thread.join(self.seconds + 60)
        assert not self._thread.is_alive(), "the transfer loop did not stop"

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for _ in range(self.limit):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            chunks = random.randint(*self.sizes)
            transfer = Transfer(self.port, self.ca, chunk=32 * KIB, max_chunks=chunks)
            self.transfers.append(transfer)
            transfer.start(wait=False)
            transfer.join()


# A gateway under a descriptor limit.


class LimitedGateway(Gateway):
    """`spicegw run` started through `prlimit`, which sets the limit on
    itself and then executes the gateway (one PID, as with `exec`)."""

    def __init__(self, nofile: int, args: list[str], log: Path):
        command = [
            *("prlimit", f"--nofile={nofile}:{nofile}", "--"),
            *(sys.executable, "-m", "spicegw", "run", *args),
        ]
        # Skip Gateway.__init__, which would start a gateway without the limit.
        super(Gateway, self).__init__(command, log)
