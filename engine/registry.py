"""name → versions → the served version a request gets; leases so a retiring version waits for its requests.

Everything here runs on the event loop thread, so there are no locks: a swap is one assignment. Front ends read;
only engine/lifecycle.py writes a version's slot and a model's routing (and the reconciler a model's `error`).
Every write that can change a version's availability, and every routing change, rebuilds the model's `Routes`
(engine/routing.py) in the same call: a label follows its version the moment that version is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from types import TracebackType

from .config import Routing
from .errors import Code, ServingError
from .routing import NO_ROUTES, Routes, resolve
from .safe_text import safe
from .served import ServedVersion
from .status import State, VersionStatus, log_change

log = logging.getLogger("hotserve.modelmanager")

LOAD_WAIT_SECONDS = 10.0  # OVMS waits this long for a version that is still loading before answering UNAVAILABLE


@dataclass
class VersionStats:
    """Cumulative per-version counters for ModelStatistics and metrics."""

    success: int = 0
    failure: int = 0
    success_ns: int = 0
    failure_ns: int = 0
    last_inference_ms: int = 0
    executions: int = 0  # OpenVINO inferences run (a dynamic batch is one), counted by the served version


@dataclass
class Slot:
    status: VersionStatus
    served: ServedVersion | None = None
    stats: VersionStats = field(default_factory=VersionStats)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Model:
    name: str
    slots: dict[int, Slot] = field(default_factory=dict)
    error: str | None = None  # a model-level problem (missing base_path, unknown loader, invalid config entry)
    routing: Routing = field(default_factory=Routing)  # as configured
    routes: Routes = NO_ROUTES  # as resolved against what is AVAILABLE now
    _default: int | None = field(default=None, repr=False, compare=False)
    _default_known: bool = field(default=False, repr=False, compare=False)

    def default_version(self) -> int | None:
        """The highest AVAILABLE version: what a request without a version gets (cached; the registry's writes
        invalidate it)."""
        if not self._default_known:
            ready = [v for v, s in self.slots.items() if s.status.state == State.AVAILABLE and s.served is not None]
            self._default = max(ready) if ready else None
            self._default_known = True
        return self._default

    def main_version(self) -> int | None:
        """What a request naming no version is served by, for metadata, readiness and health: with `traffic`, the
        most weighted AVAILABLE version (None when no weighted one is); without, the default version."""
        return self.routes.main if self.routes.routed else self.default_version()

    def changed(self) -> None:
        self._default_known = False

    def available(self) -> list[int]:
        return [v for v, s in self.slots.items() if s.status.state == State.AVAILABLE and s.served is not None]

    def reroute(self) -> None:
        if self.routes is NO_ROUTES and not self.routing:
            return  # no labels, no traffic: nothing to resolve (most models)
        routes, said = resolve(self.name, self.routing, self.available(), self.routes)
        self.routes = routes
        for line in said:
            log.info("%s", line)


class Registry:
    def __init__(self) -> None:
        self.models: dict[str, Model] = {}

    # ---- reads (front end) ----
    def model(self, name: str) -> Model:
        found = self.models.get(name)
        if found is None:
            raise ServingError(Code.MODEL_NAME_MISSING)
        return found

    def slot(
        self, name: str, version: int | str | None, key: str | None = None, draw: bool = False
    ) -> tuple[int, Slot]:
        """The slot a request names: a number, a label (str), or None/0: with `traffic`, a version drawn by weight
        for an inference (`draw`; sticky for a routing `key`) and the most weighted one for metadata and readiness;
        without, the default version."""
        model = self.model(name)
        if not version:
            routes = model.routes
            if routes.routed:
                number = (routes.route(key) if key else routes.draw()) if draw else routes.main
                if number is None:
                    raise ServingError(Code.MODEL_VERSION_MISSING, "no version that traffic names is AVAILABLE")
                return number, model.slots[number]
            default = model.default_version()
            if default is None:
                raise ServingError(Code.MODEL_VERSION_MISSING)
            return default, model.slots[default]
        if isinstance(version, str):
            number = model.routes.labels.get(version)
            if number is None:
                raise ServingError(Code.MODEL_VERSION_LABEL_MISSING, f"label: {safe(version)}")
            found = model.slots.get(number)
            if found is None:
                raise ServingError(Code.MODEL_VERSION_MISSING, f"label {version} names version {number}")
            return number, found
        found = model.slots.get(version)
        if found is None:
            raise ServingError(Code.MODEL_VERSION_MISSING)
        return version, found

    def lease(
        self, name: str, version: int | str | None, wait: float = LOAD_WAIT_SECONDS, key: str | None = None
    ) -> Lease:
        """Hold a served version for the length of a request (`async with`); retiring it waits for the release."""
        _, slot = self.slot(name, version, key, draw=True)
        return Lease(self, slot, wait)

    async def _ready(self, slot: Slot, wait: float) -> ServedVersion:
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            status = slot.status
            if status.state == State.AVAILABLE and slot.served is not None:
                return slot.served
            if status.state > State.AVAILABLE:
                raise ServingError(Code.MODEL_VERSION_NOT_LOADED_ANYMORE)
            remaining = deadline - asyncio.get_running_loop().time()
            if status.failed or remaining <= 0:
                detail = status.error_message if status.failed else ""
                raise ServingError(Code.MODEL_VERSION_NOT_LOADED_YET, detail)
            slot.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(slot.changed.wait(), remaining)

    def statuses(self, name: str) -> list[VersionStatus]:
        return [s.status for _, s in sorted(self.model(name).slots.items())]

    # ---- writes (lifecycle) ----
    def ensure(self, name: str) -> Model:
        return self.models.setdefault(name, Model(name))

    def set_routing(self, name: str, routing: Routing) -> bool:
        """Apply a model's labels and traffic (no version is touched); True when they changed."""
        model = self.ensure(name)
        if model.routing == routing:
            return False
        model.routing = routing
        model.reroute()
        return True

    def set_status(self, name: str, status: VersionStatus) -> None:
        model = self.ensure(name)
        model.changed()
        slot = model.slots.get(status.version)
        if slot is None:
            slot = model.slots[status.version] = Slot(status)
            log_change(name, status)
        else:
            before = slot.status
            slot.status = status
            if (before.state, before.error_code) != (status.state, status.error_code):
                log_change(name, status)
        model.reroute()
        slot.changed.set()

    def install(self, name: str, served: ServedVersion, status: VersionStatus) -> ServedVersion | None:
        """Swap in a compiled version atomically; returns the one it replaced (to drain and free)."""
        model = self.ensure(name)
        before = model.default_version()
        slot = model.slots.get(served.version)
        old = slot.served if slot is not None else None
        if slot is None:
            slot = model.slots[served.version] = Slot(status)
        slot.served = served
        served.counts = slot.stats  # its executions count on the slot, across reloads
        model.changed()
        self.set_status(name, status)
        self._log_default(model, before)
        return old

    def take(self, name: str, version: int) -> ServedVersion | None:
        """Detach a version's compiled model (when it retires); the caller drains and frees it."""
        model = self.models[name]
        before = model.default_version()
        slot = model.slots[version]
        served, slot.served = slot.served, None
        model.changed()
        model.reroute()
        self._log_default(model, before)
        return served

    def forget(self, name: str, version: int) -> None:
        """Drop an END version's slot (only the last few END versions are kept)."""
        model = self.models.get(name)
        if model is not None:
            model.slots.pop(version, None)
            model.changed()
            model.reroute()

    def _log_default(self, model: Model, before: int | None) -> None:
        after = model.default_version()
        if after == before:
            return
        if after is None:
            log.info("Model: %s will not have default version since no version is available.", model.name)
        else:
            log.info("Updated default version for model: %s, to: %d (from: %s)", model.name, after, before)


class Lease:
    """`async with registry.lease(...) as slot`: a plain object, not a generator-based context manager (per request)."""

    __slots__ = ("_registry", "_served", "_slot", "_wait")

    def __init__(self, registry: Registry, slot: Slot, wait: float) -> None:
        self._registry = registry
        self._slot = slot
        self._wait = wait
        self._served: ServedVersion | None = None

    async def __aenter__(self) -> Slot:
        slot = self._slot
        served = slot.served
        if slot.status.state != State.AVAILABLE or served is None:
            served = await self._registry._ready(slot, self._wait)
        served.acquire()
        self._served = served
        return slot

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._served is not None:
            self._served.release()
            self._served = None
