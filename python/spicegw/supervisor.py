"""The supervisor: one Python process that forks the workers, feeds them
certificate bundles over pipes, replaces the ones that die, and drains
them on shutdown.

Everything happens in one thread, in one loop around a selector: signal
numbers arrive through the wakeup pipe, worker frames through their
pipes, status requests through the status socket. Signal handlers do
nothing but wake the loop.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import _core, _listeners, _workers
from ._metrics import GatewayView, Metrics
from ._protocol import Kind
from ._reload import OK, Change, ScopeWatch
from ._settings import Settings
from ._status import Response, StatusServer
from ._tickets import TicketKeyRing
from .certs import Material
from .errors import EXIT_OK, EXIT_WORKERS_FAILED

log = logging.getLogger("runtime")
tls_log = logging.getLogger("runtime.tls")

# A worker must say Ready this soon after it is forked.
BOOT_TIMEOUT = 30.0
# Liveness probes go out this often.
PING_INTERVAL = 1.0
# Consecutive deaths before Ready after which the supervisor gives up.
MAX_BOOT_FAILURES = 5
# A worker that lived this long resets its slot's failure count.
STABLE_AFTER = 10.0
# Respawn delays double from BACKOFF_FIRST up to BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
# After the drain deadline, workers get this long before SIGKILL.
KILL_GRACE = 2.0
# POST /v1/reload requests closer together than this are logged at debug.
RELOAD_REQUEST_INTERVAL = 1.0
# A gap this long between two turns of the loop means the supervisor was
# not running; worker silence over that gap is not held against them.
STALL = 3 * PING_INTERVAL


@dataclass
class Scope:
    """A certificate scope as currently served."""

    name: str
    material: Material
    generation: int
    frame: bytes  # the Bundle frame; holds the key, never logged
    watch: ScopeWatch | None  # None for inline material
    # When the served generation was accepted, until every worker has it.
    converging_since: float | None = None

    @property
    def reloadable(self) -> bool:
        return self.watch is not None


def _ignore_signal(_signum: int, _frame: object) -> None:
    """Installed for the signals we handle: the wakeup fd records the
    number, and the main loop acts on it."""


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        loaded: dict[str, tuple[Material, ScopeWatch | None]],
    ) -> None:
        self.settings = settings
        self._generation = 0
        self._scopes: dict[str, Scope] = {}
        for scope_settings in settings.scopes:
            self._generation += 1
            material, watch = loaded[scope_settings.name]
            self._scopes[scope_settings.name] = Scope(
                name=scope_settings.name,
                material=material,
                generation=self._generation,
                frame=material.frame(scope_settings.name, self._generation),
                watch=watch,
            )

        self._tickets = TicketKeyRing(settings.ticket_rotation, time.monotonic())
        self._selector = selectors.DefaultSelector()
        self._workers: dict[int, _workers.WorkerHandle] = {}
        # Per worker slot, one listening socket per endpoint (see _listeners).
        self._sockets: dict[int, list[socket.socket]] = {}
        self._by_pid: dict[int, _workers.WorkerHandle] = {}
        self._respawn_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self.restarts = 0

        self._state = "starting"
        self._exit_code = EXIT_OK
        self._boot_deadline = 0.0
        self._drain_deadline = 0.0
        self._next_ping = 0.0
        self._next_poll = 0.0
        self._last_tick = time.monotonic()
        self._last_reload_request = 0.0
        self._ping_seq = 0
        # Last counters of workers that are gone, so totals never shrink.
        self._retired: dict[str, object] = {}
        self.metrics: Metrics | None = None
        self._runtime_dir = ""
        self._status: StatusServer | None = None
        self._signal_fds: tuple[int, int] | None = None
        self._pending_signals: list[int] = []
        self._config_json = ""

    def run(self) -> int:
        """Serves until drained; returns the process exit code."""
        try:
            self._start()
            while self._state != "stopped":
                self._tick()
        finally:
            self._cleanup()
        return self._exit_code

    def _start(self) -> None:
        self._install_signals()
        self._runtime_dir = tempfile.mkdtemp(prefix="spicegw-")
        status_path = os.path.join(self._runtime_dir, "status.sock")
        self._status = StatusServer(status_path, self._route, self._selector)
        self._config_json = self._worker_config(status_path)

        for slot in range(self.settings.workers):
            self._sockets[slot] = [
                _listeners.open_listener(endpoint, self.settings.limits.backlog)
                for endpoint in self.settings.endpoints
            ]

        if threading.active_count() > 1:
            log.warning(
                "%d threads are running before fork; workers may inherit held locks",
                threading.active_count(),
            )
        for slot in range(self.settings.workers):
            self._spawn(slot)
        self._boot_deadline = time.monotonic() + BOOT_TIMEOUT
        self._next_poll = time.monotonic() + self.settings.poll_interval
        # Created after the first fork, as OpenTelemetry asks; the
        # in-memory reader starts no thread, so later forks stay safe.
        self.metrics = Metrics(self._metrics_view(), self._scopes)

    def _cleanup(self) -> None:
        self._close_sockets()
        for handle in list(self._by_pid.values()):
            _kill(handle.pid, signal.SIGKILL)
        for handle in list(self._by_pid.values()):
            try:
                os.waitpid(handle.pid, 0)
            except ChildProcessError:
                pass  # Already reaped.
            handle.close()
        if self._status is not None:
            self._status.close()
        if self.metrics is not None:
            self.metrics.shutdown()
        if self._runtime_dir:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        if self._signal_fds is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._signal_fds:
                os.close(fd)
        self._selector.close()

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signal_fds = (read_fd, write_fd)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGQUIT,
            signal.SIGHUP,
            signal.SIGCHLD,
        ):
            signal.signal(signum, _ignore_signal)
        self._selector.register(read_fd, selectors.EVENT_READ, self._on_signals)

    def _worker_config(self, status_path: str) -> str:
        endpoints = []
        for endpoint in self.settings.endpoints:
            upstream = (
                endpoint.upstream.to_json()
                if endpoint.upstream is not None
                else {"unix": status_path}
            )
            endpoints.append(
                {
                    "name": endpoint.name,
                    "listen": str(endpoint.listen),
                    "upstream": upstream,
                    "scope": endpoint.scope,
                    "alpn": list(endpoint.alpn),
                    "proxy_protocol": endpoint.proxy_protocol,
                }
            )
        return json.dumps(
            {
                "index": 0,
                "endpoints": endpoints,
                "limits": self.settings.limits.to_json(),
                "stats_interval_ms": round(self.settings.stats_interval * 1000),
                "drain_timeout_ms": round(self.settings.drain_timeout * 1000),
            }
        )

    def _tick(self) -> None:
        timeout = max(0.0, min(self._next_wakeup() - time.monotonic(), 1.0))
        for key, mask in self._selector.select(timeout):
            key.data(mask)
        self._reap()
        now = time.monotonic()
        if now - self._last_tick > STALL:
            # The supervisor itself did not run (stopped, starved, a slow
            # disk): the workers' silence is ours, not theirs.
            log.warning(
                "the supervisor did not run for %.0f s; workers get a fresh ping "
                "before they are judged",
                now - self._last_tick,
            )
            for handle in self._workers.values():
                handle.last_heard = now
        self._last_tick = now
        self._housekeeping(now)

    def _next_wakeup(self) -> float:
        candidates = [self._next_ping, self._tickets.next_rotation]
        if self._state == "running" and any(s.watch for s in self._scopes.values()):
            candidates.append(self._next_poll)
        candidates.extend(self._respawn_at.values())
        if self._state == "draining":
            candidates.append(self._drain_deadline)
        return min(candidates)

    def _housekeeping(self, now: float) -> None:
        if self._status is not None:
            self._status.expire(now)

        if self._state == "draining":
            if not self._by_pid:
                log.info("all workers stopped")
                self._state = "stopped"
            elif now >= self._drain_deadline:
                for handle in self._by_pid.values():
                    log.warning(
                        "worker %d (pid %d) did not stop in time; killing it",
                        handle.index,
                        handle.pid,
                    )
                    _kill(handle.pid, signal.SIGKILL)
                self._drain_deadline = now + KILL_GRACE
            return

        for slot, when in list(self._respawn_at.items()):
            if now >= when:
                del self._respawn_at[slot]
                self._spawn(slot)

        if now >= self._tickets.next_rotation:
            self._tickets.rotate(now)
            frame = self._tickets.frame()
            for handle in self._workers.values():
                self._send(handle, frame)
            log.debug("session ticket keys rotated (generation %d)", self._tickets.generation)

        if self._state == "running" and now >= self._next_poll:
            self._next_poll = now + self.settings.poll_interval
            self.check_certificates()

        if self._state == "starting" and now >= self._boot_deadline:
            log.error("workers did not become ready within %.0f s; stopping", BOOT_TIMEOUT)
            self._halt(EXIT_WORKERS_FAILED)
            return

        if now >= self._next_ping:
            self._next_ping = now + PING_INTERVAL
            self._ping_seq += 1
            ping = _core.encode_frame(Kind.PING, self._ping_seq)
            for handle in self._workers.values():
                self._check_alive(handle, now)
                self._send(handle, ping)

    def _check_alive(self, handle: _workers.WorkerHandle, now: float) -> None:
        limit = self.settings.worker_timeout if handle.ready else BOOT_TIMEOUT
        if now - handle.last_heard > limit:
            # Read whatever it did send before calling it silent.
            self._on_worker_readable(handle, 0)
        silent = now - handle.last_heard
        if silent > limit and not handle.stopping:
            log.critical(
                "worker %d (pid %d) has not answered for %.0f s; killing it",
                handle.index,
                handle.pid,
                silent,
            )
            handle.stopping = True
            handle.killed_by_watchdog = True
            _kill(handle.pid, signal.SIGKILL)

    def _read_signals(self) -> None:
        """Moves signal numbers from the wakeup pipe to the pending list."""
        assert self._signal_fds is not None
        while True:
            try:
                data = os.read(self._signal_fds[0], 256)
            except BlockingIOError:
                return
            if not data:
                return
            self._pending_signals.extend(data)

    def _on_signals(self, _mask: int) -> None:
        self._read_signals()
        pending, self._pending_signals = self._pending_signals, []
        handlers: dict[int, Callable[[int], None]] = {
            signal.SIGTERM: self._on_stop_signal,
            signal.SIGINT: self._on_stop_signal,
            signal.SIGQUIT: self._on_quick_stop,
            signal.SIGHUP: self._on_hup,
            signal.SIGCHLD: lambda _signum: self._reap(),
        }
        # Stop signals first: a worker that died of the same SIGTERM (sent
        # to the whole process group) must not be respawned.
        for signum in sorted(set(pending), key=lambda signum: signum == signal.SIGCHLD):
            handler = handlers.get(signum)
            if handler is not None:
                handler(signum)

    def _stop_signal_pending(self) -> bool:
        """Acts on a SIGTERM, SIGINT or SIGQUIT that arrived but was not
        handled yet; True if there was one."""
        self._read_signals()
        for signum in self._pending_signals:
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                self._pending_signals.remove(signum)
                if signum == signal.SIGQUIT:
                    self._on_quick_stop(signum)
                else:
                    self._on_stop_signal(signum)
                return True
        return False

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._state == "draining":
            log.info("%s received again: closing open connections now", name)
            self._shutdown_workers(0.0)
            return
        log.info(
            "%s received: refusing new connections, letting open ones finish for up to %.0f s",
            name,
            self.settings.drain_timeout,
        )
        self._shutdown_workers(self.settings.drain_timeout)

    def _on_quick_stop(self, signum: int) -> None:
        log.info(
            "%s received: stopping now, open connections are cut",
            signal.Signals(signum).name,
        )
        self._shutdown_workers(0.0)

    def _on_hup(self, _signum: int) -> None:
        if not any(scope.watch for scope in self._scopes.values()):
            log.info("SIGHUP received: no file-backed certificate to check")
            return
        log.info("SIGHUP received: checking the certificate files now")
        changes = self.check_certificates()
        if not changes:
            log.info("certificate files unchanged since the last check")

    def check_certificates(self) -> list[Change]:
        """Looks at every watched scope once and acts on what changed."""
        changes = []
        for scope in self._scopes.values():
            if scope.watch is None:
                continue
            change = scope.watch.check()
            if change is None:
                continue
            changes.append(change)
            self._apply(scope, change)
        return changes

    def _apply(self, scope: Scope, change: Change) -> None:
        assert scope.watch is not None
        watched = scope.watch.settings
        files = ", ".join(
            str(source.shown or source.path)
            for source in (watched.cert, watched.key, watched.client_ca)
            if source is not None
        )
        if change.result == "unchanged":
            tls_log.info("%s certificate: %s (%s)", scope.name, change.message, files)
            return
        if self.metrics is not None:
            self.metrics.count_reload(scope.name, change.result)
        if change.result != OK:
            tls_log.error(
                "%s certificate not reloaded (%s): %s; still serving generation %d, sha256 %s",
                scope.name,
                change.result,
                change.message,
                scope.generation,
                _short(scope.material.fingerprint),
            )
            return

        material = change.material
        assert material is not None
        new_notes = [note for note in material.notes if note not in scope.material.notes]
        scope.watch.accept(change)
        self._generation += 1
        scope.generation = self._generation
        scope.material = material
        scope.frame = material.frame(scope.name, scope.generation)
        scope.converging_since = time.monotonic()
        tls_log.info(
            "%s certificate reloaded from %s: generation %d, %s, sha256 %s, "
            "valid until %s; pushing to %d worker(s)",
            scope.name,
            files,
            scope.generation,
            material.subject,
            _short(material.fingerprint),
            material.not_after.strftime("%Y-%m-%d"),
            len(self._workers),
        )
        for note in new_notes:
            tls_log.info("%s", note)
        for handle in self._workers.values():
            self._send(handle, scope.frame)

    def _halt(self, code: int) -> None:
        """Stops everything after a failure the supervisor cannot fix."""
        self._exit_code = code
        self._shutdown_workers(0.0)

    def _close_sockets(self) -> None:
        for sockets in self._sockets.values():
            for sock in sockets:
                sock.close()
        self._sockets.clear()

    def _shutdown_workers(self, deadline: float) -> None:
        # New connections are refused once the workers close their copies
        # of the listening sockets too.
        self._close_sockets()
        self._state = "draining"
        self._respawn_at.clear()
        self._drain_deadline = time.monotonic() + deadline + KILL_GRACE
        frame = _core.encode_frame(Kind.SHUTDOWN, 0, round(deadline * 1000).to_bytes(4, "big"))
        for handle in self._by_pid.values():
            handle.stopping = True
            self._send(handle, frame)

    def _spawn(self, slot: int) -> None:
        config = json.loads(self._config_json)
        config["index"] = slot
        frames = [self._tickets.frame()]
        frames += [scope.frame for scope in self._scopes.values()]
        listeners = [sock.fileno() for sock in self._sockets[slot]]
        handle = _workers.spawn(slot, json.dumps(config), frames, listeners)
        self._workers[slot] = handle
        self._by_pid[handle.pid] = handle
        self._selector.register(
            handle.from_fd,
            selectors.EVENT_READ,
            lambda mask, h=handle: self._on_worker_readable(h, mask),
        )
        if handle.outbox:
            self._watch_writable(handle)
        log.debug("worker %d started as pid %d", slot, handle.pid)

    def _send(self, handle: _workers.WorkerHandle, frame: bytes) -> None:
        handle.queue(frame)
        if not handle.flush():
            self._watch_writable(handle)

    def _watch_writable(self, handle: _workers.WorkerHandle) -> None:
        def on_writable(_mask: int) -> None:
            if handle.flush():
                self._selector.unregister(handle.to_fd)

        try:
            self._selector.register(handle.to_fd, selectors.EVENT_WRITE, on_writable)
        except KeyError:
            pass  # Already waiting for the pipe to drain.

    def _on_worker_readable(self, handle: _workers.WorkerHandle, _mask: int) -> None:
        try:
            data = os.read(handle.from_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The worker closed its end: it is exiting; reaping does the rest.
            self._forget_fds(handle)
            return
        handle.last_heard = time.monotonic()
        try:
            frames = handle.decoder.feed(data)
        except ValueError as err:
            log.error(
                "worker %d (pid %d) broke the pipe protocol (%s); killing it",
                handle.index,
                handle.pid,
                err,
            )
            self._forget_fds(handle)
            _kill(handle.pid, signal.SIGKILL)
            return
        for kind, generation, payload in frames:
            self._on_frame(handle, Kind(kind), generation, payload)

    def _on_frame(
        self,
        handle: _workers.WorkerHandle,
        kind: Kind,
        generation: int,
        payload: bytes,
    ) -> None:
        if kind == Kind.STATS:
            handle.stats = json.loads(payload)
        elif kind == Kind.PONG:
            pass  # Any frame counts as a sign of life; last_heard is set.
        elif kind == Kind.ACK:
            body = json.loads(payload)
            handle.acks[body["scope"]] = _workers.Ack(generation, body["fingerprint"])
            self._check_convergence(body["scope"])
        elif kind == Kind.READY:
            self._on_ready(handle)
        elif kind == Kind.NACK:
            log.error(
                "worker %d refused certificate generation %d: %s",
                handle.index,
                generation,
                json.loads(payload)["error"],
            )
        elif kind == Kind.FATAL:
            handle.fatal = json.loads(payload)["error"]
        elif kind == Kind.LOG:
            body = json.loads(payload)
            level = logging.getLevelName(str(body.get("level", "info")).upper())
            log.log(
                level if isinstance(level, int) else logging.INFO,
                "worker %d: %s",
                handle.index,
                body.get("message", ""),
            )

    def _check_convergence(self, name: str) -> None:
        """Logs once when every worker serves a scope's new generation."""
        scope = self._scopes.get(name)
        if scope is None or scope.converging_since is None:
            return
        serving = sum(
            1
            for h in self._workers.values()
            if name in h.acks and h.acks[name].generation == scope.generation
        )
        if serving < self.settings.workers:
            return
        took = time.monotonic() - scope.converging_since
        scope.converging_since = None
        tls_log.info(
            "%d/%d workers serve %s generation %d, sha256 %s (%.0f ms after the check)",
            serving,
            self.settings.workers,
            name,
            scope.generation,
            _short(scope.material.fingerprint),
            took * 1000,
        )

    def _on_ready(self, handle: _workers.WorkerHandle) -> None:
        handle.ready = True
        if self._state == "starting":
            if (
                all(h.ready for h in self._workers.values())
                and len(self._workers) == self.settings.workers
            ):
                self._state = "running"
                self._announce()
        else:
            log.info("worker %d (pid %d) is serving again", handle.index, handle.pid)

    def _announce(self) -> None:
        scheme = "https" if self.settings.tls else "http"
        for endpoint in self.settings.endpoints:
            log.info(
                "endpoint %s: %s://%s -> %s",
                endpoint.name,
                scheme if endpoint.scope else "tcp+plain",
                endpoint.listen.display,
                endpoint.describe_upstream(),
            )
        public = self._scopes.get("public")
        if public is not None:
            log.info(
                "All endpoints secured with TLS using certificate: %s",
                public.material.subject,
            )
        log.info(
            "%d worker(s) ready (pid %s)",
            len(self._workers),
            ", ".join(str(h.pid) for h in self._workers.values()),
        )

    def _forget_fds(self, handle: _workers.WorkerHandle) -> None:
        for fd in (handle.from_fd, handle.to_fd):
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass  # Not registered for this direction.

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self._by_pid.pop(pid, None)
            if handle is None:
                log.debug("reaped process %d, not a worker", pid)
                continue
            self._on_exit(handle, os.waitstatus_to_exitcode(status))

    def _on_exit(self, handle: _workers.WorkerHandle, code: int) -> None:
        self._forget_fds(handle)
        handle.close()
        # TODO(#3): a worker that is killed loses what it counted since its
        # last report (stats_interval, 1 s); counting in shared memory
        # would keep it, at the price of a second channel beside the pipe.
        self._retired = _add_counts(self._retired, handle.stats)
        if self._workers.get(handle.index) is handle:
            del self._workers[handle.index]
        how = _describe_exit(code)

        # A worker that drained because SIGTERM reached the whole process
        # group may be reaped before the supervisor saw its own SIGTERM.
        if self._state != "draining" and code == 0:
            self._stop_signal_pending()
        if self._state == "draining":
            log.info("worker %d (pid %d) stopped (%s)", handle.index, handle.pid, how)
            return

        lived = time.monotonic() - handle.started
        if not handle.ready:
            failures = self._failures.get(handle.index, 0) + 1
            self._failures[handle.index] = failures
            if handle.fatal or code in (_core.EXIT_BOOT_FAILED, _workers.EXIT_CHILD_SETUP):
                log.error(
                    "worker %d cannot start: %s",
                    handle.index,
                    handle.fatal or how,
                )
                self._halt(EXIT_WORKERS_FAILED)
                return
            if failures >= MAX_BOOT_FAILURES:
                log.error(
                    "worker %d died %d times in a row before it was ready "
                    "(last: %s); stopping instead of respawning",
                    handle.index,
                    failures,
                    how,
                )
                self._halt(EXIT_WORKERS_FAILED)
                return
        elif lived >= STABLE_AFTER:
            self._failures[handle.index] = 0
        else:
            self._failures[handle.index] = self._failures.get(handle.index, 0) + 1

        failures = self._failures.get(handle.index, 0)
        delay = 0.0 if failures == 0 else min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
        hint = ""
        if handle.killed_by_watchdog:
            hint = " (by the watchdog)"
        elif code == -signal.SIGKILL:
            hint = " (out of memory?)"
        # Exit code 0 is a worker that drained on its own SIGTERM: an
        # operator recycling it, not a crash.
        log.log(
            logging.WARNING if code == 0 else logging.ERROR,
            "worker %d (pid %d) %s%s; starting a replacement in %.1f s",
            handle.index,
            handle.pid,
            how,
            hint,
            delay,
        )
        self.restarts += 1
        self._respawn_at[handle.index] = time.monotonic() + delay

    def _route(self, method: str, path: str) -> Response:
        if path == "/v1/reload":
            if method != "POST":
                return 405, "text/plain; charset=utf-8", b"use POST\n"
            return 200, "application/json", _json(self._reload_request())
        if method == "POST":
            return 405, "text/plain; charset=utf-8", b"only /v1/reload takes POST\n"
        if path == "/metrics" and self.metrics is not None:
            return 200, "text/plain; version=0.0.4", self.metrics.prometheus().encode()
        if path == "/health":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/v1/ready":
            ready = sum(1 for h in self._workers.values() if h.ready)
            body = {
                "ready": self._state == "running" and ready == self.settings.workers,
                "workers": self.settings.workers,
                "ready_workers": ready,
            }
            return (200 if body["ready"] else 503), "application/json", _json(body)
        if path == "/v1/tls":
            return 200, "application/json", _json(self.tls_status())
        if path == "/v1/workers":
            return 200, "application/json", _json(self.worker_status())
        if path == "/":
            paths = ("/health", "/v1/ready", "/v1/tls", "/v1/workers", "/metrics")
            index = f"spicegw {_core.__version__}\n" + "".join(p + "\n" for p in paths)
            return 200, "text/plain; charset=utf-8", index.encode()
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def _reload_request(self) -> dict[str, object]:
        """Runs a check now, as `spicegw reload` asks; says what happened
        per scope."""
        if not any(scope.watch for scope in self._scopes.values()):
            return {"scopes": {}, "message": "no file-backed certificate to reload"}
        # Every request checks the files (they may have changed a moment
        # ago), but a client hammering the endpoint cannot flood the log.
        now = time.monotonic()
        quiet = now - self._last_reload_request < RELOAD_REQUEST_INTERVAL
        self._last_reload_request = now
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "reload requested over the status service: checking now",
        )
        changes = {change.scope: change for change in self.check_certificates()}
        answer: dict[str, object] = {}
        for name, scope in self._scopes.items():
            if scope.watch is None:
                answer[name] = {"result": "inline", "message": "inline material is not reloaded"}
                continue
            change = changes.get(name) or scope.watch.last
            answer[name] = {
                "result": change.result if change else "unchanged",
                "message": change.message if change else "the files hold the served certificate",
                "generation": scope.generation,
                "fingerprint": scope.material.fingerprint,
                "subject": scope.material.subject,
            }
        return {"scopes": answer}

    def _metrics_view(self) -> GatewayView:
        def totals() -> dict[str, object]:
            result = dict(self._retired)
            for handle in self._workers.values():
                result = _add_counts(result, handle.stats)
            return result

        return GatewayView(
            totals=totals,
            open_connections=lambda: sum(_open_connections(h) for h in self._workers.values()),
            workers_ready=lambda: sum(1 for h in self._workers.values() if h.ready),
            restarts=lambda: self.restarts,
            generations=lambda: [
                (scope, h.index, ack.generation)
                for h in self._workers.values()
                for scope, ack in h.acks.items()
            ],
            not_after=lambda: [
                (name, scope.material.not_after.timestamp()) for name, scope in self._scopes.items()
            ],
        )

    def worker_status(self) -> dict[str, object]:
        """Each worker's process, readiness and last reported counters."""
        return {
            "workers": [
                {
                    "index": h.index,
                    "pid": h.pid,
                    "ready": h.ready,
                    "uptime_seconds": round(time.monotonic() - h.started, 3),
                    "stats": h.stats,
                }
                for h in sorted(self._workers.values(), key=lambda h: h.index)
            ],
            "restarts": self.restarts,
        }

    def tls_status(self) -> dict[str, object]:
        """What each scope serves, and what each worker acknowledged."""
        scopes: dict[str, object] = {}
        for name, scope in self._scopes.items():
            material = scope.material
            scopes[name] = {
                "subject": material.subject,
                "not_before": material.not_before.isoformat(),
                "not_after": material.not_after.isoformat(),
                "fingerprint": material.fingerprint,
                "generation": scope.generation,
                "reloadable": scope.reloadable,
                # Files on disk that were refused and are not served.
                "refused": (
                    {"result": scope.watch.last.result, "message": scope.watch.last.message}
                    if scope.watch is not None and scope.watch.last is not None
                    else None
                ),
                "workers": [
                    {
                        "index": h.index,
                        "pid": h.pid,
                        "generation": h.acks[name].generation if name in h.acks else None,
                        "fingerprint": h.acks[name].fingerprint if name in h.acks else None,
                    }
                    for h in sorted(self._workers.values(), key=lambda h: h.index)
                ],
            }
        return {"tls": self.settings.tls, "scopes": scopes}


def _short(fingerprint: str) -> str:
    return fingerprint[:16] + "…"


def _add_counts(base: dict[str, object], more: dict[str, object]) -> dict[str, object]:
    """Adds counters (numbers, and lists of numbers for histograms);
    gauges such as open_connections are not summed across time."""
    result = dict(base)
    for key, value in more.items():
        if key == "open_connections":
            continue
        current = result.get(key)
        if isinstance(value, int):
            result[key] = (current if isinstance(current, int) else 0) + value
        elif isinstance(value, list):
            old = current if isinstance(current, list) else []
            length = max(len(old), len(value))
            padded_old = old + [0] * (length - len(old))
            padded_new = value + [0] * (length - len(value))
            result[key] = [a + b for a, b in zip(padded_old, padded_new, strict=True)]
    return result


def _json(body: object) -> bytes:
    return (json.dumps(body, indent=2) + "\n").encode()


def _open_connections(handle: _workers.WorkerHandle) -> int:
    value = handle.stats.get("open_connections", 0)
    return value if isinstance(value, int) else 0


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # Already gone; the reaper will see it.
