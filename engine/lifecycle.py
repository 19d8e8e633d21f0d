"""One owner per version slot: every transition of a version's life goes through its VersionLife.

    load:    START → LOADING → AVAILABLE           (a failed load stays LOADING with its error; the reconciler retries)
    reload:  AVAILABLE ─(new compile swapped in)→ AVAILABLE; the old compile drains and is freed
    reshape: the same, with a request's shapes (auto shape / auto batch)
    retire:  any → UNLOADING ─(compiles returned, requests drained, compiles freed)→ END

Every load, reshape and retire takes the slot's next generation. A compile whose generation is no longer current when
it returns (a retire, reload or shutdown came meanwhile) is freed, never installed. END is marked only when nothing of
the slot is compiling, draining or being freed, so a late drain of an older compile can never end a newer one.

Threads: compiles run on the load pool, with the loader's own calls of a load (load_model, release, and the unload
of a load whose compile failed); frees of loader models and every other loader call (blacklist, unload, retire,
open, close) run on one loader thread, in order; frees of plain models on a thread of their own. None runs on the
event loop, so a decrypt holding a loader's lock never blocks serving. Each successful hs_loader_load_model is
matched by exactly one hs_loader_unload_model once nothing compiled from it is left (freed, discarded or failed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from .config import ModelConfig, Routing
from .errors import Code, ServingError
from .loader_bridge import LoaderError
from .loaders import ModelLoader
from .registry import Registry, Slot
from .runtime import LoadError, Runtime, Source
from .served import ServedVersion
from .status import State, VersionStatus
from .supervise import Supervisor

log = logging.getLogger("hotserve.modelmanager")

T = TypeVar("T")
KEEP_ENDED = 10  # END versions kept per model (they still answer status queries); older ones are forgotten
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Applied:
    """What a served compile was made from: the model's config, its version folder, the loader it came through."""

    model: ModelConfig
    path: Path
    loader: ModelLoader | None = None

    @property
    def loader_generation(self) -> int:
        return 0 if self.loader is None else self.loader.generation


class Hooks:
    """Test seam: called at fixed points of a version's life. Production uses these no-ops.

    Points in a worker thread: "compile" (before the loader and OpenVINO), "loaded" (a loader's buffers handed over,
    before OpenVINO reads them), "compiled" (after), "free" (before the compiled model is dropped and the loader
    told). On the event loop: "drain" (before waiting for requests), "batch" (a dynamic batch about to run).
    """

    def thread(self, point: str, name: str, version: int) -> None:
        return None

    async def loop(self, point: str, name: str, version: int) -> None:
        return None


class Lifecycle:
    """All version lives of a server, the threads they use, and the order of shutdown."""

    def __init__(self, registry: Registry, runtime: Runtime, parallel_loads: int = 2, hooks: Hooks | None = None):
        self.registry = registry
        self.runtime = runtime
        self.hooks = hooks or Hooks()
        self.closing = False
        self._lives: dict[tuple[str, int], VersionLife] = {}
        self._ended: dict[str, list[int]] = {}  # model → versions in the order they reached END
        self._compile_pool = ThreadPoolExecutor(max_workers=parallel_loads, thread_name_prefix="load")
        self._loader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self._free_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="free")  # plain models' frees
        self._compiling: set[asyncio.Future[Any]] = set()
        self._tasks = Supervisor()

    def life(self, name: str, version: int) -> VersionLife:
        found = self._lives.get((name, version))
        if found is None:
            found = self._lives[(name, version)] = VersionLife(self, name, version)
        return found

    def get(self, name: str, version: int) -> VersionLife | None:
        return self._lives.get((name, version))

    def route(self, name: str, routing: Routing) -> bool:
        """Apply a model's labels and traffic; no version is loaded or retired. Labels then follow the versions'
        installs and retires (the registry re-resolves them in the same write). True when they changed."""
        return self.registry.set_routing(name, routing)

    async def in_loader_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a call into a loader library (or a free) on the loader thread, in submission order."""
        return await asyncio.get_running_loop().run_in_executor(self._loader_pool, fn, *args)

    async def free(self, served: ServedVersion) -> None:
        """Drop a drained compile: a loader's on the loader thread (its unload in order), a plain one beside it."""
        pool = self._loader_pool if served.origin is not None else self._free_pool
        await asyncio.get_running_loop().run_in_executor(pool, self._free_in_thread, served)

    def spawn(self, name: str, coro: Any) -> None:
        self._tasks.spawn(name, coro)

    async def settle(self) -> None:
        """Wait until no compile, drain or free runs (tests, shutdown)."""
        while self._compiling or any(life.busy for life in self._lives.values()):
            if self._compiling:  # asyncio.wait, not gather: a cancelled caller must not cancel the compiles
                await asyncio.wait(list(self._compiling))
            await self._tasks.wait()
            if not self._compiling and any(life.busy for life in self._lives.values()):
                await asyncio.sleep(0)  # a compile's result is being handed over

    async def close(self) -> None:
        """Shutdown: no new compiles; running ones are awaited and freed; every version retires and is freed."""
        self.closing = True
        for life in list(self._lives.values()):
            life.retire(reason="shutting down")
        await self.settle()

    def shutdown(self) -> None:
        """After close() and after the loaders' deinit: stop the threads."""
        for pool in (self._compile_pool, self._loader_pool, self._free_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- in worker threads ----
    def _compile_in_thread(self, name: str, version: int, applied: Applied, shapes: Shapes | None) -> ServedVersion:
        self.hooks.thread("compile", name, version)
        loaded = None
        if applied.loader is not None:
            try:
                loaded = applied.loader.load(applied.model, version)
            except LoaderError as exc:
                raise LoadError(f"{exc.version_error} - {exc}") from None
        try:
            if loaded is not None:
                self.hooks.thread("loaded", name, version)
            served = self.runtime.load(applied.model, version, Source(applied.path, loaded), shapes)
            self.hooks.thread("compiled", name, version)
        except BaseException:
            if loaded is not None:
                loaded.unload()  # nothing compiled from this load is left
            raise
        served.origin = loaded
        if served.batcher is not None:
            served.batcher.hooks = self.hooks
        return served

    def _free_in_thread(self, served: ServedVersion) -> None:
        self.hooks.thread("free", served.name, served.version)
        served.close()
        if served.origin is not None:
            served.origin.unload()

    # ---- bookkeeping ----
    def _compile(
        self, name: str, version: int, applied: Applied, shapes: Shapes | None
    ) -> tuple[concurrent.futures.Future[ServedVersion], asyncio.Future[ServedVersion]]:
        job = self._compile_pool.submit(self._compile_in_thread, name, version, applied, shapes)
        fut = asyncio.wrap_future(job)
        self._compiling.add(fut)
        fut.add_done_callback(self._compiling.discard)
        return job, fut

    def _revived(self, life: VersionLife) -> None:
        order = self._ended.get(life.name)
        if order is not None and life.version in order:
            order.remove(life.version)

    def _reached_end(self, life: VersionLife) -> None:
        """Keep the last KEEP_ENDED END versions of a model; forget older ones (registry slot and life)."""
        order = self._ended.setdefault(life.name, [])
        if life.version in order:
            order.remove(life.version)
        order.append(life.version)
        while len(order) > KEEP_ENDED:
            version = order.pop(0)
            old = self._lives.get((life.name, version))
            if old is not None and (old.busy or not old.ended):
                continue  # it came back meanwhile
            self._lives.pop((life.name, version), None)
            self.registry.forget(life.name, version)


class VersionLife:
    """The one writer of one version slot's state and compiled model."""

    def __init__(self, owner: Lifecycle, name: str, version: int) -> None:
        self._owner = owner
        self.name = name
        self.version = version
        self.generation = 0
        self.applied: Applied | None = None  # what the serving compile was made from
        self._loading: asyncio.Future[None] | None = None  # a load (not a reshape) in progress
        self._busy = 0  # compiles running + compiles draining or being freed
        self._reshaping = asyncio.Lock()

    def __repr__(self) -> str:
        status = self.status
        state = status.state.name if status else "-"
        return f"VersionLife({self.name!r}, {self.version}, {state}, gen={self.generation}, busy={self._busy})"

    # ---- reads ----
    @property
    def slot(self) -> Slot | None:
        model = self._owner.registry.models.get(self.name)
        return model.slots.get(self.version) if model is not None else None

    @property
    def status(self) -> VersionStatus | None:
        slot = self.slot
        return slot.status if slot is not None else None

    @property
    def serving(self) -> bool:
        slot = self.slot
        return slot is not None and slot.served is not None and slot.status.state == State.AVAILABLE

    @property
    def busy(self) -> bool:
        return self._busy > 0

    @property
    def busy_count(self) -> int:
        """Compiles running plus compiles draining or being freed."""
        return self._busy

    @property
    def ended(self) -> bool:
        status = self.status
        return status is not None and status.state == State.END

    def _set(self, status: VersionStatus) -> None:
        self._owner.registry.set_status(self.name, status)

    # ---- transitions ----
    async def load(self, applied: Applied) -> str | None:
        """Start or reload this version; what serves keeps serving until the new compile is in. Returns the error."""
        if self._owner.closing:
            return "the server is shutting down"
        self._owner._revived(self)
        self.generation += 1
        generation = self.generation
        serving = self.serving
        if serving:
            log.info("Will reload model: %s; version: %d ...", self.name, self.version)
        else:
            log.info("Will add model: %s; version: %d ...", self.name, self.version)
            fresh = VersionStatus(self.version)
            before = self.status
            if before is None or before.state >= State.UNLOADING:
                self._set(fresh)  # START
            self._set(fresh.moved(State.LOADING))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading = done
        clock = time.perf_counter()
        try:
            served = await self._compile(applied, None, generation)
        except Exception as exc:
            if generation != self.generation:
                return None  # retired or replaced meanwhile: this failure no longer matters
            message = _error_text(exc, self.name, self.version)
            log.error("Error occurred while loading model: %s; version: %d; error: %s", self.name, self.version,
                      message)  # fmt: skip
            if not serving:
                self._set(VersionStatus(self.version).moved(State.LOADING, message))
            return message
        finally:
            if self._loading is done:
                self._loading = None
            done.set_result(None)
        if served is not None:
            status = VersionStatus(
                self.version,
                State.AVAILABLE,
                cache=served.cache_reason,
                loaded_from_cache=served.loaded_from_cache,
                load_seconds=time.perf_counter() - clock,
            )
            self._install(served, applied, status)
        return None

    async def reshape(self, shapes: Shapes) -> bool:
        """Recompile the serving `auto` version for a request's shapes, beside it; swap it in when ready.

        True when a compile for these shapes serves (now or already); False when a reload or retire replaced the
        reshape meanwhile (the caller looks again). A failure keeps the previous shape serving: RESHAPE_ERROR.
        """
        async with self._reshaping:
            while self._loading is not None:  # a reload decides what serves; reshape what it installs
                await asyncio.shield(self._loading)
            slot, applied = self.slot, self.applied
            current = slot.served if slot is not None else None
            if slot is None or current is None or applied is None or slot.status.state != State.AVAILABLE:
                raise ServingError(Code.MODEL_VERSION_NOT_LOADED_ANYMORE)
            if all(spec.shape == shapes.get(spec.name, spec.shape) for spec in current.inputs):
                return True  # another request already reshaped it
            wanted = {**current.requested_shape, **shapes}
            log.info("Will reload model: %s version: %d (requested shape %s)", self.name, self.version, wanted)
            self.generation += 1
            generation = self.generation
            try:
                served = await self._compile(applied, wanted, generation)
            except Exception as exc:
                if generation != self.generation:
                    return False  # a reload or retire replaced it meanwhile (e.g. its loader was re-initialised)
                if not isinstance(exc, LoadError):
                    raise ServingError(Code.RESHAPE_ERROR, _error_text(exc, self.name, self.version)) from None
                log.warning("OV does not support reshaping model: %s with provided shape: %s", self.name, exc)
                raise ServingError(Code.RESHAPE_ERROR, str(exc)) from None
            if served is None:
                return False
            slot = self.slot
            assert slot is not None  # a slot is only forgotten at END, and END supersedes this generation
            status = replace(slot.status, cache=served.cache_reason, loaded_from_cache=served.loaded_from_cache)
            self._install(served, applied, status)
            return True

    def retire(self, reason: str = "") -> bool:
        """UNLOADING now; END once every compile returned and every served compile drained and was freed."""
        status = self.status
        self.generation += 1  # whatever compiles now will be freed when it returns
        if status is None or status.state >= State.UNLOADING:
            return False
        log.info("Will unload model: %s; version: %d ...%s", self.name, self.version, f" ({reason})" if reason else "")
        self._set(status.moved(State.UNLOADING))
        served = self._owner.registry.take(self.name, self.version)
        self.applied = None
        if served is not None:
            self._free_later(served)
        self._maybe_end()
        return True

    # ---- internals ----
    async def _compile(self, applied: Applied, shapes: Shapes | None, generation: int) -> ServedVersion | None:
        """A compile in the load pool; None (and the result freed) if `generation` was superseded meanwhile."""
        job, fut = self._owner._compile(self.name, self.version, applied, shapes)
        self._busy += 1
        try:
            served: ServedVersion = await asyncio.shield(fut)
        except asyncio.CancelledError:  # the caller went away
            if job.cancel():
                self._done_compiling()  # it had not started: nothing to free
            else:
                fut.add_done_callback(self._orphaned)  # running: free what it would have got
            raise
        except BaseException:
            self._done_compiling()
            raise
        if generation != self.generation or self._owner.closing:
            log.info("Model: %s; version: %d: a newer change superseded this compile; freeing it", self.name,
                     self.version)  # fmt: skip
            self._free_later(served)
            self._done_compiling()
            return None
        self._done_compiling()
        return served

    def _orphaned(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._free_later(fut.result())
        self._done_compiling()

    def _done_compiling(self) -> None:
        self._busy -= 1
        self._maybe_end()

    def _install(self, served: ServedVersion, applied: Applied, status: VersionStatus) -> None:
        old = self._owner.registry.install(self.name, served, status)
        self.applied = applied
        if old is not None:
            self._free_later(old)

    def _free_later(self, served: ServedVersion) -> None:
        self._busy += 1  # counted now, so no END can slip in before the free task starts
        self._owner.spawn(f"free {self.name} {self.version}", self._free(served))

    async def _free(self, served: ServedVersion) -> None:
        try:
            await self._owner.hooks.loop("drain", self.name, self.version)
            await served.drained()
            await self._owner.free(served)
        finally:
            self._busy -= 1
            self._maybe_end()

    def _maybe_end(self) -> None:
        slot = self.slot
        if slot is not None and slot.served is None and slot.status.state == State.UNLOADING and not self._busy:
            self._set(slot.status.moved(State.END))
            self._owner._reached_end(self)


def _error_text(exc: Exception, name: str, version: int) -> str:
    """The real error of a failed load; anything but a LoadError is a server fault and is logged with its trace."""
    if isinstance(exc, LoadError):
        return str(exc)
    log.error("Unexpected error while loading model: %s; version: %d", name, version, exc_info=exc)
    if isinstance(exc, OSError):
        return f"Cannot load model files: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"Internal error while loading: {type(exc).__name__}: {exc}"
