"""The custom loaders named in the config: opened, re-initialised on change, closed when removed.

Reconciled before the models on every reload; knows nothing of gRPC or the registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .config import LoaderConfig, ModelConfig

log = logging.getLogger("hotserve.modelmanager")


@dataclass
class _Open:
    config: LoaderConfig
    loader: object  # engine.loader_bridge.Loader
    generation: int


class LoaderSet:
    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}
        self._failed: dict[str, tuple[LoaderConfig, str]] = {}  # loader name → (its config, why it failed to open)
        self._generation = 0

    def sync(self, configs: Iterable[LoaderConfig], retry: bool = False) -> list[str]:
        """Open new loaders, re-open changed ones (the old one serves until the new one is up), close removed ones.

        A loader entry that failed is tried again when it changes, or on `retry` (an operator's reload).
        """
        from .loader_bridge import Loader, LoaderError

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
                loader = Loader.open(name, config.library_path, config.config_file)
            except LoaderError as exc:
                errors.append(f"loader {name}: {exc}")
                self._failed[name] = (config, str(exc))
                continue
            self._failed.pop(name, None)
            self._generation += 1
            self._open[name] = _Open(config, loader, self._generation)
            if current is not None:
                log.info("Loader %s was re-initialised; its models reload through it", name)
                current.loader.close()  # type: ignore[attr-defined]
        for name in set(self._failed) - set(wanted):
            del self._failed[name]
        for name in set(self._open) - set(wanted):
            log.info("Loader %s is not there in new list.. deleting the same", name)
            self._open.pop(name).loader.close()  # type: ignore[attr-defined]
        return errors

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

    def retire_model(self, model: ModelConfig | None) -> None:
        found = self._open.get(model.loader_name or "") if model is not None else None
        if found is not None:
            found.loader.retire_model(model.name)  # type: ignore[attr-defined, union-attr]

    def unload_version(self, model: ModelConfig | None, version: int) -> None:
        found = self._open.get(model.loader_name or "") if model is not None else None
        if found is not None:
            found.loader.unload_model(model.name, version)  # type: ignore[attr-defined, union-attr]

    def close(self) -> None:
        for entry in self._open.values():
            entry.loader.close()  # type: ignore[attr-defined]
        self._open.clear()


@dataclass(frozen=True)
class ModelLoader:
    """A loader as one model's versions use it."""

    loader: object
    generation: int

    def load(self, model: ModelConfig, version: int) -> object:
        return self.loader.load(model.name, str(model.base_path), version, dict(model.custom_loader_options or {}))  # type: ignore[attr-defined]

    def is_blacklisted(self, name: str, version: int, log_reason: bool = False) -> bool:
        from .loader_bridge import LoaderError

        try:
            blacklisted = bool(self.loader.is_blacklisted(name, version))  # type: ignore[attr-defined]
        except LoaderError as exc:
            log.error("Blacklist check failed, treating version %d of model %s as enabled: %s", version, name, exc)
            return False
        if blacklisted and log_reason:
            log.info("The model %s version %d is blacklisted by its custom loader", name, version)
        return blacklisted
