"""A REST body written, chunk by chunk as it arrives, into an anonymous memory file (memfd) the decoder reads.

Joining a 200 MB body into one bytes object and pickling it to the decoder process held the event loop's GIL for
about 0.45 s; here each chunk costs one small write, and the decoder process opens the same file through
/proc/<pid>/fd. A memfd has no name on any file system: nothing is left behind when the server dies.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from aiohttp import StreamReader

from ..errors import Code, ServingError

MIN_RATE = 64 << 10  # bytes/s a spooled body keeps on average after its first `idle` seconds (mod_reqtimeout's rule)
MFD_NOEXEC_SEAL = 0x0008  # Linux 6.3+ (os has it from Python 3.12): never executable, as vm.memfd_noexec=2 demands


def _memfd() -> int:
    try:
        return os.memfd_create("hotserve-body", os.MFD_CLOEXEC | MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel older than the flag
            raise
        return os.memfd_create("hotserve-body", os.MFD_CLOEXEC)


class Spool:
    """One request body in memory; `close()` (or leaving the `with`) frees it."""

    def __init__(self) -> None:
        self.fd = _memfd()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:  # ENOMEM / ENOSPC: the memory cgroup is full
            raise ServingError(Code.REQUEST_TOO_LARGE, f"no memory to hold the body: {exc.strerror}") from None
        self.size += len(chunk)

    @property
    def path(self) -> str:
        """Where another process of this user opens the same file (the fd stays open until `close`)."""
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def read(self) -> bytes:
        return os.pread(self.fd, self.size, 0)

    def close_after(self, user: Future[Any]) -> None:
        """Closed when `user` is done, not before: until then the decoder may still open `path`, and a number freed
        now could be another file's by then (another request's body, a pipe of this process)."""
        fd, self.fd = self.fd, -1
        user.add_done_callback(lambda _: os.close(fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


async def spool(content: StreamReader, limit: int, idle: float) -> Spool:
    """The whole body, refused with REQUEST_TOO_LARGE as soon as it passes `limit` bytes (chunked bodies too), and
    with BODY_TIMEOUT when no byte of it comes for `idle` seconds, or when after its first `idle` seconds it has come
    at under MIN_RATE on average: a body holds a slot (see rest.py), and a byte just inside `idle` must not keep it."""
    body = Spool()
    start = time.monotonic()
    try:
        while chunk := await _next(content, idle, body.size):
            if body.size + len(chunk) > limit:
                raise ServingError(Code.REQUEST_TOO_LARGE, f"more than {limit} bytes")
            body.write(chunk)
            if (elapsed := time.monotonic() - start) > idle + body.size / MIN_RATE:
                raise ServingError(
                    Code.BODY_TIMEOUT,
                    f"{body.size} bytes in {elapsed:.1f} s, under the {MIN_RATE >> 10} KiB/s a body must keep after "
                    f"its first {idle:g} s",
                )
    except BaseException:
        body.close()
        raise
    return body


async def _next(content: StreamReader, idle: float, received: int) -> bytes:
    try:
        return await asyncio.wait_for(content.readany(), idle)
    except TimeoutError:
        raise ServingError(Code.BODY_TIMEOUT, f"no bytes for {idle:g} s after {received} bytes") from None
