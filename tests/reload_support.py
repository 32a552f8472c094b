"""Helpers for the certificate reload tests: a gateway with 2 workers on
files the test owns, its counters, status and log, and a client that
keeps handshaking while the files change.

Every wait here polls a condition against a deadline. The only sleeps
are the pacing of the handshake loop and of the counter checks.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .harness import (
    Gateway,
    Process,
    client_context,
    free_port,
    http_get,
    start_upstream,
    tls_connect,
    wait_until,
)
from .proc_sockets import ESTABLISHED, socket_inodes
from .rotation_files import key_body_lines, put, put_all, rewrite

# The tests have the gateway poll its files this often.
POLL = "200ms"
# How long a rotation may take to be served (the promise).
SERVED_WITHIN = 5.0
# A refused content must stay counted once over this many seconds
# (three polls at least).
STEADY = 0.7

RESULTS = ("ok", "io_error", "parse_error")
# The reason logged for a key that does not belong to the certificate,
# the state between the two renames of a new pair.
MISMATCH = "does not match"


# Ports.


def quiet_port() -> int:
    """A port no outgoing connection can take (see harness.free_port)."""
    return free_port()


# Reading what the gateway presents.


def common_name(cert: Mapping[str, Any] | None) -> str:
    """The CN out of `SSLSocket.getpeercert()`."""
    assert cert is not None, "the server sent no certificate"
    for rdn in cert["subject"]:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise AssertionError(f"no CN in {cert}")


# A client that keeps handshaking.


class HandshakeLoop:
    """Full TLS handshakes against the gateway, one after another, in a
    background thread, until stopped or out of budget (count and time).

    Records the CN each handshake saw (`seen`, with the start time) and
    every failure (`failures`). `exhausted` is set when the budget ran
    out before `stop()`: then the loop did not cover the whole change.
    """

    def __init__(
        self,
        port: int,
        ca: Path,
        *,
        limit: int = 3000,
        seconds: float = 45.0,
        spacing: float = 0.01,
        minimum: ssl.TLSVersion | None = None,
    ):
        self.port = port
        self.context = client_context(ca, minimum=minimum)
        self.limit = limit
        self.seconds = seconds
        self.spacing = spacing
        self.seen: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.exhausted = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="handshake-loop", daemon=True)

    def __enter__(self) -> HandshakeLoop:
        self._thread.start()
        wait_until(lambda: self.seen or self.failures or not self._thread.is_alive(), 10)
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
        self._thread.join(15)
        assert not self._thread.is_alive(), "the handshake loop did not stop"

    @property
    def subjects(self) -> list[str]:
        """The CNs seen, in order of first appearance."""
        return list(dict.fromkeys(cn for _, cn in self.seen))

    def since(self, moment: float) -> list[str]:
        """CNs of the handshakes that started after `moment`."""
        return [cn for started, cn in self.seen if started >= moment]

    def check(self, *expected: str) -> None:
        """No handshake failed, the loop ran through the change, and it saw
        exactly the `expected` CNs, the first one first."""
        # The loop itself makes a few handshakes on the final pair before
        # it stops, so it covers the whole change.
        wait_until(
            lambda: (
                [cn for _, cn in self.seen[-3:]] == [expected[-1]] * 3
                or self.failures
                or not self._thread.is_alive()
            ),
            SERVED_WITHIN,
        )
        self.stop()
        assert self.failures == [], f"{len(self.failures)} handshake(s) failed: {self.failures[:5]}"
        assert not self.exhausted, "the handshake loop ran out of budget before the change ended"
        assert self.seen, "no handshake was made"
        assert self.subjects[0] == expected[0], self.subjects
        assert sorted(self.subjects) == sorted(expected), self.subjects

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for _ in range(self.limit):
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                break
            started = time.monotonic()
            try:
                self.seen.append((started, self._handshake()))
            except OSError as err:
                self.failures.append(f"{time.monotonic() - started:.3f}s: {err!r}")
            self._stop.wait(self.spacing)
        self.exhausted = not self._stop.is_set()

    def _handshake(self) -> str:
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            self.context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return common_name(tls.getpeercert())


def server_side_owner(port: int, client_port: int, gw: Gateway) -> int | None:
    """Which worker of `gw` holds the gateway's end (local `port`) of the
    connection a client opened from `client_port`, read from /proc."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rsplit(":", 1)[1], 16)
        remote = int(fields[2].rsplit(":", 1)[1], 16)
        if (local, remote, fields[3]) == (port, client_port, ESTABLISHED):
            inodes.add(int(fields[9]))
    for pid in gw.worker_pids():
        if inodes & socket_inodes(pid):
            return pid
    return None


# A gateway on files the test owns.


_RELOAD_LINE = re.compile(r"^runtime_tls_reload_total\{([^}]*)\} (\S+)$", re.MULTILINE)


@dataclass
class Live:
    """A running gateway with 2 workers and the files it serves."""

    gw: Gateway
    port: int  # the TLS endpoint, relayed to the echo upstream
    metrics: int  # the status service (/metrics, /v1/tls, /v1/reload)
    ca: Path  # what clients trust
    cert: Path | None
    key: Path | None
    secrets: list[bytes] = field(default_factory=list)

    # What is served.

    def subject(self, ca: Path | None = None, minimum: ssl.TLSVersion | None = None) -> str:
        trust = ca or self.ca
        if minimum is None:
            connection = tls_connect(self.port, trust)
        else:
            connection = tls_connect(self.port, trust, minimum=minimum)
        with connection as tls:
            return common_name(tls.getpeercert())

    def wait_subject(self, expected: str, timeout: float = SERVED_WITHIN) -> float:
        """Waits until new handshakes see `expected`; returns how long it took."""
        began = time.monotonic()
        wait_until(lambda: self.subject() == expected, timeout, interval=0.05)
        return time.monotonic() - began

    def tls_status(self) -> dict[str, object]:
        status, body = http_get(self.metrics, self.ca, "/v1/tls")
        assert status == 200, body
        value = json.loads(body)
        assert isinstance(value, dict)
        return value

    def scope(self) -> dict[str, object]:
        scopes = self.tls_status()["scopes"]
        assert isinstance(scopes, dict)
        public = scopes["public"]
        assert isinstance(public, dict)
        return public

    def wait_converged(self, fingerprint: str, timeout: float = SERVED_WITHIN) -> int:
        """Waits until every worker acknowledges `fingerprint` at the
        scope's current generation; returns that generation."""

        def converged() -> int | None:
            scope = self.scope()
            workers = scope["workers"]
            assert isinstance(workers, list)
            if scope["fingerprint"] != fingerprint or len(workers) != 2:
                return None
            for worker in workers:
                if worker["generation"] != scope["generation"]:
                    return None
                if worker["fingerprint"] != fingerprint:
                    return None
            generation = scope["generation"]
            assert isinstance(generation, int)
            return generation

        result = wait_until(converged, timeout, interval=0.05)
        assert isinstance(result, int)
        return result

    # Counters.

    def metrics_text(self) -> str:
        status, body = http_get(self.metrics, self.ca, "/metrics")
        assert status == 200, body
        return body.decode()

    def counts(self, scope: str = "public") -> dict[str, int]:
        counts = {}
        for labels, value in _RELOAD_LINE.findall(self.metrics_text()):
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            if pairs.get("scope") == scope:
                counts[pairs["result"]] = int(float(value))
        return counts

    def wait_counts(
        self,
        timeout: float = SERVED_WITHIN,
        transient: tuple[str, ...] = (),
        **expected: int,
    ) -> None:
        """Waits until the reload counters are `expected` (results not named
        are 0), then checks that they stay there for a few more polls.

        `transient` lists the reasons of states that exist only for
        microseconds, between two file operations made back to back
        (`put_all`). A poll that lands there judges that state like any
        other: one parse_error and one log line with that reason. Each
        such line found in the log adds one to the parse_error expected.
        """
        want: dict[str, int] = {}
        last: dict[str, int] = {}

        def reached() -> bool:
            nonlocal want, last
            extra = sum(
                1 for line in self.refusals() if any(reason in line for reason in transient)
            )
            want = {result: expected.get(result, 0) for result in RESULTS}
            want["parse_error"] += extra
            last = self.counts()
            return last == want

        try:
            wait_until(reached, timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"reload counters {last}, expected {want}") from None
        self.hold_counts(want)

    def hold_counts(self, want: dict[str, int], seconds: float = STEADY) -> None:
        """The counters stay at `want` while the poller runs a few times."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            now = self.counts()
            assert now == want, f"reload counters moved to {now}, expected to stay {want}"
            time.sleep(0.1)

    def force_check(self) -> dict[str, object]:
        """POST /v1/reload: one check now; the answer for the public scope."""
        status, body = _post(self.metrics, self.ca, "/v1/reload")
        assert status == 200, body
        scopes = json.loads(body)["scopes"]
        assert isinstance(scopes, dict)
        public = scopes["public"]
        assert isinstance(public, dict)
        return public

    # The log.

    def log(self) -> str:
        return self.gw.text()

    def refusals(self) -> list[str]:
        """The ERROR lines that report a refused or unreadable change."""
        lines = self.log().splitlines()
        return [line for line in lines if " ERROR " in line and "not reloaded" in line]

    def check_refusal(self, result: str, *needles: str, index: int = -1) -> str:
        """The refusal line at `index` reports `result` and says each needle
        (the file, the reason); returns it."""
        lines = self.refusals()
        assert lines, f"no refusal logged:\n{self.log()}"
        line = lines[index]
        assert f"({result})" in line, line
        for needle in needles:
            assert needle in line, f"{needle!r} not in {line!r}"
        return line

    def assert_log_clean(self) -> None:
        check_no_key_material(self.log(), self.secrets)

    # Changing the files.

    def put(self, path: Path, data: bytes) -> None:
        self._remember(data)
        put(path, data)

    def put_all(self, *changes: tuple[Path, bytes]) -> None:
        for _, data in changes:
            self._remember(data)
        put_all(*changes)

    def rewrite(self, path: Path, data: bytes) -> None:
        self._remember(data)
        rewrite(path, data)

    def _remember(self, data: bytes) -> None:
        if b"PRIVATE KEY" in data:
            self.secrets.append(data)


def check_no_key_material(text: str, secrets: list[bytes]) -> None:
    assert "PRIVATE KEY" not in text, "a private key header reached the log"
    for secret in secrets:
        for line in key_body_lines(secret):
            assert line not in text, "a base64 line of a private key reached the log"


def _post(port: int, ca: Path, path: str) -> tuple[int, bytes]:
    with tls_connect(port, ca) as tls:
        tls.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = bytearray()
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@dataclass
class Exit:
    """How a gateway that refused to start ended."""

    code: int
    text: str

    def error_line(self) -> str:
        lines = [line for line in self.text.splitlines() if line.startswith("spicegw: error:")]
        assert len(lines) == 1, f"expected one error line:\n{self.text}"
        return lines[0]


class Rig:
    """Starts gateways for one test: an echo upstream shared by them,
    quiet ports, the reload tests' flags; checks every gateway's log for
    key material at the end."""

    def __init__(self, start: Callable[..., Gateway], processes: list[Process], folder: Path):
        self._start = start
        self._processes = processes
        self.folder = folder
        self._upstream: int | None = None
        self.started: list[Live] = []

    @property
    def upstream(self) -> int:
        if self._upstream is None:
            port = quiet_port()
            self._processes.append(start_upstream("echo", port, self.folder / "echo.log"))
            self._upstream = port
        return self._upstream

    def files(self, cert: bytes, key: bytes, name: str = "live") -> tuple[Path, Path]:
        """A fresh folder holding cert.pem and key.pem."""
        folder = self.folder / name
        folder.mkdir()
        (folder / "cert.pem").write_bytes(cert)
        (folder / "key.pem").write_bytes(key)
        return folder / "cert.pem", folder / "key.pem"

    def start(
        self,
        cert: Path,
        key: Path,
        ca: Path,
        *extra: str,
        poll: str = POLL,
    ) -> Live:
        args = ["--tls-certificate-file", str(cert), "--tls-key-file", str(key)]
        live = self._launch(args, ca, extra, poll)
        live.cert, live.key = cert, key
        live.secrets.append(key.read_bytes())
        return live

    def start_inline(self, cert_pem: str, key_pem: str, ca: Path, *extra: str) -> Live:
        live = self._launch(["--tls-certificate", cert_pem, "--tls-key", key_pem], ca, extra, POLL)
        live.secrets.append(key_pem.encode())
        return live

    def refused(self, *tls: str, timeout: float = 20.0) -> Exit:
        """Runs a gateway that must fail at startup; returns its exit."""
        gw = self._start(*self._flags(list(tls), POLL)[0], ready=False)
        try:
            code = gw.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the gateway did not exit:\n{gw.text()}") from None
        return Exit(code, gw.text())

    def check_logs(self) -> None:
        for live in self.started:
            live.assert_log_clean()

    def _launch(self, tls: list[str], ca: Path, extra: tuple[str, ...], poll: str) -> Live:
        flags, port, metrics = self._flags(tls, poll)
        live = Live(self._start(*flags, *extra), port, metrics, ca, None, None)
        self.started.append(live)
        return live

    def _flags(self, tls: list[str], poll: str) -> tuple[list[str], int, int]:
        """`spicegw run` flags for 2 workers, an endpoint relayed to the
        echo upstream and the status service; with the endpoint's port
        and the status port."""
        port, metrics = quiet_port(), quiet_port()
        flags = [
            *("--workers", "2", "--tls-enabled", "true", *tls),
            *("--http", f"127.0.0.1:{port}", "--http-upstream", f"127.0.0.1:{self.upstream}"),
            *("--metrics", f"127.0.0.1:{metrics}", "--tls-poll-interval", poll),
        ]
        return flags, port, metrics


def reload_command(live: Live) -> subprocess.CompletedProcess[str]:
    """`spicegw reload` against `live`, verifying it with its CA."""
    command = [
        *(sys.executable, "-m", "spicegw", "reload"),
        *("--endpoint", f"https://localhost:{live.metrics}"),
        *("--tls-root-certificate-file", str(live.ca)),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@contextlib.contextmanager
def echo_connection(live: Live) -> Iterator[ssl.SSLSocket]:
    """A TLS connection through the gateway to the echo upstream, proven
    to carry data before it is handed out."""
    with tls_connect(live.port, live.ca) as tls:
        assert_echoes(tls, b"before the change\n")
        yield tls


def assert_echoes(tls: ssl.SSLSocket, message: bytes) -> None:
    tls.sendall(message)
    data = b""
    while len(data) < len(message):
        chunk = tls.recv(65536)
        assert chunk, "the connection ended"
        data += chunk
    assert data == message
