"""Scripted stand-ins for a worker at the other end of the supervisor's pipe: real spawned processes, real pipes,
for what a real server cannot be made to do on cue (close its pipe and linger, answer a reload late)."""

from __future__ import annotations

from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event


def close_pipe_then_wait(conn: Connection, go: Event) -> None:
    """A worker past `link.close()` still tearing down (threads, atexit): its pipe is at EOF, it has not exited."""
    conn.close()
    go.wait()
