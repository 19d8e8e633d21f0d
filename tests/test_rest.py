"""REST (--rest_port): OVMS's /v1/config endpoints, KServe v2 REST, and /metrics (issue 6)."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import model_entry
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: object = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def write(path: Path, *entries: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_config_list": list(entries)}))
    os.replace(tmp, path)


@pytest.fixture
def env(tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1", delta=1.0)
    modelgen.add_const(tmp_path / "extra" / "1", delta=4.0)
    config = tmp_path / "models.json"
    write(config, model_entry("dummy", tmp_path / "dummy"))
    port = free_port()
    server = serve(config, "--rest_port", str(port), "--file_system_poll_wait_seconds", "0")
    return server, f"http://127.0.0.1:{port}", config, tmp_path


def test_v1_config_and_reload_codes(env) -> None:  # type: ignore[no-untyped-def]
    _, base, config, tmp_path = env
    status, body = http("GET", f"{base}/v1/config")
    assert status == 200
    assert body["dummy"] == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": "OK"}}
        ]
    }
    assert body["_last_reload"]["ok"] is True
    status, body = http("POST", f"{base}/v1/config/reload")
    assert status == 200  # nothing changed
    write(config, model_entry("dummy", tmp_path / "dummy"), model_entry("extra", tmp_path / "extra"))
    status, body = http("POST", f"{base}/v1/config/reload")
    assert status == 201 and body["extra"]["model_version_status"][0]["state"] == "AVAILABLE"
    config.write_text("{ not json")
    status, body = http("POST", f"{base}/v1/config/reload")
    assert status == 412 and "Reloading config file failed" in body["error"]
    status, body = http("GET", f"{base}/v1/config")
    assert body["extra"]["model_version_status"][0]["state"] == "AVAILABLE"  # nothing applied
    assert body["_last_reload"]["config_valid"] is False


def test_v2_health_metadata_ready_and_infer(env) -> None:  # type: ignore[no-untyped-def]
    _, base, _, _ = env
    assert http("GET", f"{base}/v2/health/live") == (200, {"live": True})
    assert http("GET", f"{base}/v2/health/ready") == (200, {"ready": True})
    status, meta = http("GET", f"{base}/v2/models/dummy")
    assert status == 200 and meta["inputs"] == [{"name": "b", "datatype": "FP32", "shape": [1, 10]}]
    assert http("GET", f"{base}/v2/models/dummy/versions/1")[0] == 200
    assert http("GET", f"{base}/v2/models/dummy/ready") == (200, {"name": "dummy", "ready": True})
    assert http("GET", f"{base}/v2/models/nope/ready")[0] == 404
    request = {"id": "r1", "inputs": [{"name": "b", "shape": [1, 10], "datatype": "FP32", "data": list(range(10))}]}
    status, result = http("POST", f"{base}/v2/models/dummy/infer", request)
    assert status == 200, result
    assert result["id"] == "r1" and result["model_version"] == "1"
    np.testing.assert_allclose(result["outputs"][0]["data"], np.arange(10) + 1)
    bad = {"inputs": [{"name": "b", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}
    status, err = http("POST", f"{base}/v2/models/dummy/infer", bad)
    assert status == 400 and "Invalid input shape" in err["error"]
    assert http("POST", f"{base}/v2/models/dummy/infer", {"inputs": "x"})[0] == 400


def test_metrics_after_traffic(env) -> None:  # type: ignore[no-untyped-def]
    server, base, _, _ = env
    client = grpcclient.InferenceServerClient(server.address)
    tensor = grpcclient.InferInput("b", [1, 10], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 10), np.float32))
    for _ in range(3):
        client.infer("dummy", [tensor])
    bad = grpcclient.InferInput("b", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(Exception, match="Invalid input shape"):
        client.infer("dummy", [bad])
    status, text = http("GET", f"{base}/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["model"], s.labels["version"], s.labels["api"]): s.value
        for s in families["hotserve_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("dummy", "1", "kserve")] == 3, requests
    failures = [s for s in families["hotserve_request_failures"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in failures) == 1
    state = {s.labels["model"]: s.value for s in families["hotserve_version_state"].samples}
    assert state["dummy"] == 30
    assert any(s.value > 0 for s in families["hotserve_version_load_seconds"].samples)
    assert families["hotserve_reloads"].samples[0].value >= 1
    assert "hotserve_request_duration_seconds" in families
    assert "hotserve_inflight_requests" in families
