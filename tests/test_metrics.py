"""GET /metrics after traffic on every front end, parsed with prometheus-client's own parser (issue 6)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import modelgen
import numpy as np
import ovmsclient
import pytest
import tritonclient.grpc as grpcclient
from conftest import model_entry
from harness import free_port
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

X = np.zeros((1, 10), np.float32)


def post(url: str, body: object | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def scrape(base: str) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def by_labels(samples: list[Sample], suffix: str = "", *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels[k] for k in keys): s.value for s in samples if s.name.endswith(suffix)}


@pytest.fixture
def env(tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1", delta=1.0)
    modelgen.add_const(tmp_path / "dummy" / "2", delta=2.0)
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not onnx")
    config = tmp_path / "models.json"
    entries = [
        model_entry("dummy", tmp_path / "dummy", model_version_policy={"all": {}}),
        model_entry("broken", tmp_path / "broken"),
    ]
    config.write_text(json.dumps({"model_config_list": entries}))
    args = ("--file_system_poll_wait_seconds", "0", "--cache_dir", str(tmp_path / "cache"))
    port = free_port()
    server = serve(config, "--rest_port", str(port), *args)
    return server, f"http://127.0.0.1:{port}", config, args


def test_requests_failures_and_latency_per_model_version_and_api(env) -> None:  # type: ignore[no-untyped-def]
    server, base, _, _ = env
    triton = grpcclient.InferenceServerClient(server.address)
    tensor = grpcclient.InferInput("b", [1, 10], "FP32")
    tensor.set_data_from_numpy(X)
    for _ in range(3):
        triton.infer("dummy", [tensor])
    triton.infer("dummy", [tensor], model_version="1")
    bad = grpcclient.InferInput("b", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(Exception, match="Invalid input shape"):
        triton.infer("dummy", [bad], model_version="1")
    tfs = ovmsclient.make_grpc_client(server.address)
    tfs.predict({"b": X}, "dummy")
    tfs.predict({"b": X}, "dummy", 1)
    with pytest.raises(ovmsclient.ModelNotFoundError):
        tfs.predict({"b": X}, "dummy", 7)
    with pytest.raises(ovmsclient.ModelNotFoundError):
        tfs.predict({"b": X}, "made-up-name")
    body = {"inputs": [{"name": "b", "shape": [1, 10], "datatype": "FP32", "data": [0] * 10}]}
    assert post(f"{base}/v2/models/dummy/infer", body) == 200
    short = {"name": "b", "shape": [1, 9], "datatype": "FP32", "data": [0] * 9}
    assert post(f"{base}/v2/models/dummy/versions/2/infer", {"inputs": [short]}) == 400

    families = scrape(base)
    requests = by_labels(families["hotserve_requests"], "_total", "model", "version", "api")
    assert requests.pop(("", "", "tfs")) == 1  # an unknown model name: one bounded series
    assert requests == {
        ("dummy", "2", "kserve"): 3,  # no version asked: counted under the default version that answered
        ("dummy", "1", "kserve"): 2,
        ("dummy", "2", "tfs"): 1,
        ("dummy", "1", "tfs"): 1,
        ("dummy", "", "tfs"): 1,  # a version the model does not have: not a series of its own
        ("dummy", "2", "rest"): 2,
    }
    failures = by_labels(families["hotserve_request_failures"], "_total", "model", "version", "api")
    assert failures == {
        ("dummy", "1", "kserve"): 1,
        ("dummy", "", "tfs"): 1,
        ("", "", "tfs"): 1,
        ("dummy", "2", "rest"): 1,
    }
    counts = by_labels(families["hotserve_request_duration_seconds"], "_count", "model", "api")
    assert counts == {("dummy", "kserve"): 5, ("dummy", "tfs"): 3, ("dummy", "rest"): 2, ("", "tfs"): 1}
    buckets = [s for s in families["hotserve_request_duration_seconds"] if s.name.endswith("_bucket")]
    assert any(s.labels["le"] == "+Inf" and s.value == 5 for s in buckets if s.labels["api"] == "kserve")
    inflight = by_labels(families["hotserve_inflight_requests"], "", "model", "version")
    assert inflight == {("dummy", "1"): 0, ("dummy", "2"): 0, ("broken", "1"): 0}


def test_version_states_loads_cache_and_reloads(env, serve) -> None:  # type: ignore[no-untyped-def]
    server, base, config, args = env
    families = scrape(base)
    states = by_labels(families["hotserve_version_state"], "", "model", "version")
    assert states == {("dummy", "1"): 30, ("dummy", "2"): 30, ("broken", "1"): 20}
    loads = by_labels(families["hotserve_version_load_seconds"], "", "model", "version")
    assert loads[("dummy", "1")] > 0 and loads[("broken", "1")] == 0
    cached = {
        (s.labels["model"], s.labels["version"]): (s.labels["cache"], s.value)
        for s in families["hotserve_version_loaded_from_cache"]
    }
    assert cached[("dummy", "1")] == ("enabled", 0.0)  # first start: compiled afresh
    assert by_labels(families["hotserve_cache_misses"])[()] == 2
    assert by_labels(families["hotserve_cache_hits"])[()] == 0
    assert by_labels(families["hotserve_cache_bytes"])[()] > 0
    assert by_labels(families["hotserve_cache_blobs"])[()] == 2
    runs = by_labels(families["hotserve_reloads"], "_total")[()]
    failed = by_labels(families["hotserve_reload_failures"], "_total")[()]
    assert runs >= 1 and failed >= 1  # the broken model makes the initial load fail

    config_text = config.read_text()
    config.write_text("{ not json")
    assert post(f"{base}/v1/config/reload") == 412
    families = scrape(base)
    assert by_labels(families["hotserve_reloads"], "_total")[()] == runs + 1
    assert by_labels(families["hotserve_reload_failures"], "_total")[()] == failed + 1

    config.write_text(config_text)
    server.stop()
    port = free_port()
    again = serve(config, "--rest_port", str(port), *args)
    assert again.port
    families = scrape(f"http://127.0.0.1:{port}")
    assert by_labels(families["hotserve_cache_hits"])[()] == 2  # the second start imports both compiles
    assert by_labels(families["hotserve_version_loaded_from_cache"], "", "model", "version")[("dummy", "2")] == 1
