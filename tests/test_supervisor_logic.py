"""Unit tests of the supervisor's decisions about dying workers, driven
with stand-in worker handles (no fork): the paths that real processes
reach only by racing signals."""

from __future__ import annotations

import signal
import time

import pytest

from spicegw import supervisor as supervisor_module
from spicegw._addresses import ListenAddress
from spicegw._settings import Endpoint, Settings
from spicegw._workers import WorkerHandle
from spicegw.errors import EXIT_WORKERS_FAILED
from spicegw.supervisor import Supervisor

KILLED = -signal.SIGKILL


@pytest.fixture
def supervisor() -> Supervisor:
    endpoint = Endpoint("http", ListenAddress("127.0.0.1", 1), None, None)
    return Supervisor(Settings(endpoints=(endpoint,), workers=1), {})


def _worker(sup: Supervisor, pid: int, *, ready: bool, age: float = 0.0) -> WorkerHandle:
    """A handle as if slot 0 had been forked `age` seconds ago."""
    started = time.monotonic() - age
    handle = WorkerHandle(
        index=0, pid=pid, to_fd=-1, from_fd=-1, started=started, last_heard=started
    )
    handle.ready = ready
    sup._workers[0] = handle
    sup._by_pid[pid] = handle
    return handle


def _delay(sup: Supervisor) -> float:
    return sup._respawn_at[0] - time.monotonic()


def test_deaths_before_ready_stop_the_supervisor_after_the_fifth(supervisor):
    for attempt in range(1, supervisor_module.MAX_BOOT_FAILURES):
        supervisor._on_exit(_worker(supervisor, 100 + attempt, ready=False), KILLED)
        assert supervisor._state == "starting", attempt
        assert 0 in supervisor._respawn_at
    supervisor._on_exit(_worker(supervisor, 200, ready=False), KILLED)
    assert supervisor._state == "draining"
    assert supervisor._exit_code == EXIT_WORKERS_FAILED
    assert supervisor._respawn_at == {}


def test_a_worker_that_cannot_boot_stops_the_supervisor_at_once(supervisor):
    handle = _worker(supervisor, 300, ready=False)
    handle.fatal = "cannot use the listening socket"
    supervisor._on_exit(handle, 3)
    assert supervisor._state == "draining"
    assert supervisor._exit_code == EXIT_WORKERS_FAILED


def test_quick_deaths_back_off_doubling_and_a_long_life_resets(supervisor):
    supervisor._state = "running"
    delays = []
    for pid in range(400, 408):
        supervisor._on_exit(_worker(supervisor, pid, ready=True, age=1.0), KILLED)
        delays.append(_delay(supervisor))
    expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert delays == pytest.approx(expected, abs=0.05)

    # A worker that served for a while dies: replaced at once.
    supervisor._on_exit(_worker(supervisor, 500, ready=True, age=60.0), KILLED)
    assert _delay(supervisor) == pytest.approx(0.0, abs=0.05)
    assert supervisor.restarts == 9
