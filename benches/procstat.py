"""CPU time of process trees, read from /proc.

The figure of merit is server CPU per connection, so the bench needs the
user + system time of a server and everything it forked. `/proc/<pid>/stat`
gives both per process (all its threads included), in clock ticks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC = Path("/proc")
TICK_SECONDS = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields after the command name, which may itself hold spaces or
    parentheses: fields[0] is the state, [1] the parent, [11] utime and
    [12] stime (proc(5) numbers them 3, 4, 14 and 15)."""
    text = (PROC / str(pid) / "stat").read_text()
    return text.rsplit(")", 1)[1].split()


def tree(root: int) -> list[int]:
    """`root` and all its descendants alive now, parents first."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError):
            continue  # Exited while we looked.
        children.setdefault(parent, []).append(int(entry.name))

    found = [root]
    for pid in found:
        found.extend(sorted(children.get(pid, [])))
    return found


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime of each process, in clock ticks."""
    ticks = {}
    for pid in pids:
        fields = _stat_fields(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_busy_ticks(cpu: int) -> int:
    """Ticks `cpu` spent on anything but idling, from /proc/stat: every
    process, interrupts and softirqs alike."""
    for line in (PROC / "stat").read_text().splitlines():
        name, *counts = line.split()
        if name == f"cpu{cpu}":
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, counts[:8])
            return user + nice + system + irq + softirq + steal
    raise LookupError(f"cpu{cpu} not in /proc/stat")


def threads(pid: int) -> list[int]:
    return sorted(int(task.name) for task in (PROC / str(pid) / "task").iterdir())


def affinity(pids: list[int]) -> set[frozenset[int]]:
    """The distinct CPU sets the threads of `pids` may run on."""
    return {frozenset(os.sched_getaffinity(tid)) for pid in pids for tid in threads(pid)}


def wait_idle(pids: list[int], quiet: float = 0.1, timeout: float = 3.0) -> None:
    """Returns once `pids` used no CPU tick for `quiet` seconds, so the
    last connections' closing work is inside the measurement.

    Gives up silently after `timeout`: a server with a periodic timer may
    never be perfectly still, and the caller measures it either way.
    """
    deadline = time.monotonic() + timeout
    try:
        last = sum(cpu_ticks(pids).values())
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = sum(cpu_ticks(pids).values())
            if now == last:
                return
            last = now
    except FileNotFoundError:
        return  # A process is gone; the caller's check of the tree says so.
