"""TF Serving messages against ovmsclient 2023.1's own copies (renamed packages, so they share this process).

The KServe half, and the drift test, are in test_protos.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import Message
from test_protos import (
    OVMS_PROTOS,
    PACKAGE,
    _b64,
    _decode,
    _encode,
    _generated_modules,
    _layout,
    _layout_drift,
    _stub_paths,
)

# ---- TF Serving against ovmsclient 2023.1 (renamed packages, so in-process) ----------------------------------------


def _tfs_pair(module: str) -> tuple[ModuleType, ModuleType]:
    """(ours, ovmsclient's) for a module path under the generated package, like 'tensorflow_serving.apis.model_pb2'."""
    return importlib.import_module(f"{PACKAGE}.{module}"), importlib.import_module(f"{OVMS_PROTOS}.{module}")


def _tfs_modules(suffix: str = "_pb2") -> list[str]:
    names = [name.removeprefix(f"{PACKAGE}.") for name in _generated_modules(suffix)]
    return [name for name in names if name.startswith("tensorflow")]


def test_tfs_layout_matches_ovmsclient() -> None:
    pairs = [_tfs_pair(name) for name in _tfs_modules()]
    ours = _layout(o.DESCRIPTOR for o, _ in pairs)
    theirs = _layout(t.DESCRIPTOR for _, t in pairs)
    needed = {
        "tensorflow.TensorProto", "tensorflow.TensorShapeProto", "tensorflow.DataType", "tensorflow.SignatureDef",
        "tensorflow.TensorInfo", "tensorflow.error.Code", "tensorflow.serving.ModelSpec",
        "tensorflow.serving.PredictRequest", "tensorflow.serving.PredictResponse", "tensorflow.serving.SignatureDefMap",
        "tensorflow.serving.GetModelMetadataResponse", "tensorflow.serving.GetModelStatusResponse",
        "tensorflow.serving.ReloadConfigRequest", "tensorflow.serving.StatusProto",
        "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
    }  # fmt: skip
    assert needed <= set(ours), f"missing from protos/tensorflow*: {sorted(needed - set(ours))}"
    assert _layout_drift(ours, theirs) == []


def test_tfs_method_paths_match_ovmsclient() -> None:
    pairs = [_tfs_pair(f"tensorflow_serving.apis.{name}_pb2_grpc") for name in ("model_service", "prediction_service")]
    ours, theirs = _stub_paths(o for o, _ in pairs), _stub_paths(t for _, t in pairs)
    assert ours == [
        "unary_unary /tensorflow.serving.ModelService/GetModelStatus",
        "unary_unary /tensorflow.serving.ModelService/HandleReloadConfigRequest",
        "unary_unary /tensorflow.serving.PredictionService/GetModelMetadata",
        "unary_unary /tensorflow.serving.PredictionService/Predict",
    ]
    assert set(ours) <= set(theirs)


def _ovms(module: str, message: str) -> Message:
    return getattr(importlib.import_module(f"{OVMS_PROTOS}.{module}"), message)()


def _ours(module: str, message: str) -> Message:
    return getattr(importlib.import_module(f"{PACKAGE}.{module}"), message)()


def _tensor(dtype: str, shape: list[Any], **content: Any) -> dict[str, Any]:
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": n} for n in shape]}, **content}


TFS_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "predict_request": ("tensorflow_serving.apis.predict_pb2", "PredictRequest", {
        "model_spec": {"name": "dummy", "version": 0, "signature_name": "serving_default"},
        "inputs": {
            "x": _tensor("DT_FLOAT", [1, 2], tensor_content=_b64(np.ones(2, np.float32).tobytes())),
            "s": _tensor("DT_STRING", [2], string_val=[_b64(b"ab"), _b64(b"c")]),
        },
        "output_filter": ["y"],
    }),
    "predict_request_label": ("tensorflow_serving.apis.predict_pb2", "PredictRequest", {
        "model_spec": {"name": "dummy", "version_label": "stable"},
    }),
    "predict_response": ("tensorflow_serving.apis.predict_pb2", "PredictResponse", {
        "model_spec": {"name": "dummy", "version": 3},
        "outputs": {
            "f": _tensor("DT_FLOAT", [2], float_val=[1.5, 2.5]), "d": _tensor("DT_DOUBLE", [1], double_val=[0.1]),
            "i": _tensor("DT_INT32", [1], int_val=[-4]), "l": _tensor("DT_INT64", [1], int64_val=[-(2**40)]),
            "b": _tensor("DT_BOOL", [1], bool_val=[True]), "h": _tensor("DT_HALF", [1], half_val=[15360]),
            "u": _tensor("DT_UINT32", [1], uint32_val=[2**32 - 1]),
            "v": _tensor("DT_UINT64", [1], uint64_val=[2**64 - 1]),
            "c": _tensor("DT_COMPLEX64", [1], scomplex_val=[1.0, 2.0]),
            "z": _tensor("DT_COMPLEX128", [1], dcomplex_val=[1.0, 2.0]),
            "n": {"dtype": "DT_FLOAT", "tensor_shape": {"unknown_rank": True, "dim": [{"size": -1, "name": "batch"}]},
                  "version_number": 1},
        },
    }),
    "metadata_request": ("tensorflow_serving.apis.get_model_metadata_pb2", "GetModelMetadataRequest", {
        "model_spec": {"name": "dummy", "version": 2}, "metadata_field": ["signature_def"],
    }),
    "signature_def_map": ("tensorflow_serving.apis.get_model_metadata_pb2", "SignatureDefMap", {"signature_def": {
        "serving_default": {
            "inputs": {"x": {"name": "x:0", "dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": -1}, {"size": 4}]}}},
            "outputs": {"y": {"name": "y", "dtype": "DT_STRING", "tensor_shape": {"unknown_rank": True}}},
            "method_name": "tensorflow/serving/predict",
        },
    }}),
    "status_request": ("tensorflow_serving.apis.get_model_status_pb2", "GetModelStatusRequest", {
        "model_spec": {"name": "dummy", "version": 1},
    }),
    "status_response": ("tensorflow_serving.apis.get_model_status_pb2", "GetModelStatusResponse", {
        "model_version_status": [
            {"version": 1, "state": "AVAILABLE", "status": {}},
            {"version": 2, "state": "LOADING", "status": {"error_code": "UNAVAILABLE", "error_message": "loading"}},
        ],
    }),
    "reload_request": ("tensorflow_serving.apis.model_management_pb2", "ReloadConfigRequest", {
        "config": {"model_config_list": {"config": [
            {"name": "dummy", "base_path": "/models/dummy", "model_platform": "openvino"},
        ]}},
    }),
    "reload_response": ("tensorflow_serving.apis.model_management_pb2", "ReloadConfigResponse", {
        "status": {"error_code": "UNIMPLEMENTED", "error_message": "edit models.json instead"},
    }),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TFS_CASES))
def test_tfs_message_crosses_the_wire_both_ways(case: str) -> None:
    module, message, fields = TFS_CASES[case]
    ours_bytes = _encode(_ours(module, message), fields)
    theirs_bytes = _encode(_ovms(module, message), fields)
    assert theirs_bytes == ours_bytes, "same message, different bytes"
    ours_reading_ours = _decode(_ours(module, message), ours_bytes)
    assert set(ours_reading_ours["fields"]) == set(fields), "a field of the case did not encode"
    assert _decode(_ovms(module, message), ours_bytes) == ours_reading_ours, "ovmsclient misreads ours"
    assert _decode(_ours(module, message), theirs_bytes) == ours_reading_ours, "we misread ovmsclient's"


def test_requests_built_by_ovmsclient_decode_with_ours() -> None:
    from ovmsclient.tfs_compat.grpc.requests import make_metadata_request, make_predict_request, make_status_request

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    predict = make_predict_request({"x": x, "s": [b"ab", b"c"]}, "dummy", 2).raw_request
    predict_bytes = predict.SerializeToString(deterministic=True)  # map order varies otherwise
    decoded = _decode(_ours("tensorflow_serving.apis.predict_pb2", "PredictRequest"), predict_bytes)
    assert decoded["exact"] is True
    assert decoded["fields"] == {
        "model_spec": {"name": "dummy", "version": "2"},
        "inputs": {
            "x": _tensor("DT_FLOAT", ["2", "3"], tensor_content=_b64(x.tobytes())),
            "s": _tensor("DT_STRING", ["2"], string_val=[_b64(b"ab"), _b64(b"c")]),
        },
    }
    metadata = make_metadata_request("dummy").raw_request.SerializeToString()
    decoded = _decode(_ours("tensorflow_serving.apis.get_model_metadata_pb2", "GetModelMetadataRequest"), metadata)
    # version 0 means "default version"; the Int64Value wrapper is still present on the wire
    assert decoded == {
        "fields": {"model_spec": {"name": "dummy", "version": "0"}, "metadata_field": ["signature_def"]},
        "exact": True,
    }
    status = make_status_request("dummy", 3).raw_request.SerializeToString()
    decoded = _decode(_ours("tensorflow_serving.apis.get_model_status_pb2", "GetModelStatusRequest"), status)
    assert decoded == {"fields": {"model_spec": {"name": "dummy", "version": "3"}}, "exact": True}


def test_ovmsclient_reads_our_predict_response() -> None:
    from ovmsclient.tfs_compat.grpc.responses import GrpcPredictResponse

    ours = _ours("tensorflow_serving.apis.predict_pb2", "PredictResponse")
    y = np.array([[1.0, -2.0, 3.5]], dtype=np.float32)
    _encode(
        ours,
        {
            "outputs": {
                "y": _tensor("DT_FLOAT", [1, 3], tensor_content=_b64(y.tobytes())),
                "n": _tensor("DT_INT64", [2], int64_val=[-1, 2**40]),
                "s": _tensor("DT_STRING", [2], string_val=[_b64(b"ab"), _b64(b"c")]),
            }
        },
    )
    theirs = _ovms("tensorflow_serving.apis.predict_pb2", "PredictResponse")
    theirs.ParseFromString(ours.SerializeToString())
    outputs = GrpcPredictResponse(theirs).to_dict()["outputs"]
    np.testing.assert_array_equal(outputs["y"], y)
    assert outputs["y"].dtype == np.float32
    assert outputs["n"].tolist() == [-1, 2**40]
    assert outputs["s"].tolist() == [b"ab", b"c"]


def test_ovmsclient_reads_our_model_metadata_with_the_signature_def_any() -> None:
    from ovmsclient.tfs_compat.grpc.responses import GrpcModelMetadataResponse

    module = "tensorflow_serving.apis.get_model_metadata_pb2"
    signatures = _ours(module, "SignatureDefMap")
    _encode(signatures, TFS_CASES["signature_def_map"][2])
    ours = _ours(module, "GetModelMetadataResponse")
    _encode(ours, {"model_spec": {"name": "dummy", "version": 4}})
    ours.metadata["signature_def"].Pack(signatures)
    assert ours.metadata["signature_def"].type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    theirs = _ovms(module, "GetModelMetadataResponse")
    theirs.ParseFromString(ours.SerializeToString(deterministic=True))
    assert theirs.metadata["signature_def"].type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    assert GrpcModelMetadataResponse(theirs).to_dict() == {
        "model_version": 4,
        "inputs": {"x": {"shape": [-1, 4], "dtype": "DT_FLOAT"}},
        "outputs": {"y": {"shape": [], "dtype": "DT_STRING"}},
    }


def test_ovmsclient_reads_our_model_status() -> None:
    from ovmsclient.tfs_compat.grpc.responses import GrpcModelStatusResponse

    module, message, fields = TFS_CASES["status_response"]
    theirs = _ovms(module, message)
    theirs.ParseFromString(_encode(_ours(module, message), fields))
    assert GrpcModelStatusResponse(theirs).to_dict() == {
        1: {"state": "AVAILABLE", "error_code": 0, "error_message": ""},
        2: {"state": "LOADING", "error_code": 14, "error_message": "loading"},
    }


def test_a_reload_request_carrying_a_config_is_detectable() -> None:
    module = "tensorflow_serving.apis.model_management_pb2"
    theirs = _ovms(module, "ReloadConfigRequest")
    theirs.config.model_config_list.config.add(name="dummy", base_path="/models/dummy")
    ours = _ours(module, "ReloadConfigRequest")
    ours.ParseFromString(theirs.SerializeToString())
    assert ours.HasField("config")
    assert ours.config.WhichOneof("config") == "model_config_list"
    assert [c.name for c in ours.config.model_config_list.config] == ["dummy"]
    ours.ParseFromString(_ovms(module, "ReloadConfigRequest").SerializeToString())
    assert not ours.HasField("config")
