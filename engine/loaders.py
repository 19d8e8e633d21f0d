"""The custom loaders named in the config: opened, re-initialised on change, closed when removed.

Reconciled before the models on every reload; knows nothing of gRPC or the registry. Every call into a loader
library runs through `run` (the lifecycle's loader thread): a decrypt holding a loader's lock never blocks the
event loop. A closed loader is deinitialised only once every version loaded through it has been unloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .config import LoaderConfig, ModelConfig
from .loader_bridge import LoadedModel, Loader, LoaderError

log = logging.getLogger("hotserve.modelmanager")

Run = Callable[..., Awaitable[Any]]  # run(fn, *args) in the loader thread


@dataclass
class _Open:
    config: LoaderConfig
    loader: Loader
    generation: int


class LoaderSet:
    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}
        self._failed: dict[str, tuple[LoaderConfig, str]] = {}  # loader name → (its config, why it failed to open)
        self._generation = 0
        self._closing: list[Loader] = []  # closed, waiting for their last version to be unloaded

    async def sync(self, configs: Iterable[LoaderConfig], run: Run, retry: bool = False) -> list[str]:
        """Open new loaders, re-open changed ones (the old one serves until the new one is up), close removed ones.

        A loader entry that failed is tried again when it changes, or on `retry` (an operator's reload).
        """
        errors: list[str] = []
        wanted = {c.name: c for c in configs}
        for name, config in wanted.items():
            current = self._open.get(name)
            if current is not None and current.config == config:
                continue
            failed = self._failed.get(name)
            if failed is not None and failed[0] == config and not retry:
                errors.append(f"loader {name}: {failed[1]}")
                continue
            log.info("Reading Custom Loader: %s configuration", name)
            try:
                loader = await run(Loader.open, name, config.library_path, config.config_file)
            except LoaderError as exc:
                errors.append(f"loader {name}: {exc}")
                self._failed[name] = (config, str(exc))
                continue
            self._failed.pop(name, None)
            self._generation += 1
            self._open[name] = _Open(config, loader, self._generation)
            if current is not None:
                log.info("Loader %s was re-initialised; its models reload through it", name)
                await self._close(current.loader, run)
        for name in set(self._failed) - set(wanted):
            del self._failed[name]
        for name in set(self._open) - set(wanted):
            log.info("Loader %s is not there in new list.. deleting the same", name)
            await self._close(self._open.pop(name).loader, run)
        return errors

    async def _close(self, loader: Loader, run: Run) -> None:
        """Deinit now, or once the versions still serving from it are freed (kept for shutdown until then)."""
        await run(loader.close)
        self._closing = [c for c in (*self._closing, loader) if not c.deinited]

    def get(self, name: str) -> ModelLoader | None:
        found = self._open.get(name)
        return None if found is None else ModelLoader(found.loader, found.generation)

    def failure(self, name: str) -> str | None:
        """Why a configured loader is not open (library missing, bad ABI, init failed…), if it is not."""
        found = self._failed.get(name)
        return None if found is None or name in self._open else found[1]

    def generation(self, model: ModelConfig) -> int:
        found = self._open.get(model.loader_name or "")
        return 0 if found is None else found.generation

    async def retire_model(self, model: ModelConfig | None, run: Run) -> None:
        found = self._open.get(model.loader_name or "") if model is not None else None
        if found is not None and model is not None:
            await run(found.loader.retire_model, model.name)

    def close(self) -> None:
        """Shutdown, once no compile runs: unload what is still live and deinit every loader."""
        for loader in (*(e.loader for e in self._open.values()), *self._closing):
            loader.close(force=True)
        self._open.clear()
        self._closing.clear()


@dataclass(frozen=True)
class ModelLoader:
    """A loader as one model's versions use it."""

    loader: Loader
    generation: int

    def load(self, model: ModelConfig, version: int) -> LoadedModel:
        return self.loader.load(model.name, str(model.base_path), version, dict(model.custom_loader_options or {}))

    def is_blacklisted(self, name: str, version: int, log_reason: bool = False) -> bool:
        try:
            blacklisted = self.loader.is_blacklisted(name, version)
        except LoaderError as exc:
            log.error("Blacklist check failed, treating version %d of model %s as enabled: %s", version, name, exc)
            return False
        if blacklisted and log_reason:
            log.info("The model %s version %d is blacklisted by its custom loader", name, version)
        return blacklisted
