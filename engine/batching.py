"""Dynamic batching of one served version: queued requests concatenated along the batch axis, outputs split back.

A Batcher belongs to one ServedVersion (made with it at load, freed with it), so a batch never mixes versions. Each
queued request keeps its lease on the version, and a running batch holds the version itself (`acquire`), so a
retiring version drains its queue and its running batches before it is freed. Everything runs on the event loop.

A batch leaves once an infer request of the version is free and: it has max_batch_size rows, or its rows are one
of preferred_batch_sizes (the longest such run of the queue, as Triton), or its oldest request has waited
max_queue_delay_us. Requests join a batch in arrival order when their non-batch dims and types match the oldest
one's (others wait for the next batch).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .config import DynamicBatching
from .errors import Code, ServingError
from .tensors import TensorSpec

if TYPE_CHECKING:
    from .served import ServedVersion

Feed = Mapping[str, np.ndarray]


class BatchObserver(Protocol):
    """Metrics: one call per inference the batcher runs (its rows, and how long each of its requests queued)."""

    def batch(self, model: str, rows: int, queued_seconds: Sequence[float]) -> None: ...


class BatchHooks(Protocol):
    """engine.lifecycle.Hooks as the batcher calls it."""

    async def loop(self, point: str, name: str, version: int) -> None: ...


def problem(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: int) -> str | None:
    """Why a compiled model cannot be batched, or None. Batchable: every input's batch axis (the N of its layout,
    else the first) takes every size from 1 to max_batch_size, and every output's first axis is dynamic."""
    for spec in inputs:
        if not spec.bounds:
            rank = "a dynamic rank" if spec.bounds is None else "no dimensions (a scalar)"
            return f"model {name}: input {spec.name} has {rank}: dynamic_batching needs a batch dimension"
        lo, hi = spec.bounds[spec.batch_index]
        if lo > 1 or (hi != -1 and hi < max_batch):
            kind = f"a static batch {lo}" if lo == hi else f"a batch range {lo}:{hi}"
            return (
                f"model {name}: input {spec.name} (shape {spec.shape_text()}, batch axis {spec.batch_index}) has "
                f"{kind}, which cannot take 1 to {max_batch} rows (dynamic_batching max_batch_size): set "
                f'batch_size to "-1" or a range such as "1:{max_batch}" in models.json'
            )
    for spec in outputs:
        if not spec.bounds or spec.bounds[0][0] == spec.bounds[0][1]:
            return (
                f"model {name}: output {spec.name} (shape {spec.shape_text()}) has no dynamic first dimension to "
                "split a batch along: dynamic_batching needs outputs with one row per input row"
            )
    return None


class _Pending:
    __slots__ = ("done", "enqueued", "feed", "key", "rows")

    def __init__(self, feed: Feed, rows: int, key: tuple[object, ...], done: asyncio.Future[list[np.ndarray]]):
        self.feed, self.rows, self.key, self.done = feed, rows, key, done
        self.enqueued = time.perf_counter()


class Batcher:
    def __init__(self, served: ServedVersion, settings: DynamicBatching, observer: BatchObserver | None) -> None:
        self._served = served
        self._settings = settings
        self._observer = observer
        self._slots = max(1, served.nireq)  # batches run at once: one per infer request
        self._preferred = frozenset(settings.preferred_batch_sizes)
        self._delay = settings.max_queue_delay_us / 1e6
        self._queue: collections.deque[_Pending] = collections.deque()
        self._running = 0
        self._former: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # running batches (the loop keeps only weak references)
        self._changed: asyncio.Event | None = None  # a request arrived or a batch finished
        self.hooks: BatchHooks | None = None  # the lifecycle's test seam: "batch" before a batch runs

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Batches running; each holds its version (ServedVersion.inflight counts it beside the requests)."""
        return self._running

    async def infer(self, feed: Feed) -> list[np.ndarray]:
        """The outputs of this request's rows, from the batch it joined (or run alone if it cannot join one)."""
        rows, key = self._shape_of(feed)
        if rows is None or rows > self._settings.max_batch_size:
            self._observe(rows or 0, (0.0,))
            return await self._served.infer(feed)  # too big for a batch (or inputs disagree on rows): alone
        if len(self._queue) >= self._settings.max_queue_size:
            raise ServingError(
                Code.QUEUE_FULL,
                f"{len(self._queue)} requests are waiting (max_queue_size {self._settings.max_queue_size}); "
                f"model: {self._served.name}; version: {self._served.version}",
            )
        loop = asyncio.get_running_loop()
        if self._changed is None:
            self._changed = asyncio.Event()
        pending = _Pending(feed, rows, key, loop.create_future())
        self._queue.append(pending)
        self._changed.set()
        if self._former is None or self._former.done():
            self._former = loop.create_task(self._form())
        try:
            return await pending.done
        except asyncio.CancelledError:
            if pending in self._queue:  # not dispatched yet: it leaves the queue with its client
                self._queue.remove(pending)
            raise

    def _shape_of(self, feed: Feed) -> tuple[int | None, tuple[object, ...]]:
        """The request's rows (None when its inputs disagree) and what a batch-mate must share: dims and types."""
        rows = None
        key: list[object] = []
        for spec in self._served.inputs:
            array = feed[spec.name]
            n = array.shape[spec.batch_index]
            if rows is not None and n != rows:
                return None, ()
            rows = n
            key.append((array.dtype, array.shape[: spec.batch_index] + array.shape[spec.batch_index + 1 :]))
        return rows, tuple(key)

    async def _form(self) -> None:
        """Form batches while requests wait; ends when the queue is empty (the next request starts it again)."""
        changed = self._changed
        assert changed is not None
        while self._queue:
            changed.clear()
            wait: float | None = None
            if self._running < self._slots:
                batch, wait = self._take()
                if batch:
                    self._running += 1
                    task = asyncio.get_running_loop().create_task(self._run(batch))
                    self._batches.add(task)
                    task.add_done_callback(self._batches.discard)
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)

    def _take(self) -> tuple[list[_Pending], float | None]:
        """The next batch, or [] and how long until the oldest request's delay runs out."""
        head = self._queue[0]
        batch, rows, full, preferred = [], 0, False, 0
        for pending in self._queue:
            if pending.key != head.key:
                continue
            if rows + pending.rows > self._settings.max_batch_size:
                full = True  # the next one in line does not fit: waiting cannot make this batch bigger
                break
            batch.append(pending)
            rows += pending.rows
            if rows in self._preferred:
                preferred = len(batch)  # the longest prefix of a preferred size (more may have queued meanwhile)
        left = head.enqueued + self._delay - time.perf_counter()
        if not full and rows < self._settings.max_batch_size and left > 0:
            if not preferred:
                return [], left
            batch = batch[:preferred]
        for pending in batch:
            self._queue.remove(pending)
        return batch, None

    async def _run(self, batch: list[_Pending]) -> None:
        served = self._served
        served.acquire()  # the batch keeps the version even if all its clients went away
        started = time.perf_counter()
        rows = sum(p.rows for p in batch)
        self._observe(rows, [started - p.enqueued for p in batch])
        try:
            if self.hooks is not None:
                await self.hooks.loop("batch", served.name, served.version)
            if len(batch) == 1:
                outputs = await served.infer(batch[0].feed)
                _answer(batch[0], outputs)
                return
            feed = {
                spec.name: np.concatenate([p.feed[spec.name] for p in batch], axis=spec.batch_index)
                for spec in served.inputs
            }
            outputs = await served.infer(feed)
            for out, spec in zip(outputs, served.outputs, strict=True):
                if out.ndim == 0 or out.shape[0] != rows:
                    raise ServingError(
                        Code.INTERNAL_ERROR,
                        f"output {spec.name} has shape {out.shape} for a batch of {rows} rows: this model's outputs "
                        f"do not have one row per input row (dynamic_batching); model: {served.name}",
                    )
            start = 0
            for pending in batch:
                _answer(pending, [out[start : start + pending.rows] for out in outputs])
                start += pending.rows
        except BaseException as exc:
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            served.release()
            self._running -= 1
            if self._changed is not None:
                self._changed.set()

    def _observe(self, rows: int, queued: Sequence[float]) -> None:
        if self._observer is not None:
            self._observer.batch(self._served.name, rows, queued)


def _answer(pending: _Pending, outputs: list[np.ndarray]) -> None:
    if not pending.done.done():  # its client may have gone away meanwhile
        pending.done.set_result(outputs)
