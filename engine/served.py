"""A served version: one compiled model, its pool of infer requests, and the count of requests that use it.

The registry hands these to requests and the lifecycle frees them; neither needs to know how they were compiled
(engine/runtime.py makes them). Inference never blocks the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import openvino as ov

from .tensors import OV_TO_KSERVE, TensorSpec


class Origin(Protocol):
    """What a version was loaded from that must hear when it is freed (a custom loader's load)."""

    def unload(self) -> None: ...


def spec_of(port: ov.Output, batch_index: int) -> TensorSpec:
    shape = port.get_partial_shape()
    bounds = None
    if shape.rank.is_static:
        bounds = tuple((d.get_min_length(), d.get_max_length()) for d in shape)
    return TensorSpec(port.any_name, OV_TO_KSERVE.get(port.element_type.get_type_name(), "UNKNOWN"), bounds,
                      batch_index)  # fmt: skip


class ServedVersion:
    """A compiled model version. `inflight` counts leases and inferences OpenVINO still runs; drain waits for 0."""

    def __init__(
        self,
        name: str,
        version: int,
        compiled: ov.CompiledModel,
        nireq: int,
        loaded_from_cache: bool,
        cache_reason: str,
        batch_index: Mapping[str, int],
        requested_shape: Mapping[str, tuple[int, ...]] | None = None,
        auto_inputs: frozenset[str] = frozenset(),
        auto_batch: bool = False,
    ) -> None:
        self.name = name
        self.version = version
        self.compiled: ov.CompiledModel | None = compiled
        self.nireq = nireq
        self.loaded_from_cache = loaded_from_cache
        self.cache_reason = cache_reason
        self.inputs: tuple[TensorSpec, ...] = tuple(spec_of(p, batch_index.get(p.any_name, 0)) for p in compiled.inputs)
        self.outputs: tuple[TensorSpec, ...] = tuple(spec_of(p, 0) for p in compiled.outputs)
        self.requested_shape = dict(requested_shape or {})
        self.auto_inputs = auto_inputs  # shape "auto": a request of another shape reshapes this version
        self.auto_batch = auto_batch  # batch_size "auto": a request of another batch reshapes this version
        self.origin: Origin | None = None  # set by the lifecycle for a custom loader's model
        self._requests = [compiled.create_infer_request() for _ in range(nireq)]
        self._idle: asyncio.Queue[ov.InferRequest] | None = None
        self.inflight = 0
        self._drained: asyncio.Event | None = None

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference on an idle request; returns the outputs (copied) in the model's output order."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for request in self._requests:
                self._idle.put_nowait(request)
        idle = self._idle
        request = await idle.get()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        try:
            request.set_callback(lambda fut: loop.call_soon_threadsafe(_finish, fut), done)
            request.start_async(dict(inputs), share_inputs=True)
        except BaseException:
            idle.put_nowait(request)
            raise
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # The client went away but OpenVINO still runs the request: it keeps the version (drain, free, a
            # loader's unload) and its infer request until OpenVINO is done with it.
            self.acquire()
            done.add_done_callback(lambda _: (idle.put_nowait(request), self.release()))
            raise
        try:
            request.wait()  # returns at once; raises what the asynchronous inference raised
            return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(len(self.outputs))]
        finally:
            idle.put_nowait(request)

    # Leases: the registry counts in-flight requests so a retiring version can wait for them.
    def acquire(self) -> None:
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._drained is not None:
            self._drained.set()

    async def drained(self) -> None:
        if self.inflight == 0:
            return
        if self._drained is None or self._drained.is_set():
            self._drained = asyncio.Event()
        await self._drained.wait()

    def close(self) -> None:
        """Drop the infer requests and the compiled model (freed once the last reference goes)."""
        self._requests.clear()
        self._idle = None
        self.compiled = None


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
