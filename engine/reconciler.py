"""Desired (config + version folders) vs actual (registry) → a plan per model and version, handed to the lifecycle.

The reconciler only decides: which versions start, reload or retire, and when a failed one is retried. Each version's
VersionLife (engine/lifecycle.py) carries the decision out. One reconcile runs at a time; triggers that arrive
meanwhile coalesce into one more run. File-system work and loader calls run off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import versions
from .config import Config, ConfigInvalid, ModelConfig, Routing
from .errors import Code, ServingError
from .lifecycle import Applied, Hooks, Lifecycle
from .loaders import LoaderSet, ModelLoader
from .registry import Registry
from .runtime import Runtime
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
        hooks: Hooks | None = None,
    ) -> None:
        self._source = source
        self.registry = registry
        self.loaders = loaders or LoaderSet()
        self.lifecycle = Lifecycle(registry, runtime, parallel_loads, hooks)
        self._parallel = asyncio.Semaphore(parallel_loads)
        self._said: set[str] = set()  # problems already logged: each is logged once while it lasts
        self._said_now: set[str] = set()
        self._wake: asyncio.TimerHandle | None = None
        self._force = False
        self._forced_run = False
        self._desired: dict[str, ModelConfig | None] = {}
        self._failures: dict[tuple[str, int], _Failure] = {}
        self._pending: list[asyncio.Future[ReloadResult]] = []
        self._runner: asyncio.Task[None] | None = None
        self._router: asyncio.Task[None] | None = None  # applies labels and weights while a run is loading
        self._reroute = False  # a trigger came during the run: its file's routing is to be applied now
        self._rerouted = False  # the router changed routing: the next run reports it as a change
        self._routings = 0  # runs that applied their file's routing: a router read older than the last is dropped
        self._run_routed = False  # the running run has applied its routing (before: it would undo the router's)
        self._closing = False
        self.config: Config | None = None
        self.last_result: ReloadResult | None = None
        self.runs = 0
        self.failed_runs = 0

    # ---- triggering ----
    def trigger(self, force: bool = False) -> asyncio.Future[ReloadResult]:
        """Ask for a reconcile; triggers during a run coalesce into one more run. Await the result if needed.

        `force` (an operator's reload: API, SIGHUP) also retries failed versions now instead of after their backoff.
        """
        fut: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_result(ReloadResult(False, False, ("the server is shutting down",)))
            return fut
        self._force |= force
        self._pending.append(fut)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="reconcile")
        else:  # the run may compile for minutes: a label or weight edit (a rollback) must not wait for it
            self._reroute = True
            if self._run_routed:
                self._start_router()
        return fut

    def _start_router(self) -> None:
        if self._router is None or self._router.done():
            self._router = asyncio.create_task(self._route_now(), name="reroute")

    async def _route_now(self) -> None:
        """Apply the file's labels and weights to the models being served, now; versions are left to the next run
        (labels are availability-first, so they never point at a version before it is AVAILABLE)."""
        while self._reroute and not self._closing:
            self._reroute = False
            routings = self._routings
            try:
                config = await asyncio.to_thread(self._source)
            except ConfigInvalid:
                return  # the next run reports it
            except Exception:  # a bug must not go unseen; the next run applies everything anyway
                log.exception("Applying labels and traffic failed")
                return
            if routings != self._routings:
                continue  # a run applied a file read after this one
            for model in config.models:
                if self._desired.get(model.name) is not None and model.name in self.registry.models:
                    self._rerouted |= self.lifecycle.route(model.name, model.routing)

    async def _run(self) -> None:
        while self._pending and not self._closing:
            waiting, self._pending = self._pending, []
            self._reroute, self._run_routed = False, False  # this run reads the file after these triggers
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
            config = await asyncio.to_thread(self._source)  # reading and schema checks: off the loop
        except ConfigInvalid as exc:
            for error in exc.errors:
                self._say(logging.ERROR, f"Configuration invalid, nothing applied: {error}")
            return ReloadResult(False, False, tuple(str(e) for e in exc.errors), config_valid=False)
        errors: list[str] = [str(e) for e in config.errors]
        for error in config.errors:
            applied = error.model in self._desired or (error.loader is not None and self.loaders.get(error.loader))
            what = "Invalid entry left as it was" if applied else "Invalid entry not loaded"
            self._say(logging.ERROR, f"{what}: {error}")
        for warning in config.warnings:
            self._say(logging.WARNING, f"{config.path}: {warning}")  # logged once while it lasts
        self.config = config
        errors += await self.loaders.sync(config.loaders, self.lifecycle.in_loader_thread, retry=self._forced_run)
        for error in errors[len(config.errors) :]:
            self._say(logging.ERROR, error)
        changed, self._rerouted = self._rerouted, False
        desired = {m.name: m for m in config.models}
        invalid = {name: errs for name, errs in config.model_errors.items() if name not in desired}
        for name, model_errors in invalid.items():
            entry = self.registry.ensure(name)  # at start-up it is listed with its error, as on a live reload
            entry.error = "Invalid config entry: " + "; ".join(f"{e.pointer}: {e.message}" for e in model_errors)
        for model in desired.values():  # before the loads: a label moved to a new version waits for its install
            changed |= self.lifecycle.route(model.name, model.routing)
        self._routings += 1
        self._run_routed = True
        if self._reroute:  # the file changed while this run read it: apply the newer routing now
            self._start_router()
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._model(m)) for m in desired.values()]
        for task in tasks:
            model_changed, model_errors = task.result()
            changed |= model_changed
            errors += model_errors
        for name in list(self.registry.models):
            if name in desired or name in invalid:
                continue
            if self._desired.get(name) is not None:
                log.info("Retiring all versions of model: %s (removed from the config)", name)
                changed |= self._retire_all(name)
                self.lifecycle.route(name, Routing())
                await self.loaders.retire_model(self._desired[name], self.lifecycle.in_loader_thread)
                self._desired[name] = None
                self._forget_failures(name)
            entry = self.registry.models[name]
            entry.error = None  # no longer configured: no error of its own (its END versions stay listed)
            if not entry.slots:
                del self.registry.models[name]  # an invalid entry that never served, now removed
        self._desired.update(desired)
        errors += self._still_failing(desired, errors)
        return ReloadResult(not errors, changed, tuple(errors))

    def _forget_failures(self, name: str) -> None:
        for key in [k for k in self._failures if k[0] == name]:
            del self._failures[key]

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
        if self._closing:
            return False, []
        entry = self.registry.ensure(model.name)
        scan = await asyncio.to_thread(versions.scan, model.base_path)
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
            # the loader forgets what it knew of the old options (enable_file…)
            await self.loaders.retire_model(previous, self.lifecycle.in_loader_thread)
        loader = None
        if model.loader_name is not None:
            loader = self.loaders.get(model.loader_name)
            if loader is None:
                why = self.loaders.failure(model.loader_name)
                entry.error = f"Specified custom loader {model.loader_name} not found" + (f": {why}" if why else "")
                self._say(logging.ERROR, f"{entry.error}. In case any models are loaded, will be unloading them "
                                         f"(model {model.name})")  # fmt: skip
                return self._retire_all(model.name), [f"model {model.name}: {entry.error}"]
        quiet = await asyncio.to_thread(self._quiet_times, model.name, scan)
        now = time.time()
        available = {v for v in scan.versions if self._ready_on_disk(model.name, v, quiet, now)}
        being_written = set(scan.versions) - available  # still on disk: not a reason to retire what is registered
        if loader is not None:
            available = await self.lifecycle.in_loader_thread(_not_blacklisted, loader, model.name, available)
        generation = self.loaders.generation(model)
        stale = set()
        for version, slot in entry.slots.items():
            life = self.lifecycle.get(model.name, version)
            applied = life.applied if life is not None and slot.served is not None else None
            if applied is None or not (applied.model.needs_reload(model) or applied.loader_generation != generation):
                continue
            if not (version in scan.versions and self._held(model, version, quiet)):
                stale.add(version)  # a reload that failed (the old compile serves) is retried with the same backoff
        changed, errors, failed = False, [], set()
        while True:
            if self._closing:
                return changed, errors
            current = {v: s.status for v, s in entry.slots.items()}
            held = {v for v in available if current.get(v) and current[v].failed and self._held(model, v, quiet)}
            requested = set(model.version_policy.select(sorted(available - failed - held)))
            plan = plan_versions(current, requested, stale)
            todo = sorted(plan.start | plan.reload)
            if not todo:
                break
            for version in todo:
                if self._closing:
                    return changed, errors  # shutting down: no new compile starts
                error = await self._load(model, version, scan.versions[version], loader, quiet.get(version))
                changed = True
                if error is not None:
                    failed.add(version)
                    errors.append(f"model {model.name} version {version}: {error}")
            stale -= set(todo)
        retire = plan.retire - failed - held - being_written
        for version in retire:
            changed |= self.lifecycle.life(model.name, version).retire()
        return changed, errors

    def _quiet_times(self, name: str, scan: versions.VersionScan) -> dict[int, float]:
        """When each version folder not serving cleanly (new, ended, failed) was last written: a walk, in a thread."""
        model = self.registry.models.get(name)
        times = {}
        for version, path in scan.versions.items():
            slot = model.slots.get(version) if model is not None else None
            clean = slot is not None and slot.status.state < State.UNLOADING and not slot.status.failed
            if not clean or (name, version) in self._failures:
                times[version] = versions.quiet_since(path)
        return times

    def _ready_on_disk(self, name: str, version: int, quiet: Mapping[int, float], now: float) -> bool:
        """A folder not yet served must have been quiet for QUIET_SECONDS: a half-copied folder is not ready."""
        if self.runs == 1 or self._forced_run or version not in quiet:
            return True  # at start-up or on an operator's reload the files are what they are
        if now - quiet[version] >= QUIET_SECONDS:
            return True
        log.info("Version %d of model %s is still being written; waiting until it is quiet", version, name)
        self._wake_later(QUIET_SECONDS)
        return False

    def _wake_later(self, delay: float) -> None:
        """Come back for a folder that is not ready yet, whether or not anything watches the disk."""
        if self._closing:
            return
        if self._wake is None or self._wake.cancelled() or self._wake.when() < asyncio.get_running_loop().time():
            self._wake = asyncio.get_running_loop().call_later(delay, self.trigger)

    def _held(self, model: ModelConfig, version: int, quiet: Mapping[int, float]) -> bool:
        """A failed version is retried when its files or config change, otherwise with backoff."""
        failure = self._failures.get((model.name, version))
        if failure is None:
            return False
        if failure.key != (model.without_routing(), quiet.get(version)):
            return False
        return time.monotonic() < failure.next_try

    async def _load(
        self, model: ModelConfig, version: int, path: Path, loader: ModelLoader | None, started: float | None
    ) -> str | None:
        """Start or reload one version through its lifecycle; a failure is remembered for the backoff."""
        if started is None:
            started = await asyncio.to_thread(versions.quiet_since, path)
        error = await self.lifecycle.life(model.name, version).load(Applied(model, path, loader))
        if error is None:
            self._failures.pop((model.name, version), None)
            return None
        now_quiet = await asyncio.to_thread(versions.quiet_since, path)
        if now_quiet != started:
            log.info("Version %d of model %s changed while loading; will retry when quiet", version, model.name)
            self._wake_later(QUIET_SECONDS)
        self._note_failure(model, version, now_quiet)
        return error

    def _note_failure(self, model: ModelConfig, version: int, quiet: float) -> None:
        key = (model.without_routing(), quiet)  # a label or weight edit does not retry a failed load
        previous = self._failures.get((model.name, version))
        attempts = previous.attempts + 1 if previous is not None and previous.key == key else 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempts - 1))
        self._failures[(model.name, version)] = _Failure(key, attempts, time.monotonic() + delay)

    # ---- auto shape / auto batch (called by the front end) ----
    async def reshape(self, name: str, version: int, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Recompile one `auto` version for a request's shapes (see VersionLife.reshape)."""
        life = self.lifecycle.get(name, version)
        if life is None:
            raise ServingError(Code.MODEL_VERSION_NOT_LOADED_ANYMORE)
        return await life.reshape(shapes)

    # ---- retiring ----
    def _retire_all(self, name: str) -> bool:
        entry = self.registry.models.get(name)
        if entry is None:
            return False
        retired = False
        for version in list(entry.slots):
            if version in entry.slots:  # a retire reaching END may have pruned an older END slot
                retired |= self.lifecycle.life(name, version).retire()
        return retired

    async def settle(self) -> None:
        """Wait for background compiles, drains and frees (tests)."""
        await self.lifecycle.settle()

    # ---- shutdown ----
    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self) -> None:
        """From now on no reconcile and no compile starts; later triggers answer "shutting down"."""
        self._closing = True
        if self._wake is not None:
            self._wake.cancel()

    async def quiesce(self) -> None:
        """begin_shutdown(), then wait for the running reconcile (it finishes its running compiles only)."""
        self.begin_shutdown()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._router is not None:
            await asyncio.gather(self._router, return_exceptions=True)
        for fut in self._pending:
            if not fut.done():
                fut.set_result(ReloadResult(False, False, ("the server is shutting down",)))
        self._pending.clear()

    async def close(self) -> None:
        """Shutdown after the front ends stopped: every version drained and freed, then the loaders deinitialised."""
        await self.quiesce()
        await self.lifecycle.close()
        await self.lifecycle.in_loader_thread(self.loaders.close)
        self.lifecycle.shutdown()


def _not_blacklisted(loader: ModelLoader, name: str, available: set[int]) -> set[int]:
    return {v for v in available if not loader.is_blacklisted(name, v, log_reason=True)}
