"""`--grpc_workers N` (N > 1): a supervisor process running N replicas of the server on the same ports.

Each worker is a full single-process server (its own watcher, reconciler and compiled models) started with
multiprocessing's spawn (nothing of gRPC or OpenVINO is ever forked); the kernel balances connections among them
(SO_REUSEPORT). Worker 1 starts first; 2..N start once it is ready, so they import what it compiled from the cache.
The supervisor holds the ports (engine/ports.py), restarts a worker that dies (with backoff), forwards SIGTERM/SIGINT
(drain) and SIGHUP (reload), runs fleet reloads (engine/worker_link.py) and owns the metrics dir of
prometheus_client's multiprocess mode (engine/metrics_dir.py). A watchdog kills a worker whose event loop sends no
heartbeat for HUNG_AFTER seconds, or that closed its pipe and has not exited EXIT_AFTER seconds later: a hung worker
is restarted, and no reload or stop waits for it forever. One thread, one `wait()` over the workers' pipes, their
process sentinels and a signal wake-up socket.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from . import ports
from .metrics_dir import MetricsDir, clean_stale
from .settings import startup_checked
from .status import ReloadResult
from .worker_link import HEARTBEAT_SECONDS, FleetReload, FleetReloaded, Ready, Reload, Reloaded, worker_main

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("hotserve.supervisor")

RESTART_FIRST, RESTART_MAX = 0.5, 30.0  # backoff of a worker's restarts; reset after it ran RESTART_MAX calmly
HUNG_AFTER = 30.0  # seconds without a heartbeat: the worker's loop is blocked (a 200 MB receive blocks it 0.2–0.6 s)
FOLD_RETRY = 0.1  # seconds between tries to fold a dead worker's metrics while a scrape holds their lock
EXIT_AFTER = 30.0  # seconds between a worker closing its pipe (the end of its shutdown) and its exit at the latest
SEND_TIMEOUT = 5.0  # seconds a send to a worker may wait for room in its pipe: one that does not read is hung
assert HUNG_AFTER > 10 * HEARTBEAT_SECONDS


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    started: float
    ready: bool = False
    ready_at: float = 0.0
    heard: float = 0.0  # when its last message came (any message is a heartbeat); 0: since `started`
    closed_at: float | None = None  # when its pipe read EOF
    killed: str | None = None  # why the watchdog killed it

    def __post_init__(self) -> None:
        # a worker that stops reading fills its pipe: a send then fails (EAGAIN) instead of blocking the supervisor
        with socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as pipe:  # a dup: same socket
            pipe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))

    def deadline(self, hung_after: float, exit_after: float) -> float:
        if self.killed is not None:
            return float("inf")
        if self.closed_at is not None:
            return self.closed_at + exit_after
        return max(self.heard, self.started) + hung_after


@dataclass
class _FleetReload:
    """One fleet reload: who asked (None: SIGHUP), and the answers still awaited (worker index → pid)."""

    asker: _Worker | None  # the process itself: a restarted worker at its index did not ask
    asker_request: int
    waiting: dict[int, int]
    results: dict[int, tuple[int, ReloadResult]] = field(default_factory=dict)
    missing: dict[int, tuple[int, str]] = field(default_factory=dict)  # index → (pid, why it will never answer)


def combine(results: dict[int, tuple[int, ReloadResult]], missing: dict[int, tuple[int, str]]) -> ReloadResult:
    """One result for a fleet reload. An error every worker reported is listed once; others name their worker."""
    all_errors = [set(r.errors) for _, r in results.values()]
    common = set.intersection(*all_errors) if all_errors and not missing else set()
    errors: list[str] = sorted(common)
    for index, (pid, result) in sorted(results.items()):
        errors += [f"worker {index} (pid {pid}): {e}" for e in result.errors if e not in common]
    errors += [f"worker {index} (pid {pid}): {why}" for index, (pid, why) in sorted(missing.items())]
    return ReloadResult(
        ok=not missing and all(r.ok for _, r in results.values()),
        changed=any(r.changed for _, r in results.values()),
        errors=tuple(errors),
        config_valid=all(r.config_valid for _, r in results.values()),
    )


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class WorkerSupervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.grpc_workers
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._restart_at: dict[int, float] = {}  # index → when to start it again
        self._delay: dict[int, float] = dict.fromkeys(range(1, self.count + 1), RESTART_FIRST)
        self._reloads: dict[int, _FleetReload] = {}
        self._next_reload = 1
        self._stopping = False
        self._exit_code = 0
        self._all_ready = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._signals: list[int] = []
        self.metrics: MetricsDir | None = None
        self._unfolded: dict[int, int] = {}  # pid → worker index: dead workers whose metrics await a free lock
        self.hung_after, self.exit_after = HUNG_AFTER, EXIT_AFTER  # instance fields: tests shorten them

    # ---- the loop ----
    def run(self) -> int:
        held: list[ports.HeldPort] = []
        try:
            held.append(ports.hold("gRPC", self.settings.grpc_bind_address, self.settings.port))
            if self.settings.rest_port:
                held.append(ports.hold("REST", self.settings.rest_bind_address, self.settings.rest_port))
        except ports.PortBusy as exc:
            ports.release(held)
            log.error("%s", exc)
            return 1
        worker_settings = replace(self.settings, port=held[0].port)
        for stale in clean_stale():
            log.info("Removed the metrics dir of a supervisor that is gone: %s", stale)
        try:
            self.metrics = MetricsDir()
        except OSError as exc:
            ports.release(held)
            log.error("Cannot make the workers' metrics dir in %s (TMPDIR sets where): %s", tempfile.gettempdir(), exc)
            return 1
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics.path)  # the spawned workers inherit it
        self._install_signals()
        rest = f" and REST port {self.settings.rest_port}" if self.settings.rest_port else ""
        log.info("Supervisor: %d workers on gRPC port %d%s; metrics dir %s", self.count, held[0].port, rest,
                 self.metrics.path)  # fmt: skip
        try:
            self._start(1, worker_settings)
            while self._workers or (self._restart_at and not self._stopping):
                self._step(worker_settings)
            return self._exit_code
        finally:
            self._restore_signals()
            ports.release(held)
            self.metrics.close()
            log.info("Supervisor: all workers stopped")

    def _step(self, settings: Settings) -> None:
        now = time.monotonic()
        for index, due in list(self._restart_at.items()):
            if due <= now and not self._stopping:
                del self._restart_at[index]
                self._start(index, settings)
        for pid, index in list(self._unfolded.items()):
            self._fold(pid, index)
        due = [
            *self._restart_at.values(),
            *(w.deadline(self.hung_after, self.exit_after) for w in self._workers.values()),
            *([now + FOLD_RETRY] if self._unfolded else []),
        ]
        timeout = max(0.0, min(due) - now) if due else None
        for ready in wait(self._waitables(), None if timeout == float("inf") else timeout):
            if ready is self._wake_r:
                self._on_signals()
                continue
            for worker in list(self._workers.values()):
                if ready is worker.conn:
                    self._read(worker, settings)
                elif ready == worker.process.sentinel:
                    self._exited(worker)
        self._watchdog()

    def _watchdog(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if now < worker.deadline(self.hung_after, self.exit_after):
                continue
            if worker.closed_at is None:
                silent = now - max(worker.heard, worker.started)
                self._kill(worker, f"killed: no heartbeat for {silent:.0f} s (its event loop was blocked)")
            else:
                self._kill(worker, f"killed: still running {now - worker.closed_at:.0f} s after its shutdown ended")

    def _kill(self, worker: _Worker, why: str) -> None:
        worker.killed = why
        log.error("Worker %d (pid %s) %s", worker.index, worker.process.pid, why)
        if worker.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGKILL)
        self._unanswered(worker)  # it will never answer: its reloads are answered without it now

    def _send(self, worker: _Worker, message: Reload | FleetReloaded) -> None:
        try:
            worker.conn.send(message)
        except BlockingIOError:  # no room for SEND_TIMEOUT: it does not read (and the message may be half-sent)
            self._kill(worker, f"killed: its pipe stayed full for {SEND_TIMEOUT:.0f} s (its event loop was blocked)")
        except OSError:  # it is exiting: _exited() answers for it
            pass

    def _waitables(self) -> list[Connection | socket.socket | int]:
        waitables: list[Connection | socket.socket | int] = [self._wake_r]
        for worker in self._workers.values():
            waitables += [worker.process.sentinel] if worker.conn.closed else [worker.conn, worker.process.sentinel]
        return waitables

    def _start(self, index: int, settings: Settings) -> None:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(target=worker_main, args=(settings, index, child), name=f"worker-{index}")
        process.start()
        child.close()
        assert process.pid is not None
        self._workers[index] = _Worker(index, process, parent, time.monotonic())
        log.info("Worker %d started (pid %d)", index, process.pid)

    def _read(self, worker: _Worker, settings: Settings) -> None:
        try:
            while worker.conn.poll():
                worker.heard = time.monotonic()
                self._message(worker, worker.conn.recv(), settings)
        except (EOFError, OSError):  # the worker is exiting (its sentinel says when): EOF would stay readable
            worker.conn.close()
            worker.closed_at = time.monotonic()
            self._unanswered(worker)

    def _message(self, worker: _Worker, message: object, settings: Settings) -> None:
        if isinstance(message, Ready):
            worker.ready, worker.ready_at = True, time.monotonic()
            log.info("Worker %d ready (pid %d)", worker.index, message.pid)
            if worker.index == 1 and not self._all_ready and not self._stopping:
                for index in range(2, self.count + 1):  # after worker 1: they import its compiles from the cache
                    if index not in self._workers:
                        self._start(index, settings)
            if (
                not self._all_ready
                and len(self._workers) == self.count
                and all(w.ready for w in self._workers.values())
            ):
                self._all_ready = True
                pids = ", ".join(str(w.process.pid) for w in self._workers.values())
                log.info("All %d workers ready (pids %s)", self.count, pids)
        elif isinstance(message, FleetReload):
            self._begin_reload(worker, message.request)
        elif isinstance(message, Reloaded):
            self._reloaded(worker.index, message.request, message.result)

    # ---- fleet reloads ----
    def _begin_reload(self, asker: _Worker | None, asker_request: int = 0) -> None:
        """Every running worker reloads, one still starting too: its initial load may have read the files before the
        change (and with watching off nothing else would apply it); it answers once it has started."""
        request, self._next_reload = self._next_reload, self._next_reload + 1
        targets = {w.index: w for w in self._workers.values() if not w.conn.closed and w.killed is None}
        fleet = _FleetReload(asker, asker_request, {i: w.process.pid or 0 for i, w in targets.items()})
        self._reloads[request] = fleet
        if asker is None:
            log.info("SIGHUP: reloading %d worker(s)", len(targets))
        else:
            log.info("Reload requested through worker %d: reloading %d worker(s)", asker.index, len(targets))
        for worker in targets.values():
            self._send(worker, Reload(request))
        self._finish_reload(request)

    def _reloaded(self, index: int, request: int, result: ReloadResult) -> None:
        fleet = self._reloads.get(request)
        if fleet is None or index not in fleet.waiting:
            return
        fleet.results[index] = (fleet.waiting.pop(index), result)
        self._finish_reload(request)

    def _finish_reload(self, request: int) -> None:
        fleet = self._reloads.get(request)
        if fleet is None or fleet.waiting:  # None: finished already (a worker killed while it was being asked)
            return
        del self._reloads[request]
        result = combine(fleet.results, fleet.missing)
        if fleet.asker is None:
            if result.ok:
                log.info("Reload on SIGHUP done: OK (%d worker(s))", len(fleet.results))
            else:
                log.error("Reload on SIGHUP done with %d error(s): %s", len(result.errors), "; ".join(result.errors))
        elif self._workers.get(fleet.asker.index) is fleet.asker and fleet.asker.killed is None:
            self._send(fleet.asker, FleetReloaded(fleet.asker_request, result))

    def _unanswered(self, worker: _Worker) -> None:
        """Its pipe is gone or it was killed: the fleet reloads it had not answered are answered without it."""
        why = worker.killed or "exited before it reloaded"
        for request, fleet in list(self._reloads.items()):
            if worker.index in fleet.waiting:
                fleet.missing[worker.index] = (fleet.waiting.pop(worker.index), why)
                self._finish_reload(request)

    # ---- exits and restarts ----
    def _exited(self, worker: _Worker) -> None:
        worker.process.join()
        code = worker.process.exitcode
        pid = worker.process.pid
        del self._workers[worker.index]
        worker.conn.close()
        if pid is not None:
            self._fold(pid, worker.index)
        self._unanswered(worker)
        if self._stopping:
            log.info("Worker %d (pid %s) stopped (%s)", worker.index, pid, _exit_text(code))
            if worker.killed is not None and not self._exit_code:
                self._exit_code = 1
            elif code and code > 0 and not self._exit_code:  # killed by our SIGTERM before its handler: no error
                self._exit_code = code
            return
        if not worker.ready and not self._all_ready:
            log.error("Worker %d (pid %s) could not start (%s); stopping", worker.index, pid, _exit_text(code))
            self._exit_code = code if code and code > 0 else 1
            self._stop(signal.SIGTERM)
            return
        delay = self._delay[worker.index]
        if worker.ready and worker.killed is None and time.monotonic() - worker.ready_at > RESTART_MAX:
            delay = RESTART_FIRST  # it served calmly for a while: a new problem (one that hangs at each start is not)
        log.error("Worker %d (pid %s) exited (%s); restarting it in %.1f s", worker.index, pid, _exit_text(code), delay)
        self._restart_at[worker.index] = time.monotonic() + delay
        self._delay[worker.index] = min(RESTART_MAX, delay * 2)

    def _fold(self, pid: int, index: int) -> None:
        """Its live gauges go; its counters join the archive. Never waits for a scrape: one in a hung worker would
        keep the watchdog that kills it from running."""
        if self.metrics is None:
            return
        try:
            folded = self.metrics.fold(pid)
        except (OSError, ValueError) as exc:  # the metrics must not take the fleet down
            log.warning("Could not fold the metrics files of worker %d (pid %s): %s", index, pid, exc)
            folded = 0
        if folded is None:
            self._unfolded[pid] = index
        else:
            self._unfolded.pop(pid, None)

    # ---- signals ----
    def _install_signals(self) -> None:
        self._wake_w.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    def _on_signal(self, sig: int, frame: object) -> None:
        self._signals.append(sig)  # handled by the loop: the wake-up fd makes wait() return

    def _on_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        signals, self._signals = self._signals, []
        for sig in signals:
            if sig == signal.SIGHUP:
                self._begin_reload(None)  # over the pipes: a worker still starting has no SIGHUP handler yet
            else:
                self._stop(signal.Signals(sig))

    def _stop(self, sig: signal.Signals) -> None:
        """First: every worker drains and stops (SIGTERM); again: SIGTERM again, which ends their drain windows."""
        if not self._stopping:
            log.info("%s: stopping %d worker(s)", sig.name, len(self._workers))
        self._stopping = True
        self._restart_at.clear()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self._workers.values():
            if worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)


def run(settings: Settings) -> int:
    """`hotserve serve --grpc_workers N` (N > 1): the same start-up check as one process, then the workers."""
    if not startup_checked(settings):
        return 1
    return WorkerSupervisor(settings).run()
