"""The shared metrics dir of `--grpc_workers N` (engine/metrics_dir.py): dead workers' values folded into one archive
per type with the fleet's sums unchanged, stale dirs told apart by their lock (not a pid), scrapes kept apart from a
fold. Real processes write the files with prometheus_client itself."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import scripted_worker
from conftest import ROOT
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics_dir import MetricsDir, clean_stale, scrape_lock

CONTEXT = multiprocessing.get_context("spawn")


def own_dir(parent: str, report: Connection) -> None:
    """A supervisor's dir, held until this process dies."""
    made = MetricsDir(Path(parent))
    report.send(str(made.path))
    report.recv()


def hold_dir(path: str, report: Connection) -> None:
    """A worker holding its share of the dir, until this process dies."""
    from engine.metrics_dir import hold

    hold(Path(path))
    report.send("held")
    report.recv()


def sums(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(path))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}  # fmt: skip


@pytest.fixture
def metrics(tmp_path: Path) -> Iterator[MetricsDir]:
    made = MetricsDir(tmp_path)
    yield made
    made.close()


def run(target, *args) -> int:  # type: ignore[no-untyped-def]
    process = CONTEXT.Process(target=target, args=args)
    process.start()
    process.join(60)
    assert process.exitcode == 0 and process.pid is not None
    return process.pid


def test_dead_workers_fold_into_one_archive_per_type_with_the_sums_unchanged(metrics: MetricsDir) -> None:
    pids = [run(scripted_worker.record_metrics, str(metrics.path), amount) for amount in (1, 2, 4)]
    before = sums(metrics.path)
    assert before[("served_total", (("api", "rest"),))] == 7 and before[("latency_count", ())] == 3
    assert before[("latency_bucket", (("le", "0.1"),))] == 2  # 0.05 and 0.1: cumulative buckets stay right
    for pid in pids:
        assert metrics.fold(pid) == 2  # its counter and histogram files (the live gauge is dropped)
    after = sums(metrics.path)
    kept = {k: v for k, v in before.items() if k[0] != "state"}
    assert {k: v for k, v in after.items() if k[0] != "state"} == pytest.approx(kept)  # sums in another order
    assert not [k for k in after if k[0] == "state"]  # live gauges die with their process
    assert sorted(p.name for p in metrics.path.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]
    assert metrics.fold(pids[0]) == 0  # folding again changes nothing
    assert sums(metrics.path) == after


def test_a_stale_dir_is_known_by_its_free_lock_not_by_a_pid(tmp_path: Path) -> None:
    report_r, report_w = CONTEXT.Pipe()
    owner = CONTEXT.Process(target=own_dir, args=(str(tmp_path), report_w))
    owner.start()
    alive = Path(report_r.recv())
    assert clean_stale(tmp_path) == [] and alive.is_dir()  # its owner lives
    making = tmp_path / ".hotserve-metrics-being-made"
    making.mkdir()
    worker = CONTEXT.Process(target=hold_dir, args=(str(alive), report_w))
    worker.start()
    assert report_r.recv() == "held"
    assert owner.pid is not None and worker.pid is not None
    os.kill(owner.pid, signal.SIGKILL)  # dies without cleaning up
    owner.join()
    assert clean_stale(tmp_path) == [] and alive.is_dir()  # a worker left draining still uses it
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    assert clean_stale(tmp_path) == [alive] and not alive.exists()
    assert making.is_dir()  # a dir still being made is not a metrics dir yet


def test_a_fold_never_runs_while_a_scrape_reads_the_files(metrics: MetricsDir) -> None:
    pid = run(scripted_worker.record_metrics, str(metrics.path), 1)
    with scrape_lock(metrics.path):
        assert metrics.fold(pid) is None  # not now, and without waiting: the supervisor tries again later
        assert (metrics.path / f"counter_{pid}.db").exists()
    assert metrics.fold(pid) == 2 and not (metrics.path / f"counter_{pid}.db").exists()


def test_an_older_hotserve_s_dir_is_kept_while_its_supervisor_lives(tmp_path: Path) -> None:
    """Before the lock, a dir was named after its supervisor's pid (`hotserve-metrics-<pid>-<random>`) and never
    locked: a free lock says nothing about it. One of a live older supervisor (an upgrade in place) stays."""
    live = tmp_path / f"hotserve-metrics-{os.getpid()}-k3j2h1g0"
    live.mkdir()
    (live / "counter_1.db").write_bytes(b"")
    dead = tmp_path / f"hotserve-metrics-{run(os.getpid)}-a1b2c3d4"  # a process that has exited
    dead.mkdir()
    assert clean_stale(tmp_path) == [dead]
    assert live.is_dir() and (live / "counter_1.db").exists() and not dead.exists()


def test_a_fold_on_a_full_tmp_fails_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    """prometheus_client writes through an mmap: on a full filesystem that is a SIGBUS, which would kill the
    supervisor (and with it the fleet). The archive's bytes are allocated first, so a full tmp is ENOSPC."""
    script = f"import sys; sys.path[:0] = {[str(ROOT), str(ROOT / 'tests')]!r}; import scripted_worker as s; "
    script += f"s.fold_on_a_full_tmp({str(tmp_path)!r})"
    mount = f'mount -t tmpfs -o size=2m hotserve-test {tmp_path} && exec {sys.executable} -c "{script}"'
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here: cannot mount a small tmpfs")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["full"] == "ENOSPC"  # an error the supervisor logs, not a crash
    before, after_full, after = ([tuple(s) for s in sums] for sums in report["sums"])
    counted = [s for s in before if not s[0].startswith("state")]  # the live gauge goes at the first try
    assert after_full == counted and after == counted  # a fold that stopped half-way counts nothing twice
    assert report["then"] == 1  # the histogram's, left by the full tmp, is folded once there is room
