"""Desired (config + version folders) vs actual (registry) → a plan per model and version → executed.

A new or reloaded version is compiled beside what serves and swapped in only once it is AVAILABLE; a retiring version
goes UNLOADING, waits for its in-flight requests, is freed, then END. One reconcile runs at a time; triggers that arrive
meanwhile coalesce into one more run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from . import versions
from .config import Config, ConfigInvalid, ModelConfig
from .errors import Code, ServingError
from .loader_bridge import LoaderError
from .loaders import LoaderSet
from .registry import Registry
from .runtime import LoadError, Runtime, ServedVersion, Source
from .status import ReloadResult, State, VersionStatus

log = logging.getLogger("hotserve.modelmanager")

QUIET_SECONDS = 0.3  # a new version folder must be this quiet before it is loaded (half-copied folders)
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 300.0  # retry of a failed version whose files did not change


@dataclass(frozen=True)
class VersionPlan:
    start: frozenset[int] = frozenset()
    reload: frozenset[int] = frozenset()
    retire: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.start or self.reload or self.retire)


def plan_versions(
    current: Mapping[int, VersionStatus], requested: Iterable[int], stale: Iterable[int] = ()
) -> VersionPlan:
    """OVMS's rules (research §3.4): start what is new, reload what ended, failed or went stale, retire the rest."""
    wanted, registered = set(requested), set(current)
    stale = set(stale)
    reload = {v for v in wanted & registered if _needs_reload(current[v], v in stale)}
    retire = {v for v in registered - wanted if current[v].state < State.UNLOADING}
    return VersionPlan(frozenset(wanted - registered), frozenset(reload), frozenset(retire))


def _needs_reload(status: VersionStatus, stale: bool) -> bool:
    return status.state >= State.UNLOADING or status.failed or (stale and status.state == State.AVAILABLE)


@dataclass
class _Failure:
    key: tuple[object, ...]
    attempts: int
    next_try: float


class Reconciler:
    def __init__(
        self,
        source: Callable[[], Config],
        registry: Registry,
        runtime: Runtime,
        loaders: LoaderSet | None = None,
        parallel_loads: int = 2,
    ) -> None:
        self._source = source
        self.registry = registry
        self.runtime = runtime
        self.loaders = loaders or LoaderSet()
        self._pool = ThreadPoolExecutor(max_workers=parallel_loads, thread_name_prefix="load")
        self._parallel = asyncio.Semaphore(parallel_loads)
        # the config (and loader generation) each served version was compiled with
        self._applied: dict[str, dict[int, tuple[ModelConfig, int]]] = {}
        self._said: set[str] = set()  # problems already logged: each is logged once while it lasts
        self._said_now: set[str] = set()
        self._wake: asyncio.TimerHandle | None = None
        self._reshape_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._force = False
        self._forced_run = False
        self._desired: dict[str, ModelConfig] = {}
        self._failures: dict[tuple[str, int], _Failure] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._pending: list[asyncio.Future[ReloadResult]] = []
        self._runner: asyncio.Task[None] | None = None
        self.config: Config | None = None
        self.last_result: ReloadResult | None = None
        self.runs = 0
        self.failed_runs = 0

    # ---- triggering ----
    def trigger(self, force: bool = False) -> asyncio.Future[ReloadResult]:
        """Ask for a reconcile; triggers during a run coalesce into one more run. Await the result if needed.

        `force` (an operator's reload: API, SIGHUP) also retries failed versions now instead of after their backoff.
        """
        self._force |= force
        fut: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return fut

    async def _run(self) -> None:
        while self._pending:
            waiting, self._pending = self._pending, []
            self._forced_run, self._force = self._force, False
            if self._forced_run:
                self._failures.clear()
            try:
                result = await self.reconcile()
            except Exception as exc:  # a bug must not kill the trigger loop; report it as the result
                log.exception("Reconcile failed")
                result = ReloadResult(False, False, (f"internal error: {exc}",))
            for fut in waiting:
                if not fut.done():
                    fut.set_result(result)

    # ---- one reconcile ----
    async def reconcile(self) -> ReloadResult:
        self.runs += 1
        log.log(5, "Reconcile #%d started", self.runs)
        if self._forced_run:
            self._said.clear()  # an operator asked: say everything again
        self._said_now = set()
        try:
            result = await self._reconcile()
        finally:
            self._said = self._said_now
        self.last_result = result
        self.failed_runs += not result.ok
        log.log(5, "Reconcile #%d done: changed=%s errors=%d", self.runs, result.changed, len(result.errors))
        return result

    def _say(self, level: int, message: str) -> None:
        """Log a problem once while it lasts, not on every poll."""
        self._said_now.add(message)
        if message not in self._said:
            log.log(level, "%s", message)

    async def _reconcile(self) -> ReloadResult:
        try:
            config = self._source()
        except ConfigInvalid as exc:
            for error in exc.errors:
                self._say(logging.ERROR, f"Configuration invalid, nothing applied: {error}")
            return ReloadResult(False, False, tuple(str(e) for e in exc.errors), config_valid=False)
        errors: list[str] = [str(e) for e in config.errors]
        for error in config.errors:
            self._say(logging.ERROR, f"Invalid entry left as it was: {error}")
        self.config = config
        errors += self.loaders.sync(config.loaders, retry=self._forced_run)
        for error in errors[len(config.errors) :]:
            self._say(logging.ERROR, error)
        changed = False
        desired = {m.name: m for m in config.models}
        untouched = set(config.model_errors)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._model(m)) for m in desired.values()]
        for task in tasks:
            model_changed, model_errors = task.result()
            changed |= model_changed
            errors += model_errors
        for name in list(self.registry.models):
            if name not in desired and name not in untouched and self._desired.get(name) is not None:
                log.info("Retiring all versions of model: %s (removed from the config)", name)
                changed |= self._retire_all(name)
                self.loaders.retire_model(self._desired[name])
                self._desired[name] = None  # type: ignore[assignment]
        self._desired.update(desired)
        errors += self._still_failing(desired, errors)
        return ReloadResult(not errors, changed, tuple(errors))

    def _still_failing(self, desired: Mapping[str, ModelConfig], reported: list[str]) -> list[str]:
        """Versions that failed before and wait for their retry: the result describes the state, not just this run."""
        found = []
        for name in desired:
            for version, slot in sorted(self.registry.models[name].slots.items()):
                line = f"model {name} version {version}: {slot.status.error_message}"
                if slot.status.failed and line not in reported:
                    found.append(line)
        return found

    async def _model(self, model: ModelConfig) -> tuple[bool, list[str]]:
        async with self._parallel:
            try:
                return await self._reconcile_model(model)
            except Exception as exc:  # one model's bug must not stop the others' changes
                log.exception("Reconciling model %s failed", model.name)
                return False, [f"model {model.name}: internal error: {exc}"]

    async def _reconcile_model(self, model: ModelConfig) -> tuple[bool, list[str]]:
        entry = self.registry.ensure(model.name)
        scan = versions.scan(model.base_path)
        for warning in scan.warnings:
            self._say(logging.WARNING, f"{warning} (model {model.name})")
        entry.error = None
        if not scan.exists:
            entry.error = f"Directory does not exist: {model.base_path}"
            if any(s.status.state < State.UNLOADING for s in entry.slots.values()):
                log.error("%s; retiring all versions of model %s", entry.error, model.name)
                return self._retire_all(model.name), [f"model {model.name}: {entry.error}"]
            self._say(logging.ERROR, f"{entry.error} (model {model.name})")
            return False, [f"model {model.name}: {entry.error}"]
        previous = self._desired.get(model.name)
        if previous is not None and previous.custom_loader_options != model.custom_loader_options:
            self.loaders.retire_model(previous)  # the loader forgets what it knew of the old options (enable_file…)
        loader = None
        if model.loader_name is not None:
            loader = self.loaders.get(model.loader_name)
            if loader is None:
                why = self.loaders.failure(model.loader_name)
                entry.error = f"Specified custom loader {model.loader_name} not found" + (f": {why}" if why else "")
                self._say(logging.ERROR, f"{entry.error}. In case any models are loaded, will be unloading them "
                                         f"(model {model.name})")  # fmt: skip
                return self._retire_all(model.name), [f"model {model.name}: {entry.error}"]
        now = time.time()
        available = {v for v, path in scan.versions.items() if self._ready_on_disk(model.name, v, path, now)}
        if loader is not None:
            available = {v for v in available if not loader.is_blacklisted(model.name, v, log_reason=True)}
        generation = self.loaders.generation(model)
        applied = self._applied.setdefault(model.name, {})
        stale = {
            v
            for v, (cfg, gen) in applied.items()
            if (cfg.needs_reload(model) or gen != generation)
            and not (v in scan.versions and self._held(model, v, scan))
        }  # a reload that failed (the old compile keeps serving) is retried with the same backoff as a failed load
        changed, errors, failed = False, [], set()
        while True:
            current = {v: s.status for v, s in entry.slots.items()}
            held = {v for v in available if current.get(v) and current[v].failed and self._held(model, v, scan)}
            requested = set(model.version_policy.select(sorted(available - failed - held)))
            plan = plan_versions(current, requested, stale)
            todo = sorted(plan.start | plan.reload)
            if not todo:
                break
            for version in todo:
                error = await self._load(model, version, scan.versions[version], loader, current.get(version))
                changed = True
                if error is not None:
                    failed.add(version)
                    errors.append(f"model {model.name} version {version}: {error}")
            stale -= set(todo)
        retire = plan.retire - failed - held
        for version in retire:
            changed = True
            self._retire(model.name, version)
        return changed, errors

    def _ready_on_disk(self, name: str, version: int, path: object, now: float) -> bool:
        """A folder not yet served must have been quiet for QUIET_SECONDS: a half-copied folder is not ready."""
        slot = self.registry.models[name].slots.get(version)
        if (
            self.runs == 1
            or self._forced_run
            or (slot is not None and slot.status.state < State.UNLOADING and not slot.status.failed)
        ):
            return True  # at start-up or on an operator's reload the files are what they are
        quiet = versions.quiet_since(path)  # type: ignore[arg-type]
        if now - quiet >= QUIET_SECONDS:
            return True
        log.info("Version %d of model %s is still being written; waiting until it is quiet", version, name)
        self._wake_later(QUIET_SECONDS)
        return False

    def _wake_later(self, delay: float) -> None:
        """Come back for a folder that is not ready yet, whether or not anything watches the disk."""
        if self._wake is None or self._wake.cancelled() or self._wake.when() < asyncio.get_running_loop().time():
            self._wake = asyncio.get_running_loop().call_later(delay, self.trigger)

    def _held(self, model: ModelConfig, version: int, scan: versions.VersionScan) -> bool:
        """A failed version is retried when its files or config change, otherwise with backoff."""
        failure = self._failures.get((model.name, version))
        if failure is None:
            return False
        if failure.key != _failure_key(model, scan.versions[version]):
            return False
        return time.monotonic() < failure.next_try

    async def _load(
        self, model: ModelConfig, version: int, path: object, loader: object, before: VersionStatus | None
    ) -> str | None:
        """Start or reload one version. The old compiled model (if any) keeps serving until the new one is in."""
        name = self.registry.ensure(model.name).name
        slot = self.registry.models[name].slots.get(version)
        serving = slot is not None and slot.served is not None and slot.status.state == State.AVAILABLE
        if serving:
            log.info("Will reload model: %s; version: %d ...", name, version)
            status = slot.status  # type: ignore[union-attr]
        else:
            log.info("Will add model: %s; version: %d ...", name, version)
            status = VersionStatus(version)
            if before is None or before.state >= State.UNLOADING:
                self.registry.set_status(name, status)  # START
            status = status.moved(State.LOADING)
            self.registry.set_status(name, status)
        started = versions.quiet_since(path)  # type: ignore[arg-type]
        clock = time.perf_counter()
        try:
            served = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._compile, model, version, path, loader
            )
        except LoadError as exc:
            message = str(exc)
            if versions.quiet_since(path) != started:  # type: ignore[arg-type]
                log.info("Version %d of model %s changed while loading; will retry when quiet", version, name)
                self._wake_later(QUIET_SECONDS)
            self._note_failure(model, version, path)
            log.error("Error occurred while loading model: %s; version: %d; error: %s", name, version, message)
            if not serving:
                self.registry.set_status(name, status.moved(State.LOADING, message))
            return message
        self._failures.pop((name, version), None)
        new_status = VersionStatus(
            version,
            State.AVAILABLE,
            cache=served.cache_reason,
            loaded_from_cache=served.loaded_from_cache,
            load_seconds=time.perf_counter() - clock,
        )
        old = self.registry.install(name, served, new_status)
        self._applied.setdefault(name, {})[version] = (model, self.loaders.generation(model))
        if old is not None:
            self._spawn(self._free(old))
        return None

    def _compile(
        self, model: ModelConfig, version: int, path: object, loader: object, shapes: object = None
    ) -> ServedVersion:
        loaded = None
        if loader is not None:
            try:
                loaded = loader.load(model, version)  # type: ignore[attr-defined]
            except LoaderError as exc:
                raise LoadError(f"{exc.version_error} - {exc}") from None
        return self.runtime.load(model, version, Source(path, loaded), shapes)  # type: ignore[arg-type]

    def _note_failure(self, model: ModelConfig, version: int, path: object) -> None:
        key = _failure_key(model, path)
        previous = self._failures.get((model.name, version))
        attempts = previous.attempts + 1 if previous is not None and previous.key == key else 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempts - 1))
        self._failures[(model.name, version)] = _Failure(key, attempts, time.monotonic() + delay)

    # ---- auto shape / auto batch ----
    async def reshape(self, name: str, version: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """Recompile one `auto` version for a request's shapes, beside the serving one; swap it in when ready.

        Concurrent requests for the new shape wait on the lock and then find it done; if it fails, the previous
        shape keeps serving and the request gets RESHAPE_ERROR.
        """
        lock = self._reshape_locks.setdefault((name, version), asyncio.Lock())
        async with lock:
            slot = self.registry.models[name].slots.get(version)
            current = slot.served if slot is not None else None
            applied = self._applied.get(name, {}).get(version)
            if current is None or applied is None:
                raise ServingError(Code.MODEL_VERSION_NOT_LOADED_ANYMORE)
            if all(spec.shape == shapes.get(spec.name, spec.shape) for spec in current.inputs):
                return  # another request already reshaped it
            model = applied[0]
            wanted = {**current.requested_shape, **shapes}
            log.info("Will reload model: %s version: %d (requested shape %s)", name, version, wanted)
            path = versions.scan(model.base_path).versions.get(version)
            if path is None:
                raise ServingError(Code.MODEL_VERSION_NOT_LOADED_ANYMORE)
            loader = self.loaders.get(model.loader_name) if model.loader_name else None
            try:
                served = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._compile, model, version, path, loader, wanted
                )
            except LoadError as exc:
                log.warning("OV does not support reshaping model: %s with provided shape: %s", name, exc)
                raise ServingError(Code.RESHAPE_ERROR, str(exc)) from None
            status = replace(slot.status, cache=served.cache_reason, loaded_from_cache=served.loaded_from_cache)
            old = self.registry.install(name, served, status)
            if old is not None:
                self._spawn(self._free(old))

    # ---- retiring ----
    def _retire_all(self, name: str) -> bool:
        entry = self.registry.models.get(name)
        if entry is None:
            return False
        live = [v for v, s in entry.slots.items() if s.status.state < State.UNLOADING]
        for version in live:
            self._retire(name, version)
        return bool(live)

    def _retire(self, name: str, version: int) -> None:
        """UNLOADING now; END once in-flight requests finish and the model is freed (in the background)."""
        log.info("Will unload model: %s; version: %d ...", name, version)
        slot = self.registry.models[name].slots[version]
        self.registry.set_status(name, slot.status.moved(State.UNLOADING))
        served = self.registry.take(name, version)
        applied = self._applied.get(name, {}).pop(version, None)
        self._spawn(self._finish_retire(name, version, served, applied[0] if applied else None))

    async def _finish_retire(
        self, name: str, version: int, served: ServedVersion | None, model: ModelConfig | None
    ) -> None:
        if served is not None:
            await self._free(served)
            self.loaders.unload_version(model, version)
        slot = self.registry.models[name].slots[version]
        if slot.served is None and slot.status.state == State.UNLOADING:  # not resurrected meanwhile
            self.registry.set_status(name, slot.status.moved(State.END))

    async def _free(self, served: ServedVersion) -> None:
        await served.drained()
        served.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def settle(self) -> None:
        """Wait for background retirements (tests, shutdown)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.loaders.close()


def _failure_key(model: ModelConfig, path: object) -> tuple[object, ...]:
    return (model, versions.quiet_since(path))  # type: ignore[arg-type]
