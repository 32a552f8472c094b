"""CPU time and memory of process trees, read from /proc.

The figures are server CPU per connection or per byte, so the bench needs
the user + system time of a server and everything it forked, and the
resident memory of the same tree.

Two sources of CPU time, combined by `cpu_seconds()`:

- `/proc/<pid>/task/<tid>/schedstat`: each thread's time on a CPU, in
  nanoseconds. This is the kernel's own running total; the user and
  system times of `stat` are this total split in two. Threads that exit
  take their time with them, so it serves only while the tree keeps its
  processes and threads.
- `/proc/<pid>/stat`: utime + stime, and cutime + cstime for children
  already reaped, in clock ticks (10 ms here). Coarse, but it keeps the
  time of processes that ended (a reload replaces workers), so it serves
  when the tree changed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICK_SECONDS = 1.0 / os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str]:
    """Fields after the command name, which may itself hold spaces or
    parentheses: fields[0] is the state, [1] the parent, [11] utime, [12]
    stime, [13] cutime and [14] cstime (proc(5) numbers them 3, 4 and 14
    to 17)."""
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


def threads(pid: int) -> list[int]:
    return sorted(int(task.name) for task in (PROC / str(pid) / "task").iterdir())


@dataclass(frozen=True)
class CpuSample:
    """CPU time of a process tree at one moment."""

    # Per process: the sum of its live threads' nanoseconds on a CPU.
    ns: dict[int, int]
    # Per process: the tick counts utime + stime + cutime + cstime.
    ticks: dict[int, int]
    threads: dict[int, frozenset[int]]


def sample(pids: list[int]) -> CpuSample:
    """Reads the CPU time of `pids`; a process that exits meanwhile is
    left out, which `cpu_seconds` notices."""
    ns: dict[int, int] = {}
    ticks: dict[int, int] = {}
    tids: dict[int, frozenset[int]] = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            found = threads(pid)
            total = 0
            for tid in found:
                text = (PROC / str(pid) / "task" / str(tid) / "schedstat").read_text()
                total += int(text.split()[0])
        except (OSError, IndexError):
            continue
        ticks[pid] = sum(int(value) for value in fields[11:15])
        ns[pid] = total
        tids[pid] = frozenset(found)
    return CpuSample(ns, ticks, tids)


@dataclass(frozen=True)
class CpuDelta:
    seconds: float
    # False when a process or thread came or went: the figure (or that
    # process's part of it) then comes from clock ticks, exact to 10 ms
    # per process, and the time a process used after the first sample and
    # before it was reaped by a process outside the tree is lost.
    precise: bool


def cpu_seconds(before: CpuSample, after: CpuSample) -> CpuDelta:
    """CPU time the tree used between two samples."""
    if before.threads == after.threads:
        seconds = 0.0
        precise = True
        for pid in after.ns:
            ns = (after.ns[pid] - before.ns[pid]) / 1e9
            ticks = (after.ticks[pid] - before.ticks[pid]) * TICK_SECONDS
            # A thread or child that came and went between the samples is
            # in the ticks only; two ticks of slack cover their rounding.
            if ticks > ns + 2 * TICK_SECONDS:
                seconds += ticks
                precise = False
            else:
                seconds += ns
        return CpuDelta(seconds, precise)
    # New processes count from zero; their whole life falls inside. A
    # process that ended was reaped by its parent with all its time, the
    # part before the first sample included: that part comes off again.
    total = sum(ticks - before.ticks.get(pid, 0) for pid, ticks in after.ticks.items())
    total -= sum(ticks for pid, ticks in before.ticks.items() if pid not in after.ticks)
    return CpuDelta(total * TICK_SECONDS, False)


def cpu_ns(pids: list[int]) -> int:
    return sum(sample(pids).ns.values())


def cpu_busy_ticks(cpu: int) -> int:
    """Ticks `cpu` spent on anything but idling, from /proc/stat: every
    process, interrupts and softirqs alike."""
    for line in (PROC / "stat").read_text().splitlines():
        name, *counts = line.split()
        if name == f"cpu{cpu}":
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, counts[:8])
            return user + nice + system + irq + softirq + steal
    raise LookupError(f"cpu{cpu} not in /proc/stat")


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of `pids`, summed. Pages that forked processes
    share count once per process; the benches compare the same tree
    before and after, where that cancels out."""
    total = 0
    for pid in pids:
        try:
            resident = int((PROC / str(pid) / "statm").read_text().split()[1])
        except (OSError, IndexError):
            continue
        total += resident * PAGE_BYTES
    return total


def affinity(pids: list[int]) -> set[frozenset[int]]:
    """The distinct CPU sets the threads of `pids` may run on."""
    return {frozenset(os.sched_getaffinity(tid)) for pid in pids for tid in threads(pid)}


def wait_idle(
    pids: list[int], quiet: float = 0.1, share: float = 0.02, timeout: float = 3.0
) -> None:
    """Returns once `pids` used less than `share` of one CPU for `quiet`
    seconds, so the last connections' closing work is inside the
    measurement.

    Gives up silently after `timeout`: a server with a periodic timer may
    never be still, and the caller measures it either way.
    """
    deadline = time.monotonic() + timeout
    last = cpu_ns(pids)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cpu_ns(pids)
        if now - last < share * quiet * 1e9:
            return
        last = now
