"""In-process reconciler + lifecycle over the real Runtime, real OpenVINO models and the real C test loader.

Gates pause a version's life at a chosen point (a compile, a loader hand-over, a drain, a free) until the test
releases it, so each interleaving is reproduced on every run instead of hoped for by sleeping.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
from loader_fixtures import BUILD

from engine import config as config_mod
from engine.cache import ModelCache
from engine.frontend.dataplane import DataPlane, Tensor
from engine.lifecycle import Hooks
from engine.reconciler import Reconciler
from engine.registry import Registry
from engine.runtime import Runtime
from engine.status import ReloadResult, State

X = np.arange(10, dtype=np.float32).reshape(1, 10)
GATE_TIMEOUT = 60.0


def aio(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop, bounded so a deadlock fails instead of hanging."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 120))

    return run


@dataclass
class Gate:
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # raised at the point instead of pausing

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, GATE_TIMEOUT), "the gate was never reached"

    def release(self) -> None:
        self.released.set()


class Gates(Hooks):
    """Hooks that pause (or fail) the next pass through a point for one model version, and count every pass."""

    def __init__(self) -> None:
        self._armed: dict[tuple[str, str, int], Gate] = {}
        self._lock = threading.Lock()
        self.passed: Counter[tuple[str, str, int]] = Counter()

    def arm(self, point: str, name: str, version: int = 1, error: BaseException | None = None) -> Gate:
        gate = Gate(error=error)
        with self._lock:
            self._armed[(point, name, version)] = gate
        return gate

    def _take(self, point: str, name: str, version: int) -> Gate | None:
        with self._lock:
            self.passed[(point, name, version)] += 1
            return self._armed.pop((point, name, version), None)

    def thread(self, point: str, name: str, version: int) -> None:
        gate = self._take(point, name, version)
        if gate is None:
            return
        gate.entered.set()
        if gate.error is not None:
            raise gate.error
        assert gate.released.wait(GATE_TIMEOUT), f"gate {point} {name} {version} never released"

    async def loop(self, point: str, name: str, version: int) -> None:
        gate = self._take(point, name, version)
        if gate is None:
            return
        gate.entered.set()
        assert await asyncio.to_thread(gate.released.wait, GATE_TIMEOUT)

    def balanced(self, name: str, version: int, serving: int) -> bool:
        """Every compile that returned was freed, except the `serving` one(s)."""
        return self.passed[("compiled", name, version)] - self.passed[("free", name, version)] == serving


class Env:
    """One models.json in a temp folder, served in-process; nothing of gRPC."""

    def __init__(self, root: Path, cache: bool = False) -> None:
        self.root = root
        self.path = root / "models.json"
        self.models: dict[str, dict[str, Any]] = {}
        self.loaders: dict[str, dict[str, Any]] = {}
        self.registry = Registry()
        self.gates = Gates()
        self.cache_dir = root / "cache"
        self.runtime = Runtime(ModelCache.open(self.cache_dir) if cache else None)
        self.reconciler = Reconciler(self._source, self.registry, self.runtime, hooks=self.gates)
        self.plane = DataPlane(self.registry, self.reload, lambda: None, self.reconciler.reshape)
        self.lifecycle = self.reconciler.lifecycle
        self.violations: list[str] = []  # invariants broken at the moment of a status change
        set_status = self.registry.set_status

        def observed(name: str, status: Any) -> None:  # a probe on our own registry: END only when all is freed
            if status.state == State.END and not self.gates.balanced(name, status.version, serving=0):
                self.violations.append(f"{name} {status.version} reached END with a compile not yet freed")
            set_status(name, status)

        self.registry.set_status = observed  # type: ignore[method-assign]

    def _source(self) -> config_mod.Config:
        return config_mod.load(self.path)

    # ---- models.json and folders ----
    def version(self, name: str, version: int, delta: float | None = None, **kwargs: Any) -> Path:
        folder = self.root / "models" / name / str(version)
        modelgen.add_const(folder, delta=float(version) if delta is None else delta, **kwargs)
        return folder

    def drop_version(self, name: str, version: int) -> None:
        shutil.rmtree(self.root / "models" / name / str(version))

    def model(self, name: str, **config: Any) -> None:
        self.models[name] = {"name": name, "base_path": str(self.root / "models" / name), **config}

    def loader(self, name: str = "t", cfg: str = "") -> None:
        cfg_file = self.root / f"{name}-{len(cfg)}.cfg"
        cfg_file.write_text(cfg)
        self.loaders[name] = {"loader_name": name, "library_path": str(BUILD / "libtestloader.so"),
                              "loader_config_file": str(cfg_file)}  # fmt: skip

    def write(self) -> None:
        document = {
            "custom_loader_config_list": [{"config": c} for c in self.loaders.values()],
            "model_config_list": [{"config": c} for c in self.models.values()],
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        tmp.replace(self.path)

    async def reload(self) -> ReloadResult:
        """Write models.json and reconcile as an operator's reload (no quiet-time wait for new folders)."""
        self.write()
        return await self.reconciler.trigger(force=True)

    # ---- reads ----
    def state(self, name: str, version: int) -> State | None:
        slot = self.registry.models[name].slots.get(version)
        return slot.status.state if slot is not None else None

    def status(self, name: str, version: int):  # type: ignore[no-untyped-def]
        return self.registry.models[name].slots[version].status

    def served(self, name: str, version: int):  # type: ignore[no-untyped-def]
        return self.registry.models[name].slots[version].served

    async def infer(self, name: str, version: int | None = None, x: np.ndarray = X) -> tuple[int, np.ndarray]:
        number, outputs = await self.plane.infer(name, version, [Tensor("b", "FP32", tuple(x.shape), x)])
        return number, outputs[0].data

    async def until(self, check: Callable[[], bool], what: str) -> None:
        """Wait for a state the code reaches on its own (e.g. a task that was just released), bounded."""
        for _ in range(10_000):
            if check():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"never happened: {what}")

    async def close(self) -> None:
        await self.reconciler.close()


def loader_options(**extra: Any) -> dict[str, Any]:
    return {"loader_name": "t", "model_file": "model.xml", "bin_file": "model.bin", **extra}


async def gather_quietly(*aws: Awaitable[Any]) -> list[Any]:
    return await asyncio.gather(*aws, return_exceptions=True)
