"""Shared fixtures: a test CA, server certificates, upstream processes
and a factory for gateways. Every process a test starts is ended by PID
at teardown."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spicegw import _pki

from .harness import Gateway, Pair, Process, free_port, make_pair, start_upstream, tls_file_flags

# Files the tests write are private, as a careful operator's are: spicegw
# refuses a private key file that others may read.
os.umask(0o077)


@dataclass(frozen=True)
class CertAuthority:
    issued: _pki.Issued
    path: Path
    folder: Path

    def pair(self, common_name: str = "localhost", **kwargs: object) -> Pair:
        return make_pair(self.folder, self.issued, self.path, common_name, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    folder = tmp_path_factory.mktemp("pki")
    issued = _pki.make_ca("spicegw test CA", "spicegw tests")
    path = folder / "ca.pem"
    path.write_bytes(issued.cert_pem())
    return CertAuthority(issued, path, folder)


@pytest.fixture(scope="session")
def server_pair(ca: CertAuthority) -> Pair:
    return ca.pair("localhost", stem="server")


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def echo_port(processes: list[Process], tmp_path: Path) -> int:
    port = free_port()
    processes.append(start_upstream("echo", port, tmp_path / "echo.log"))
    return port


@pytest.fixture
def http_port(processes: list[Process], tmp_path: Path) -> int:
    port = free_port()
    processes.append(start_upstream("http", port, tmp_path / "http.log"))
    return port


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway(processes: list[Process], tmp_path: Path) -> GatewayFactory:
    """Starts `spicegw run ARGS…`; by default waits until it is ready."""
    count = 0

    def start(*args: str, ready: bool = True, env: dict[str, str] | None = None) -> Gateway:
        nonlocal count
        count += 1
        gw = Gateway(list(args), tmp_path / f"gateway-{count}.log", env)
        processes.append(gw)
        if ready:
            gw.wait_ready()
        return gw

    return start


@pytest.fixture
def tls_args(server_pair: Pair) -> list[str]:
    return tls_file_flags(server_pair.cert, server_pair.key)
