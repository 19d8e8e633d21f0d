"""A worker's end of its pipe to the supervisor (`--grpc_workers N`), and the messages both ends send.

The pipe is a `multiprocessing` duplex connection (a unix socketpair) created by the supervisor; messages are the
small frozen dataclasses below. A worker says when it is ready, asks for a fleet reload (a reload request it got from
a client) and answers the supervisor's reload requests with its own reconcile's result. Its event loop sends a
heartbeat every HEARTBEAT_SECONDS: a worker whose loop is blocked is killed and restarted by the supervisor, so no
reload or stop waits for it forever. When the supervisor is gone (the pipe reads EOF) the worker stops as on SIGTERM,
so killing the supervisor never leaves workers behind.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from .status import ReloadResult

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("hotserve.worker")

HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Alive:
    """worker → supervisor, every HEARTBEAT_SECONDS from the event loop: the loop is not blocked."""


@dataclass(frozen=True)
class FleetReload:
    """worker → supervisor: reload every worker and tell me the combined result."""

    request: int


@dataclass(frozen=True)
class Reload:
    """supervisor → worker: run a forced reconcile now and answer with `Reloaded`."""

    request: int


@dataclass(frozen=True)
class Reloaded:
    request: int
    result: ReloadResult


@dataclass(frozen=True)
class FleetReloaded:
    """supervisor → worker: the answer to its `FleetReload`."""

    request: int
    result: ReloadResult


Message = Ready | Alive | FleetReload | Reload | Reloaded | FleetReloaded
LOST = ReloadResult(ok=False, changed=False, errors=("the worker supervisor is gone; nothing was reloaded",))


class WorkerLink:
    def __init__(self, index: int, conn: Connection) -> None:
        self.index = index
        self._conn = conn
        self._ids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[ReloadResult]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_here: Callable[[], Awaitable[ReloadResult]] | None = None
        self._lost: Callable[[], None] | None = None
        self._closed = False
        self._beat: asyncio.TimerHandle | None = None

    def start(self, reload_here: Callable[[], Awaitable[ReloadResult]], lost: Callable[[], None]) -> None:
        """Listen on the event loop: `reload_here` answers the supervisor's reloads; `lost` runs once on EOF."""
        self._reload_here, self._lost = reload_here, lost
        asyncio.get_running_loop().add_reader(self._conn.fileno(), self._readable)
        self._heartbeat()

    def _heartbeat(self) -> None:
        if not self._closed:
            self._send(Alive())
        if not self._closed:  # the send may have found the supervisor gone
            self._beat = asyncio.get_running_loop().call_later(HEARTBEAT_SECONDS, self._heartbeat)

    def ready(self) -> None:
        self._send(Ready(os.getpid()))

    async def fleet_reload(self) -> ReloadResult:
        if self._closed:
            return LOST
        request = next(self._ids)
        future: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        self._asked[request] = future
        self._send(FleetReload(request))
        try:
            return await future
        finally:
            self._asked.pop(request, None)

    def _send(self, message: Message) -> None:
        try:
            self._conn.send(message)  # a few hundred bytes into a socketpair: does not block in practice
        except OSError:
            self._gone()

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                self._handle(self._conn.recv())
        except (EOFError, OSError):
            self._gone()

    def _handle(self, message: Message) -> None:
        if isinstance(message, Reload):
            task = asyncio.get_running_loop().create_task(self._answer(message.request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(message, FleetReloaded):
            future = self._asked.get(message.request)
            if future is not None and not future.done():
                future.set_result(message.result)

    async def _answer(self, request: int) -> None:
        assert self._reload_here is not None
        try:
            result = await self._reload_here()
        except Exception as exc:  # the supervisor waits for every worker's answer: always send one
            log.exception("Reload asked by the supervisor failed")
            result = ReloadResult(ok=False, changed=False, errors=(f"{type(exc).__name__}: {exc}",))
        self._send(Reloaded(request, result))

    def _gone(self) -> None:
        if self._closed:
            return
        self._stop_beating()
        asyncio.get_running_loop().remove_reader(self._conn.fileno())
        for future in self._asked.values():
            if not future.done():
                future.set_result(LOST)
        log.warning("The worker supervisor is gone: stopping")
        if self._lost is not None:
            self._lost()

    def _stop_beating(self) -> None:
        self._closed = True
        if self._beat is not None:
            self._beat.cancel()

    def close(self) -> None:
        if not self._closed:
            self._stop_beating()
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
        self._conn.close()


def worker_main(settings: Settings, index: int, conn: Connection) -> None:
    """A worker process's entry point (multiprocessing, spawn): the single-process server plus this link."""
    from .server import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor sends SIGTERM
    sys.exit(serve(settings, WorkerLink(index, conn)))
