"""Worker processes as the supervisor sees them: forking one, talking to
it over its pipe pair, and what it last said."""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

from . import _core

# Exit code of a worker whose Python side failed before Rust took over.
EXIT_CHILD_SETUP = 70


@dataclass
class Ack:
    generation: int
    fingerprint: str


@dataclass
class WorkerHandle:
    """One worker slot's current process and pipes.

    `to_fd` carries frames to the worker, `from_fd` brings its answers;
    both are non-blocking. Frames that did not fit into the pipe wait in
    `outbox`, so a slow worker never blocks the supervisor.
    """

    index: int
    pid: int
    to_fd: int
    from_fd: int
    started: float
    last_heard: float
    decoder: _core.FrameDecoder = field(default_factory=_core.FrameDecoder)
    outbox: bytearray = field(default_factory=bytearray)
    ready: bool = False
    stopping: bool = False
    killed_by_watchdog: bool = False
    fatal: str | None = None
    acks: dict[str, Ack] = field(default_factory=dict)
    stats: dict[str, object] = field(default_factory=dict)

    def queue(self, frame: bytes) -> None:
        self.outbox += frame

    def flush(self) -> bool:
        """Writes what the pipe takes; True when the outbox is empty.

        A worker that is gone or whose pipe is broken is handled when it is
        reaped; its frames are dropped here.
        """
        while self.outbox:
            try:
                written = os.write(self.to_fd, self.outbox)
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno in (errno.EPIPE, errno.EBADF):
                    self.outbox.clear()
                    return True
                raise
            del self.outbox[:written]
        return True

    def close(self) -> None:
        for fd in (self.to_fd, self.from_fd):
            try:
                os.close(fd)
            except OSError:
                pass  # Already closed after an earlier end of stream.
        self.outbox.clear()


def spawn(
    index: int,
    config_json: str,
    initial_frames: list[bytes],
    listeners: list[int],
) -> WorkerHandle:
    """Forks a worker that serves on `listeners` (one per endpoint). The
    caller must have no other thread running."""
    down_r, down_w = os.pipe2(os.O_CLOEXEC)
    up_r, up_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(config_json, down_r, up_w, listeners, parent)

    os.close(down_r)
    os.close(up_w)
    os.set_blocking(down_w, False)
    os.set_blocking(up_r, False)
    now = time.monotonic()
    handle = WorkerHandle(
        index=index,
        pid=pid,
        to_fd=down_w,
        from_fd=up_r,
        started=now,
        last_heard=now,
    )
    for frame in initial_frames:
        handle.queue(frame)
    handle.flush()
    return handle


def _child(
    config_json: str, pipe_in: int, pipe_out: int, listeners: list[int], parent: int
) -> NoReturn:
    """The forked worker: settle signals and descriptors, then hand the
    process to Rust for good."""
    code = EXIT_CHILD_SETUP
    try:
        signal.set_wakeup_fd(-1)
        # The supervisor coordinates shutdown: Ctrl-C reaches the whole
        # process group, but only the supervisor should act on it.
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_IGN)
        # SIGTERM sent to the worker itself (systemd signals the whole
        # group) makes the Rust side drain, like a Shutdown frame.
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        # No orphans: if the supervisor dies, so does the worker.
        if not _core.set_parent_death_signal(signal.SIGKILL, parent):
            os._exit(0)
        # A core dump of a worker would hold private keys.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _close_inherited(pipe_in, pipe_out, *listeners)
        code = _core.run_worker(config_json, pipe_in, pipe_out, listeners)
    except BaseException as err:  # noqa: BLE001 - the child must never return
        try:
            sys.stderr.write(f"spicegw worker: cannot start: {err}\n")
        finally:
            os._exit(code)
    os._exit(code)


def _close_inherited(*keep: int) -> None:
    """Closes every descriptor but stdio and `keep`: other slots'
    listeners, other workers' pipes, the supervisor's selector, and
    whatever the supervisor itself inherited, stay out of the worker.

    The open descriptors are listed from /proc rather than counted up to a
    limit: one inherited above the current soft limit is closed too.
    """
    wanted = {0, 1, 2, *keep}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in wanted:
            try:
                os.close(fd)
            except OSError:
                pass  # The listing's own descriptor, already closed.
