"""Scripted stand-ins for a worker at the other end of the supervisor's pipe: real spawned processes, real pipes,
for what a real server cannot be made to do on cue (close its pipe and linger, answer a reload late)."""

from __future__ import annotations

import contextlib
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

from engine.status import ReloadResult
from engine.worker_link import FleetReload, FleetReloaded, Reload, Reloaded


def close_pipe_then_wait(conn: Connection, go: Event) -> None:
    """A worker past `link.close()` still tearing down (threads, atexit): its pipe is at EOF, it has not exited."""
    conn.close()
    go.wait()


def ask_then_exit(conn: Connection, go: Event) -> None:
    """Asks for a fleet reload (its request 1), then dies when told, before the answer."""
    conn.send(FleetReload(1))
    go.wait()


def answer_when_told(conn: Connection, go: Event) -> None:
    """Answers the supervisor's reloads, but only once `go` is set: a slow reload (a long compile, say)."""
    asked: list[int] = []
    while True:
        message = conn.recv()
        if isinstance(message, Reload):
            asked.append(message.request)
        if len(asked) == 2:
            break
    go.wait()
    for request in asked:
        conn.send(Reloaded(request, ReloadResult(ok=True, changed=True)))
    with contextlib.suppress(EOFError):
        conn.recv()  # alive until the test closes the pipe


def ask_and_report(conn: Connection, report: Connection) -> None:
    """A restarted worker at the asker's index: asks its own request 1 and reports the first answer it gets."""
    conn.send(FleetReload(1))
    while True:
        message = conn.recv()
        if isinstance(message, Reload):
            conn.send(Reloaded(message.request, ReloadResult(ok=True, changed=True)))
        elif isinstance(message, FleetReloaded):
            report.send(message.result)
            return


# For the watchdog's tests, which kill them: a multiprocessing Event a killed process waited on can hang its set().
def silent(conn: Connection) -> None:
    """A worker whose event loop is blocked: its pipe is open, it reads but sends nothing (no heartbeat, no answer)."""
    with contextlib.suppress(EOFError):
        while True:
            conn.recv()


def heartbeat_only(conn: Connection) -> None:
    """A worker that beats, and answers nothing, until its pipe closes."""
    from engine.worker_link import Alive

    with contextlib.suppress(EOFError, OSError):
        while True:
            conn.send(Alive())
            if conn.poll(0.05):
                conn.recv()


def close_pipe_then_linger(conn: Connection) -> None:
    """A worker stuck after the end of its shutdown (a thread that never ends): pipe closed, process alive."""
    import time

    conn.close()
    time.sleep(3600)


def record_metrics(path: str, amount: int, wide: int = 0) -> None:
    """A worker's life in metrics: counts, observations and a live gauge, written to the shared dir at `path`, plus
    `wide` more histogram series (files of many pages). Here, not in the test module: prometheus_client picks its
    multiprocess mode when first imported."""
    import os

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    from prometheus_client import Counter, Gauge, Histogram

    Counter("served", "requests", ["api"]).labels("rest").inc(amount)
    Histogram("latency", "seconds", buckets=(0.1, 1.0)).observe(0.05 * amount)
    Gauge("state", "per worker", multiprocess_mode="liveall").set(amount)
    if wide:
        per_model = Histogram("per_model", "seconds", ["model"], buckets=(0.1, 1.0))
        for model in range(wide):
            per_model.labels(f"model-{model}").observe(0.5)


def exit_at_once(conn: Connection) -> None:
    """A worker that dies as soon as it runs (a crash)."""
    conn.close()


def silent_in_a_scrape(conn: Connection, metrics_dir: str, report: Connection) -> None:
    """A worker whose loop blocked inside a scrape: it holds the scrape lock and sends nothing until killed."""
    from engine.metrics_dir import scrape_lock

    with scrape_lock(Path(metrics_dir)):
        report.send("locked")
        silent(conn)


def fold_on_a_full_tmp(base: str) -> None:
    """A supervisor folding a dead worker's metrics when its tmp is full, then after space came back: prints what
    each fold did and the sums. Run in a mount namespace where `base` is a small tmpfs (tests/test_metrics_dir.py).
    The counter's archive fits in the page the dropped gauge frees; the wide histogram's does not."""
    import errno
    import json
    import multiprocessing

    from engine.metrics_dir import MetricsDir

    made = MetricsDir(Path(base))
    worker = multiprocessing.get_context("spawn").Process(target=record_metrics, args=(str(made.path), 3, 300))
    worker.start()
    worker.join()
    assert worker.pid is not None
    filler = Path(base) / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"x" * 65536)
            f.flush()
    before = _sums(made.path)
    try:
        full = str(made.fold(worker.pid))
    except OSError as exc:
        full = errno.errorcode.get(exc.errno or 0, str(exc))
    after_full = _sums(made.path)
    filler.unlink()
    then = made.fold(worker.pid)
    print(json.dumps({"full": full, "then": then, "sums": [before, after_full, _sums(made.path)]}))


def _sums(path: Path) -> list[tuple[str, float]]:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(path))
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return sorted((f"{s.name}{sorted(s.labels.items())}", s.value) for f in families for s in f.samples)


def not_reading(conn: Connection) -> None:
    """A worker whose event loop is blocked for good: it neither sends nor reads, so its pipe fills up."""
    import time

    time.sleep(3600)
