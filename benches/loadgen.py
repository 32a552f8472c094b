"""The Rust load client, `spicegw-load`, for the benchmarks.

The client is the workspace member `rust/loadgen`. `binary()` builds it
with cargo (a no-op when it is up to date, a rebuild when a source
changed) and returns its path; `run()` runs one bounded load and returns
the parsed JSON report; `start()` and `finish()` do the same in two
steps, for a bench that measures the server while the load runs (an
`idle` run says on stderr when its connections are open, see
`wait_holding()`).

A session fixture, `loadgen_binary`, is defined here for test modules
that import it.
"""

from __future__ import annotations

import functools
import json
import re
import resource
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKSPACE = ROOT / "rust"
BINARY = WORKSPACE / "target" / "release" / "spicegw-load"

# A build from nothing takes about half a minute on two cores.
BUILD_TIMEOUT = 900.0

# How long past its own --max-seconds a run may take before it is ended
# by PID: the connections in flight at the deadline finish their steps
# (each bounded by --timeout), then the report is written.
GRACE_SECONDS = 30.0

# `idle` writes this line to stderr once its connections are open.
HOLDING = re.compile(r"^idle: (\d+) connections established", re.MULTILINE)


class LoadgenError(RuntimeError):
    """The client could not be built, or a run ended without a report."""


@functools.cache
def binary() -> Path:
    """Builds `spicegw-load` from the locked workspace; returns its path."""
    cargo = shutil.which("cargo")
    if cargo is None:
        raise LoadgenError("cargo is not on PATH; cannot build spicegw-load")
    result = subprocess.run(
        [cargo, "build", "--release", "-p", "spicegw-loadgen", "--locked"],
        cwd=WORKSPACE,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if result.returncode != 0 or not BINARY.is_file():
        raise LoadgenError(f"cargo build of spicegw-loadgen failed:\n{result.stderr}")
    return BINARY


@pytest.fixture(scope="session")
def loadgen_binary() -> Path:
    return binary()


def command(
    mode: str,
    port: int,
    ca: Path,
    *,
    connections: int | None = None,
    concurrency: int = 1,
    threads: int = 1,
    max_seconds: float = 60.0,
    timeout: float = 10.0,
    **options: object,
) -> list[str]:
    """The command line of one run against 127.0.0.1:`port`.

    Further options are given by name with underscores (`expect_prefix="OK"`
    becomes `--expect-prefix OK`); True stands for a bare switch (`echo=True`
    is `--echo`), and None or False leaves the option out.
    """
    args = [
        str(binary()),
        mode,
        "--target",
        f"127.0.0.1:{port}",
        "--ca",
        str(ca),
        "--concurrency",
        str(concurrency),
        "--threads",
        str(threads),
        "--max-seconds",
        str(max_seconds),
        "--timeout",
        str(timeout),
    ]
    if connections is not None:
        args += ["--connections", str(connections)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def start(mode: str, port: int, ca: Path, **kwargs: Any) -> subprocess.Popen[str]:
    """Starts a run; the process inherits this one's CPU affinity.

    Idle runs need a descriptor per connection: the soft limit is raised
    to the hard one first (in this process, so the child inherits it).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return subprocess.Popen(
        command(mode, port, ca, **kwargs),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_holding(proc: subprocess.Popen[str], timeout: float) -> int:
    """For an `idle` run: waits until its connections are open and
    returns how many are. Reads stderr, which holds nothing else until
    the run ends."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stderr], [], [], left)
        if not readable:
            break
        line = proc.stderr.readline()
        if not line:
            break  # The run ended without opening its connections.
        seen += line
        if match := HOLDING.search(line):
            return int(match.group(1))
    raise LoadgenError(f"idle run did not report its connections open:\n{seen}")


def finish(proc: subprocess.Popen[str], max_seconds: float) -> dict[str, Any]:
    """Waits for a started run and returns its report. Exit status 1 (some
    connections failed) still returns the report: its counts say why."""
    try:
        stdout, stderr = proc.communicate(timeout=max_seconds + GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LoadgenError(f"spicegw-load ran past {max_seconds} s and was ended") from None
    if proc.returncode not in (0, 1):
        raise LoadgenError(f"spicegw-load exited {proc.returncode}:\n{stderr}")
    try:
        report: dict[str, Any] = json.loads(stdout)
    except json.JSONDecodeError:
        raise LoadgenError(f"spicegw-load wrote no report:\n{stdout}\n{stderr}") from None
    report["exit_code"] = proc.returncode
    return report


def run(mode: str, port: int, ca: Path, **kwargs: Any) -> dict[str, Any]:
    """One run to its end; the parsed report, with `exit_code` added.

    Example: `run("connect", port, ca, connections=4000, concurrency=8,
    expect_prefix="OK ")`.
    """
    proc = start(mode, port, ca, **kwargs)
    return finish(proc, float(kwargs.get("max_seconds", 60.0)))
