"""Starting what the benchmarks measure: the upstream and the peers.

Two cores are split in two: the servers under test run on SERVER_CPU,
everything that makes load (clients, upstream, the pytest process) on
LOAD_CPU. A process inherits the CPU set of whoever starts it, so the
pytest process stays on LOAD_CPU while such a benchmark runs and moves
to SERVER_CPU only while it starts a server; the fixtures then check
every thread of every server.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.harness import Gateway, Pair, Process, free_port, wait_until

from . import procstat

HERE = Path(__file__).resolve().parent
SERVER_CPU = 0
LOAD_CPU = 1

# spicegw logs at warning level and above; the asyncio proxy only ever
# says `ready`, so any other line is asyncio reporting a problem.
SPICEGW_NOTABLE = re.compile(r"^\S+\s+(WARN|WARNING|ERROR|CRITICAL)\b.*$", re.MULTILINE)
ASYNCIO_NOTABLE = re.compile(r"^(?!ready$).+$", re.MULTILINE)


@dataclass(frozen=True)
class Peer:
    """A server under test: where it listens and the root of its process
    tree (for spicegw the supervisor; its workers are children)."""

    name: str
    port: int
    process: Process
    # Log lines that deserve a look after a run.
    notable: re.Pattern[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return procstat.tree(self.pid)

    def notable_log_lines(self) -> list[str]:
        return [match.group(0) for match in self.notable.finditer(self.process.text())]


def options(values: dict[str, object]) -> list[str]:
    """Command-line flags from {flag: value}, in order."""
    return [str(item) for pair in values.items() for item in pair]


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Runs the block, and whatever it starts, on `cpu` alone."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def start_upstream(log: Path) -> tuple[int, Process]:
    """benches/upstream.py on a free port, once it accepts connections."""
    port = free_port()
    proc = Process([sys.executable, str(HERE / "upstream.py"), str(port)], log)
    try:
        wait_until(lambda: _accepts(port) or proc.proc.poll() is not None)
        assert proc.proc.poll() is None, f"upstream exited:\n{proc.text()}"
    except BaseException:
        proc.stop()
        raise
    return port, proc


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def start_spicegw(pair: Pair, upstream: int, log: Path) -> Peer:
    """`spicegw run` with one worker, on SERVER_CPU, once it is ready."""
    port = free_port()
    with pinned(SERVER_CPU):
        gateway = Gateway(
            options(
                {
                    "--workers": 1,
                    "--tls-enabled": "true",
                    "--tls-certificate-file": pair.cert,
                    "--tls-key-file": pair.key,
                    "--http": f"127.0.0.1:{port}",
                    "--http-upstream": f"127.0.0.1:{upstream}",
                }
            ),
            log,
        )
    peer = Peer("spicegw", port, gateway, SPICEGW_NOTABLE)
    try:
        workers = gateway.wait_ready()
        assert len(workers) == 1, workers
        assert set(workers) <= set(peer.pids()), (workers, peer.pids())
    except BaseException:
        gateway.stop()
        raise
    return peer


def start_asyncio(pair: Pair, upstream: int, log: Path) -> Peer:
    """benches/peers/asyncio_proxy.py on SERVER_CPU, once it listens."""
    port = free_port()
    with pinned(SERVER_CPU):
        proc = Process(
            [
                sys.executable,
                str(HERE / "peers" / "asyncio_proxy.py"),
                *options(
                    {
                        "--listen": f"127.0.0.1:{port}",
                        "--upstream": f"127.0.0.1:{upstream}",
                        "--certificate": pair.cert,
                        "--key": pair.key,
                    }
                ),
            ],
            log,
        )
    try:
        proc.wait_for_log(r"(?m)^ready$")
    except BaseException:
        proc.stop()
        raise
    return Peer("asyncio", port, proc, ASYNCIO_NOTABLE)


def negotiated(port: int, ca: Path) -> str:
    """What `openssl s_client -brief` reports for one handshake: version,
    cipher, group and signature type. Python's ssl module does not tell
    the key exchange group, which the figure of merit fixes (X25519)."""
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-brief",
            "-tls1_3",
            *options(
                {
                    "-connect": f"127.0.0.1:{port}",
                    "-servername": "localhost",
                    "-CAfile": ca,
                }
            ),
        ],
        input=b"",
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.stderr.decode(errors="replace") + result.stdout.decode(errors="replace")
