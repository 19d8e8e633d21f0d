"""Request decoding off the event loop: small requests inline, large ones in a thread, large JSON in a process.

A thread keeps the loop free only while the work releases the GIL or is pure-Python bytecode (the interpreter
switches threads every few ms); json.loads holds the GIL from start to end, so big REST bodies go to a spawned
worker process that imports nothing but the decoder (no OpenVINO). It reads the body from the memory file the
request was spooled into (rest_spool.py): no copy of the body passes through this process's GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from ..errors import Code, ServingError
from .rest_body import InferBody, parse_infer
from .rest_spool import Spool

INLINE_BYTES = 1 << 20  # below this, decoding costs less than a hop to a worker
JSON_INLINE_BYTES = 16 << 10  # JSON takes ~75 ns a byte to parse and check: 16 KiB holds the loop ~1 ms

T = TypeVar("T")
log = logging.getLogger("hotserve.requests")

_lock = threading.Lock()
_threads: ThreadPoolExecutor | None = None
_processes: dict[str, ProcessPoolExecutor] = {}  # per lane: a huge body never queues a medium one behind it
_turns: dict[str, asyncio.Lock] = {}  # per lane: one body in its decoder at a time, so a death fails that body alone
_by_path = True  # False once a decoder was refused the server's /proc/<pid>/fd: bodies are then copied to it


def _thread_pool() -> ThreadPoolExecutor:
    global _threads
    with _lock:
        if _threads is None:
            _threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        return _threads


def _process_pool(lane: str) -> ProcessPoolExecutor:
    with _lock:
        if lane not in _processes:
            _processes[lane] = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_decoder_start,
                initargs=(lane,),
            )
        return _processes[lane]


async def _run(pool: Executor, fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def decode(size: int, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) inline when the request is small, else in a decoder thread."""
    if size < INLINE_BYTES:
        return fn(*args)
    return await _run(_thread_pool(), fn, *args)


def _decoder_start(lane: str) -> None:
    """In a decoder process: decoding one huge body is background work next to serving every other request."""
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(f"hotserve-json-{lane[0]}")  # `ps` and `top` tell the decoders apart
    os.nice(10)  # a CPU shared with the event loop goes to the loop first
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
        adj.write("1000")  # out of memory (JSON takes ~15x the body), the kernel kills this process, not the server


def _parse_file(path: str) -> InferBody | None:
    """None: this process may not open the server's files (a server that is not dumpable, or no /proc)."""
    try:
        body = open(path, "rb")  # noqa: SIM115 — closed below; only the open may be refused
    except (PermissionError, FileNotFoundError):  # the spool holds the fd open until this call is done
        return None
    with body:
        return parse_infer(body.read())


def _refused(path: str) -> None:
    global _by_path
    if _by_path:
        _by_path = False
        log.warning(
            "The request decoder process cannot open this process's files through /proc (%s; is the server not "
            "dumpable, e.g. a python binary with file capabilities, or /proc not mounted?): large REST bodies are "
            "copied to it instead, which holds the event loop about 0.45 s per 200 MB",
            path,
        )


async def infer_body(body: Spool) -> InferBody:
    """A REST infer body parsed inline when small, else in a decoder process, read from the spool's memory file.

    Bodies under 1 MiB and larger ones have a decoder each: a 200 MB body parses for many seconds, and a medium one
    must not wait behind it.
    """
    if body.size < JSON_INLINE_BYTES:
        return parse_infer(body.read())
    lane = "small" if body.size < INLINE_BYTES else "large"
    async with _turns.setdefault(lane, asyncio.Lock()):  # the rest wait here, not in the pool that may break
        pool = _process_pool(lane)
        future: Future[InferBody | None] | None = None
        try:
            if _by_path:
                pool, future = _submit(lane, pool, _parse_file, body.path)
                if (parsed := await asyncio.wrap_future(future)) is not None:
                    return parsed
                _refused(body.path)
            pool, copied = _submit(lane, pool, parse_infer, body.read())  # the body itself, pickled
            return await asyncio.wrap_future(copied)
        except BrokenProcessPool:  # the worker died (killed, out of memory) in this body: a fresh one for the next
            _discard(lane, pool)
            raise _died() from None
        finally:
            if future is not None and not future.done():  # cancelled (shutdown) while the decoder has it
                body.close_after(future)


def _submit(
    lane: str, pool: ProcessPoolExecutor, fn: Callable[..., T], *args: object
) -> tuple[ProcessPoolExecutor, Future[T]]:
    """pool.submit, on a fresh pool if this one is broken already: its decoder died idle (the OOM killer's first
    pick), not in this body."""
    try:
        return pool, pool.submit(fn, *args)
    except BrokenProcessPool:
        _discard(lane, pool)
        pool = _process_pool(lane)
        return pool, pool.submit(fn, *args)


def _died() -> ServingError:
    return ServingError(Code.INTERNAL_ERROR, "the request decoder process died (out of memory or killed); try again")


def _discard(lane: str, pool: ProcessPoolExecutor) -> None:
    with _lock:
        if _processes.get(lane) is pool:  # not one that a concurrent request already put in its place
            del _processes[lane]
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown() -> None:
    global _threads
    with _lock:
        decoders = list(_processes.values())
        threads, _threads = _threads, None
        _processes.clear()
        _turns.clear()  # bound to this event loop
    # a decoder may be deep in a body nobody awaits any more: the interpreter's exit would wait for it
    workers = [worker for pool in decoders for worker in (pool._processes or {}).values()]  # 3.14: terminate_workers()
    for pool in [threads, *decoders]:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.kill()
