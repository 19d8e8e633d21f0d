"""The decoder processes in this process (engine/frontend/offload.py, rest_spool.py), real ones held with SIGSTOP:
shutdown ends a decoder stuck in a body, a cancelled request keeps its memory file until its decoder is done, and
a spooled body can never be executed."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal

import numpy as np
import pytest
from rest_env import (
    WIDE,
    body_for,
    decoders,
    memfds,
    until,
)

from engine.frontend import offload
from engine.frontend.rest_spool import Spool


def test_shutdown_ends_a_decoder_that_holds_a_body_and_frees_it() -> None:
    """offload.shutdown() with the decoder stuck (held stopped) in a cancelled request's body: it is killed, so the
    body is freed and nothing waits for it (the interpreter's exit joined the pool: a server that never exited)."""
    asyncio.run(_shutdown_while_decoding())


async def _shutdown_while_decoding() -> None:
    decoder = await _stopped_decoder()
    try:
        with spooled() as body:
            await _taken_then_cancelled(body)
        assert len(memfds(os.getpid())) == 1  # kept for the decoder
        offload.shutdown()
        until(lambda: decoder not in decoders(os.getpid()).values(), "the decoder ended", timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(decoder, signal.SIGCONT)
    until(lambda: memfds(os.getpid()) == [], "the body freed", timeout=10)


async def _stopped_decoder() -> int:
    """The large lane's decoder process, up and then held with SIGSTOP."""
    with spooled() as warm:
        await offload.infer_body(warm)
    decoder = decoders(os.getpid())["l"]
    os.kill(decoder, signal.SIGSTOP)
    return decoder


async def _taken_then_cancelled(body: Spool) -> None:
    """A request for `body` cancelled once the stopped decoder's pool has taken its work (it can no longer be
    taken back)."""
    work = offload._process_pool("large")._pending_work_items  # type: ignore[attr-defined]
    waiting = asyncio.create_task(offload.infer_body(body))
    await asyncio.sleep(0)  # submitted
    until(lambda: [item.future.running() for item in work.values()] == [True], "the path handed to the decoder")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


def spooled() -> Spool:
    body = Spool()
    body.write(body_for(np.arange(WIDE, dtype=np.float32)))
    return body


def test_a_cancelled_request_keeps_its_body_open_until_the_decoder_is_done() -> None:
    """Shutdown cancels a request waiting for the decoder (in this process, the real decoder process): if its fd
    were closed then, the decoder would open whatever file took the number next, here a pipe of this process."""
    try:
        asyncio.run(_cancel_while_queued())
    finally:
        offload.shutdown()


async def _cancel_while_queued() -> None:
    decoder = await _stopped_decoder()
    try:
        with spooled() as body:
            await _taken_then_cancelled(body)
        reader, writer = os.pipe()
        os.write(writer, b"not a body")
        os.close(writer)
    finally:
        os.kill(decoder, signal.SIGCONT)
    with spooled() as after:
        await offload.infer_body(after)  # one decoder, first in first out: it is done with the cancelled body
    try:
        assert os.read(reader, 100) == b"not a body", "the decoder read the pipe that took the body's fd number"
    finally:
        os.close(reader)
    assert memfds(os.getpid()) == []


def test_a_decoder_that_died_idle_costs_no_request() -> None:
    """The decoders are the OOM killer's first pick (oom_score_adj 1000) even when idle: a decoder killed between
    bodies must not fail the next body, which was never in it."""
    try:
        asyncio.run(_died_idle())
    finally:
        offload.shutdown()


async def _died_idle() -> None:
    with spooled() as warm:
        await offload.infer_body(warm)
    pool = offload._process_pool("large")
    decoder = decoders(os.getpid())["l"]
    os.kill(decoder, signal.SIGKILL)
    until(lambda: bool(pool._broken), "the pool noticed its decoder died")  # type: ignore[attr-defined]
    with spooled() as body:
        parsed = await offload.infer_body(body)
    np.testing.assert_array_equal(parsed.inputs[0].data.ravel(), np.arange(WIDE, dtype=np.float32))
    assert decoders(os.getpid())["l"] != decoder


# `serve` in a process that is not dumpable, as one running a python with file capabilities is (setcap, to bind
# port 80 without root): its /proc/<pid>/fd is closed to its own children unless they hold CAP_SYS_PTRACE (root
# here: dropped)


F_SEAL_EXEC = 0x0020


def test_a_spooled_body_can_never_be_executed() -> None:
    """Sealed non-executable where the kernel knows the seal (6.3+), so vm.memfd_noexec=2 lets it be made at all."""
    with Spool() as body:
        release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
        if release >= (6, 3):
            assert fcntl.fcntl(body.fd, fcntl.F_GET_SEALS) & F_SEAL_EXEC
            assert os.fstat(body.fd).st_mode & 0o111 == 0
        body.write(b"{}")
        assert body.read() == b"{}"
