"""watchfiles on the config's folder and every base_path, plus a periodic rescan → asks for a reconcile.

Editors save by writing a temp file and renaming it; Kubernetes swaps a `..data` symlink. Either arrives as a burst
of events that the debounce folds into one trigger, and the reconciler's content hash turns an identical re-save
into no change at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import watchfiles

from .supervise import Supervisor

log = logging.getLogger("hotserve.watcher")

STEP_MS = 20  # an event burst ends after this much quiet...
DEBOUNCE_MS = 400  # ...or after this long at most


class Watcher:
    def __init__(
        self,
        config_path: Path | None,
        base_paths: Callable[[], set[Path]],
        trigger: Callable[[], object],
        poll_seconds: float,
        force_polling: bool = False,
    ) -> None:
        self._config = config_path
        self._base_paths = base_paths
        self._trigger = trigger
        self._poll_seconds = poll_seconds
        self._force_polling = force_polling
        self.events = 0  # event batches seen (tests and metrics)

    def start(self, supervisor: Supervisor) -> None:
        """Run the watch and the rescan under `supervisor`: a crash is logged and the loop restarts."""
        if self._poll_seconds <= 0:
            log.info("File system watching is off (--file_system_poll_wait_seconds 0); reload with SIGHUP or the API")
            return
        supervisor.keep("watcher", self._watch)
        supervisor.keep("rescan", self._rescan)
        mode = "polling" if self._force_polling else "native events"
        log.info("Watching the config and model folders (%s), rescanning every %g s", mode, self._poll_seconds)

    def _paths(self) -> set[Path]:
        paths = set(self._base_paths())
        if self._config is not None:
            paths.add(self._config.parent)
        return paths

    def relevant(self, path: str) -> bool:
        """The config file, Kubernetes' `..data` symlink swaps next to it, or anything under a base_path."""
        changed = Path(path)
        config = self._config
        if config is not None and changed.parent == config.parent and changed.name.startswith(("..", config.name)):
            return changed.name == config.name or changed.name.startswith("..")
        return any(changed == base or base in changed.parents for base in self._base_paths())

    async def _rescan(self) -> None:
        """Catches what events miss (NFS, fuse) and drives retries of failed or half-copied versions."""
        while True:
            await asyncio.sleep(self._poll_seconds)
            self._trigger()

    async def _watch(self) -> None:
        """Watch the current set of folders; restart when the set changes (models added or removed)."""
        while True:
            paths = {p for p in self._paths() if p.exists()}
            if not paths:
                await asyncio.sleep(self._poll_seconds)
                continue
            changed = asyncio.Event()
            watcher = asyncio.create_task(self._watch_once(paths, changed))
            while not watcher.done():
                await asyncio.sleep(self._poll_seconds)
                if {p for p in self._paths() if p.exists()} != paths:
                    changed.set()
                    break
            with contextlib.suppress(Exception):
                await watcher

    async def _watch_once(self, paths: set[Path], stop: asyncio.Event) -> None:
        try:
            async for batch in watchfiles.awatch(
                *paths,
                stop_event=stop,
                debounce=DEBOUNCE_MS,
                step=STEP_MS,
                force_polling=self._force_polling,
                poll_delay_ms=int(self._poll_seconds * 1000) if self._force_polling else 300,
                watch_filter=lambda _change, path: self.relevant(path),
                recursive=True,
            ):
                self.events += 1
                log.debug("File system changes: %s", sorted(p for _, p in batch)[:10])
                self._trigger()
        except Exception as exc:  # a watched folder vanished, or the backend failed: the rescan covers the gap
            log.debug("Watching %s stopped: %s", sorted(map(str, paths)), exc)
            await asyncio.sleep(self._poll_seconds)
