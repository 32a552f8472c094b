"""Starting what the benchmarks measure: the upstream and the peers.

Two cores are split in two: the servers under test run on SERVER_CPU,
everything that makes load (clients, upstream, the pytest process) on
LOAD_CPU. A process inherits the CPU set of whoever starts it, so the
pytest process stays on LOAD_CPU while a benchmark runs and moves to
SERVER_CPU only while it starts a server; `start_peers` then checks every
thread of every server.

Each peer gets a folder of its own: its configuration (written for this
run from a template in benches/peers/), its log, and the certificate it
serves (`live.pem`, `live.key`, and both in one file,
`live.combined.pem`, for HAProxy). Rotating a certificate replaces those
files by rename and then does what the peer needs to notice: nothing for
spicegw (it polls), a SIGHUP to nginx's master (what `nginx -s reload`
sends), a SIGUSR2 to HAProxy's master (its master-worker reload).
Every process is started here, in a session of its own, and ended by
its PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import Gateway, Process, free_port, wait_until

from . import loadgen, procstat
from .certs import ServerCert

HERE = Path(__file__).resolve().parent
SERVER_CPU = 0
LOAD_CPU = 1

PEER_NAMES = ("spicegw", "nginx", "haproxy", "asyncio")

# The same cipher preference for every peer that lets us set it: spicegw
# puts AES-128-GCM first, so nginx and HAProxy are told to do the same.
# Python's ssl has no setting for TLS 1.3 suites; the asyncio peer takes
# the client's first choice (the reports name the suite each used).
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Log lines that deserve a look after a run, per peer. spicegw logs at
# warning level and above; the asyncio proxy only ever says `ready`.
NOTABLE = {
    "spicegw": re.compile(r"^\S+\s+(WARN|WARNING|ERROR|CRITICAL)\b.*$", re.MULTILINE),
    "nginx": re.compile(r"^.*\[(warn|error|crit|alert|emerg)\].*$", re.MULTILINE),
    "haproxy": re.compile(r"^.*\[(WARNING|ALERT)\].*$", re.MULTILINE),
    "asyncio": re.compile(r"^(?!ready$).+$", re.MULTILINE),
}

# The upstream stops by itself after this long, whatever happens.
UPSTREAM_MAX_SECONDS = 3600
# Idle connections wait for their first line for the whole hold.
UPSTREAM_STEP_SECONDS = 300


class UnavailableError(Exception):
    """A peer that cannot run on this machine, and why. It is skipped
    and the summary says so; nothing stands in for it."""


@dataclass
class Peer:
    """A server under test: where it listens and the root of its process
    tree (spicegw's supervisor, nginx's and HAProxy's masters)."""

    name: str
    port: int
    process: Process
    workers: int
    folder: Path
    # How it runs, in a few words, for the summary.
    shape: str
    # What makes it take a rotated certificate; None when nothing can.
    reload: Callable[[], None] | None = None
    reload_how: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return procstat.tree(self.pid)

    def alive(self) -> bool:
        return self.process.proc.poll() is None

    def notable_log_lines(self) -> list[str]:
        found = NOTABLE[self.name].finditer(self.process.text())
        return [match.group(0) for match in found]

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- {self.name} log ---\n{self.process.text()[-chars:]}"

    def rotate(self, cert: ServerCert) -> None:
        """Serves `cert` from now on, the way an operator would do it."""
        install(cert, self.folder)
        if self.reload is not None:
            self.reload()


@dataclass
class PeerSet:
    """The peers of one bench module, and those that could not start."""

    peers: dict[str, Peer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        for peer in reversed(list(self.peers.values())):
            peer.process.stop()


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


def _replace(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(data)
    temp.chmod(0o600)
    os.replace(temp, path)


def install(cert: ServerCert, folder: Path) -> None:
    """Puts `cert` in place of the peer's live files, each by rename: the
    key first, then the certificate, then the combined file."""
    chain, key = cert.cert.read_bytes(), cert.key.read_bytes()
    _replace(folder / "live.key", key)
    _replace(folder / "live.pem", chain)
    _replace(folder / "live.combined.pem", chain + key)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _wait_listening(proc: Process, port: int, name: str) -> None:
    wait_until(lambda: _accepts(port) or proc.proc.poll() is not None, timeout=15)
    if proc.proc.poll() is not None:
        raise AssertionError(f"{name} exited ({proc.proc.returncode}):\n{proc.text()}")


@dataclass
class Upstream:
    """`spicegw-load serve` on LOAD_CPU: the plain TCP upstream behind
    every peer (see rust/loadgen/src/serve.rs for what it answers)."""

    port: int
    process: Process

    def stop(self) -> dict[str, Any] | None:
        """Ends the upstream with SIGTERM and returns its report (None if
        it wrote none); SIGKILL to the session if it does not end."""
        self.process.signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.process.stop()
        for line in reversed(self.process.text().splitlines()):
            if line.startswith("{"):
                report: dict[str, Any] = json.loads(line)
                return report
        return None


def start_upstream(log: Path) -> Upstream:
    proc = Process(
        [
            str(loadgen.binary()),
            "serve",
            *options(
                {
                    "--listen": "127.0.0.1:0",
                    "--max-seconds": UPSTREAM_MAX_SECONDS,
                    "--timeout": UPSTREAM_STEP_SECONDS,
                }
            ),
        ],
        log,
    )
    try:
        match = proc.wait_for_log(r"serve: listening on 127\.0\.0\.1:(\d+)")
    except BaseException:
        proc.stop()
        raise
    return Upstream(int(match.group(1)), proc)


def start_spicegw(upstream: int, folder: Path, workers: int) -> Peer:
    """`spicegw run --workers N`, default settings otherwise."""
    port = free_port()
    with pinned(SERVER_CPU):
        gateway = Gateway(
            options(
                {
                    "--workers": workers,
                    "--tls-enabled": "true",
                    "--tls-certificate-file": folder / "live.pem",
                    "--tls-key-file": folder / "live.key",
                    "--http": f"127.0.0.1:{port}",
                    "--http-upstream": f"127.0.0.1:{upstream}",
                }
            ),
            folder / "spicegw.log",
        )
    try:
        ready = gateway.wait_ready()
        assert len(ready) == workers, ready
    except BaseException:
        gateway.stop()
        raise
    return Peer(
        "spicegw",
        port,
        gateway,
        workers,
        folder,
        shape=f"supervisor + {workers} worker process(es)",
        reload_how="new files renamed in; its 2 s poll picks them up",
    )


def start_asyncio(upstream: int, folder: Path, workers: int) -> Peer:
    """benches/peers/asyncio_proxy.py: one process, one event loop."""
    if workers != 1:
        raise UnavailableError(
            "one process, one event loop: no worker model, and OpenSSL's ticket "
            "keys live in that one process"
        )
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
                        "--certificate": folder / "live.pem",
                        "--key": folder / "live.key",
                    }
                ),
            ],
            folder / "asyncio.log",
        )
    try:
        proc.wait_for_log(r"(?m)^ready$")
    except BaseException:
        proc.stop()
        raise
    return Peer("asyncio", port, proc, 1, folder, shape="1 process")


def _render(template: str, target: Path, **values: object) -> None:
    """Writes `target` from benches/peers/`template`, every `${name}`
    filled in; the cipher settings are the same for every peer."""
    text = (HERE / "peers" / template).read_text()
    ciphers = {"tls12": TLS12_CIPHERS, "tls13": TLS13_SUITES}
    target.write_text(string.Template(text).substitute(ciphers, **values))


def _nginx_stream_module(nginx: str) -> str:
    """The `load_module` line nginx needs for `stream`, or "" when it is
    built in; UnavailableError when it has none."""
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10, check=False)
    flags = built.stderr + built.stdout
    if re.search(r"--with-stream(\s|$)", flags):
        return ""
    if "--with-stream=dynamic" not in flags:
        raise UnavailableError("nginx was built without the stream module")
    found = re.search(r"--modules-path=(\S+)", flags)
    module = Path(found.group(1) if found else "/usr/lib/nginx/modules") / "ngx_stream_module.so"
    if not module.is_file():
        raise UnavailableError(
            f"nginx has no stream module at {module} (Debian: install libnginx-mod-stream)"
        )
    return f"load_module {module};"


def start_nginx(upstream: int, folder: Path, workers: int) -> Peer:
    """nginx's stream module as a TLS-terminating TCP proxy: a master and
    N worker processes, each with its own SO_REUSEPORT listener."""
    nginx = shutil.which("nginx")
    if nginx is None:
        raise UnavailableError("nginx is not installed")
    port = free_port()
    conf = folder / "nginx.conf"
    module = _nginx_stream_module(nginx)
    _render(
        "nginx.conf.in",
        conf,
        load_module=module,
        workers=workers,
        folder=folder,
        port=port,
        upstream=upstream,
    )
    args = [nginx, "-p", str(folder), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
    with pinned(SERVER_CPU):
        proc = Process(args, folder / "nginx.log")
    try:
        _wait_listening(proc, port, "nginx")
        # Listening comes from the master; wait for the workers too.
        wait_until(lambda: len(procstat.tree(proc.pid)) == 1 + workers, timeout=10)
    except BaseException:
        proc.stop()
        raise

    def reload() -> None:
        proc.signal(signal.SIGHUP)

    return Peer(
        "nginx",
        port,
        proc,
        workers,
        folder,
        shape=f"master + {workers} worker process(es)",
        reload=reload,
        reload_how="new files renamed in, then SIGHUP to the master (nginx -s reload)",
    )


def start_haproxy(upstream: int, folder: Path, workers: int) -> Peer:
    """HAProxy in TCP mode, master-worker (`-W`) in the foreground
    (`-db`): one worker process with N threads, which share one set of
    ticket keys."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise UnavailableError("haproxy is not installed")
    port = free_port()
    conf = folder / "haproxy.cfg"
    _render("haproxy.cfg.in", conf, workers=workers, folder=folder, port=port, upstream=upstream)
    with pinned(SERVER_CPU):
        proc = Process([haproxy, "-W", "-db", "-f", str(conf)], folder / "haproxy.log")
    try:
        _wait_listening(proc, port, "haproxy")
    except BaseException:
        proc.stop()
        raise

    def reload() -> None:
        proc.signal(signal.SIGUSR2)

    return Peer(
        "haproxy",
        port,
        proc,
        workers,
        folder,
        shape=f"master + 1 worker process with {workers} thread(s)",
        reload=reload,
        reload_how="new file renamed in, then SIGUSR2 to the master (master-worker reload)",
    )


# What the bench modules' `start_peers` fixture hands them: start every
# chosen peer with this certificate and this many workers.
StartPeers = Callable[[ServerCert, int], PeerSet]

# Each starts one kind of peer serving the live files already in its
# folder, in front of the upstream's port, with this many workers.
STARTERS: dict[str, Callable[[int, Path, int], Peer]] = {
    "spicegw": start_spicegw,
    "nginx": start_nginx,
    "haproxy": start_haproxy,
    "asyncio": start_asyncio,
}


def start_peers(
    names: tuple[str, ...], cert: ServerCert, upstream: int, folder: Path, workers: int
) -> PeerSet:
    """Starts each named peer serving `cert` in front of `upstream`, on
    SERVER_CPU, and checks where their threads may run and what the first
    handshake negotiates. A peer that cannot run here is skipped."""
    started = PeerSet()
    try:
        for name in names:
            home = folder / f"{name}-{cert.kind}-{workers}w"
            home.mkdir(parents=True, exist_ok=True)
            install(cert, home)
            try:
                peer = STARTERS[name](upstream, home, workers)
            except UnavailableError as why:
                started.skipped[name] = str(why)
                continue
            started.peers[name] = peer

            cpus = procstat.affinity(peer.pids())
            assert cpus == {frozenset({SERVER_CPU})}, f"{name} threads may run on {cpus}"
            check_handshake(peer, cert)
    except BaseException:
        started.stop()
        raise
    return started


SIGNATURE = {"ecdsa": "ECDSA", "rsa": "RSA-PSS"}


def check_handshake(peer: Peer, cert: ServerCert) -> None:
    """`openssl s_client` once: TLS 1.3, X25519, the key's signature,
    and a chain that verifies. Python's ssl and the Rust client do not
    report the signature type; without openssl this goes unchecked."""
    if shutil.which("openssl") is None:
        return
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-brief",
            "-tls1_3",
            "-groups",
            "X25519",
            *options(
                {
                    "-connect": f"127.0.0.1:{peer.port}",
                    "-servername": "localhost",
                    "-CAfile": cert.ca,
                }
            ),
        ],
        input=b"",
        capture_output=True,
        timeout=10,
        check=False,
    )
    said = result.stderr.decode(errors="replace") + result.stdout.decode(errors="replace")
    for expected in ("TLSv1.3", "X25519", SIGNATURE[cert.kind], "Verification: OK"):
        assert expected in said, f"{peer.name}: no {expected!r} in\n{said}"
