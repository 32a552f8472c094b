"""The stage for the benchmarks: a certificate, one upstream and the
peers under test, started once per module that asks for them and ended
by PID.

Run with: python -m pytest benches -q --benchmark-enable
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.harness import Pair, make_pair

from spicegw import _pki

from . import procstat, stage
from .report import Summary
from .stage import LOAD_CPU, SERVER_CPU, Peer

SUMMARY = pytest.StashKey[Summary]()


@pytest.fixture(scope="module")
def load_cpu() -> Iterator[None]:
    """Keeps this process, and every load process it starts, on LOAD_CPU
    while the module's tests run; other benchmarks keep both cores."""
    available = os.sched_getaffinity(0)
    if not {SERVER_CPU, LOAD_CPU} <= available:
        pytest.skip(f"needs CPUs {SERVER_CPU} and {LOAD_CPU}; this process may use {available}")
    with stage.pinned(LOAD_CPU):
        yield


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def server_pair(workdir: Path) -> Pair:
    """One ECDSA P-256 leaf for every peer, signed by a throwaway CA."""
    ca = _pki.make_ca("spicegw bench CA")
    ca_path = workdir / "ca.pem"
    ca_path.write_bytes(ca.cert_pem())
    return make_pair(workdir, ca, ca_path, stem="server")


@pytest.fixture(scope="module")
def upstream_port(load_cpu: None, workdir: Path) -> Iterator[int]:
    port, proc = stage.start_upstream(workdir / "upstream.log")
    try:
        yield port
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def peers(
    load_cpu: None, server_pair: Pair, upstream_port: int, workdir: Path
) -> Iterator[dict[str, Peer]]:
    """spicegw and the asyncio baseline side by side: same certificate,
    same upstream, both on SERVER_CPU."""
    started: list[Peer] = []
    try:
        started.append(stage.start_spicegw(server_pair, upstream_port, workdir / "spicegw.log"))
        started.append(stage.start_asyncio(server_pair, upstream_port, workdir / "asyncio.log"))

        for peer in started:
            cpus = procstat.affinity(peer.pids())
            assert cpus == {frozenset({SERVER_CPU})}, f"{peer.name} threads may run on {cpus}"

            # Without openssl the group goes unchecked; the rest still holds.
            if shutil.which("openssl"):
                handshake = stage.negotiated(peer.port, server_pair.ca)
                for expected in ("TLSv1.3", "X25519", "ECDSA", "Verification: OK"):
                    assert expected in handshake, f"{peer.name}: no {expected!r} in\n{handshake}"

        yield {peer.name: peer for peer in started}
    finally:
        for peer in reversed(started):
            peer.process.stop()


@pytest.fixture(scope="session")
def summary(pytestconfig: pytest.Config) -> Summary:
    """What the benchmarks found, printed at the end of the session."""
    return pytestconfig.stash.setdefault(SUMMARY, Summary())


# Last, so the table follows pytest-benchmark's own.
@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    found = config.stash.get(SUMMARY, None)
    if found is None or not found.peers:
        return
    terminalreporter.write_sep("=", "server CPU per connection (median of rounds)")
    for line in found.table():
        terminalreporter.write_line(line)
