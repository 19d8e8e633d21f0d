"""Request decoding off the event loop: small requests inline, large ones in a thread, large JSON in a process.

A thread keeps the loop free only while the work releases the GIL or is pure-Python bytecode (the interpreter
switches threads every few ms); json.loads holds the GIL from start to end, so big REST bodies go to a spawned
worker process that imports nothing but the decoder (no OpenVINO).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from ..errors import Code, ServingError
from .rest_body import InferBody, parse_infer

INLINE_BYTES = 1 << 20  # below this, decoding costs less than a hop to a worker

T = TypeVar("T")

_lock = threading.Lock()
_threads: ThreadPoolExecutor | None = None
_process: ProcessPoolExecutor | None = None


def _thread_pool() -> ThreadPoolExecutor:
    global _threads
    with _lock:
        if _threads is None:
            _threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        return _threads


def _process_pool() -> ProcessPoolExecutor:
    global _process
    with _lock:
        if _process is None:
            _process = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return _process


async def _run(pool: Executor, fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def decode(size: int, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) inline when the request is small, else in a decoder thread."""
    if size < INLINE_BYTES:
        return fn(*args)
    return await _run(_thread_pool(), fn, *args)


async def infer_body(body: bytes) -> InferBody:
    """A REST infer body parsed inline when small, else in the decoder process."""
    global _process
    if len(body) < INLINE_BYTES:
        return parse_infer(body)
    pool = _process_pool()
    try:
        return await _run(pool, parse_infer, body)
    except BrokenProcessPool:  # the worker died (killed, out of memory): a fresh one for the next request
        with _lock:
            if _process is pool:  # not one that a concurrent request already put in its place
                _process = None
        pool.shutdown(wait=False, cancel_futures=True)
        raise ServingError(Code.INTERNAL_ERROR, "the request decoder process died; try again") from None


def shutdown() -> None:
    global _threads, _process
    with _lock:
        pools, _threads, _process = (_threads, _process), None, None
    for pool in pools:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
