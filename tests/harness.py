"""A real server subprocess on 127.0.0.1 with an ephemeral port, and its log (tests and benchmarks use it)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    """A port free now (for servers that must come back on the same one, or a second port of one server), taken
    from below the kernel's ephemeral range: a `--port 0` server started meanwhile can never be handed it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(max(1024, low - 16384), low)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # the REST port binds every address
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range ({low})")


class ServerProcess:
    """One `python -m engine serve` process; `port` is read from its 'Started gRPC server on port N' line."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, program: list[str] | None = None
    ) -> None:
        """`program`: what runs `serve` (default `python -m engine serve`; a benchmark may wrap it)."""
        if not any(a.startswith("--drain_seconds") for a in args):
            args = [*args, "--drain_seconds", "0"]  # stop at once at teardown; drain tests ask for their window
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 — closed in stop()
        self.proc = subprocess.Popen(
            [*(program or [sys.executable, "-m", "engine", "serve"]), "--grpc_bind_address", "127.0.0.1", *args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.port = 0
        self.workers = int(args[args.index("--grpc_workers") + 1]) if "--grpc_workers" in args else 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0, exited: bool = False) -> re.Match[str]:
        """Wait until the log (from offset `start`) matches `pattern`; `exited`: the process itself may be gone
        (its workers still write the log)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log[start:]
            found = re.search(pattern, text)
            if found:
                return found
            if not exited and self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}) before {pattern!r}:\n{self.log[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.log[-4000:]}")
            time.sleep(0.05)

    def wait_ready(self) -> ServerProcess:
        try:
            self.port = int(self.wait_for(r"Started gRPC server on port (\d+)", STARTUP_TIMEOUT).group(1))
            self.wait_for(r"Server ready" if self.workers == 1 else r"All \d+ workers ready", STARTUP_TIMEOUT)
        except BaseException:
            self.stop(timeout=5)  # never leave a server behind
            raise
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def _kill_orphans(self) -> None:
        """Workers left behind by a supervisor that was killed: only processes with this run's metrics dir."""
        found = re.search(r"; metrics dir (\S+)", self.log)
        if found is None:
            return
        mark = f"PROMETHEUS_MULTIPROC_DIR={found.group(1)}".encode()
        for pid in map(int, re.findall(r"Worker \d+ started \(pid (\d+)\)", self.log)):
            with contextlib.suppress(OSError):  # gone already (or not ours to read)
                if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_orphans()
        self._log.close()
        return self.proc.returncode
