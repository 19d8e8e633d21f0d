"""Protocol-neutral serving: lookup, request validation (OVMS's order and messages), inference, metadata, status.

The protocol adapters (kserve.py, tfs.py, rest.py) only convert messages to and from these calls.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..config_traffic import label_problem
from ..errors import Code, ServingError
from ..registry import Model, Registry, Slot
from ..routing import NO_ROUTES, Routes
from ..safe_text import safe
from ..served import ServedVersion
from ..status import ReloadResult, State, VersionStatus
from ..tensors import TensorSpec, shape_text
from .tensor import Tensor

__all__ = ["DataPlane", "Metadata", "ModelView", "Tensor", "Version", "parse_version", "validate"]

PLATFORM = "OpenVINO"
MAX_VERSION_DIGITS = 64  # longer than any version number (at most 19 digits), short of int()'s limit
RESHAPE_ATTEMPTS = 2  # a reshape a concurrent reload superseded is tried once more
_WALL_MINUS_PERF_NS = time.time_ns() - time.perf_counter_ns()  # wall time from the request's perf_counter reading


@dataclass(frozen=True)
class Metadata:
    name: str
    version: int
    versions: tuple[int, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ModelView:
    """A model as status queries show it."""

    name: str
    versions: tuple[VersionStatus, ...]
    error: str | None
    routes: Routes = NO_ROUTES  # labels: which version each serves now, which wait for their version

    def labels(self, version: int) -> tuple[str, ...]:
        return self.routes.labels_of(version)

    def pending_labels(self, version: int) -> tuple[str, ...]:
        return self.routes.pending_for(version)


Version = int | str | None  # a number, a version label (hotserve's extension), or None: the default / traffic


def parse_version(text: str) -> Version:
    """KServe sends versions as strings: "" = default, a number, or a version label."""
    if text == "":
        return None
    if text.isascii() and text.isdigit() and len(text) <= MAX_VERSION_DIGITS:  # int() would take "٣", "1_0", " 2"
        return int(text)
    if label_problem(text) is None:
        return text
    raise ServingError(
        Code.MODEL_VERSION_INVALID_FORMAT, f"{safe(text)} is neither a version number nor a version label"
    )


class DataPlane:
    def __init__(
        self,
        registry: Registry,
        reload: Callable[[], Awaitable[ReloadResult]],
        last_result: Callable[[], ReloadResult | None],
        reshape: Callable[[str, int, dict[str, tuple[int, ...]]], Awaitable[bool]],
        observe: Callable[[str, Version, str, bool, float], None] | None = None,
    ) -> None:
        self._observe = observe  # metrics: (model, version, api, ok, seconds)
        self.registry = registry
        self._reload = reload
        self._reshape = reshape
        self._last_result = last_result
        self.ready = False  # set once the initial reconcile is done; stays set (OVMS semantics)
        self.draining = False  # set on SIGTERM: health says NOT_SERVING while requests are still served

    # ---- status ----
    def model_ready(self, name: str, version: Version) -> bool:
        _, slot = self.registry.slot(name, version)
        return slot.status.state == State.AVAILABLE and slot.served is not None

    def models(self) -> list[ModelView]:
        return [self.model_view(name) for name in sorted(self.registry.models)]

    def model_view(self, name: str) -> ModelView:
        model: Model = self.registry.model(name)
        return ModelView(name, tuple(s.status for _, s in sorted(model.slots.items())), model.error, model.routes)

    def routed(self, name: str) -> bool:
        """Whether `name` has traffic weights: only then does a front end look for a routing key."""
        model = self.registry.models.get(name)
        return model is not None and model.routes.routed

    def version_status(self, name: str, version: Version) -> list[VersionStatus]:
        """TF Serving's GetModelStatus: every version when none is given, else that one."""
        if not version:
            return self.registry.statuses(name)
        _, slot = self.registry.slot(name, version)
        return [slot.status]

    def slot(self, name: str, version: Version) -> tuple[int, Slot]:
        return self.registry.slot(name, version)

    async def reload(self) -> ReloadResult:
        return await self._reload()

    def last_reload(self) -> ReloadResult | None:
        return self._last_result()

    # ---- metadata ----
    def metadata(self, name: str, version: Version) -> Metadata:
        number, slot = self.registry.slot(name, version)
        served = self._serving(slot)
        model = self.registry.model(name)
        available = tuple(sorted(v for v, s in model.slots.items() if s.status.state == State.AVAILABLE))
        return Metadata(name, number, available, served.inputs, served.outputs)

    @staticmethod
    def _serving(slot: Slot) -> ServedVersion:
        if slot.status.state > State.AVAILABLE:
            raise ServingError(Code.MODEL_VERSION_NOT_LOADED_ANYMORE)
        if slot.status.state != State.AVAILABLE or slot.served is None:
            raise ServingError(
                Code.MODEL_VERSION_NOT_LOADED_YET, slot.status.error_message if slot.status.failed else ""
            )
        return slot.served

    # ---- inference ----
    async def infer(
        self,
        name: str,
        version: Version,
        inputs: Sequence[Tensor],
        outputs: Sequence[str] = (),
        api: str = "kserve",
        route_key: str | None = None,
    ) -> tuple[int, list[Tensor]]:
        """Validate, infer without blocking the loop, return (version, outputs in the requested or model order).

        A request without a version to a model with traffic is drawn by weight (sticky for a `route_key`). A request
        whose shape differs from an `auto` version's reshapes that version once, then runs.
        """
        started = time.perf_counter_ns()  # the one clock pair of a request: statistics and metrics share it
        leased: list[int] = []  # the version a lease chose: a failure counts on the version it was drawn to
        try:
            number, results, elapsed = await self._infer(name, version, inputs, outputs, started, route_key, leased)
        except BaseException:
            if self._observe is not None:
                chosen = leased[-1] if leased else version
                self._observe(name, chosen, api, False, (time.perf_counter_ns() - started) / 1e9)
            raise
        if self._observe is not None:
            self._observe(name, number, api, True, elapsed / 1e9)
        return number, results

    async def _infer(
        self,
        name: str,
        version: Version,
        inputs: Sequence[Tensor],
        outputs: Sequence[str],
        started: int,
        route_key: str | None,
        leased: list[int],
    ) -> tuple[int, list[Tensor], int]:
        for attempt in range(RESHAPE_ATTEMPTS + 1):
            async with self.registry.lease(name, version, key=route_key) as slot:
                served = slot.served
                assert served is not None
                leased.append(served.version)
                try:
                    feed = validate(served, inputs, reshape_allowed=attempt < RESHAPE_ATTEMPTS)
                    if isinstance(feed, Reshape):
                        number = served.version
                    else:
                        order = _output_order(served, outputs)
                        batcher = served.batcher
                        results = await (served.infer(feed) if batcher is None else batcher.infer(feed))
                except BaseException:
                    slot.stats.failure += 1
                    slot.stats.failure_ns += time.perf_counter_ns() - started
                    raise
                if not isinstance(feed, Reshape):
                    now = time.perf_counter_ns()
                    stats = slot.stats
                    stats.success += 1
                    stats.success_ns += now - started
                    stats.last_inference_ms = (now + _WALL_MINUS_PERF_NS) // 1_000_000
                    specs = served.outputs
                    return (
                        served.version,
                        [Tensor(specs[i].name, specs[i].datatype, results[i].shape, results[i]) for i in order],
                        now - started,
                    )
            await self._reshape(name, number, feed.shapes)  # False: a reload replaced it meanwhile; look again
            version = number
        raise AssertionError("unreachable: the last attempt never asks for a reshape")


def _output_order(served: ServedVersion, requested: Sequence[str]) -> list[int]:
    index = {spec.name: i for i, spec in enumerate(served.outputs)}
    if not requested:
        return list(range(len(served.outputs)))
    order = []
    for name in requested:
        if name not in index:
            raise ServingError(Code.INVALID_MISSING_OUTPUT, f"Required output: {name}")
        order.append(index[name])
    return order


@dataclass(frozen=True)
class Reshape:
    """The request fits only after reshaping an `auto` version to these input shapes."""

    shapes: dict[str, tuple[int, ...]]


def validate(
    served: ServedVersion, inputs: Sequence[Tensor], reshape_allowed: bool = True
) -> dict[str, np.ndarray] | Reshape:
    """OVMS's order: count, name, precision, number of dims, batch, shape."""
    reshape: dict[str, tuple[int, ...]] = {}
    if len(inputs) != len(served.inputs):
        raise ServingError(Code.INVALID_NO_OF_INPUTS, f"Expected: {len(served.inputs)}; Actual: {len(inputs)}")
    given = {t.name: t for t in inputs}
    feed: dict[str, np.ndarray] = {}
    for spec in served.inputs:
        tensor = given.get(spec.name)
        if tensor is None:
            raise ServingError(Code.INVALID_MISSING_INPUT, f"Required input: {spec.name}")
        if any(d < 0 for d in tensor.shape):
            raise ServingError(
                Code.INVALID_SHAPE, f"Negative or zero dimension size is not acceptable: {shape_text(tensor.shape)}"
            )
        if tensor.datatype != spec.datatype:
            raise ServingError(
                Code.INVALID_PRECISION, f"Expected: {spec.datatype}; Actual: {tensor.datatype}; input name: {spec.name}"
            )
        if spec.bounds is not None:
            actual = shape_text(tensor.shape)
            if len(tensor.shape) != len(spec.bounds):
                raise ServingError(
                    Code.INVALID_NO_OF_SHAPE_DIMENSIONS,
                    f"Expected: {spec.shape_text()}; Actual: {actual}; input name: {spec.name}",
                )
            b = spec.batch_index
            auto_shape = reshape_allowed and spec.name in served.auto_inputs
            if spec.bounds and not spec.accepts(b, tensor.shape[b]) and reshape_allowed and served.auto_batch:
                reshape[spec.name] = tuple(
                    n if i == b else s for i, (s, n) in enumerate(zip(spec.shape, tensor.shape, strict=True))
                )
            elif spec.bounds and not spec.accepts(b, tensor.shape[b]) and not auto_shape:
                lo, hi = spec.bounds[b]
                expected = str(lo) if lo == hi else spec.shape_text()
                raise ServingError(
                    Code.INVALID_BATCH_SIZE, f"Expected: {expected}; Actual: {tensor.shape[b]}; input name: {spec.name}"
                )
            others_fit = all(
                spec.accepts(a, n) for a, n in enumerate(tensor.shape) if not (a == b and spec.name in reshape)
            )
            if not others_fit and auto_shape:
                reshape[spec.name] = tuple(tensor.shape)
            elif not others_fit:
                raise ServingError(
                    Code.INVALID_SHAPE, f"Expected: {spec.shape_text()}; Actual: {actual}; input name: {spec.name}"
                )
        feed[spec.name] = tensor.data
    return Reshape(reshape) if reshape else feed
