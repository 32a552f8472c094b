"""The stage for the benchmarks: certificates, the upstream and the peers
under test, started per module and ended by PID; the summary printed and
written at the end of the session.

Run with: python -m pytest benches --benchmark-enable
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import knobs, stage
from .certs import Authority, ServerCert, make_ca, make_server_cert
from .plot import plot
from .report import Summary
from .stage import LOAD_CPU, PEER_NAMES, SERVER_CPU, PeerSet, Upstream

SUMMARY = pytest.StashKey[Summary]()

# The upstream must never see these: each means bytes went missing or
# were changed on the way through a peer.
UPSTREAM_DATA_ERRORS = ("sink_mismatch", "sink_short", "bad_request")


@pytest.fixture(scope="module")
def load_cpu() -> Iterator[None]:
    """Keeps this process, and every load process it starts, on LOAD_CPU
    while the module's tests run."""
    available = os.sched_getaffinity(0)
    if not {SERVER_CPU, LOAD_CPU} <= available:
        pytest.skip(f"needs CPUs {SERVER_CPU} and {LOAD_CPU}; this process may use {available}")
    with stage.pinned(LOAD_CPU):
        yield


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def authority(workdir: Path) -> Authority:
    return make_ca(workdir / "pki")


@pytest.fixture(scope="session")
def ecdsa_cert(workdir: Path, authority: Authority) -> ServerCert:
    """One ECDSA P-256 leaf for every peer."""
    return make_server_cert(workdir / "pki", authority, "ecdsa", "server-ecdsa")


@pytest.fixture(scope="session")
def rsa_cert(workdir: Path, authority: Authority) -> ServerCert:
    return make_server_cert(workdir / "pki", authority, "rsa", "server-rsa")


@pytest.fixture(scope="module")
def module_dir(workdir: Path, request: pytest.FixtureRequest) -> Path:
    folder = workdir / request.module.__name__.rpartition(".")[2]
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def upstream(load_cpu: None, module_dir: Path) -> Iterator[Upstream]:
    """spicegw-load serve, on the load core. When the module is done its
    report must show every byte of every sink arriving intact."""
    started = stage.start_upstream(module_dir / "upstream.log")
    yield started
    report = started.stop()
    assert report is not None, f"upstream wrote no report:\n{started.process.text()[-2000:]}"
    bad = {kind: report["failures"][kind] for kind in UPSTREAM_DATA_ERRORS}
    assert not any(bad.values()), f"upstream saw damaged transfers: {report}"


@pytest.fixture(scope="module")
def start_peers(
    load_cpu: None, upstream: Upstream, module_dir: Path
) -> Iterator[Callable[[ServerCert, int], PeerSet]]:
    """Starts the peers of SPICEGW_BENCH_PEERS with a certificate and a
    number of workers; all of them end with the module."""
    sets: list[PeerSet] = []

    def start(cert: ServerCert, workers: int) -> PeerSet:
        peers = stage.start_peers(knobs.PEERS, cert, upstream.port, module_dir, workers)
        sets.append(peers)
        for name in PEER_NAMES:
            if name not in knobs.PEERS:
                peers.skipped[name] = "left out by SPICEGW_BENCH_PEERS"
        return peers

    try:
        yield start
    finally:
        for peers in sets:
            peers.stop()


@pytest.fixture(scope="session")
def summary(pytestconfig: pytest.Config) -> Summary:
    """What the benchmarks found, printed at the end of the session."""
    found = pytestconfig.stash.setdefault(SUMMARY, Summary())
    if not found.notes:
        found.notes.extend(_session_notes())
    return found


def _version(args: list[str]) -> str:
    if shutil.which(args[0]) is None:
        return "not installed"
    result = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    said = (result.stdout + result.stderr).strip().splitlines()
    return said[0] if said else "unknown"


def _session_notes() -> list[str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    return [
        f"Machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}; servers on "
        f"CPU {SERVER_CPU}, load (spicegw-load), upstream and pytest on CPU {LOAD_CPU}.",
        f"Peers: {_version(['nginx', '-v'])}; {_version(['haproxy', '-v'])}; "
        f"{_version(['openssl', 'version'])}; Python {platform.python_version()}.",
        f"Knobs: {knobs.CONNECTIONS} connections x {knobs.ROUNDS} rounds, concurrency "
        f"{'/'.join(map(str, knobs.CONCURRENCY))}, bulk {knobs.BULK_BYTES:,} bytes x "
        f"{knobs.BULK_ROUNDS}, {knobs.IDLE_CONNECTIONS} idle connections, "
        f"{knobs.STORM_ROUNDS} storm(s) of {knobs.STORM_SECONDS:g} s.",
        "noise: the most any peer's server core spent outside the peer, as a share of the "
        "peer's own CPU (median of rounds). Absolute figures drift between runs on a shared "
        "machine; the ratios of peers measured side by side are the figures to read.",
    ]


def results_folder(config: pytest.Config) -> Path | None:
    """Where to write the summary: SPICEGW_BENCH_RESULTS, or benches/results
    for a real run (--benchmark-enable); None for a quick check."""
    if knobs.RESULTS:
        return Path(knobs.RESULTS)
    if config.getoption("benchmark_enable"):
        return knobs.DEFAULT_RESULTS
    return None


# Last, so the tables follow pytest-benchmark's own.
@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    found = config.stash.get(SUMMARY, None)
    if found is None or not found.figures:
        return
    terminalreporter.write_sep("=", "spicegw beside its peers (medians; ÷peer = spicegw / peer)")
    for line in found.text():
        terminalreporter.write_line(line)

    folder = results_folder(config)
    if folder is None:
        terminalreporter.write_line("(not written: a quick check; see benches/README.md)")
        return
    written = found.write(folder)
    png, why = plot(found, folder / "summary.png")
    if png is not None:
        written.append(png)
    terminalreporter.write_line("written: " + ", ".join(str(path) for path in written))
    if why:
        terminalreporter.write_line(f"no plot: {why}")
