"""Version labels and weighted canaries against a real server process (issue 13): TF Serving stubs, tritonclient,
REST, metrics and `hotserve status`; live edits of models.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ROOT, model_entry
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import free_port
from loader_fixtures import BUILD
from prometheus_client.parser import text_string_to_metric_families
from stats import binomial_bound, random_keys
from tritonclient.utils import InferenceServerException

from engine.config import Routing
from engine.frontend.generated.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from engine.frontend.generated.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from engine.frontend.routing_wire import MAX_ROUTE_KEY
from engine.routing import NO_ROUTES, resolve

X = np.arange(10, dtype=np.float32).reshape(1, 10)
REST_INPUTS = [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": X.ravel().tolist()}]
REQUESTS = 2000


def http(method: str, url: str, body: object = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode()


def write(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_config_list": entries}))
    os.replace(tmp, path)


class Env:
    def __init__(self, root: Path, serve: Any) -> None:
        for version in (1, 2, 3):
            modelgen.add_const(root / "m" / str(version), delta=float(version))  # version v adds v
        self.root = root
        self.config = root / "models.json"
        self.rest_port = free_port()
        self.apply(labels={"stable": 1, "canary": 2})
        self.server = serve(self.config, "--rest_port", str(self.rest_port))
        self.base = f"http://127.0.0.1:{self.rest_port}"
        self.triton = grpcclient.InferenceServerClient(self.server.address)
        channel = grpc.insecure_channel(self.server.address)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def apply(self, **routing: Any) -> None:
        extra: dict[str, Any] = {}
        if routing.get("labels") is not None:
            extra["version_labels"] = routing["labels"]
        if routing.get("traffic") is not None:
            extra["traffic"] = routing["traffic"]
        write(self.config, [model_entry("m", self.root / "m", model_version_policy={"all": {}}, **extra)])

    def edit(self, wait_for: str, **routing: Any) -> None:
        """Edit models.json and wait for the watcher to have applied it (the log line the change gives)."""
        start = len(self.server.log)
        self.apply(**routing)
        self.server.wait_for(wait_for, start=start)

    def infer(self, version: str = "", **kwargs: Any) -> int:
        x = grpcclient.InferInput("b", [1, 10], "FP32")
        x.set_data_from_numpy(X)
        result = self.triton.infer("m", [x], model_version=version, **kwargs)
        number = int(result.get_response().model_version)
        np.testing.assert_allclose(result.as_numpy("a"), X + number)  # the answer is that version's
        return number


@pytest.fixture
def env(tmp_path: Path, serve: Any) -> Env:
    return Env(tmp_path, serve)


def tensor(x: np.ndarray) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=x.tobytes())
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in x.shape)
    return proto


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_labels_over_tf_serving_kserve_and_rest(env: Env) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.version_label = "canary"
    request.inputs["b"].CopyFrom(tensor(X))
    reply = env.prediction.Predict(request)
    assert reply.model_spec.version.value == 2, "a response to a request by label carries the version number"
    out = np.frombuffer(reply.outputs["a"].tensor_content, np.float32).reshape(1, 10)
    np.testing.assert_allclose(out, X + 2)
    meta = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    meta.model_spec.name, meta.model_spec.version_label = "m", "stable"
    assert env.prediction.GetModelMetadata(meta).model_spec.version.value == 1
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name, status.model_spec.version_label = "m", "canary"
    assert [s.version for s in env.models.GetModelStatus(status).model_version_status] == [2]
    request.model_spec.version_label = "nope"
    error = rpc_error(lambda: env.prediction.Predict(request))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "Model with requested version label is not found - label: nope"
    # KServe v2: a model_version that is not a number is a label (hotserve's extension)
    assert env.infer("canary") == 2 and env.infer("stable") == 1 and env.infer("3") == 3 and env.infer() == 3
    assert env.triton.is_model_ready("m", "canary")
    assert env.triton.get_model_metadata("m", "canary").name == "m"
    stats = env.triton.get_inference_statistics("m", "canary").model_stats
    assert [s.version for s in stats] == ["2"]
    with pytest.raises(InferenceServerException) as nameless:  # a label belongs to one model
        env.triton.get_inference_statistics("", "canary")
    assert nameless.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "version label canary needs a model name" in nameless.value.message()
    with pytest.raises(InferenceServerException) as caught:
        env.infer("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND" and "version label is not found" in caught.value.message()
    with pytest.raises(InferenceServerException) as bad:
        env.infer("1.5")
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "invalid model version format in request - 1.5 is neither" in bad.value.message()
    # REST
    body = {"inputs": REST_INPUTS}
    code, reply_json = http("POST", f"{env.base}/v2/models/m/versions/canary/infer", body)
    assert code == 200 and reply_json["model_version"] == "2"
    assert http("GET", f"{env.base}/v2/models/m/versions/stable/ready")[0] == 200
    code, missing = http("GET", f"{env.base}/v2/models/m/versions/nope")
    assert code == 404 and missing["error"] == "Model with requested version label is not found - label: nope"
    code, config = http("GET", f"{env.base}/v1/config")
    entries = {e["version"]: (e["labels"], e["pending_labels"]) for e in config["m"]["model_version_status"]}
    assert entries == {"1": (["stable"], []), "2": (["canary"], []), "3": ([], [])}

    # health of "m" says what a request naming no version gets: with no weighted version AVAILABLE, NOT_SERVING
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(env.server.address))

    def model_health() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service="m")).status

    assert model_health() == health_pb2.HealthCheckResponse.SERVING
    env.edit(r"Traffic of model m: no version it weighs is AVAILABLE \(9\)", labels={"stable": 1, "next": 9},
             traffic={"9": 1})  # fmt: skip
    code, config = http("GET", f"{env.base}/v1/config")  # a label on a version with no entry is shown, not lost
    assert code == 200 and config["m"]["labels_waiting"] == {"next": "9"}
    with pytest.raises(InferenceServerException) as none:
        env.infer()
    assert none.value.status() == "StatusCode.NOT_FOUND"
    wait_until(lambda: model_health() == health_pb2.HealthCheckResponse.NOT_SERVING, "health to follow the traffic")
    env.edit(r"Traffic of model m: version 1 100 %", labels={"stable": 1}, traffic={"stable": 1, "9": 1})
    wait_until(lambda: model_health() == health_pb2.HealthCheckResponse.SERVING, "health to follow the traffic")


def test_weights_are_followed_sticky_with_a_route_key_and_edited_live(env: Env) -> None:
    env.edit(r"Traffic of model m: version 1 80 %, version 2 20 %", labels={"stable": 1, "canary": 2},
             traffic={"stable": 80, "canary": 20})  # fmt: skip
    loads = env.server.log.count("Loading model: m")
    meta = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    meta.model_spec.name = "m"
    assert {env.prediction.GetModelMetadata(meta).model_spec.version.value for _ in range(20)} == {1}, (
        "metadata without a version: the most weighted version, not a draw"
    )
    drawn = Counter(env.infer() for _ in range(REQUESTS))
    assert set(drawn) <= {1, 2}, f"version 3 is AVAILABLE but has no weight: {drawn}"
    bound = binomial_bound(REQUESTS, 0.2)  # P(a correct server fails this) < 1e-6
    assert abs(drawn[2] - 0.2 * REQUESTS) <= bound, (drawn, bound)
    # a routing key lands on the version the pure function computes, on every API and every time
    expected = resolve("m", Routing({}, ((1, 80), (2, 20))), {1, 2, 3}, NO_ROUTES)[0]
    keys = random_keys(100)
    for key in keys:
        by_metadata = env.infer(headers={"hotserve-route-key": key})
        by_parameter = env.infer(parameters={"route_key": key})
        body = {"parameters": {"route_key": key}, "inputs": REST_INPUTS}
        by_rest = int(http("POST", f"{env.base}/v2/models/m/infer", body)[1]["model_version"])
        assert by_metadata == by_parameter == by_rest == expected.route(key), key
    assert len({expected.route(k) for k in keys}) == 2
    with pytest.raises(InferenceServerException) as refused:
        env.infer(parameters={"route_key": True})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "route_key must be a string" in str(refused.value)
    bad = {"parameters": {"route_key": [1]}, "inputs": REST_INPUTS}
    code, error = http("POST", f"{env.base}/v2/models/m/infer", bad)
    assert code == 400 and "parameters.route_key must be a string or an integer" in error["error"]
    with pytest.raises(InferenceServerException) as named:  # checked the same on every protocol, version or not
        env.infer("3", parameters={"route_key": True})
    assert named.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert http("POST", f"{env.base}/v2/models/m/versions/3/infer", bad)[0] == 400
    # a key is hashed on the event loop: a client cannot make it cost more than MAX_ROUTE_KEY characters
    longest = "k" * MAX_ROUTE_KEY
    assert env.infer(parameters={"route_key": longest}) == env.infer(headers={"hotserve-route-key": longest})
    for where in ("parameters", "headers"):
        key = {"route_key" if where == "parameters" else "hotserve-route-key": longest + "k"}
        with pytest.raises(InferenceServerException) as huge:
            env.infer(**{where: key})
        assert huge.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert f"route key is {MAX_ROUTE_KEY + 1} characters; at most {MAX_ROUTE_KEY}" in huge.value.message()
    code, error = http("POST", f"{env.base}/v2/models/m/infer", {"parameters": {"route_key": longest + "k"},
                                                                 "inputs": REST_INPUTS})  # fmt: skip
    assert code == 400 and f"at most {MAX_ROUTE_KEY}" in error["error"]
    # promote: the canary gets everything, then the stable label moves; nothing is reloaded
    env.edit(r"Traffic of model m: version 2 100 %", labels={"stable": 1, "canary": 2}, traffic={"canary": 100})
    assert {env.infer() for _ in range(50)} == {2}
    assert {env.infer(headers={"hotserve-route-key": k}) for k in keys} == {2}
    env.edit(r"Version label stable of model m now points at version 2 \(was 1\)", labels={"stable": 2})
    assert env.infer("stable") == 2 and env.infer() == 3, "no traffic: the default version again"
    assert env.server.log.count("Loading model: m") == loads, "label and weight edits reload nothing"


def test_metrics_carry_the_version_label_and_status_shows_labels(env: Env) -> None:
    env.infer("canary")
    env.infer("canary")
    env.infer("3")
    with urllib.request.urlopen(f"{env.base}/metrics", timeout=30) as response:
        families = {f.name: f.samples for f in text_string_to_metric_families(response.read().decode())}
    counts = {(s.labels["version"], s.labels["version_label"]): s.value
              for s in families["hotserve_requests"] if s.name == "hotserve_requests_total"}  # fmt: skip
    assert counts == {("2", "canary"): 2.0, ("3", ""): 1.0}
    env.edit(r"Version label canary of model m now points at version 3 \(was 2\)", labels={"stable": 1, "canary": 3})
    env.infer("canary")
    with urllib.request.urlopen(f"{env.base}/metrics", timeout=30) as response:
        families = {f.name: f.samples for f in text_string_to_metric_families(response.read().decode())}
    counts = {(s.labels["version"], s.labels["version_label"]): s.value
              for s in families["hotserve_requests"] if s.name == "hotserve_requests_total"}  # fmt: skip
    assert counts == {("2", "canary"): 2.0, ("3", ""): 1.0, ("3", "canary"): 1.0}, "a moved label: a new series"
    result = subprocess.run([sys.executable, "-m", "engine", "status", "--address", env.server.address], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "CACHE", "LABELS", "ERROR"]
    rows = {line.split()[1]: line for line in lines[1:]}
    assert "stable" in rows["1"] and "canary" in rows["3"] and "canary" not in rows["2"]


def wait_until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_label_moved_to_a_loading_version_waits_then_switches_under_load(tmp_path: Path, serve: Any) -> None:
    """Version 4's load is held inside the test loader (its hold_file) while clients call by label: every answer
    comes from version 3 until 4 is AVAILABLE, then from 4, and none fails."""
    modelgen.add_const(tmp_path / "c" / "3", delta=3.0)
    hold, calls = tmp_path / "hold", tmp_path / "calls.log"
    (tmp_path / "loader.cfg").write_text(f"CALL_LOG {calls}\n")
    options = {"loader_name": "test", "model_file": "model.xml", "bin_file": "model.bin", "hold_file": str(hold)}
    config = tmp_path / "models.json"

    def apply(versions: list[int], stable: int) -> None:
        doc = {
            "custom_loader_config_list": [{"config": {"loader_name": "test",
                                                      "library_path": str(BUILD / "libtestloader.so"),
                                                      "loader_config_file": str(tmp_path / "loader.cfg")}}],
            "model_config_list": [model_entry("c", tmp_path / "c", custom_loader_options=options,
                                              model_version_policy={"specific": {"versions": versions}},
                                              version_labels={"stable": stable})],
        }  # fmt: skip
        tmp = config.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, config)

    apply([3], 3)
    server = serve(config)
    modelgen.add_const(tmp_path / "c" / "4", delta=4.0)
    hold.touch()
    apply([3, 4], 4)
    wait_until(lambda: calls.exists() and "load_model c 4" in calls.read_text(), "version 4's load to be held")
    triton = grpcclient.InferenceServerClient(server.address)
    reasons = {m.version: m.reason for m in triton.get_model_repository_index().models}
    assert reasons["4"].endswith("; labels: stable (pending)") and reasons["3"].endswith("; labels: stable")
    seen: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(i: int) -> None:
        own = grpcclient.InferenceServerClient(server.address)
        x = grpcclient.InferInput("b", [1, 10], "FP32")
        x.set_data_from_numpy(X)
        try:
            while not stop.is_set():
                result = own.infer("c", [x], model_version="stable")
                number = int(result.get_response().model_version)
                np.testing.assert_allclose(result.as_numpy("a"), X + number)
                seen[i].append(number)
        except BaseException as exc:  # any failed request fails the test
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(len(s) >= 30 for s in seen) or errors, "30 requests per client while 4 is held")
        assert not errors and all(set(s) == {3} for s in seen), "the label stays on version 3 while 4 loads"
        start = len(server.log)
        hold.unlink()
        server.wait_for(r"Version label stable of model c now points at version 4 \(was 3\)", start=start)
        marks = [len(s) for s in seen]
        wait_until(lambda: all(len(s) >= m + 20 for s, m in zip(seen, marks, strict=True)) or errors, "20 more")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[0]
    for s in seen:
        assert 4 in s and set(s[: s.index(4)]) == {3} and set(s[s.index(4) :]) == {4}, "switched once"
    assert server.log.count("Loading model: c, version: 3") == 1, "version 3 was never reloaded"
