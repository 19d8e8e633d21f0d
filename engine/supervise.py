"""Background tasks that are never lost: a crashed loop is logged once with its traceback and restarted with
backoff; a one-shot task's exception is logged; stop() cancels and awaits them all and never raises."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("hotserve.server")

RESTART_FIRST, RESTART_MAX = 0.5, 30.0


class Supervisor:
    def __init__(self, restart_first: float = RESTART_FIRST, restart_max: float = RESTART_MAX) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._oneshots: set[asyncio.Task[Any]] = set()
        self._first = restart_first
        self._max = restart_max
        self.crashes: dict[str, int] = {}  # task name → crashes so far (tests, metrics)

    def keep(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `factory()` for the server's life; restart it after a crash (backoff doubles, reset after a calm run)."""
        self._track(asyncio.create_task(self._keep(name, factory), name=name))

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a one-shot task; its exception, if any, is logged with its traceback."""
        task = asyncio.create_task(coro, name=name)
        self._track(task)
        self._oneshots.add(task)
        task.add_done_callback(self._oneshots.discard)
        task.add_done_callback(self._report)
        return task

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        delay = self._first
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await factory()
                return  # finished on its own
            except asyncio.CancelledError:
                raise
            except Exception:
                self.crashes[name] = self.crashes.get(name, 0) + 1
                if asyncio.get_running_loop().time() - started > self._max:
                    delay = self._first  # it ran calmly for a while: this is a new problem
                log.exception("Background task %s failed; restarting it in %.1f s", name, delay)
            await asyncio.sleep(delay)
            delay = min(self._max, delay * 2)

    def _report(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("Background task %s failed", task.get_name(), exc_info=exc)

    async def wait(self) -> None:
        """Wait for the one-shot tasks running now (and any they start meanwhile)."""
        while self._oneshots:
            await asyncio.gather(*list(self._oneshots), return_exceptions=True)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
