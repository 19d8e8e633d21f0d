"""The supervisor's watchdog (issue 12): a worker whose event loop is blocked, or that lingers after its shutdown, is
killed and restarted, so no fleet reload or stop waits for it forever. Real spawned processes and real pipes; the
scripted workers (tests/scripted_worker.py) do on cue what a real server cannot be made to do."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import modelgen
import pytest
import scripted_worker
from conftest import model_entry

from engine.metrics_dir import MetricsDir
from engine.settings import Settings
from engine.status import ReloadResult
from engine.worker_link import HEARTBEAT_SECONDS, Alive, Ready, WorkerLink, worker_main
from engine.workers import WorkerSupervisor, _Worker

CONTEXT = multiprocessing.get_context("spawn")


class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.settings = Settings(grpc_workers=3)
        self.supervisor = WorkerSupervisor(self.settings)
        self.supervisor.metrics = MetricsDir(tmp_path)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.restarted: list[int] = []  # restarts are recorded, not run: no real server starts here
        self.supervisor._start = lambda index, settings: self.restarted.append(index)  # type: ignore[method-assign]

    def add(self, index: int, target: Callable[..., None], *args: object) -> _Worker:
        parent, child = CONTEXT.Pipe(duplex=True)
        process = CONTEXT.Process(target=target, args=(child, *args))
        process.start()
        child.close()
        self.processes.append(process)
        worker = _Worker(index, process, parent, time.monotonic(), ready=True)
        self.supervisor._workers[index] = worker
        return worker

    def overdue(self, worker: _Worker) -> None:
        """Silent for longer than the watchdog allows, at once: the workers that do beat keep HUNG_AFTER's 30 s, so
        how fast a loaded machine spawns them cannot matter."""
        worker.started = time.monotonic() - self.supervisor.hung_after

    def step_until(self, done: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the supervisor never got there"
            self.supervisor._step(self.settings)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        for worker in fleet.supervisor._workers.values():
            worker.conn.close()  # the scripted workers still running end at EOF
        for process in fleet.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


def test_a_worker_without_heartbeat_is_killed_and_a_reload_is_answered_without_it(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    beating = fleet.add(1, scripted_worker.heartbeat_only)
    hung = fleet.add(2, scripted_worker.silent)
    fleet.overdue(hung)
    fleet.supervisor._begin_reload(None)  # worker 1 never answers either, but it beats: the reload waits for it
    caplog.set_level(logging.INFO, "hotserve.supervisor")
    fleet.step_until(lambda: 2 not in fleet.supervisor._workers)
    assert hung.process.exitcode == -signal.SIGKILL and hung.killed is not None
    assert "no heartbeat for" in hung.killed and "event loop was blocked" in hung.killed
    assert f"Worker 2 (pid {hung.process.pid}) killed: no heartbeat for" in caplog.text
    assert 2 in fleet.supervisor._restart_at  # restarted with backoff, as a crash is
    assert fleet.supervisor._workers == {1: beating} and beating.killed is None
    fleet.step_until(lambda: beating.heard > beating.started)  # every message it sends moves its deadline on
    assert beating.deadline(fleet.supervisor.hung_after, 0) == beating.heard + fleet.supervisor.hung_after
    (fleet_reload,) = fleet.supervisor._reloads.values()
    assert fleet_reload.missing == {2: (hung.process.pid, hung.killed)} and list(fleet_reload.waiting) == [1]


def test_a_worker_that_hangs_at_every_start_backs_off_further_each_time(fleet: Fleet) -> None:
    """Killed as hung 30 s after its start, it must not count as having run calmly (which resets the backoff)."""
    delays = []
    for _ in range(3):
        hung = fleet.add(2, scripted_worker.silent)
        hung.ready = False  # it never said Ready: its first load hangs
        fleet.supervisor._all_ready = True  # the fleet started long ago: this is a restart, not the first start
        fleet.overdue(hung)
        fleet.step_until(lambda: 2 not in fleet.supervisor._workers)
        delays.append(fleet.supervisor._restart_at.pop(2) - time.monotonic())
    assert delays[1] > delays[0] + 0.25 and delays[2] > delays[1] + 0.5, delays  # 0.5, 1, 2 s: not 0.5 each time


def test_the_reload_result_names_the_killed_worker(fleet: Fleet) -> None:
    fleet.overdue(fleet.add(1, scripted_worker.silent))
    fleet.supervisor._stopping = True  # no restart: the test ends when it is gone
    results: list[ReloadResult] = []
    asker = fleet.supervisor._workers[1]
    fleet.supervisor._begin_reload(None)
    request = next(iter(fleet.supervisor._reloads))
    fleet.supervisor._reloads[request].asker = None
    original = fleet.supervisor._finish_reload

    def finish(request: int) -> None:
        fleet_reload = fleet.supervisor._reloads[request]
        if not fleet_reload.waiting:
            from engine.workers import combine

            results.append(combine(fleet_reload.results, fleet_reload.missing))
        original(request)

    fleet.supervisor._finish_reload = finish  # type: ignore[method-assign]
    fleet.step_until(lambda: bool(results))
    (result,) = results
    assert not result.ok
    assert result.errors == (f"worker 1 (pid {asker.process.pid}): {asker.killed}",)
    fleet.step_until(lambda: not fleet.supervisor._workers)
    assert fleet.supervisor._exit_code == 1  # a worker killed while stopping: the stop was not clean


def test_a_worker_lingering_after_its_shutdown_is_killed(fleet: Fleet) -> None:
    fleet.supervisor.exit_after = 0.5
    worker = fleet.add(1, scripted_worker.close_pipe_then_linger)
    fleet.step_until(lambda: worker.closed_at is not None)
    assert worker.process.is_alive()
    fleet.step_until(lambda: 1 not in fleet.supervisor._workers)
    assert worker.process.exitcode == -signal.SIGKILL
    assert worker.killed is not None and "after its shutdown ended" in worker.killed


def test_a_worker_hung_inside_a_scrape_cannot_stall_the_supervisor(fleet: Fleet) -> None:
    """A fold waits for scrapes; the supervisor must not wait with it, or its watchdog (the one thing that can end
    the scrape, by killing its worker) never runs and healthy workers' heartbeats go unread."""
    metrics = fleet.supervisor.metrics
    assert metrics is not None
    locked_r, locked_w = CONTEXT.Pipe(duplex=False)
    hung = fleet.add(1, scripted_worker.silent_in_a_scrape, str(metrics.path), locked_w)
    assert locked_r.poll(60) and locked_r.recv() == "locked"
    beating = fleet.add(2, scripted_worker.heartbeat_only)
    crashed = fleet.add(3, scripted_worker.exit_at_once)
    crashed.process.join(60)  # its exit is the first thing the supervisor sees: it folds while the scrape is held
    fleet.overdue(hung)
    failed: list[BaseException] = []

    def step() -> None:
        try:
            fleet.step_until(lambda: not ({1, 3} & set(fleet.supervisor._workers)))
        except BaseException as exc:
            failed.append(exc)

    stepping = threading.Thread(target=step)
    stepping.start()
    stepping.join(30)
    if stepping.is_alive():  # stuck in the fold: end the scrape so the thread (and the test) can finish
        hung.process.kill()
        stepping.join(60)
        pytest.fail("the supervisor blocked in a fold while a hung worker held the scrape lock")
    assert not failed, failed
    assert hung.process.exitcode == -signal.SIGKILL and crashed.process.exitcode == 0
    assert fleet.supervisor._workers == {2: beating} and beating.killed is None
    fleet.step_until(lambda: not fleet.supervisor._unfolded)  # both folded once the lock is free
    assert not list(metrics.path.glob(f"*_{hung.process.pid}.db"))


def test_a_worker_that_stopped_reading_cannot_block_the_supervisor_in_a_send(fleet: Fleet) -> None:
    """Reloads asked again and again (SIGHUPs, clients of the other workers) fill a blocked worker's pipe: the
    supervisor's send must give up, and the worker be killed as hung, not wait for it forever."""
    hung = fleet.add(1, scripted_worker.not_reading)
    fleet.supervisor._stopping = True  # no restart: the test ends when it is gone
    asked = threading.Thread(target=lambda: [fleet.supervisor._begin_reload(None) for _ in range(20_000)])
    asked.start()
    asked.join(60)
    if asked.is_alive():  # blocked in a send: end the worker so the thread (and the test) can finish
        hung.process.kill()
        asked.join(60)
        pytest.fail("the supervisor blocked in a send to a worker that does not read")
    assert hung.killed is not None and "pipe" in hung.killed
    assert fleet.supervisor._reloads == {}  # every reload was answered without it
    fleet.step_until(lambda: not fleet.supervisor._workers)
    assert hung.process.exitcode == -signal.SIGKILL


def test_a_real_worker_beats_while_its_initial_load_is_held(
    tmp_path: Path, build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first load may take minutes (a big model, a cold cache): the loop runs, and beats, all along, or the
    watchdog would kill every worker that starts slowly. Its load is held in the test loader until the test lets go."""
    modelgen.add_const(tmp_path / "h" / "1")
    hold, calls = tmp_path / "hold", tmp_path / "calls.log"
    hold.touch()
    (tmp_path / "loader.cfg").write_text(f"CALL_LOG {calls}\n")
    options = {"loader_name": "test", "model_file": "model.xml", "bin_file": "model.bin", "hold_file": str(hold)}
    config = tmp_path / "models.json"
    config.write_text(json.dumps({
        "custom_loader_config_list": [{"config": {"loader_name": "test",
                                                  "library_path": str(build / "libtestloader.so"),
                                                  "loader_config_file": str(tmp_path / "loader.cfg")}}],
        "model_config_list": [model_entry("h", tmp_path / "h", custom_loader_options=options)],
    }))  # fmt: skip
    metrics = MetricsDir(tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics.path))
    parent, child = CONTEXT.Pipe(duplex=True)
    settings = Settings(config_path=config, port=0, grpc_workers=2)
    worker = CONTEXT.Process(target=worker_main, args=(settings, 1, child))
    worker.start()
    child.close()
    try:
        while not (calls.exists() and "load_model h 1" in calls.read_text()):  # its load is under way, and held
            assert parent.poll(60), "the worker said nothing"
            assert isinstance(parent.recv(), Alive)
        assert parent.poll(60) and parent.recv() == Alive()  # sent while the load is still held: not Ready
        hold.unlink()
        while not isinstance(message := (parent.recv() if parent.poll(60) else None), Ready):
            assert message == Alive()
    finally:
        hold.unlink(missing_ok=True)
        parent.close()  # EOF: the worker stops
        worker.join(60)
        metrics.close()
    assert worker.exitcode == 0


def test_the_worker_link_beats_from_the_event_loop_until_closed() -> None:
    parent, child = multiprocessing.Pipe(duplex=True)

    async def main() -> tuple[list[Any], bool]:
        link = WorkerLink(1, child)

        async def reload_here() -> ReloadResult:
            return ReloadResult(ok=True, changed=False)

        link.start(reload_here, lambda: None)
        got = []
        for _ in range(2):  # the first at start, the next one heartbeat later
            while not parent.poll():
                await asyncio.sleep(HEARTBEAT_SECONDS / 10)
            got.append(parent.recv())
        link.close()
        return got, link._beat is not None and link._beat.cancelled()

    beats, cancelled = asyncio.run(main())
    assert beats == [Alive(), Alive()] and cancelled  # no timer is left on the loop once closed
