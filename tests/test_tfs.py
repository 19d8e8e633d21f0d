"""TF Serving API: the real ovmsclient 2023.1 against IR and ONNX models, OVMS's error cases (research ovms.md §7.3,
§7.4, §11 item 50), the TFS tensor codec, and HandleReloadConfigRequest (issue 6)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import modelgen
import numpy as np
import ovmsclient
import pytest
from conftest import model_entry

from engine.errors import Code, ServingError
from engine.frontend import tfs
from engine.frontend.dataplane import Tensor
from engine.frontend.generated.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from engine.frontend.generated.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

X = np.linspace(0, 1, 10, dtype=np.float32).reshape(1, 10)


def wait_until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write(config: Path, entries: list[dict]) -> None:
    tmp = config.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_config_list": entries}))
    os.replace(tmp, config)


@pytest.fixture
def env(tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1", delta=1.0)
    modelgen.add_const(tmp_path / "multi" / "1", delta=1.0)
    modelgen.add_const(tmp_path / "multi" / "2", delta=2.0)
    modelgen.onnx_add_const(tmp_path / "onnx" / "1", delta=5.0)
    modelgen.two_inputs(tmp_path / "two" / "1")
    modelgen.add_const(tmp_path / "half" / "1", delta=0.5, dtype=np.float16)
    modelgen.add_const(tmp_path / "int" / "1", delta=3, dtype=np.int32, shape=(2, 3))
    modelgen.add_const(tmp_path / "dyn" / "1", delta=1.0, shape=(-1, 10))
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"definitely not onnx")
    config = tmp_path / "models.json"
    entries = [
        model_entry("dummy", tmp_path / "dummy"),
        model_entry("multi", tmp_path / "multi", model_version_policy={"all": {}}),
        model_entry("onnx", tmp_path / "onnx"),
        model_entry("two", tmp_path / "two"),
        model_entry("half", tmp_path / "half"),
        model_entry("int", tmp_path / "int"),
        model_entry("dyn", tmp_path / "dyn"),
        model_entry("broken", tmp_path / "broken"),
    ]
    write(config, entries)
    server = serve(config, "--file_system_poll_wait_seconds", "0")  # only the reload RPC applies edits
    return server, ovmsclient.make_grpc_client(server.address), config, tmp_path


class Stubs:
    def __init__(self, address: str) -> None:
        channel = grpc.insecure_channel(address)
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    def status(self, name: str, version: int | None = None) -> get_model_status_pb2.GetModelStatusResponse:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return self.models.GetModelStatus(request)

    def predict(self, name: str, **inputs: tensor_pb2.TensorProto) -> predict_pb2.PredictResponse:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        for key, proto in inputs.items():
            request.inputs[key].CopyFrom(proto)
        return self.prediction.Predict(request)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def typed(dtype: int, shape: tuple[int, ...], field: str, values: list) -> tensor_pb2.TensorProto:  # type: ignore[type-arg]
    proto = tensor_pb2.TensorProto(dtype=dtype)
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape)
    getattr(proto, field).extend(values)
    return proto


# ---- ovmsclient ----


def test_status_of_every_version(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    assert client.get_model_status("dummy") == {1: {"state": "AVAILABLE", "error_code": 0, "error_message": "OK"}}
    both = client.get_model_status("multi")
    assert list(both) == [1, 2] and all(v["state"] == "AVAILABLE" for v in both.values())
    assert list(client.get_model_status("multi", 1)) == [1]
    broken = client.get_model_status("broken")[1]
    assert broken["state"] == "LOADING" and broken["error_code"] == 2
    assert broken["error_message"] not in ("", "OK", "UNKNOWN")  # the real load error
    assert "model.onnx" in broken["error_message"] or "onnx" in broken["error_message"].lower()


def test_status_errors(env) -> None:  # type: ignore[no-untyped-def]
    server, client, _, _ = env
    with pytest.raises(ovmsclient.ModelNotFoundError, match="Model with requested name is not found"):
        client.get_model_status("nope")
    with pytest.raises(ovmsclient.ModelNotFoundError, match="Model with requested version is not found"):
        client.get_model_status("dummy", 989464)
    stubs = Stubs(server.address)
    error = rpc_error(lambda: stubs.status("dummy", -1))  # ovmsclient refuses -1 itself; OVMS answers NOT_FOUND
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "Model with requested version is not found"
    error = rpc_error(lambda: stubs.models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest()))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_metadata_ir_onnx_and_dynamic_dims(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    meta = client.get_model_metadata("dummy")
    assert meta == {
        "model_version": 1,
        "inputs": {"b": {"shape": [1, 10], "dtype": "DT_FLOAT"}},
        "outputs": {"a": {"shape": [1, 10], "dtype": "DT_FLOAT"}},
    }
    assert client.get_model_metadata("onnx")["inputs"]["b"] == {"shape": [1, 10], "dtype": "DT_FLOAT"}
    assert client.get_model_metadata("multi")["model_version"] == 2
    assert client.get_model_metadata("multi", 1)["model_version"] == 1
    assert client.get_model_metadata("dyn")["inputs"]["b"]["shape"] == [-1, 10]
    assert client.get_model_metadata("half")["inputs"]["b"]["dtype"] == "DT_HALF"
    assert client.get_model_metadata("int")["outputs"]["a"] == {"shape": [2, 3], "dtype": "DT_INT32"}
    with pytest.raises(ovmsclient.ModelNotFoundError):
        client.get_model_metadata("nope")
    with pytest.raises(ovmsclient.ModelNotFoundError):
        client.get_model_metadata("dummy", 7)


def test_predict_ir_onnx_versions_dtypes_and_two_outputs(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    np.testing.assert_allclose(client.predict({"b": X}, "dummy"), X + 1)
    np.testing.assert_allclose(client.predict({"b": X}, "onnx"), X + 5)
    np.testing.assert_allclose(client.predict({"b": X}, "multi"), X + 2)
    np.testing.assert_allclose(client.predict({"b": X}, "multi", 1), X + 1)
    np.testing.assert_allclose(client.predict({"b": np.ones((3, 10), np.float32)}, "dyn"), np.full((3, 10), 2.0))
    half = client.predict({"b": X.astype(np.float16)}, "half")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, X.astype(np.float16) + np.float16(0.5), rtol=1e-3)
    ints = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = client.predict({"b": ints}, "int")
    assert out.dtype == np.int32 and out.tolist() == (ints + 3).tolist()
    x = np.ones((1, 4), np.float32)
    both = client.predict({"x": x, "y": x * 3}, "two")
    np.testing.assert_allclose(both["sum"], x * 4)
    np.testing.assert_allclose(both["diff"], -x * 2)


def test_predict_errors(env) -> None:  # type: ignore[no-untyped-def]
    _, client, _, _ = env
    with pytest.raises(
        ovmsclient.InvalidInputError, match=r"Invalid input shape - Expected: \(1,10\); Actual: \(1,5\)"
    ):
        client.predict({"b": np.ones((1, 5), np.float32)}, "dummy")
    with pytest.raises(ovmsclient.InvalidInputError, match="Invalid input precision - Expected: FP32; Actual: INT32"):
        client.predict({"b": np.ones((1, 10), np.int32)}, "dummy")
    with pytest.raises(ovmsclient.InvalidInputError, match="Missing input with specific name - Required input: b"):
        client.predict({"c": X}, "dummy")
    with pytest.raises(ovmsclient.InvalidInputError, match="Invalid number of inputs - Expected: 2; Actual: 1"):
        client.predict({"x": np.ones((1, 4), np.float32)}, "two")
    with pytest.raises(ovmsclient.InvalidInputError, match="Invalid input batch size - Expected: 1; Actual: 2"):
        client.predict({"b": np.ones((2, 10), np.float32)}, "dummy")
    with pytest.raises(ovmsclient.ModelNotFoundError, match="Model with requested name is not found"):
        client.predict({"b": X}, "nope")
    with pytest.raises(ovmsclient.ModelNotFoundError, match="Model with requested version is not found"):
        client.predict({"b": X}, "multi", 3)


# ---- the wire, below what ovmsclient sends ----


def test_predict_typed_fields_and_output_filter(env) -> None:  # type: ignore[no-untyped-def]
    server, _, _, _ = env
    stubs = Stubs(server.address)
    response = stubs.predict("dummy", b=typed(types_pb2.DT_FLOAT, (1, 10), "float_val", X.ravel().tolist()))
    assert response.model_spec.name == "dummy" and response.model_spec.version.value == 1
    out = response.outputs["a"]
    assert out.dtype == types_pb2.DT_FLOAT and [d.size for d in out.tensor_shape.dim] == [1, 10]
    np.testing.assert_allclose(np.frombuffer(out.tensor_content, np.float32), X.ravel() + 1)
    halves = np.arange(10, dtype=np.float16)
    response = stubs.predict("half", b=typed(types_pb2.DT_HALF, (1, 10), "half_val", halves.view(np.uint16).tolist()))
    np.testing.assert_allclose(np.frombuffer(response.outputs["a"].tensor_content, np.float16), halves + 0.5)
    response = stubs.predict("int", b=typed(types_pb2.DT_INT32, (2, 3), "int_val", [1, 2, 3, 4, 5, 6]))
    assert np.frombuffer(response.outputs["a"].tensor_content, np.int32).tolist() == [4, 5, 6, 7, 8, 9]
    request = predict_pb2.PredictRequest(output_filter=["diff"])
    request.model_spec.name = "two"
    request.inputs["x"].CopyFrom(typed(types_pb2.DT_FLOAT, (1, 4), "float_val", [5.0] * 4))
    request.inputs["y"].CopyFrom(typed(types_pb2.DT_FLOAT, (1, 4), "float_val", [1.0] * 4))
    assert list(stubs.prediction.Predict(request).outputs) == ["diff"]
    error = rpc_error(lambda: stubs.predict("dummy", b=typed(types_pb2.DT_FLOAT, (1, 10), "float_val", [1.0] * 9)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        error.details() == "Invalid number of values in tensor proto container - Expected: 10; Actual: 9; input name: b"
    )
    error = rpc_error(lambda: stubs.prediction.Predict(predict_pb2.PredictRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == "model_spec missing in request"


def test_failed_version_answers_unavailable_with_its_error(env) -> None:  # type: ignore[no-untyped-def]
    server, _, _, _ = env
    stubs = Stubs(server.address)
    error = rpc_error(lambda: stubs.predict("broken", b=_content(X)))
    assert error.code() == grpc.StatusCode.NOT_FOUND  # no version ever became AVAILABLE: no default version
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "broken"
    request.model_spec.version.value = 1
    request.inputs["b"].CopyFrom(_content(X))
    error = rpc_error(lambda: stubs.prediction.Predict(request))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("Model with requested version is not loaded yet - ")
    assert error.details() != "Model with requested version is not loaded yet - "  # carries the real load error
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "broken"
    metadata.model_spec.version.value = 1
    assert rpc_error(lambda: stubs.prediction.GetModelMetadata(metadata)).code() == grpc.StatusCode.UNAVAILABLE


def test_metadata_request_errors_and_any_type_url(env) -> None:  # type: ignore[no-untyped-def]
    server, _, _, _ = env
    stubs = Stubs(server.address)
    error = rpc_error(
        lambda: stubs.prediction.GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "model_spec missing in request"
    for fields in ([], ["inputs"], ["signature_def", "signature_def"]):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
        request.model_spec.name = "dummy"
        error = rpc_error(lambda request=request: stubs.prediction.GetModelMetadata(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == "Invalid signature name"
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "dummy"
    response = stubs.prediction.GetModelMetadata(request)
    assert response.metadata["signature_def"].type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert list(signatures.signature_def) == ["serving_default"]
    assert signatures.signature_def["serving_default"].inputs["b"].name == "b"


def test_reload_rpc_applies_the_file_reports_errors_and_refuses_a_config(env) -> None:  # type: ignore[no-untyped-def]
    server, client, config, tmp_path = env
    stubs = Stubs(server.address)
    modelgen.add_const(tmp_path / "late" / "1", delta=9.0)
    entries = json.loads(config.read_text())["model_config_list"]
    entries = [e for e in entries if e["config"]["name"] != "multi"]
    entries.append(model_entry("multi", tmp_path / "multi", model_version_policy={"specific": {"versions": [1]}}))
    write(config, [*entries, model_entry("late", tmp_path / "late")])
    response = stubs.models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest())
    assert response.status.error_code == 2 and "broken" in response.status.error_message  # the rest applied
    assert client.get_model_status("late")[1]["state"] == "AVAILABLE"
    wait_until(lambda: client.get_model_status("multi")[2]["state"] == "END", what="multi v2 END")
    assert client.get_model_status("multi")[1]["state"] == "AVAILABLE"  # every version, in any state
    assert [s.state for s in stubs.status("multi").model_version_status] == [30, 50]
    config.write_text("{ not json")
    response = stubs.models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest())
    assert response.status.error_code == 9 and response.status.error_message
    assert client.get_model_status("late")[1]["state"] == "AVAILABLE"  # nothing applied
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.config.add(name="x", base_path="/x")
    error = rpc_error(lambda: stubs.models.HandleReloadConfigRequest(request))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "models.json is the source of truth" in error.details()


# ---- the codec, in process ----


def _content(array: np.ndarray) -> tensor_pb2.TensorProto:
    return tfs.encode(Tensor("t", "FP32", array.shape, array))


@pytest.mark.parametrize(
    ("dtype", "field", "values", "expected"),
    [
        (types_pb2.DT_FLOAT, "float_val", [1.5, -2.0], np.array([1.5, -2.0], np.float32)),
        (types_pb2.DT_DOUBLE, "double_val", [1.5, -2.0], np.array([1.5, -2.0], np.float64)),
        (types_pb2.DT_INT8, "int_val", [-3, 4], np.array([-3, 4], np.int8)),
        (types_pb2.DT_UINT16, "int_val", [3, 65535], np.array([3, 65535], np.uint16)),
        (types_pb2.DT_INT64, "int64_val", [-(2**40), 7], np.array([-(2**40), 7], np.int64)),
        (types_pb2.DT_UINT32, "uint32_val", [2**32 - 1, 0], np.array([2**32 - 1, 0], np.uint32)),
        (types_pb2.DT_UINT64, "uint64_val", [2**64 - 1, 0], np.array([2**64 - 1, 0], np.uint64)),
        (types_pb2.DT_BOOL, "bool_val", [True, False], np.array([True, False])),
        (types_pb2.DT_HALF, "half_val", np.array([0.5, -1], np.float16).view(np.uint16).tolist(),
         np.array([0.5, -1], np.float16)),
        (types_pb2.DT_STRING, "string_val", [b"ab", b"\x00c"], np.array([b"ab", b"\x00c"], dtype=object)),
    ],
)  # fmt: skip
def test_decode_typed_fields(dtype: int, field: str, values: list, expected: np.ndarray) -> None:  # type: ignore[type-arg]
    tensor = tfs.decode("in", typed(dtype, (2, 1), field, values).SerializeToString())
    assert tensor.shape == (2, 1) and tensor.data.shape == (2, 1)
    assert tensor.data.dtype == expected.dtype
    assert tensor.data.ravel().tolist() == expected.tolist()


def test_decode_content_zero_copy_and_encode_round_trip() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    proto = _content(array)
    assert proto.dtype == types_pb2.DT_FLOAT and not proto.float_val
    tensor = tfs.decode("t", proto.SerializeToString())
    assert tensor.datatype == "FP32" and not tensor.data.flags.owndata  # a view over the message's bytes
    np.testing.assert_array_equal(tensor.data, array)
    half = tfs.encode(Tensor("h", "FP16", (2,), np.array([1.5, 2], np.float16)))
    assert half.dtype == types_pb2.DT_HALF and np.frombuffer(half.tensor_content, np.float16).tolist() == [1.5, 2]
    text = tfs.encode(Tensor("s", "BYTES", (2,), np.array([b"x", b"yz"], dtype=object)))
    assert text.dtype == types_pb2.DT_STRING and list(text.string_val) == [b"x", b"yz"] and not text.tensor_content


@pytest.mark.parametrize(
    ("proto", "code", "detail"),
    [
        (typed(types_pb2.DT_FLOAT, (2, 2), "float_val", [1.0]), Code.INVALID_VALUE_COUNT, "Expected: 4; Actual: 1"),
        (typed(types_pb2.DT_FLOAT, (2, 2), "int_val", [1, 2, 3, 4]), Code.INVALID_VALUE_COUNT, "Actual: 0"),
        (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\0" * 5), Code.INVALID_CONTENT_SIZE,
         "Expected: 4 bytes; Actual: 5 bytes"),
        (typed(types_pb2.DT_COMPLEX64, (1,), "scomplex_val", [1.0, 2.0]), Code.INVALID_PRECISION, "DT_COMPLEX64"),
        (typed(types_pb2.DT_BFLOAT16, (1,), "half_val", [1]), Code.INVALID_PRECISION, "DT_BFLOAT16"),
        (typed(types_pb2.DT_FLOAT, (-1, 2), "float_val", [1.0, 2.0]), Code.INVALID_SHAPE, "(-1,2)"),
        (tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_content=b"abcd"), Code.INVALID_CONTENT_SIZE,
         "string_val"),
    ],
)  # fmt: skip
def test_decode_errors_name_the_input(proto: tensor_pb2.TensorProto, code: Code, detail: str) -> None:
    with pytest.raises(ServingError) as caught:
        tfs.decode("in0", proto.SerializeToString())
    assert caught.value.code is code
    assert detail in str(caught.value)
    assert "input name: in0" in str(caught.value)
