"""REST (--rest_port): OVMS's /v1/config endpoints and KServe v2 REST (issue 6); /metrics is in test_metrics.py."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import modelgen
import numpy as np
import pytest
from conftest import model_entry
from harness import free_port


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
    modelgen.add_const(tmp_path / "dummy" / "2", delta=2.0)
    modelgen.add_const(tmp_path / "extra" / "1", delta=4.0)
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not onnx")
    config = tmp_path / "models.json"
    write(config, model_entry("dummy", tmp_path / "dummy", model_version_policy={"all": {}}))
    port = free_port()
    server = serve(config, "--rest_port", str(port), "--file_system_poll_wait_seconds", "0")
    return server, f"http://127.0.0.1:{port}", config, tmp_path


def test_v1_config_and_reload_codes(env) -> None:  # type: ignore[no-untyped-def]
    _, base, config, tmp_path = env
    ok = {"error_code": "OK", "error_message": "OK"}
    status, body = http("GET", f"{base}/v1/config")
    assert status == 200
    assert body["dummy"] == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": ok, "labels": [], "pending_labels": []},
            {"version": "2", "state": "AVAILABLE", "status": ok, "labels": [], "pending_labels": []},
        ]
    }
    assert body["_last_reload"] == {"ok": True, "changed": True, "config_valid": True, "errors": []}
    status, body = http("POST", f"{base}/v1/config/reload")
    assert status == 200 and body["_last_reload"]["changed"] is False  # nothing changed
    write(config, model_entry("dummy", tmp_path / "dummy"), model_entry("extra", tmp_path / "extra"))
    status, body = http("POST", f"{base}/v1/config/reload")
    assert status == 201
    assert body["extra"]["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": ok, "labels": [], "pending_labels": []}
    ]
    states = [v["state"] for v in body["dummy"]["model_version_status"]]
    assert states[0] in ("UNLOADING", "END") and states[1] == "AVAILABLE"  # latest policy retires version 1
    write(config, model_entry("extra", tmp_path / "extra"), model_entry("broken", tmp_path / "broken"))
    status, body = http("POST", f"{base}/v1/config/reload")
    assert status == 201  # applied; the failed load is in the statuses and in the result
    broken = body["broken"]["model_version_status"][0]
    assert broken["state"] == "LOADING" and broken["status"]["error_code"] == "UNKNOWN"
    assert body["_last_reload"]["ok"] is False and any("broken" in e for e in body["_last_reload"]["errors"])
    config.write_text("{ not json")
    status, body = http("POST", f"{base}/v1/config/reload")
    assert status == 412 and body["error"].startswith("Reloading config file failed.")
    assert str(config) in body["error"]  # the error names the file
    status, body = http("GET", f"{base}/v1/config")
    assert body["extra"]["model_version_status"][0]["state"] == "AVAILABLE"  # nothing applied
    assert body["_last_reload"]["config_valid"] is False and body["_last_reload"]["errors"]


def test_v2_server_health_and_model_metadata(env) -> None:  # type: ignore[no-untyped-def]
    _, base, _, _ = env
    status, server = http("GET", f"{base}/v2")
    assert status == 200 and server["name"] == "hotserve" and server["version"]
    assert http("GET", f"{base}/v2/health/live") == (200, {"live": True})
    assert http("GET", f"{base}/v2/health/ready") == (200, {"ready": True})
    status, meta = http("GET", f"{base}/v2/models/dummy")
    assert status == 200
    assert meta == {
        "name": "dummy",
        "versions": ["1", "2"],
        "platform": "OpenVINO",
        "inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10]}],
        "outputs": [{"name": "a", "datatype": "FP32", "shape": [1, 10]}],
    }
    assert http("GET", f"{base}/v2/models/dummy/versions/1")[1]["name"] == "dummy"
    status, err = http("GET", f"{base}/v2/models/dummy/versions/3")
    assert status == 404 and err == {"error": "Model with requested version is not found"}
    status, err = http("GET", f"{base}/v2/models/nope")
    assert status == 404 and err == {"error": "Model with requested name is not found"}
    status, err = http("GET", f"{base}/v2/models/dummy/versions/x")  # a name: a version label (none is defined)
    assert status == 404 and err == {"error": "Model with requested version label is not found - label: x"}
    status, err = http("GET", f"{base}/v2/models/dummy/versions/1.5")
    assert status == 400
    assert err == {
        "error": "invalid model version format in request - 1.5 is neither a version number nor a version label"
    }
    assert http("GET", f"{base}/v2/models/dummy/ready") == (200, {"name": "dummy", "ready": True})
    assert http("GET", f"{base}/v2/models/dummy/versions/1/ready") == (200, {"name": "dummy", "ready": True})
    assert http("GET", f"{base}/v2/models/dummy/versions/3/ready")[0] == 404
    assert http("GET", f"{base}/v2/models/nope/ready")[0] == 404


def test_v2_infer(env) -> None:  # type: ignore[no-untyped-def]
    _, base, _, _ = env
    tensor = {"name": "b", "shape": [1, 10], "datatype": "FP32", "data": list(range(10))}
    status, result = http("POST", f"{base}/v2/models/dummy/infer", {"id": "r1", "inputs": [tensor]})
    assert status == 200, result
    assert result["model_name"] == "dummy" and result["id"] == "r1" and result["model_version"] == "2"
    assert result["outputs"][0]["name"] == "a" and result["outputs"][0]["shape"] == [1, 10]
    np.testing.assert_allclose(result["outputs"][0]["data"], np.arange(10) + 2)
    nested = {**tensor, "data": [list(range(10))]}  # row-major nested lists are accepted too
    status, result = http("POST", f"{base}/v2/models/dummy/versions/1/infer", {"inputs": [nested]})
    assert status == 200 and result["model_version"] == "1" and "id" not in result
    np.testing.assert_allclose(result["outputs"][0]["data"], np.arange(10) + 1)
    status, result = http("POST", f"{base}/v2/models/dummy/infer", {"inputs": [tensor], "outputs": [{"name": "a"}]})
    assert status == 200 and [o["name"] for o in result["outputs"]] == ["a"]
    status, err = http("POST", f"{base}/v2/models/dummy/infer", {"inputs": [tensor], "outputs": [{"name": "zz"}]})
    assert status == 400 and err["error"] == "Missing output with specific name - Required output: zz"
    bad = {"inputs": [{"name": "b", "shape": [1, 5], "datatype": "FP32", "data": [0] * 5}]}
    status, err = http("POST", f"{base}/v2/models/dummy/infer", bad)
    assert status == 400
    assert err["error"] == "Invalid input shape - Expected: (1,10); Actual: (1,5); input name: b"
    status, err = http("POST", f"{base}/v2/models/dummy/infer", {"inputs": [{**tensor, "data": [0] * 9}]})
    assert status == 400 and err["error"].startswith("Invalid number of values in tensor proto container")
    status, err = http("POST", f"{base}/v2/models/dummy/infer", {"inputs": [{**tensor, "datatype": "FP8"}]})
    assert status == 400 and err["error"].startswith("Invalid input precision")
    assert http("POST", f"{base}/v2/models/nope/infer", {"inputs": [tensor]})[0] == 404
    assert http("POST", f"{base}/v2/models/dummy/infer", {"inputs": "x"})[0] == 400
    assert http("POST", f"{base}/v2/models/dummy/infer", {"no": "inputs"})[0] == 400
    request = urllib.request.Request(f"{base}/v2/models/dummy/infer", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400


def test_rest_is_off_by_default(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "m" / "1")
    server = serve({"model_config_list": [model_entry("m", tmp_path / "m")]})
    assert "Started gRPC server" in server.log and "REST" not in server.log
