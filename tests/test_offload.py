"""offload.infer_body against a real decoder process: a request cancelled once its body is with the decoder keeps
the body's memory file open until the decoder is done with it, so the decoder can never open a reused fd number."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

from engine.frontend import offload
from engine.frontend.rest_spool import Spool

BODY = json.dumps({"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 5000], "data": [0.5] * 5000}]}).encode()


def spool(data: bytes) -> Spool:
    body = Spool()
    body.write(data)
    return body


def decoder(lane: str) -> int:
    me = os.getpid()
    for child in Path(f"/proc/{me}/task/{me}/children").read_text().split():
        with contextlib.suppress(FileNotFoundError):
            if Path(f"/proc/{child}/comm").read_text().strip() == f"hotserve-json-{lane[0]}":
                return int(child)
    raise AssertionError(f"no {lane} decoder")


def is_spool(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:hotserve-body")
    except FileNotFoundError:
        return False


def test_a_cancelled_request_keeps_its_body_open_until_the_decoder_is_done() -> None:
    assert offload.JSON_INLINE_BYTES <= len(BODY) < offload.INLINE_BYTES

    async def main() -> None:
        with spool(BODY) as warm:
            assert (await offload.infer_body(warm)).inputs[0].data.size == 5000  # the decoder is up
        pid, pool = decoder("small"), offload._processes["small"]
        body = spool(BODY)
        fd = body.fd
        os.kill(pid, signal.SIGSTOP)
        try:
            task = asyncio.create_task(offload.infer_body(body))
            deadline = time.monotonic() + 30
            # handed to the stopped decoder: past the point where cancelling takes the work back
            while not any(item.future.running() for item in pool._pending_work_items.values()):
                assert time.monotonic() < deadline, "the work never reached the decoder"
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            body.close()  # as rest.py's `with` does when the handler is cancelled
            assert is_spool(fd), "closed while the decoder has yet to open it"
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while is_spool(fd):  # closed once the decoder has read it
            assert time.monotonic() < deadline, "the cancelled request's body was never closed"
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        offload.shutdown()
