"""A served version: one compiled model, its pool of infer requests, and the count of requests that use it.

The registry hands these to requests and the lifecycle frees them; neither needs to know how they were compiled
(engine/runtime.py makes them). Inference never blocks the event loop for long: a version runs inline only after
OpenVINO measured it faster than a thread hop (INLINE_LIMIT_S), and goes back to asynchronous if it slows down.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import openvino as ov

from .tensors import OV_TO_KSERVE, TensorSpec

if TYPE_CHECKING:
    from .batching import Batcher

INLINE_LIMIT_S = 0.0002  # a model this fast runs on the loop: the hop to OpenVINO's thread and back costs more
SMALL_INPUT_BYTES = 4096  # below this an input is copied into the request's own tensor, above it is wrapped in place
INLINE_AFTER = 8  # consecutive asynchronous inferences that must be this fast first (a slow model never blocks)
INLINE_SLOW_RUNS = 3  # consecutive slow inline runs that send it back: one preempted run on a busy host does not
FAILURE_POLL_S = (0.005, 0.1)  # first and longest interval between looks for a failed asynchronous inference


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


class Executions(Protocol):
    executions: int  # OpenVINO inferences run (a dynamic batch is one): ModelStatistics' execution_count


@dataclass
class _Executions:
    executions: int = 0


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
        self.batcher: Batcher | None = None  # set by the runtime for a model with dynamic_batching
        self.counts: Executions = _Executions()  # the slot's statistics once installed (Registry.install)
        self._requests = [compiled.create_infer_request() for _ in range(nireq)]
        self._idle: asyncio.Queue[tuple[ov.InferRequest, _Call]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inline = False  # set by _calibrate once OpenVINO's own latency says a thread hop costs more
        self._fast = 0
        self._slow = 0
        self.inflight = 0
        self._drained: asyncio.Event | None = None

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference on an idle request; returns the outputs (owned copies) in the model's output order."""
        idle = self._idle
        if idle is None:
            idle = self._start(asyncio.get_running_loop())
        request, call = await idle.get() if idle.empty() else idle.get_nowait()
        if self._inline:
            return self._infer_inline(request, call, inputs)
        done = call.done = self._loop.create_future()  # type: ignore[union-attr]
        call.finished = False
        try:
            kept = _set_inputs(call, self.inputs, inputs)
            if kept is None:  # strings, bf16, scalars: OpenVINO's own conversion
                call.unbind()
                request.start_async(dict(inputs), share_inputs=True)
            else:
                call.inputs = kept
                request.start_async()
        except BaseException:
            idle.put_nowait((request, call))
            raise
        self._poll_later(call, FAILURE_POLL_S[0])
        try:
            await done
        except asyncio.CancelledError:
            if not done.cancelled() or call.finished:  # OpenVINO finished before the cancel: nothing runs any more
                idle.put_nowait((request, call))
                raise
            # The client went away but OpenVINO still runs the request: it keeps the version (drain, free, a
            # loader's unload) and its infer request until OpenVINO is done with it (_complete gives both back).
            self.acquire()
            call.abandoned = True
            raise
        try:
            request.wait()  # returns at once; raises what the asynchronous inference raised
            self._calibrate(request.latency)
            self.counts.executions += 1
            return [_owned(request.get_output_tensor(i).data) for i in range(len(self.outputs))]
        finally:
            idle.put_nowait((request, call))

    def _infer_inline(
        self, request: ov.InferRequest, call: _Call, inputs: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        """A model measured faster than a thread hop runs on the loop: no callback, no wake-up, no GIL hand-over."""
        try:
            kept = _set_inputs(call, self.inputs, inputs)
            started = time.perf_counter()
            if kept is None:
                call.unbind()
                request.infer(dict(inputs), share_inputs=True)
            else:
                call.inputs = kept
                request.infer()
            if time.perf_counter() - started > INLINE_LIMIT_S * 4:  # a slower shape (dynamic, auto)?
                self._slow += 1
                if self._slow >= INLINE_SLOW_RUNS:  # yes: measure again asynchronously
                    self._inline, self._fast, self._slow = False, 0, 0
            else:
                self._slow = 0
            self.counts.executions += 1
            return [_owned(request.get_output_tensor(i).data) for i in range(len(self.outputs))]
        finally:
            self._idle.put_nowait((request, call))  # type: ignore[union-attr]

    def _calibrate(self, latency_ms: float) -> None:
        """After INLINE_AFTER consecutive asynchronous inferences under INLINE_LIMIT_S, run this version inline."""
        if latency_ms < INLINE_LIMIT_S * 1000:
            self._fast += 1
            self._inline = self._fast >= INLINE_AFTER
        else:
            self._fast = 0

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[tuple[ov.InferRequest, _Call]]:
        """The idle queue and each infer request's callback, set once (not per call) on the loop that serves."""
        self._loop = loop
        idle: asyncio.Queue[tuple[ov.InferRequest, _Call]] = asyncio.Queue()
        for request in self._requests:
            call = _Call(request, self.inputs)
            request.set_callback(self._callback, call)
            idle.put_nowait((request, call))
        self._idle = idle
        return idle

    def _callback(self, call: _Call) -> None:
        """OpenVINO's thread: hand the completion to the loop (the only thread that touches futures and counts)."""
        self._loop.call_soon_threadsafe(self._complete, call)  # type: ignore[union-attr]

    def _poll(self, call: _Call, interval: float) -> None:
        """OpenVINO calls no callback for a failed asynchronous inference (only wait() raises): look for one."""
        try:
            if not call.request.wait_for(0):  # still running: look again later
                self._poll_later(call, min(interval * 2, FAILURE_POLL_S[1]))
            return  # done: its callback is on its way to the loop
        except Exception:  # failed: complete it as the callback would; wait() gives the caller the error
            call.poll = None
            self._complete(call)

    def _poll_later(self, call: _Call, interval: float) -> None:
        call.poll = self._loop.call_later(interval, self._poll, call, interval)  # type: ignore[union-attr]

    def _complete(self, call: _Call) -> None:
        if call.poll is not None:
            call.poll.cancel()
            call.poll = None
        call.finished = True  # a cancel the task has not seen yet must not wait for this callback again
        if call.abandoned:  # its request was cancelled: give back the infer request and the version it held
            call.abandoned = False
            self.release()
            if self._idle is not None:
                self._idle.put_nowait((call.request, call))
            return
        done = call.done
        if done is not None and not done.done():
            done.set_result(None)

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
        for request in self._requests:  # the callback refers to this version: without this, a cycle through C++
            request.set_callback(_ignore, None)
        self._requests.clear()
        self._idle = None
        self.compiled = None


def _ignore(_: object) -> None:
    pass


class _Call:
    """One infer request's state across calls; the OpenVINO callback gets it as its userdata."""

    __slots__ = ("abandoned", "bound", "done", "finished", "inputs", "own", "own_tensors", "poll", "request")

    def __init__(self, request: ov.InferRequest, specs: tuple[TensorSpec, ...] = ()) -> None:
        self.request = request
        # The request's own input tensors (static shapes): a small input is copied into one, no tensor is made per
        # call. `bound[i]`: input i is still the own tensor (a large or odd-shaped input replaces it for a call).
        self.own_tensors: list[ov.Tensor | None] = [_own_tensor(request, i, s) for i, s in enumerate(specs)]
        self.own: list[np.ndarray | None] = [None if t is None else t.data for t in self.own_tensors]
        self.bound = [t is not None for t in self.own_tensors]
        self.done: asyncio.Future[None] | None = None
        self.abandoned = False
        self.finished = False  # OpenVINO's callback for the current call has run on the loop
        self.inputs: list[np.ndarray] = []  # the buffers OpenVINO reads, alive until the next call replaces them
        self.poll: asyncio.TimerHandle | None = None  # the next look for a failure no callback reports

    def unbind(self) -> None:
        """OpenVINO's own conversion sets every input itself."""
        self.bound = [False] * len(self.bound)


def _own_tensor(request: ov.InferRequest, index: int, spec: TensorSpec) -> ov.Tensor | None:
    if spec.datatype in _COPIED:
        return None
    try:
        tensor = request.get_input_tensor(index)
    except RuntimeError:  # a dynamic input has no tensor of its own until one is set
        return None
    return tensor if tensor.size > 0 and tensor.byte_size < SMALL_INPUT_BYTES else None


_COPIED = frozenset({"BYTES", "BF16", "UNKNOWN"})  # OpenVINO's own conversion path: strings, bf16


def _set_inputs(call: _Call, specs: tuple[TensorSpec, ...], feed: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
    """Each input into OpenVINO without a copy of a large one: a small input is copied into the request's own tensor
    (cheaper than making and setting a tensor); a large one is wrapped in place (OpenVINO copies read-only arrays).
    → the buffers OpenVINO reads, to keep alive. None: an input needs OpenVINO's conversion (the caller passes the
    arrays to infer/start_async instead)."""
    if any(spec.datatype in _COPIED for spec in specs):
        return None
    arrays = [feed[spec.name] for spec in specs]
    if any(a.ndim == 0 or not a.flags.c_contiguous for a in arrays):
        return None
    request = call.request
    kept = []
    for i, array in enumerate(arrays):
        own = call.own[i]
        if own is not None and own.shape == array.shape and own.dtype == array.dtype:
            own[...] = array
            if not call.bound[i]:
                request.set_input_tensor(i, call.own_tensors[i])
                call.bound[i] = True
            continue
        call.bound[i] = False
        if not array.flags.writeable and array.nbytes < SMALL_INPUT_BYTES:
            array = array.copy()  # a few bytes: copying costs less than the ctypes view below
        elif not array.flags.writeable:  # OpenVINO only reads inputs; a writable view over the same memory
            raw = (ctypes.c_char * array.nbytes).from_address(array.ctypes.data)
            kept.append(array)
            array = np.frombuffer(raw, array.dtype).reshape(array.shape)
        kept.append(array)
        request.set_input_tensor(i, ov.Tensor(array, shared_memory=True))
    return kept


def _owned(view: np.ndarray) -> np.ndarray:
    """One copy out of OpenVINO's memory (reused by the next call) into bytes that codec.encode sends as they are."""
    if view.dtype.kind not in "biufc":
        return np.array(view, copy=True)
    return np.frombuffer(view.tobytes(), view.dtype).reshape(view.shape)
