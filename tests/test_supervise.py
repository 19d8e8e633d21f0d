"""Background tasks are supervised (issue 9 item 8): a crash is logged and restarted, stop never raises."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from lifecycle_env import aio
from loader_fixtures import BUILD

from engine.supervise import Supervisor


# ---- 8. background tasks are supervised ----
@aio
async def test_a_crashing_background_loop_is_logged_and_restarted(caplog: Any) -> None:
    supervisor = Supervisor(restart_first=0.01)
    runs: list[int] = []
    started = asyncio.Event()

    async def watcher() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise PermissionError(13, "Permission denied", "/models/m")
        started.set()
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, "hotserve.server"):
        supervisor.keep("watcher", watcher)
        await asyncio.wait_for(started.wait(), 10)
    assert supervisor.crashes == {"watcher": 1} and len(runs) == 2
    assert "Background task watcher failed; restarting it" in caplog.text and "PermissionError" in caplog.text
    await supervisor.stop()  # never raises


@aio
async def test_a_failing_one_shot_task_is_reported(caplog: Any) -> None:
    supervisor = Supervisor()

    async def free() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, "hotserve.server"):
        supervisor.spawn("free m 1", free())
        await supervisor.wait()
    assert "Background task free m 1 failed" in caplog.text and "ValueError: boom" in caplog.text
    await supervisor.stop()


@aio
async def test_a_crashing_watch_loop_leaves_no_live_watch(tmp_path: Path) -> None:
    from engine.watcher import Watcher

    calls = 0

    def base_paths() -> set[Path]:
        nonlocal calls
        calls += 1
        if calls % 2 == 0:  # the loop crashes right after it started a watch
            raise PermissionError(13, "Permission denied", str(tmp_path))
        return {tmp_path}

    supervisor = Supervisor(restart_first=0.01, restart_max=0.02)
    Watcher(None, base_paths, lambda: None, 0.02).start(supervisor)

    def watches() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "_watch_once" in repr(t.get_coro())]

    deadline = asyncio.get_running_loop().time() + 20
    while supervisor.crashes.get("watcher", 0) < 5 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert supervisor.crashes.get("watcher", 0) >= 5
    assert len(watches()) <= 1, "each crash must stop the watch it started"
    await supervisor.stop()
    await asyncio.sleep(0)
    assert watches() == []


SERVER_WITH_A_DYING_WATCHER = """
import asyncio, logging, sys
from pathlib import Path
sys.path.insert(0, "tests")
from lifecycle_env import Env
from engine.server import Server, Settings
from engine.status import State
from engine.supervise import Supervisor

logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(name)s %(message)s")

async def main(root):
    env = Env(root)
    env.version("m", 1)
    env.model("m")
    env.write()
    server = Server(Settings(config_path=env.path, port=0, grpc_bind_address="127.0.0.1"))
    server.supervisor = Supervisor(restart_first=0.01)

    def broken():
        raise PermissionError(13, "Permission denied", str(root / "models"))

    server.watcher._base_paths = broken  # the watch loop dies on every pass
    await server.start()
    await env.until(lambda: server.supervisor.crashes.get("watcher", 0) >= 2, "the watcher to crash twice")
    await server.stop()  # must not raise
    print("END" if server.registry.models["m"].slots[1].status.state == State.END else "NOT FREED")

asyncio.run(main(Path(sys.argv[1])))
"""


def test_server_stop_never_raises_because_a_background_task_died(tmp_path: Path) -> None:
    # its own process: the server's generated protos and tritonclient's (loaded by other tests) share names
    done = subprocess.run([sys.executable, "-c", SERVER_WITH_A_DYING_WATCHER, str(tmp_path)], cwd=BUILD.parent,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Background task watcher failed; restarting it" in done.stdout and "PermissionError" in done.stdout
    assert done.stdout.strip().endswith("END"), "stopped in order: the version was freed"
