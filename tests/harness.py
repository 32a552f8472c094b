"""Real processes for the tests: spicegw itself, upstream servers, and
certificates made for the occasion.

Nothing here is a mock. A `Gateway` is a `spicegw run` process with its
workers; an upstream is a separate Python process serving TCP; clients
are Python's ssl, curl and openssl.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spicegw import _pki

HERE = Path(__file__).resolve().parent
SERVERS = HERE / "servers"
FIXTURES = HERE / "fixtures"


def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> object:
    """Polls `condition` until it returns something true; fails loudly."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range.

    A port from the ephemeral range can be taken as the source port of
    some outgoing connection before the gateway binds it (on a machine
    where tests open thousands of short connections), and the gateway then
    refuses to start with "address already in use". No outgoing connection
    ever takes a port below the range.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low <= 12000:
        raise AssertionError(f"ephemeral range starts at {low}; no quiet ports to use")
    for _ in range(200):
        port = random.randrange(10000, low)
        with socket.socket() as probe:
            try:
                # No SO_REUSEADDR: a port with a TIME_WAIT left on it fails here.
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port found below the ephemeral range")


@dataclass(frozen=True)
class Pair:
    """A certificate and key on disk, with their CA."""

    cert: Path
    key: Path
    ca: Path
    issued: _pki.Issued

    @property
    def cert_pem(self) -> str:
        return self.cert.read_text()

    @property
    def key_pem(self) -> str:
        return self.key.read_text()


def tls_file_flags(cert: Path, key: Path) -> list[str]:
    """The flags that turn TLS on with a certificate and key from files."""
    return [
        *("--tls-enabled", "true"),
        *("--tls-certificate-file", str(cert)),
        *("--tls-key-file", str(key)),
    ]


def make_pair(
    folder: Path,
    ca: _pki.Issued,
    ca_path: Path,
    common_name: str = "localhost",
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    stem: str | None = None,
    client: bool = False,
) -> Pair:
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or common_name.replace(" ", "_")
    issued = _pki.issue(ca, common_name, names=names, client=client, server=not client)
    cert = folder / f"{stem}.pem"
    key = folder / f"{stem}.key"
    cert.write_bytes(issued.cert_pem())
    key.write_bytes(issued.key_pem())
    key.chmod(0o600)
    return Pair(cert, key, ca_path, issued)


class Process:
    """A child process whose output goes to a file, ended by PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            match = regex.search(self.text())
            if match is None and self.proc.poll() is not None:
                raise AssertionError(
                    f"process exited ({self.proc.returncode}) before logging "
                    f"{pattern!r}:\n{self.text()}"
                )
            return match

        result = wait_until(found, timeout)
        assert isinstance(result, re.Match)
        return result

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Ends the process and everything it started (its own session)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        else:
            # Workers of a supervisor that already exited die with it
            # (PR_SET_PDEATHSIG); make sure nothing of ours lingers.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


class Gateway(Process):
    """A running `spicegw run`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        super().__init__([sys.executable, "-m", "spicegw", "run", *args], log, env)

    def wait_ready(self, timeout: float = 20.0) -> list[int]:
        match = self.wait_for_log(r"(\d+) worker\(s\) ready \(pid ([\d, ]+)\)", timeout)
        return [int(pid) for pid in match.group(2).split(", ")]

    def worker_pids(self) -> list[int]:
        """Children of the supervisor, from /proc."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.pid:
                pids.append(int(entry.name))
        return sorted(pids)


def start_upstream(kind: str, port: int, log: Path, *extra: str) -> Process:
    """Starts tests/servers/<kind>_upstream.py on 127.0.0.1:port and
    waits until it accepts connections."""
    script = SERVERS / f"{kind}_upstream.py"
    proc = Process([sys.executable, str(script), str(port), *extra], log)
    try:
        wait_until(lambda: _accepts(port) or proc.proc.poll() is not None, 10)
        if proc.proc.poll() is not None:
            raise AssertionError(f"{script.name} exited:\n{proc.text()}")
    except BaseException:
        proc.stop()
        raise
    return proc


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def client_context(
    ca: Path,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


@contextlib.contextmanager
def tls_connect(
    port: int,
    ca: Path,
    server_name: str = "localhost",
    timeout: float = 10.0,
    **versions: ssl.TLSVersion,
) -> Iterator[ssl.SSLSocket]:
    context = client_context(ca, **versions)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            yield tls
    finally:
        raw.close()


def echo_exactly(tls: ssl.SSLSocket, message: bytes) -> None:
    """Sends `message` and reads as many bytes back; EOFError when the
    stream ends early or the echo differs."""
    tls.sendall(message)
    reply = b""
    while len(reply) < len(message):
        chunk = tls.recv(len(message) - len(reply))
        if not chunk:
            raise EOFError(f"the connection ended after {reply!r}")
        reply += chunk
    if reply != message:
        raise EOFError(f"the echo returned {reply!r}")


def served_subject(port: int, ca: Path) -> str:
    """The CN of the certificate the gateway presents now."""
    with tls_connect(port, ca) as tls:
        cert = tls.getpeercert()
    assert cert is not None
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise AssertionError(f"no CN in {cert}")


def http_get(port: int, ca: Path, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    """A whole HTTP/1.1 exchange over TLS; returns (status, body)."""
    with tls_connect(port, ca, timeout=timeout) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body
