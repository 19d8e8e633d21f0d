"""TF Serving API with the real ovmsclient 2023.1, gRPC health and reflection (issue 6)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import modelgen
import numpy as np
import ovmsclient
import pytest
from conftest import model_entry
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_reload import wait_until

X = np.linspace(0, 1, 10, dtype=np.float32).reshape(1, 10)


@pytest.fixture
def env(tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1", delta=1.0)
    modelgen.add_const(tmp_path / "multi" / "1", delta=1.0)
    modelgen.add_const(tmp_path / "multi" / "2", delta=2.0)
    modelgen.onnx_add_const(tmp_path / "onnx" / "1", delta=5.0)
    modelgen.two_inputs(tmp_path / "two" / "1")
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"definitely not onnx")
    config = tmp_path / "models.json"
    entries = [
        model_entry("dummy", tmp_path / "dummy"),
        model_entry("multi", tmp_path / "multi", model_version_policy={"all": {}}),
        model_entry("onnx", tmp_path / "onnx"),
        model_entry("two", tmp_path / "two"),
        model_entry("broken", tmp_path / "broken"),
    ]
    config.write_text(json.dumps({"model_config_list": entries}))
    server = serve(config)
    return server, ovmsclient.make_grpc_client(server.address), config, tmp_path


def test_status_of_every_version(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    assert client.get_model_status("dummy") == {1: {"state": "AVAILABLE", "error_code": 0, "error_message": "OK"}}
    both = client.get_model_status("multi")
    assert list(both) == [1, 2] and all(v["state"] == "AVAILABLE" for v in both.values())
    assert client.get_model_status("multi", 1)[1]["state"] == "AVAILABLE"
    broken = client.get_model_status("broken")[1]
    assert broken["state"] == "LOADING" and broken["error_code"] == 2
    assert broken["error_message"] not in ("", "OK", "UNKNOWN")  # the real load error


def test_status_errors(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    with pytest.raises(ovmsclient.ModelNotFoundError):
        client.get_model_status("nope")
    with pytest.raises(ovmsclient.ModelNotFoundError):
        client.get_model_status("dummy", 989464)


def test_metadata_ir_and_onnx(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    meta = client.get_model_metadata("dummy")
    assert meta["model_version"] == 1
    assert meta["inputs"] == {"b": {"shape": [1, 10], "dtype": "DT_FLOAT"}}
    assert meta["outputs"] == {"a": {"shape": [1, 10], "dtype": "DT_FLOAT"}}
    assert client.get_model_metadata("onnx")["inputs"]["b"]["dtype"] == "DT_FLOAT"
    assert client.get_model_metadata("multi", 1)["model_version"] == 1


def test_predict_ir_onnx_versions_and_two_outputs(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    np.testing.assert_allclose(client.predict({"b": X}, "dummy"), X + 1)
    np.testing.assert_allclose(client.predict({"b": X}, "onnx"), X + 5)
    np.testing.assert_allclose(client.predict({"b": X}, "multi"), X + 2)
    np.testing.assert_allclose(client.predict({"b": X}, "multi", 1), X + 1)
    x = np.ones((1, 4), np.float32)
    out = client.predict({"x": x, "y": x * 3}, "two")
    np.testing.assert_allclose(out["sum"], x * 4)
    np.testing.assert_allclose(out["diff"], -x * 2)


def test_predict_errors(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    with pytest.raises(ovmsclient.InvalidInputError, match="Invalid input shape"):
        client.predict({"b": np.ones((1, 5), np.float32)}, "dummy")
    with pytest.raises(ovmsclient.ModelNotFoundError):
        client.predict({"b": X}, "nope")


def _tfs_stubs(address: str):  # type: ignore[no-untyped-def]
    from engine.frontend.generated.tensorflow_serving.apis import (
        get_model_metadata_pb2,
        model_management_pb2,
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    channel = grpc.insecure_channel(address)
    return (
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
        get_model_metadata_pb2,
        model_management_pb2,
    )


def test_metadata_request_errors_and_any_type_url(env) -> None:  # type: ignore[no-untyped-def]
    server, _, _, _ = env
    prediction, _, md, _ = _tfs_stubs(server.address)
    with pytest.raises(grpc.RpcError) as caught:
        prediction.GetModelMetadata(md.GetModelMetadataRequest(metadata_field=["signature_def"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_spec missing in request" in caught.value.details()
    request = md.GetModelMetadataRequest(metadata_field=["inputs"])
    request.model_spec.name = "dummy"
    with pytest.raises(grpc.RpcError) as caught:
        prediction.GetModelMetadata(request)
    assert "Invalid signature name" in caught.value.details()
    del request.metadata_field[:]
    request.metadata_field.append("signature_def")
    response = prediction.GetModelMetadata(request)
    assert response.metadata["signature_def"].type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"


def test_reload_rpc_applies_the_file_and_refuses_a_config(env) -> None:  # type: ignore[no-untyped-def]
    server, client, config, tmp_path = env
    _, model_service, _, mm = _tfs_stubs(server.address)
    modelgen.add_const(tmp_path / "late" / "1", delta=9.0)
    doc = json.loads(config.read_text())
    doc["model_config_list"].append(model_entry("late", tmp_path / "late"))
    tmp = config.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, config)
    response = model_service.HandleReloadConfigRequest(mm.ReloadConfigRequest())
    assert "broken" in response.status.error_message  # the result names what failed; the rest applied
    assert client.get_model_status("late")[1]["state"] == "AVAILABLE"
    request = mm.ReloadConfigRequest()
    request.config.model_config_list.config.add(name="x", base_path="/x")
    with pytest.raises(grpc.RpcError) as caught:
        model_service.HandleReloadConfigRequest(request)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_health_overall_and_per_model(env) -> None:  # type: ignore[no-untyped-def]
    server, _, config, _ = env
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    serving = health_pb2.HealthCheckResponse.SERVING

    def status(name: str) -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service=name)).status

    assert status("") == serving
    assert status("dummy") == serving
    assert status("broken") == health_pb2.HealthCheckResponse.NOT_SERVING
    doc = json.loads(config.read_text())
    doc["model_config_list"] = [e for e in doc["model_config_list"] if e["config"]["name"] != "dummy"]
    config.write_text(json.dumps(doc))
    wait_until(lambda: status("dummy") == health_pb2.HealthCheckResponse.NOT_SERVING, what="dummy NOT_SERVING")
    with pytest.raises(grpc.RpcError) as caught:
        status("never-configured")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_every_service(env) -> None:  # type: ignore[no-untyped-def]
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    server, _, _, _ = env
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(server.address))
    services = set(database.get_services())
    assert {
        "inference.GRPCInferenceService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    method = database.FindFileContainingSymbol("tensorflow.serving.PredictionService")
    assert method.name.endswith("prediction_service.proto")
