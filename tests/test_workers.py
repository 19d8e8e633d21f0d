"""`--grpc_workers 2`: real supervisor and worker processes on shared ports (issue 12).

Which worker served a connection is read from `hotserve_worker_requests{pid}`; when something happened is read from
the workers' own log lines (each names its pid) and from the endpoints, never from sleeps.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from multiprocessing.connection import wait
from pathlib import Path

import grpc
import modelgen
import numpy as np
import pytest
import scripted_worker
import tritonclient.grpc as grpcclient
from conftest import ROOT, ServerProcess, model_entry
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import free_port
from loader_fixtures import BUILD
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics_dir import MetricsDir, clean_stale
from engine.settings import Settings
from engine.status import ReloadResult
from engine.workers import WorkerSupervisor, _Worker, combine

X = np.arange(10, dtype=np.float32).reshape(1, 10)
SERVING = health_pb2.HealthCheckResponse.SERVING


def rest_infer(port: int, model: str = "m") -> tuple[int, dict]:
    body = {"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": X.ravel().tolist()}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json.dumps(body).encode(),
                                     headers={"Connection": "close"}, method="POST")  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # a new connection each time
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def grpc_infer(address: str, model: str = "m") -> np.ndarray:
    # a private subchannel pool: each client is its own TCP connection, balanced by the kernel on its own
    client = grpcclient.InferenceServerClient(address, channel_args=[("grpc.use_local_subchannel_pool", 1)])
    try:
        tensor = grpcclient.InferInput("b", [1, 10], "FP32")
        tensor.set_data_from_numpy(X)
        return client.infer(model, [tensor]).as_numpy("a")
    finally:
        client.close()


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def scrape_when(port: int, wanted) -> dict[str, list] | None:  # type: ignore[no-untyped-def]
    metrics = scrape(port)
    return metrics if wanted(metrics) else None


def requests_total(metrics: dict[str, list], api: str) -> float:
    return sum(s.value for s in metrics["hotserve_requests"] if s.name.endswith("_total") and s.labels["api"] == api)


def per_worker(metrics: dict[str, list]) -> dict[int, float]:
    return {int(s.labels["pid"]): s.value for s in metrics.get("hotserve_worker_requests", [])}


def until(what: str, check, server: ServerProcess, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """Poll an endpoint until `check()` is truthy (another worker publishes its metrics every 0.25 s)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert server.proc.poll() is None and time.monotonic() < deadline, f"{what}:\n{server.log[-3000:]}"
        time.sleep(0.05)


def worker_pids(server: ServerProcess, start: int = 0) -> list[int]:
    found = re.findall(r"All \d+ workers ready \(pids ([\d, ]+)\)", server.log[start:])
    return [int(p) for p in found[-1].split(", ")]


def logged_by(server: ServerProcess, pid: int, pattern: str) -> bool:
    return re.search(rf"\[{pid}\]\[[^\]]+\]\[\w+\] {pattern}", server.log) is not None


@pytest.fixture
def fleet(tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    def start(*args: str) -> tuple[ServerProcess, int, Path]:
        modelgen.add_const(tmp_path / "m" / "1")
        config = tmp_path / "models.json"
        config.write_text(json.dumps({"model_config_list": [model_entry("m", tmp_path / "m")]}))
        rest_port = free_port()
        server = serve(config, "--grpc_workers", "2", "--rest_port", str(rest_port), *args)
        return server, rest_port, config

    return start


def test_two_workers_share_both_ports_and_sum_their_metrics(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, rest_port, config = fleet("--cache_dir", str(tmp_path / "cache"), "--drain_seconds", "60")
    pids = worker_pids(server)
    assert len(set(pids)) == 2 and server.proc.pid not in pids
    loaded = r"Loaded model m; version: 1; .*; loaded from cache: {}"
    assert logged_by(server, pids[0], loaded.format("False")) and logged_by(server, pids[1], loaded.format("True"))
    rounds = 40  # each a new connection on each port: all 80 on one worker is a 2^-79 chance
    for _ in range(rounds):
        status, body = rest_infer(rest_port)
        assert status == 200 and body["outputs"][0]["data"] == (X + 1).ravel().tolist()
        np.testing.assert_allclose(grpc_infer(server.address), X + 1)
    published = lambda m: sum(per_worker(m).values()) == 2 * rounds  # noqa: E731
    metrics = until("both workers' counts published", lambda: scrape_when(rest_port, published), server)
    served = per_worker(metrics)
    assert set(served) == set(pids) and all(n > 0 for n in served.values()), served  # both got connections
    assert requests_total(metrics, "rest") == rounds and requests_total(metrics, "kserve") == rounds  # the fleet's sums
    state = {int(s.labels["pid"]) for s in metrics["hotserve_version_state"] if s.value == 30}
    assert state == set(pids)  # each worker's own view of the version, by pid

    # hotserve status and health answer against the fleet
    status = subprocess.run([sys.executable, "-m", "engine", "status", "--address", server.address],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0 and re.search(r"^m\s+1\s+AVAILABLE", status.stdout, re.M), status
    with grpc.insecure_channel(server.address) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING

    # a config edit reaches both workers (each watches the same file)
    modelgen.add_const(tmp_path / "m2" / "1", delta=2.0)
    config.write_text(json.dumps({"model_config_list": [model_entry("m", tmp_path / "m"),
                                                        model_entry("m2", tmp_path / "m2")]}))  # fmt: skip
    available = 'STATUS CHANGE: Version 1 of model m2 .*"AVAILABLE"'
    until("m2 on both workers", lambda: all(logged_by(server, pid, available) for pid in pids), server)
    for _ in range(4):
        assert rest_infer(rest_port, "m2")[1]["outputs"][0]["data"] == (X + 2).ravel().tolist()

    # only this fleet shares its ports: another hotserve (one worker on the gRPC port, two on the REST port) is refused
    for workers, port, error in [("1", ["--port", str(server.port)],
                                  f"Cannot start gRPC server on 127.0.0.1:{server.port}: port is busy"),
                                 ("2", ["--port", "0", "--rest_port", str(rest_port)],
                                  f"Cannot start REST server on port {rest_port}: port is busy")]:  # fmt: skip
        other = subprocess.run(
            [sys.executable, "-m", "engine", "serve", "--config_path", str(config), "--grpc_bind_address",
             "127.0.0.1", *port, "--grpc_workers", workers], cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.returncode == 1 and error in other.stderr, other.stderr
    assert rest_infer(rest_port)[0] == 200

    # the supervisor killed outright: its workers see their pipe close and stop on their own, draining meanwhile;
    # their metrics dir is theirs until they are gone (the next fleet's clean-up must not take it from under them)
    metrics_dir = Path(re.search(r"; metrics dir (\S+)", server.log).group(1))  # type: ignore[union-attr]
    server.proc.kill()
    for pid in pids:
        server.wait_for(rf"\[{pid}\]\[hotserve.server\]\[INFO\] Draining: still serving", exited=True)
    assert clean_stale(metrics_dir.parent) == [] and metrics_dir.is_dir()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # a second one: the drain window ends now
        server.wait_for(rf"\[{pid}\]\[hotserve.server\]\[INFO\] Shutdown complete", exited=True)


def test_reload_answers_once_every_worker_reloaded_and_a_killed_worker_comes_back(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, rest_port, config = fleet("--file_system_poll_wait_seconds", "0", "--drain_seconds", "30")
    pids = worker_pids(server)
    metrics_dir = Path(re.search(r"; metrics dir (\S+)", server.log).group(1))  # type: ignore[union-attr]
    modelgen.add_const(tmp_path / "m2" / "1", delta=2.0)
    config.write_text(json.dumps({"model_config_list": [model_entry("m", tmp_path / "m"),
                                                        model_entry("m2", tmp_path / "m2")]}))  # fmt: skip
    available = 'STATUS CHANGE: Version 1 of model m2 .*"AVAILABLE"'
    assert not any(logged_by(server, pid, available) for pid in pids)  # nothing watches: only the reload applies it
    request = urllib.request.Request(f"http://127.0.0.1:{rest_port}/v1/config/reload", b"", method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 201
        body = json.loads(response.read())
    assert all(logged_by(server, pid, available) for pid in pids), server.log[-3000:]  # both, before the answer
    assert body["_last_reload"] == {"ok": True, "changed": True, "config_valid": True, "errors": []}
    assert body["m2"]["model_version_status"][0]["state"] == "AVAILABLE"

    # SIGHUP to the supervisor reloads every worker
    config.write_text(json.dumps({"model_config_list": [model_entry("m", tmp_path / "m")]}))
    server.signal(signal.SIGHUP)
    removed = 'STATUS CHANGE: Version 1 of model m2 .*"END"'
    until("m2 retired on both workers", lambda: all(logged_by(server, pid, removed) for pid in pids), server)

    # SIGKILL one worker: the supervisor logs it, starts another, and the fleet keeps serving meanwhile
    for _ in range(6):
        assert rest_infer(rest_port)[0] == 200
    mark = len(server.log)
    os.kill(pids[1], signal.SIGKILL)
    server.wait_for(rf"Worker 2 \(pid {pids[1]}\) exited \(signal SIGKILL\); restarting it in 0.5 s", start=mark)
    assert rest_infer(rest_port)[0] == 200  # the survivor serves while worker 2 is away
    new_pid = int(server.wait_for(r"Worker 2 ready \(pid (\d+)\)", start=mark).group(1))
    assert new_pid not in pids
    assert not logged_by(server, new_pid, available)  # it started from the current file: no m2
    own = [line for line in server.log[mark:].splitlines() if f"[{new_pid}]" in line]
    loaded = next(i for i, line in enumerate(own) if re.search(r'model m status change.*"AVAILABLE"', line))
    listening = next(i for i, line in enumerate(own) if "Started gRPC server" in line)
    assert loaded < listening  # it joined the shared ports only once it could serve: no "model not found" meanwhile
    metrics = until("the new worker's state published",
                    lambda: scrape_when(rest_port, lambda m: new_pid in per_worker(m)), server)  # fmt: skip
    assert set(per_worker(metrics)) == {pids[0], new_pid}  # the dead worker's live gauges went with it...
    assert requests_total(metrics, "rest") == 7  # ...its counts stay in the fleet's totals, counted once
    assert not list(metrics_dir.glob(f"*_{pids[1]}.db"))  # folded into the archive, not left for every scrape
    assert (metrics_dir / "counter_archive.db").exists()

    # SIGTERM: every worker drains (still serving, not ready), a second SIGTERM ends the window, exit 0
    mark = len(server.log)
    server.signal(signal.SIGTERM)
    for pid in (pids[0], new_pid):
        server.wait_for(rf"\[{pid}\]\[hotserve.server\]\[INFO\] Draining: still serving", start=mark)
    assert rest_infer(rest_port)[0] == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v2/health/live", timeout=10) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as ready:
        urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v2/health/ready", timeout=10)
    assert ready.value.code == 503
    server.signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0, server.log[-3000:]
    for pid in (pids[0], new_pid):
        assert logged_by(server, pid, "Shutdown complete")
    assert not metrics_dir.exists()


def test_a_worker_that_cannot_start_fails_the_start_up_as_one_process_would(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "m" / "1")
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": [model_entry("m", tmp_path / "m")]}))
    (tmp_path / "garbage.pem").write_text("not a certificate")
    tls = ["--tls_cert", str(tmp_path / "garbage.pem"), "--tls_key", str(tmp_path / "garbage.pem")]
    single = serve(config, *tls, ready=False)
    fleet = serve(config, *tls, "--grpc_workers", "2", ready=False)
    assert single.proc.wait(60) == 1 and fleet.proc.wait(60) == 1
    error = re.search(r"\[ERROR\] (Cannot start with TLS: .*)", single.log).group(1)  # type: ignore[union-attr]
    assert error in fleet.log, fleet.log
    assert re.search(r"Worker 1 \(pid \d+\) could not start \(exit code 1\); stopping", fleet.log), fleet.log
    assert "Worker 2" not in fleet.log and "Traceback" not in fleet.log


def test_a_fleet_cannot_join_a_single_servers_port(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "m" / "1")
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": [model_entry("m", tmp_path / "m")]}))
    single = serve(config)
    fleet = serve(config, "--port", str(single.port), "--grpc_workers", "2", ready=False)
    assert fleet.proc.wait(60) == 1
    assert f"Cannot start gRPC server on 127.0.0.1:{single.port}: port is busy" in fleet.log, fleet.log
    assert "Worker 1" not in fleet.log  # refused before any worker started
    np.testing.assert_allclose(grpc_infer(single.address), X + 1)


def test_a_full_tmp_fails_the_start_up_with_a_clear_error(tmp_path: Path) -> None:
    """The metrics dir cannot be made (here: a tmpfs with one inode free, which tempfile's own probe frees again):
    a logged error naming the dir and exit 1, not a traceback."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here: cannot mount a small tmpfs")
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": []}))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    serve = f"{sys.executable} -m engine serve --config_path {config} --port 0 --grpc_workers 2"
    script = f"mount -t tmpfs -o size=1m,nr_inodes=2 hotserve-test {tmp} && TMPDIR={tmp} exec {serve}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert f"Cannot make the workers' metrics dir in {tmp} (TMPDIR sets where): [Errno 28]" in log, log
    assert "Traceback" not in log and "Worker 1" not in log


def test_fleet_reload_result_names_the_worker_that_failed() -> None:
    same = ReloadResult(ok=False, changed=True, errors=("model x: bad",))
    other = ReloadResult(ok=False, changed=False, errors=("model x: bad", "model y: only here"))
    combined = combine({1: (11, same), 2: (22, other)}, {})
    assert not combined.ok and combined.changed and combined.config_valid
    assert combined.errors == ("model x: bad", "worker 2 (pid 22): model y: only here")
    ok = ReloadResult(ok=True, changed=False)
    gone = combine({1: (11, ok)}, {2: (22, "exited before it reloaded")})
    assert not gone.ok and gone.errors == ("worker 2 (pid 22): exited before it reloaded",)
    both = combine({1: (11, ok), 2: (22, ok)}, {})
    assert both.ok and not both.changed and both.errors == ()


def test_a_worker_whose_pipe_closed_is_waited_for_by_its_exit_alone(tmp_path: Path) -> None:
    """A worker closes its pipe before its last teardown (threads, atexit): EOF stays readable, so the supervisor
    must stop waiting on that pipe or its loop spins at 100 % CPU until the worker has exited."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=True)
    go = context.Event()
    process = context.Process(target=scripted_worker.close_pipe_then_wait, args=(child, go))
    process.start()
    child.close()
    settings = Settings(grpc_workers=2)
    supervisor = WorkerSupervisor(settings)
    supervisor.metrics = MetricsDir(tmp_path)
    supervisor._workers[1] = _Worker(1, process, parent, time.monotonic(), ready=True)
    try:
        supervisor._step(settings)  # returns once the pipe reads EOF (the process still runs: it waits for `go`)
        assert process.is_alive() and 1 in supervisor._workers
        assert wait(supervisor._waitables(), 0) == []  # nothing is ready: the next step blocks, it does not spin
        go.set()
        supervisor._step(settings)  # its exit
        assert supervisor._workers == {} and process.exitcode == 0
    finally:
        go.set()
        process.join()


def test_a_worker_still_starting_takes_part_in_reloads_and_does_not_join_the_ports_once_stopped(
    tmp_path: Path, serve, build: Path
) -> None:  # type: ignore[no-untyped-def]
    """Watching off: only reloads apply an edit. A restarted worker whose initial load read the config before the edit
    (its load held in the test loader) must reload too, or it serves the old config until the next reload."""
    modelgen.add_const(tmp_path / "m" / "1")
    modelgen.add_const(tmp_path / "h" / "1")
    modelgen.add_const(tmp_path / "m2" / "1", delta=2.0)
    hold, calls = tmp_path / "hold", tmp_path / "calls.log"
    (tmp_path / "loader.cfg").write_text(f"CALL_LOG {calls}\n")
    options = {"loader_name": "test", "model_file": "model.xml", "bin_file": "model.bin", "hold_file": str(hold)}
    config = tmp_path / "models.json"

    def apply(*extra: str) -> None:
        config.write_text(json.dumps({
            "custom_loader_config_list": [{"config": {"loader_name": "test",
                                                      "library_path": str(BUILD / "libtestloader.so"),
                                                      "loader_config_file": str(tmp_path / "loader.cfg")}}],
            "model_config_list": [model_entry("m", tmp_path / "m"),
                                  model_entry("h", tmp_path / "h", custom_loader_options=options),
                                  *(model_entry(name, tmp_path / name) for name in extra)],
        }))  # fmt: skip

    def held_loads() -> int:
        return len(re.findall(r"^load_model h 1$", calls.read_text(), re.M))

    def restart_worker_2_held(pid: int) -> tuple[int, int]:
        """SIGKILL worker 2 with the hold in place: → (log mark, new pid), its initial load held (config read)."""
        hold.touch()
        mark, held = len(server.log), held_loads()
        os.kill(pid, signal.SIGKILL)
        new_pid = int(server.wait_for(r"Worker 2 started \(pid (\d+)\)", start=mark).group(1))
        until("its load of h held", lambda: held_loads() > held, server)
        return mark, new_pid

    apply()
    rest_port = free_port()
    server = serve(config, "--grpc_workers", "2", "--rest_port", str(rest_port), "--file_system_poll_wait_seconds", "0")
    available, retired = (
        'STATUS CHANGE: Version 1 of model m2 .*"AVAILABLE"',
        'STATUS CHANGE: Version 1 of model m2 .*"END"',
    )

    # a reload request while worker 2 is starting: answered once it, too, has reloaded
    mark, second = restart_worker_2_held(worker_pids(server)[1])
    apply("m2")
    answer: list[dict] = []
    request = urllib.request.Request(f"http://127.0.0.1:{rest_port}/v1/config/reload", b"", method="POST")
    asking = threading.Thread(
        target=lambda: answer.append(json.loads(urllib.request.urlopen(request, timeout=120).read()))
    )
    asking.start()
    server.wait_for(r"Reload requested through worker 1: reloading (\d+) worker", start=mark)
    hold.unlink()
    asking.join(120)
    assert answer and answer[0]["_last_reload"]["ok"], answer
    assert logged_by(server, second, available), server.log[mark:][-3000:]  # before the answer, as worker 1 did

    # SIGHUP while worker 2 is starting: it reloads too (the supervisor logs the fleet's result)
    mark, third = restart_worker_2_held(second)
    apply()
    server.signal(signal.SIGHUP)
    server.wait_for(r"SIGHUP: reloading \d+ worker", start=mark)
    hold.unlink()
    server.wait_for(r"Reload on SIGHUP done: OK", start=mark)
    # the reload retired m2; its drain and free (→ END) may finish just after the reload's answer
    until("worker 3 to end m2", lambda: logged_by(server, third, retired), server)

    # SIGTERM while worker 2 is starting: it stops without ever joining the shared ports
    mark, fourth = restart_worker_2_held(third)
    server.signal(signal.SIGTERM)
    server.wait_for(rf"\[{fourth}\]\[hotserve.server\]\[INFO\] SIGTERM: health is NOT_SERVING", start=mark)
    hold.unlink()
    assert server.proc.wait(60) == 0, server.log[mark:][-3000:]
    assert logged_by(server, fourth, "Shutdown complete") and not logged_by(server, fourth, "Started gRPC server")


def test_a_fleet_reload_answers_the_process_that_asked_not_a_restarted_worker_at_its_index(tmp_path: Path) -> None:
    """Worker 2 asks (its request 1) and dies; its successor asks its own request 1 while worker 1 still reloads
    for the first: the first reload's answer must not reach the successor as the answer to its request."""
    context = multiprocessing.get_context("spawn")
    settings = Settings(grpc_workers=2)
    supervisor = WorkerSupervisor(settings)
    supervisor.metrics = MetricsDir(tmp_path)
    go_1, go_2 = context.Event(), context.Event()
    report_r, report_w = context.Pipe(duplex=False)
    processes = []

    def add(index: int, target, *args) -> _Worker:  # type: ignore[no-untyped-def]
        parent, child = context.Pipe(duplex=True)
        process = context.Process(target=target, args=(child, *args))
        process.start()
        child.close()
        processes.append(process)
        supervisor._workers[index] = _Worker(index, process, parent, time.monotonic(), ready=True)
        return supervisor._workers[index]

    try:
        add(1, scripted_worker.answer_when_told, go_1)
        add(2, scripted_worker.ask_then_exit, go_2)
        while not supervisor._reloads:
            supervisor._step(settings)  # worker 2's FleetReload
        go_2.set()
        while 2 in supervisor._workers:
            supervisor._step(settings)  # its exit
        supervisor._restart_at.clear()  # its successor is the scripted one below
        add(2, scripted_worker.ask_and_report, report_w)
        while len(supervisor._reloads) < 2:
            supervisor._step(settings)  # the successor's FleetReload
        go_1.set()
        while supervisor._reloads:
            supervisor._step(settings)  # worker 1's answers to both, the successor's to its own
        assert report_r.poll(60)
        answer = report_r.recv()
        assert answer.ok and answer.errors == (), answer  # not "worker 2 (pid …): exited before it reloaded"
    finally:
        go_1.set()
        go_2.set()
        for worker in supervisor._workers.values():
            worker.conn.close()
        for process in processes:
            process.join(60)
