"""Drain on SIGTERM (issue 11): health NOT_SERVING at once, serve on for --drain_seconds, finish in-flight, exit 0.

Requests are provably in flight at SIGTERM: the `slow` model runs one ~0.15 s inference at a time (nireq 1, one
thread), the server's own hotserve_inflight_requests gauge shows all of them leased before the signal is sent, and
the test checks that some of them answered only after it.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import grpc
import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import model_entry
from fleetsim import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ServerProcess, free_port

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
SLOW = {"nireq": 1, "plugin_config": {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}}
IN_FLIGHT = 4
STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]"


def logged_at(server: ServerProcess, pattern: str) -> float:
    """The server's own clock at the log line matching `pattern`."""
    found = server.wait_for(STAMP + r".*" + pattern, timeout=30)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()


def inflight(rest: str, model: str) -> int:
    with urllib.request.urlopen(f"{rest}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(rf'^hotserve_inflight_requests\{{model="{model}",version="\d+"\}} (\S+)$', text, re.M)
    return int(sum(float(v) for v in found))


def rest_ready(rest: str) -> int:
    try:
        with urllib.request.urlopen(f"{rest}/v2/health/ready", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def rest_infer(rest: str) -> list[float]:
    body = {"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": [0.0] * 10}]}
    request = urllib.request.Request(
        f"{rest}/v2/models/dummy/infer", json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["outputs"][0]["data"]


def infer_dummy(address: str) -> np.ndarray:
    client = grpcclient.InferenceServerClient(address)  # a new channel: a new connection after SIGTERM
    x = grpcclient.InferInput("b", [1, 10], "FP32")
    x.set_data_from_numpy(np.zeros((1, 10), np.float32))
    try:
        return client.infer("dummy", [x], client_timeout=30).as_numpy("a")
    finally:
        client.close()


class SlowRequests:
    """IN_FLIGHT concurrent requests to `slow`, each on its own client; (ok or error, time.time() of the answer)."""

    def __init__(self, address: str) -> None:
        self.results: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, args=(address,)) for _ in range(IN_FLIGHT)]
        for t in self.threads:
            t.start()

    def _one(self, address: str) -> None:
        client = grpcclient.InferenceServerClient(address)
        x = grpcclient.InferInput("x", [1, 1], "FP32")
        x.set_data_from_numpy(np.ones((1, 1), np.float32))
        try:
            client.infer("slow", [x], client_timeout=60)
            outcome = "ok"
        except Exception as exc:
            outcome = repr(exc)
        with self._lock:
            self.results.append((outcome, time.time()))
        client.close()

    def join(self) -> list[tuple[str, float]]:
        for t in self.threads:
            t.join(60)
        return self.results


@pytest.fixture
def config(tmp_path: Path) -> dict:
    modelgen.add_const(tmp_path / "dummy" / "1")
    modelgen.slow(tmp_path / "slow" / "1")
    entries = [model_entry("dummy", tmp_path / "dummy"), model_entry("slow", tmp_path / "slow", **SLOW)]
    return {"model_config_list": entries}


def start_in_flight(server: ServerProcess, rest: str) -> tuple[SlowRequests, float]:
    """IN_FLIGHT requests leased in the server (its gauge says so), then SIGTERM; returns the signal's time."""
    requests = SlowRequests(server.address)
    wait_until(lambda: inflight(rest, "slow") == IN_FLIGHT, 30, "every slow request in flight in the server")
    sent = time.time()
    server.signal(signal.SIGTERM)
    return requests, sent


def check_in_flight(requests: SlowRequests, sent: float) -> None:
    results = requests.join()
    assert [r for r, _ in results] == ["ok"] * IN_FLIGHT
    answered_after = [t for _, t in results if t > sent]
    assert answered_after, "no request was still in flight at SIGTERM: the test proved nothing"


def test_drain_window_keeps_serving_with_health_not_serving(serve, config: dict) -> None:
    rest = f"http://127.0.0.1:{free_port()}"
    server = serve(config, "--rest_port", rest.rsplit(":", 1)[1], "--drain_seconds", "120")
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)

    def status(name: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

    assert [status(""), status("dummy"), status("slow")] == [SERVING] * 3
    assert rest_ready(rest) == 200
    requests, sent = start_in_flight(server, rest)
    wait_until(lambda: status("") == NOT_SERVING, 5, 'health "" NOT_SERVING', step=0.002)
    flipped = time.time() - sent
    assert flipped < 0.1, f"health flipped {flipped * 1000:.0f} ms after SIGTERM"
    assert [status("dummy"), status("slow")] == [NOT_SERVING] * 2
    assert rest_ready(rest) == 503
    # Sent during the drain window, on new connections: served as before.
    assert infer_dummy(server.address).tolist() == [[1.0] * 10]
    assert rest_infer(rest) == [1.0] * 10
    check_in_flight(requests, sent)
    assert server.proc.poll() is None, "the server left before its drain window was over"
    assert "Drain window over" not in server.log
    server.signal(signal.SIGTERM)  # the second one: no waiting out the remaining ~2 minutes
    assert server.proc.wait(30) == 0
    assert re.search(r"SIGTERM again: ending the drain window now", server.log)
    assert "Shutdown complete" in server.log


def test_in_flight_requests_finish_when_drain_is_skipped(serve, config: dict) -> None:
    rest = f"http://127.0.0.1:{free_port()}"
    server = serve(config, "--rest_port", rest.rsplit(":", 1)[1], "--drain_seconds", "0")
    requests, sent = start_in_flight(server, rest)
    check_in_flight(requests, sent)  # they were in flight when the server stopped accepting: it finished them
    assert server.proc.wait(30) == 0
    log = server.log
    assert "Draining: still serving" not in log
    assert log.index("SIGTERM: health is NOT_SERVING") < log.index("Shutting down") < log.index("Shutdown complete")


def test_drain_window_is_waited_out(serve, config: dict) -> None:
    server = serve(config, "--drain_seconds", "1")
    server.signal(signal.SIGINT)
    assert server.proc.wait(30) == 0
    began = logged_at(server, "SIGINT: health is NOT_SERVING")
    ended = logged_at(server, "Drain window over")
    assert ended - began >= 1.0 - 0.002  # the log clock has millisecond steps
    assert server.log.index("Drain window over") < server.log.index("Shutting down")


def test_drain_seconds_must_not_be_negative(serve, config: dict) -> None:
    server = serve(config, "--drain_seconds", "-1", ready=False)
    assert server.proc.wait(30) == 64
    assert "--drain_seconds must be >= 0" in server.log


def test_grpc_server_ready_follows_health_during_the_drain(serve, config: dict) -> None:
    server = serve(config, "--drain_seconds", "120")
    client = grpcclient.InferenceServerClient(server.address)
    assert client.is_server_ready()
    server.signal(signal.SIGTERM)
    wait_until(lambda: not client.is_server_ready(), 5, "ServerReady false while draining")
    assert client.is_model_ready("dummy"), "the model itself still serves in the window"
    client.close()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0


def test_an_open_health_watch_does_not_hold_the_shutdown(serve, config: dict) -> None:
    server = serve(config, "--drain_seconds", "0")
    channel = grpc.insecure_channel(server.address)
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(stream).status == SERVING
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert [r.status for r in stream] == [NOT_SERVING], "told NOT_SERVING, then the stream ends"
    assert server.proc.wait(25) == 0, "an open Watch must not hold the 30 s grace"
    assert time.monotonic() - started < 25
    channel.close()


def test_sigterm_while_loading_starts_no_further_compile(tmp_path: Path, serve, build: Path) -> None:  # type: ignore[no-untyped-def]
    calls = tmp_path / "calls.log"
    (tmp_path / "loader.cfg").write_text(f"CALL_LOG {calls}\n")
    loaders, entries = [], []
    for name in ("t1", "t2"):  # two loaders: the two parallel loads do not wait for one handle's lock
        loaders.append({"config": {"loader_name": name, "library_path": str(build / "libtestloader.so"),
                                   "loader_config_file": str(tmp_path / "loader.cfg")}})  # fmt: skip
    for i, name in enumerate(("m1", "m2", "m3", "m4")):
        modelgen.add_const(tmp_path / name / "1")
        options = {"loader_name": f"t{i % 2 + 1}", "model_file": "model.xml", "bin_file": "model.bin",
                   "delay_ms": "1500"}  # fmt: skip
        entries.append(model_entry(name, tmp_path / name, custom_loader_options=options))
    server = serve({"custom_loader_config_list": loaders, "model_config_list": entries}, ready=False)

    # two loads (the parallel limit) are inside their loaders for 1.5 s each: SIGTERM then
    def loads() -> list[str]:
        return (
            [line for line in calls.read_text().splitlines() if line.startswith("load_model")] if calls.exists() else []
        )

    wait_until(lambda: len(loads()) == 2, 30, "two loads to start")
    server.signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert sorted(loads()) == ["load_model m1 1", "load_model m2 1"], "no further load after SIGTERM"
    assert "Shutdown complete" in server.log
