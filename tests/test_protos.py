"""Generated protobuf code: no drift from protos/, and KServe wire compatibility with tritonclient 2.41.

Our `inference` package and tritonclient's cannot share a process (duplicate symbols), so for KServe this file also runs
as a script (`python tests/test_protos.py ours|triton`, one JSON request on stdin, one JSON reply on stdout) and the
tests compare what each side decodes from the other's bytes. ovmsclient's copies live in renamed packages
(`ovmsclient.*`), so the TF Serving checks run in this process.

gRPC reflection takes its service names straight from the generated descriptors:
    [s.full_name for m in (grpc_service_pb2, prediction_service_pb2, model_service_pb2)
     for s in m.DESCRIPTOR.services_by_name.values()]
"""

from __future__ import annotations

import base64
import filecmp
import importlib
import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from google.protobuf.message import Message

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "engine" / "frontend" / "generated"
PACKAGE = "engine.frontend.generated"
OVMS_PROTOS = "ovmsclient.tfs_compat.protos"
SIDE_MODULES = {  # the KServe pb2 modules each subprocess loads
    "ours": (f"{PACKAGE}.inference.grpc_service_pb2", f"{PACKAGE}.inference.model_config_pb2"),
    "triton": ("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2"),
}
SIDE_STUBS = {"ours": f"{PACKAGE}.inference.grpc_service_pb2_grpc", "triton": "tritonclient.grpc.service_pb2_grpc"}
SERVICES = {
    "inference.GRPCInferenceService": [
        "ModelConfig", "ModelInfer", "ModelMetadata", "ModelReady", "ModelStatistics", "ModelStreamInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ServerLive", "ServerMetadata",
        "ServerReady",
    ],
    "tensorflow.serving.ModelService": ["GetModelStatus", "HandleReloadConfigRequest"],
    "tensorflow.serving.PredictionService": ["GetModelMetadata", "Predict"],
}  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _framed(*items: bytes) -> bytes:
    """KServe BYTES tensor layout: each element prefixed by its little-endian uint32 length."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


_STAT = {"count": 3, "ns": 4_500_000_000}
KSERVE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "infer_request": ("inference.ModelInferRequest", {
        "model_name": "dummy", "model_version": "2", "id": "req-1",
        "parameters": {
            "sequence_id": {"int64_param": -7}, "sequence_start": {"bool_param": True},
            "note": {"string_param": "x"}, "ratio": {"double_param": 0.25}, "priority": {"uint64_param": 2**64 - 1},
        },
        "inputs": [
            {"name": "raw", "datatype": "FP32", "shape": [1, 4],
             "parameters": {"binary_data_size": {"int64_param": 16}}},
            {"name": "typed", "datatype": "FP32", "shape": [8], "contents": {
                "bool_contents": [True, False], "int_contents": [-3], "int64_contents": [-(2**40)],
                "uint_contents": [2**32 - 1], "uint64_contents": [2**64 - 1], "fp32_contents": [1.5, -2.0],
                "fp64_contents": [1e300], "bytes_contents": [_b64(b"\x00\xff")],
            }},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": {"bool_param": True}}}],
        "raw_input_contents": [_b64(np.arange(4, dtype=np.float32).tobytes())],
    }),
    "infer_response": ("inference.ModelInferResponse", {
        "model_name": "dummy", "model_version": "2", "id": "req-1",
        "parameters": {"triton_final_response": {"bool_param": True}},
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [2, 2]},
            {"name": "s", "datatype": "BYTES", "shape": [2]},
            {"name": "i", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": {"int64_param": 16}}},
        ],
        "raw_output_contents": [
            _b64(np.arange(4, dtype=np.float32).tobytes()),
            _b64(_framed(b"ab", b"c")),
            _b64(np.array([-1, 2**40], dtype=np.int64).tobytes()),
        ],
    }),
    "stream_response": ("inference.ModelStreamInferResponse", {
        "error_message": "model 'dummy' is not ready",
        "infer_response": {"model_name": "dummy", "outputs": [{"name": "y", "contents": {"fp32_contents": [1.0]}}]},
    }),
    "model_metadata": ("inference.ModelMetadataResponse", {
        "name": "dummy", "versions": ["1", "3"], "platform": "openvino",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1, 1000]}],
    }),
    "server_metadata": ("inference.ServerMetadataResponse", {
        "name": "hotserve", "version": "0.1.0", "extensions": ["model_configuration", "statistics"],
    }),
    "model_config": ("inference.ModelConfigResponse", {"config": {
        "name": "dummy", "platform": "openvino", "backend": "openvino", "max_batch_size": 8,
        "version_policy": {"specific": {"versions": [1, 3]}},
        "input": [{"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [-1, 3, 224, 224],
                   "is_shape_tensor": True, "allow_ragged_batch": True, "optional": True}],
        "output": [{"name": "y", "data_type": "TYPE_BF16", "dims": [1000], "label_filename": "labels.txt",
                    "is_shape_tensor": True}],
        "default_model_filename": "model.xml",
    }}),
    "model_config_latest": ("inference.ModelConfigResponse", {"config": {
        "name": "dummy", "version_policy": {"latest": {"num_versions": 2}},
        "input": [{"name": "s", "data_type": "TYPE_STRING", "dims": [-1]}],
    }}),
    "statistics": ("inference.ModelStatisticsResponse", {"model_stats": [{
        "name": "dummy", "version": "1", "last_inference": 1_700_000_000_000, "inference_count": 12,
        "execution_count": 10,
        "inference_stats": {key: _STAT for key in (
            "success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")},
        "batch_stats": [{"batch_size": 4, "compute_input": _STAT, "compute_infer": _STAT, "compute_output": _STAT}],
    }]}),
    "repository_index": ("inference.RepositoryIndexResponse", {"models": [
        {"name": "dummy", "version": "1", "state": "READY"},
        {"name": "broken", "version": "2", "state": "UNAVAILABLE", "reason": "models/broken/2: no model.xml"},
    ]}),
    "repository_index_request": ("inference.RepositoryIndexRequest", {"repository_name": "models", "ready": True}),
    "model_load_request": ("inference.RepositoryModelLoadRequest", {
        "repository_name": "models", "model_name": "dummy",
        "parameters": {"config": {"string_param": "{}"}, "file:1/model.bin": {"bytes_param": _b64(b"\x01\x02")},
                       "poll": {"bool_param": True}, "n": {"int64_param": -1}},
    }),
    "model_unload_request": ("inference.RepositoryModelUnloadRequest", {
        "model_name": "dummy", "parameters": {"unload_dependents": {"bool_param": True}},
    }),
    "model_ready_request": ("inference.ModelReadyRequest", {"name": "dummy", "version": "3"}),
    "model_statistics_request": ("inference.ModelStatisticsRequest", {"name": "dummy", "version": "3"}),
    "model_config_request": ("inference.ModelConfigRequest", {"name": "dummy", "version": "3"}),
    "readiness": ("inference.ModelReadyResponse", {"ready": True}),
}  # fmt: skip


# ---- helpers shared by the pytest process and the subprocess sides ------------------------------------------------


def _message_class(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))


def _encode(message: Message, fields: dict[str, Any]) -> bytes:
    return json_format.ParseDict(fields, message).SerializeToString(deterministic=True)


def _decode(message: Message, raw: bytes) -> dict[str, Any]:
    """The fields as a dict, and whether re-encoding only the fields this side knows gives back the same bytes."""
    message.ParseFromString(raw)
    fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
    message.DiscardUnknownFields()
    return {"fields": fields, "exact": message.SerializeToString(deterministic=True) == raw}


def _normalize(full_name: str) -> str:
    # ovmsclient renamed tensorflow.* to ovmsclient.*; the wire does not carry package names
    return "tensorflow." + full_name.removeprefix("ovmsclient.") if full_name.startswith("ovmsclient.") else full_name


def _layout(files: Iterable[FileDescriptor]) -> dict[str, dict[str, Any]]:
    """Every message, enum and service in `files`: what decides the wire format, keyed by (normalized) full name."""
    out: dict[str, dict[str, Any]] = {}

    def enum(e: EnumDescriptor) -> None:
        out[_normalize(e.full_name)] = {"kind": "enum", "members": {v.name: v.number for v in e.values}}

    def message(d: Descriptor) -> None:
        members = {}
        for f in d.fields:
            target = f.message_type or f.enum_type
            members[f.name] = {
                "number": f.number,
                "type": f.type,
                "repeated": f.is_repeated,
                "packed": f.is_packed,
                "target": _normalize(target.full_name) if target else None,
                "map": bool(f.message_type and f.message_type.GetOptions().map_entry),
                "oneof": f.containing_oneof.name if f.containing_oneof else None,
            }
        out[_normalize(d.full_name)] = {"kind": "message", "members": members}
        for nested in d.nested_types:
            message(nested)
        for nested_enum in d.enum_types:
            enum(nested_enum)

    for file in files:
        for d in file.message_types_by_name.values():
            message(d)
        for e in file.enum_types_by_name.values():
            enum(e)
        for s in file.services_by_name.values():
            out[_normalize(s.full_name)] = {
                "kind": "service",
                "members": {
                    m.name: [
                        _normalize(m.input_type.full_name),
                        _normalize(m.output_type.full_name),
                        m.client_streaming,
                        m.server_streaming,
                    ]
                    for m in s.methods
                },
            }
    return out


def _layout_drift(ours: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]) -> list[str]:
    """Where ours differs from the reference; members we leave out are fine, members we declare must match."""
    problems = []
    for name, spec in sorted(ours.items()):
        ref = theirs.get(name)
        if ref is None or ref["kind"] != spec["kind"]:
            problems.append(f"{name}: no {spec['kind']} of that name in the reference")
            continue
        problems += [
            f"{name}.{member}: ours {value}, reference {ref['members'].get(member)}"
            for member, value in spec["members"].items()
            if ref["members"].get(member) != value
        ]
    return problems


class _PathRecorder:
    """A stand-in channel: generated stubs ask it for one callable per RPC, and it notes the path and kind."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def _note(self, kind: str, path: str) -> None:
        self.paths.append(f"{kind} {path}")

    def unary_unary(self, path: str, *args: Any, **kwargs: Any) -> None:
        self._note("unary_unary", path)

    def unary_stream(self, path: str, *args: Any, **kwargs: Any) -> None:
        self._note("unary_stream", path)

    def stream_unary(self, path: str, *args: Any, **kwargs: Any) -> None:
        self._note("stream_unary", path)

    def stream_stream(self, path: str, *args: Any, **kwargs: Any) -> None:
        self._note("stream_stream", path)


def _stub_paths(modules: Iterable[ModuleType]) -> list[str]:
    """The gRPC method paths (what goes on the wire) of every *Stub class in the given _pb2_grpc modules."""
    recorder = _PathRecorder()
    for module in modules:
        for name in dir(module):
            if name.endswith("Stub"):
                getattr(module, name)(recorder)
    return sorted(recorder.paths)


def _generated_modules(suffix: str = "_pb2") -> list[str]:
    files = sorted(GENERATED.rglob(f"*{suffix}.py"))
    return [".".join((PACKAGE, *p.relative_to(GENERATED).with_suffix("").parts)) for p in files]


# ---- the subprocess sides ----------------------------------------------------------------------------------------


def _side_main(side: str) -> None:
    """Serves one JSON request: encode/decode messages by full name with this side's classes, plus side extras."""
    modules = [importlib.import_module(name) for name in SIDE_MODULES[side]]
    request = json.load(sys.stdin)
    reply: dict[str, Any] = {
        "encoded": {
            key: _b64(_encode(_message_class(name)(), fields)) for key, (name, fields) in request["encode"].items()
        },
        "decoded": {
            key: _decode(_message_class(name)(), base64.b64decode(raw))
            for key, (name, raw) in request["decode"].items()
        },
        "layout": _layout(m.DESCRIPTOR for m in modules),
        "stub_paths": _stub_paths([importlib.import_module(SIDE_STUBS[side])]),
    }
    reply |= _ours_extras() if side == "ours" else _triton_extras(request)
    json.dump(reply, sys.stdout)


def _ours_extras() -> dict[str, Any]:
    """Class placement (pickle needs a real __module__) and what gRPC reflection serves from our descriptors."""
    modules = [importlib.import_module(name) for name in _generated_modules()]
    misplaced = [
        f"{cls.__module__}.{name} (in {module.__name__})"
        for module in modules
        for name in module.DESCRIPTOR.message_types_by_name
        if (cls := getattr(module, name)).__module__ != module.__name__
    ]
    infer = _message_class("inference.ModelInferRequest")()
    _encode(infer, KSERVE_CASES["infer_request"][1])
    return {"misplaced": misplaced, "pickles": pickle.loads(pickle.dumps(infer)) == infer, "reflection": _reflect()}


def _reflect() -> dict[str, Any]:
    """Starts a bare gRPC server with reflection over our service names and asks it, as grpcurl would."""
    from concurrent import futures

    import grpc
    from grpc_reflection.v1alpha import reflection
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    service_modules = [
        importlib.import_module(f"{PACKAGE}.{name}")
        for name in (
            "inference.grpc_service_pb2",
            "tensorflow_serving.apis.prediction_service_pb2",
            "tensorflow_serving.apis.model_service_pb2",
        )
    ]
    names = [s.full_name for m in service_modules for s in m.DESCRIPTOR.services_by_name.values()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)  # resolves each file and its imports over the wire
            listed = sorted(database.get_services())
            methods = {name: sorted(m.name for m in pool.FindServiceByName(name).methods) for name in listed}
    finally:
        server.stop(None)
    return {"names": names, "listed": listed, "methods": methods}


def _triton_extras(request: dict[str, Any]) -> dict[str, Any]:
    """What tritonclient's own code makes of our reply, and the request bytes it builds itself."""
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2
    from tritonclient.grpc._utils import _get_inference_request

    result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(base64.b64decode(request["as_numpy"])))
    arrays = {}
    for name in ("y", "s", "i"):
        try:
            array = result.as_numpy(name)
        except Exception as e:  # reported per output, so the other wire checks still run
            arrays[name] = {"error": repr(e)}
            continue
        values = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
        arrays[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "values": values}
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    s = grpcclient.InferInput("s", [2], "BYTES")
    s.set_data_from_numpy(np.array([b"ab", b"c"], dtype=np.object_))
    built = _get_inference_request(
        model_name="dummy",
        inputs=[x, s],
        model_version="1",
        request_id="r1",
        outputs=[grpcclient.InferRequestedOutput("y")],
        sequence_id=5,
        sequence_start=True,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters={"tag": "a"},
    )
    return {"as_numpy": arrays, "client_request": _b64(built.SerializeToString(deterministic=True))}


def _run_side(side: str, request: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, side],
        input=json.dumps(request),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"{side} side of the KServe wire check failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def kserve() -> dict[str, dict[str, Any]]:
    """Both sides encode every case; each then decodes the other's bytes (three subprocesses in all)."""
    first = _run_side("ours", {"encode": KSERVE_CASES, "decode": {}})
    triton = _run_side(
        "triton",
        {
            "encode": KSERVE_CASES,
            "decode": {key: (name, first["encoded"][key]) for key, (name, _) in KSERVE_CASES.items()},
            "as_numpy": first["encoded"]["infer_response"],
        },
    )
    decode = {key: (name, triton["encoded"][key]) for key, (name, _) in KSERVE_CASES.items()}
    decode["client_request"] = ("inference.ModelInferRequest", triton["client_request"])
    decode |= {f"own:{key}": (name, first["encoded"][key]) for key, (name, _) in KSERVE_CASES.items()}
    ours = _run_side("ours", {"encode": {}, "decode": decode})
    return {"first": first, "triton": triton, "ours": ours}


# ---- drift ------------------------------------------------------------------------------------------------------


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(out)], check=True, capture_output=True)
    expected, committed = _files(out), _files(GENERATED)
    assert expected, "protos/generate.py wrote nothing"
    assert expected == committed, (
        f"engine/frontend/generated has missing {sorted(expected - committed)} / extra {sorted(committed - expected)} "
        "files; run `make protos` and commit"
    )
    changed = [name for name in sorted(expected) if not filecmp.cmp(out / name, GENERATED / name, shallow=False)]
    assert not changed, f"{changed} drifted from protos/; run `make protos` and commit"


def test_generated_classes_live_in_their_modules_and_pickle(kserve: dict[str, dict[str, Any]]) -> None:
    assert kserve["first"]["misplaced"] == []
    assert kserve["first"]["pickles"] is True


# ---- KServe against tritonclient 2.41 ----------------------------------------------------------------------------


def test_kserve_layout_matches_tritonclient(kserve: dict[str, dict[str, Any]]) -> None:
    ours, theirs = kserve["first"]["layout"], kserve["triton"]["layout"]
    needed = {
        "inference.ModelInferRequest",
        "inference.ModelInferResponse",
        "inference.ModelMetadataResponse",
        "inference.ModelConfig",
        "inference.ModelInput",
        "inference.ModelOutput",
        "inference.DataType",
        "inference.ModelStatistics",
        "inference.InferStatistics",
        "inference.StatisticDuration",
        "inference.RepositoryIndexResponse.ModelIndex",
        "inference.GRPCInferenceService",
    }
    assert needed <= set(ours), f"missing from protos/inference: {sorted(needed - set(ours))}"
    assert _layout_drift(ours, theirs) == []


def test_kserve_method_paths_match_tritonclient(kserve: dict[str, dict[str, Any]]) -> None:
    ours, theirs = kserve["first"]["stub_paths"], kserve["triton"]["stub_paths"]
    assert len(ours) == len(SERVICES["inference.GRPCInferenceService"])
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))


@pytest.mark.parametrize("case", sorted(KSERVE_CASES))
def test_kserve_message_crosses_the_wire_both_ways(kserve: dict[str, dict[str, Any]], case: str) -> None:
    ours_reading_theirs = kserve["ours"]["decoded"][case]
    theirs_reading_ours = kserve["triton"]["decoded"][case]
    ours_reading_ours = kserve["ours"]["decoded"][f"own:{case}"]
    assert set(ours_reading_ours["fields"]) == set(KSERVE_CASES[case][1]), "a field of the case did not encode"
    assert theirs_reading_ours == {"fields": ours_reading_ours["fields"], "exact": True}, "tritonclient misreads ours"
    assert ours_reading_theirs == {"fields": ours_reading_ours["fields"], "exact": True}, "we misread tritonclient's"
    assert kserve["triton"]["encoded"][case] == kserve["first"]["encoded"][case], "same message, different bytes"


def test_tritonclient_reads_our_infer_response_as_numpy(kserve: dict[str, dict[str, Any]]) -> None:
    assert kserve["triton"]["as_numpy"] == {
        "y": {"dtype": "float32", "shape": [2, 2], "values": [0.0, 1.0, 2.0, 3.0]},
        "s": {"dtype": "object", "shape": [2], "values": ["ab", "c"]},
        "i": {"dtype": "int64", "shape": [2], "values": [-1, 2**40]},
    }


def test_request_built_by_tritonclient_decodes_with_ours(kserve: dict[str, dict[str, Any]]) -> None:
    decoded = kserve["ours"]["decoded"]["client_request"]
    assert decoded["exact"] is True
    assert decoded["fields"] == {
        "model_name": "dummy",
        "model_version": "1",
        "id": "r1",
        "parameters": {
            "sequence_id": {"int64_param": "5"},
            "sequence_start": {"bool_param": True},
            "sequence_end": {"bool_param": False},  # a oneof member keeps its presence even when false
            "tag": {"string_param": "a"},
        },
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": ["1", "4"]},
            {"name": "s", "datatype": "BYTES", "shape": ["2"]},
        ],
        "outputs": [{"name": "y"}],
        "raw_input_contents": [_b64(np.arange(4, dtype=np.float32).tobytes()), _b64(_framed(b"ab", b"c"))],
    }


def test_reflection_lists_our_services_from_the_descriptors(kserve: dict[str, dict[str, Any]]) -> None:
    reflected = kserve["first"]["reflection"]
    assert sorted(reflected["names"]) == sorted(SERVICES)
    assert reflected["listed"] == sorted([*SERVICES, "grpc.reflection.v1alpha.ServerReflection"])
    assert {name: reflected["methods"][name] for name in SERVICES} == SERVICES


if __name__ == "__main__":
    _side_main(sys.argv[1])
