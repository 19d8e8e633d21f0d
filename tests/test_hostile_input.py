"""Hostile requests over KServe gRPC, TF Serving and REST (issue 10): every malformed tensor gets INVALID_ARGUMENT /
HTTP 400 naming the input, a good request is answered right after, and nothing is logged with a traceback."""

from __future__ import annotations

import gzip
import json
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc
import modelgen
import numpy as np
import pytest
from conftest import ServerProcess, model_entry
from harness import free_port
from tritonclient.grpc import service_pb2, service_pb2_grpc

from engine.frontend.generated.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from engine.frontend.generated.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

MAX_REQUEST_MB = 2
X = np.arange(10, dtype=np.float32).reshape(1, 10)


@dataclass
class Env:
    server: ServerProcess
    rest: str
    kserve: service_pb2_grpc.GRPCInferenceServiceStub
    tfs: prediction_service_pb2_grpc.PredictionServiceStub


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hostile")
    modelgen.add_const(root / "dummy" / "1", delta=1.0)
    modelgen.add_const(root / "int8" / "1", delta=1, dtype=np.int8, shape=(1, 4))
    config = root / "models.json"
    config.write_text(
        json.dumps({"model_config_list": [model_entry("dummy", root / "dummy"), model_entry("int8", root / "int8")]})
    )
    port = free_port()
    server = ServerProcess(
        ["--config_path", str(config), "--port", "0", "--rest_port", str(port),
         "--max_request_mb", str(MAX_REQUEST_MB), "--file_system_poll_wait_seconds", "0"],
        tmp_path_factory.mktemp("logs") / "server.log",
    ).wait_ready()  # fmt: skip
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)])
    yield Env(
        server,
        f"http://127.0.0.1:{port}",
        service_pb2_grpc.GRPCInferenceServiceStub(channel),
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
    )
    channel.close()
    assert server.stop() == 0
    assert "Traceback" not in server.log, server.log[-3000:]


# ---- the three protocols, each sending one tensor as a hostile client would ----
@dataclass(frozen=True)
class Case:
    id: str
    model: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None  # KServe raw_input_contents / TFS tensor_content
    values: list | None = None  # typed contents / REST data
    expect: str = ""  # in the error message, besides the input's name
    http: int = 400
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


def _prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


CASES = [
    Case("dims -1,-1", "dummy", "FP32", [-1, -1], raw=b"\0" * 4, values=[0.0], expect="Negative dimension"),
    Case("dims -1,-10", "dummy", "FP32", [-1, -10], raw=b"\0" * 40, values=[0.0] * 10, expect="Negative dimension"),
    Case("dims -2,-5", "dummy", "FP32", [-2, -5], raw=b"\0" * 40, values=[0.0] * 10, expect="Negative dimension"),
    Case("dims 0,-5", "dummy", "FP32", [0, -5], raw=b"", values=[], expect="Negative dimension"),
    Case("product wraps", "dummy", "FP32", [2**63 - 1, 2**63 - 1], raw=b"\0" * 4, values=[0.0], expect="too large"),
    Case("huge dim times 0", "dummy", "FP32", [2**63 - 1, 0], raw=b"", values=[], expect="too large"),
    Case("65 dims", "dummy", "FP32", [1] * 65, raw=b"\0" * 4, values=[0.0], expect="65 dimensions"),
    Case("raw size", "dummy", "FP32", [1, 10], raw=b"\0" * 12, values=[0.0] * 3, expect="Expected: "),
    Case("INT8 1000", "int8", "INT8", [1, 4], values=[1, 2, 3, 1000], expect="1000 is out of the INT8 range"),
    Case("INT8 -1000", "int8", "INT8", [1, 4], values=[-1000, 2, 3, 4], expect="-1000 is out of the INT8 range"),
    Case("INT8 2**31-1", "int8", "INT8", [1, 4], values=[2**31 - 1, 0, 0, 0], expect="2147483647 is out of"),
    Case("INT8 float", "int8", "INT8", [1, 4], values=[1.5, 0.0, 0.0, 0.0], expect="must be integers"),
    Case("BYTES prefix", "dummy", "BYTES", [1, 10], raw=b"\xff" * 40, expect="BYTES element 0 says 4294967295"),
    Case("BYTES count", "dummy", "BYTES", [1, 10], raw=_prefixed(b"a", b"b"), expect="Expected: 10 BYTES elements"),
    Case("BYTES trailing", "dummy", "BYTES", [1, 1], raw=_prefixed(b"a") + b"x", expect="1 bytes left after"),
    Case("datatype FP8", "dummy", "FP8", [1, 10], raw=b"\0" * 10, values=[0] * 10, expect="Unsupported datatype"),
]
NAME = "b\nforged log line"  # a name with a newline: messages must name it, escaped, on one line


def _check_good(env: Env) -> None:
    """A good request right after: served, and right."""
    request = service_pb2.ModelInferRequest(model_name="dummy")
    request.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    request.raw_input_contents.append(X.tobytes())
    out = np.frombuffer(env.kserve.ModelInfer(request, timeout=30).raw_output_contents[0], np.float32)
    np.testing.assert_allclose(out, X.ravel() + 1)


def _kserve(env: Env, case: Case, typed: bool) -> grpc.RpcError:
    request = service_pb2.ModelInferRequest(model_name=case.model)
    tensor = request.inputs.add(name=NAME, datatype=case.datatype, shape=case.shape)
    if typed:
        field = {"INT8": "int_contents", "FP32": "fp32_contents", "FP8": "int_contents"}[case.datatype]
        getattr(tensor.contents, field).extend(case.values)  # type: ignore[arg-type]
    else:
        request.raw_input_contents.append(case.raw)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as caught:
        env.kserve.ModelInfer(request, timeout=30)
    return caught.value


@pytest.mark.parametrize("case", [c for c in CASES if c.raw is not None], ids=lambda c: c.id)
def test_kserve_raw(env: Env, case: Case) -> None:
    error = _kserve(env, case, typed=False)
    assert error.code() == case.code, error.details()
    assert case.expect in error.details() and "input name: b\\x0aforged log line" in error.details()
    _check_good(env)


def _fits_int_field(case: Case) -> bool:
    """int_contents / int_val are int32 fields: a float cannot even be put in the message."""
    return case.datatype != "INT8" or all(isinstance(v, int) for v in case.values or ())


@pytest.mark.parametrize("case", [c for c in CASES if c.values is not None and c.datatype != "BYTES"
                                  and _fits_int_field(c)], ids=lambda c: c.id)  # fmt: skip
def test_kserve_typed(env: Env, case: Case) -> None:
    error = _kserve(env, case, typed=True)
    assert error.code() == case.code, error.details()
    assert case.expect in error.details() and "input name: b\\x0aforged" in error.details()
    _check_good(env)


_TF = {"FP32": types_pb2.DT_FLOAT, "INT8": types_pb2.DT_INT8, "BYTES": types_pb2.DT_STRING}


@pytest.mark.parametrize("case", [c for c in CASES if c.datatype in ("FP32", "INT8") and _fits_int_field(c)],
                         ids=lambda c: c.id)  # fmt: skip
def test_tfs(env: Env, case: Case) -> None:
    proto = tensor_pb2.TensorProto(dtype=_TF[case.datatype])
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in case.shape)
    if case.raw is not None:
        proto.tensor_content = case.raw
    else:
        proto.int_val.extend(case.values)  # type: ignore[arg-type]
    if not case.raw and case.raw is not None:  # empty tensor_content is "no content": send the typed field
        proto.float_val.extend(case.values)  # type: ignore[arg-type]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = case.model
    request.inputs[NAME].CopyFrom(proto)
    with pytest.raises(grpc.RpcError) as caught:
        env.tfs.Predict(request, timeout=30)
    assert caught.value.code() == case.code, caught.value.details()
    assert case.expect in caught.value.details() and "input name: b\\x0aforged" in caught.value.details()
    _check_good(env)


def test_tfs_unknown_dtype_and_half_bits(env: Env) -> None:
    for dtype, field, values, expect in [
        (types_pb2.DT_COMPLEX64, "scomplex_val", [1.0] * 20, "Unsupported dtype DT_COMPLEX64"),
        (types_pb2.DT_HALF, "half_val", [70000] * 10, "16-bit patterns"),
    ]:
        proto = tensor_pb2.TensorProto(dtype=dtype)
        proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in (1, 10))
        getattr(proto, field).extend(values)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "dummy"
        request.inputs["b"].CopyFrom(proto)
        with pytest.raises(grpc.RpcError) as caught:
            env.tfs.Predict(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expect in caught.value.details() and "input name: b" in caught.value.details()
    _check_good(env)


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _rest_good(env: Env) -> None:
    body = {"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": X.ravel().tolist()}]}
    status, answer = http("POST", f"{env.rest}/v2/models/dummy/infer", json.dumps(body).encode())
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], X.ravel() + 1)


@pytest.mark.parametrize("case", [c for c in CASES if c.values is not None], ids=lambda c: c.id)
def test_rest(env: Env, case: Case) -> None:
    body = {"inputs": [{"name": NAME, "datatype": case.datatype, "shape": case.shape, "data": case.values}]}
    status, answer = http("POST", f"{env.rest}/v2/models/{case.model}/infer", json.dumps(body).encode())
    assert status == case.http, answer
    assert case.expect in answer["error"] and "input name: b\\x0aforged" in answer["error"]
    _rest_good(env)


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b"{not json", "body is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nest more than"),
        (b'{"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": ' + b"[" * 50 + b"0"
         + b"]" * 50 + b"}]}", "nest more than"),
        (b'{"inputs": "\xff"}', "not UTF-8 JSON"),
        (b'{"inputs": [], "id": ' + b"9" * 5000 + b"}", "a value JSON parsing refused: Exceeds the limit"),
        (b'{"inputs": 5}', '"inputs" must be an array'),
        (b'{"inputs": [{"name": "b", "datatype": "FP32", "shape": "1,10", "data": []}]}', "shape must be an array"),
        (b'{"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, true], "data": []}]}', "must be integers"),
        (b'{"inputs": [{"name": "b", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}', "valid Unicode"),
        (b'{"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": [[1], [1, 2]]}]}', "nested list"),
        (b'{"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 1], "data": [1e300]}]}', "out of the FP32 range"),
    ],
)  # fmt: skip
def test_rest_bodies(env: Env, body: bytes, expect: str) -> None:
    status, answer = http("POST", f"{env.rest}/v2/models/dummy/infer", body)
    assert status == 400 and expect in answer["error"], answer
    _rest_good(env)


# ---- the size limit: refused before decoding ----
def test_request_size_limit(env: Env) -> None:
    big = b"\0" * ((MAX_REQUEST_MB << 20) + 1024)
    request = service_pb2.ModelInferRequest(model_name="dummy")
    request.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    request.raw_input_contents.append(big)
    with pytest.raises(grpc.RpcError) as caught:
        env.kserve.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, answer = http("POST", f"{env.rest}/v2/models/dummy/infer", big)
    assert status == 413 and "max_request_mb" in answer["error"], answer
    _check_good(env)
    _rest_good(env)
    under = b"\0" * ((MAX_REQUEST_MB << 20) - 4096)  # below the limit: decoded (off the loop) and refused for size
    request.raw_input_contents[0] = under
    with pytest.raises(grpc.RpcError) as caught:
        env.kserve.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Expected: 40 bytes" in caught.value.details()
    body = json.dumps({"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": [0.5] * 300_000}]})
    status, answer = http("POST", f"{env.rest}/v2/models/dummy/infer", body.encode())  # > 1 MiB: decoder process
    assert status == 400 and "Expected: 10; Actual: 300000" in answer["error"], answer
    _rest_good(env)


def test_a_compressed_request_is_limited_by_what_it_inflates_to(env: Env) -> None:
    """A few KB on the wire that inflate past --max_request_mb: gRPC (gzip message) RESOURCE_EXHAUSTED, REST (gzip
    body, its Content-Length small) 413, and the server's peak memory does not grow by what they inflate to."""
    inflated = 64 * MAX_REQUEST_MB << 20  # 128 MB of zeros, ~130 KB gzipped
    request = service_pb2.ModelInferRequest(model_name="dummy")
    request.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    request.raw_input_contents.append(bytes(inflated))
    peak = _peak_mb(env.server.proc.pid, reset=True)
    with pytest.raises(grpc.RpcError) as caught:
        env.kserve.ModelInfer(request, timeout=30, compression=grpc.Compression.Gzip)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    packed = gzip.compress(bytes(inflated), compresslevel=1)
    assert len(packed) < inflated // 100
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    posted = urllib.request.Request(f"{env.rest}/v2/models/dummy/infer", packed, headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(posted, timeout=30)
    assert refused.value.code == 413, refused.value.read()
    assert _peak_mb(env.server.proc.pid) < peak + inflated // 4 / (1 << 20)
    _check_good(env)
    _rest_good(env)


def _peak_mb(pid: int, reset: bool = False) -> float:
    """The process's peak resident size; `reset`: from now on (the peak set to the current size first)."""
    if reset:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


# ---- logging: one line per (model, reason) per interval, never a traceback ----
def test_a_thousand_bad_requests_log_one_line(env: Env) -> None:
    start = len(env.server.log)
    began = time.monotonic()
    request = service_pb2.ModelInferRequest(model_name="flood-target")
    request.inputs.add(name="b", datatype="FP32", shape=[-1, 10])
    request.raw_input_contents.append(b"\0" * 40)
    for _ in range(1000):
        with pytest.raises(grpc.RpcError):
            env.kserve.ModelInfer(request, timeout=30)
    _check_good(env)
    elapsed = time.monotonic() - began
    time.sleep(0.3)  # let the server's log handler flush
    lines = [line for line in env.server.log[start:].splitlines() if "flood-target" in line]
    assert 1 <= len(lines) <= 2 + int(elapsed / 10), lines
    assert "Rejected kserve request for model flood-target: Invalid input shape" in lines[0]
    assert "Traceback" not in env.server.log[start:]


# ---- bytes that are not the protobuf message at all ----
@pytest.mark.parametrize(
    "method",
    ["/inference.GRPCInferenceService/ModelInfer", "/tensorflow.serving.PredictionService/Predict"],
)
@pytest.mark.parametrize(
    "body", [b"\x80", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab"], ids=["varint", "length", "short"]
)
def test_malformed_protobuf_is_invalid_argument_without_a_traceback(env: Env, method: str, body: bytes) -> None:
    start = len(env.server.log)
    channel = grpc.insecure_channel(env.server.address)
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        call(body, timeout=30)
    channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "not a valid" in (caught.value.details() or "")
    _check_good(env)
    assert "Traceback" not in env.server.log[start:]


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("/inference.GRPCInferenceService/ModelMetadata", "unary_unary"),
        ("/inference.GRPCInferenceService/ServerReady", "unary_unary"),
        ("/tensorflow.serving.PredictionService/GetModelMetadata", "unary_unary"),
        ("/tensorflow.serving.ModelService/GetModelStatus", "unary_unary"),
        ("/grpc.health.v1.Health/Check", "unary_unary"),
        ("/grpc.health.v1.Health/Watch", "unary_stream"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ],
)
def test_malformed_protobuf_to_any_other_method_is_invalid_argument_without_a_traceback(
    env: Env, method: str, kind: str
) -> None:
    """Where grpc.aio's own deserializing answered UNKNOWN and logged a traceback for every such call."""
    start = len(env.server.log)
    channel = grpc.insecure_channel(env.server.address)
    call = getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        if kind == "unary_unary":
            call(b"\x80", timeout=30)
        else:
            list(call(iter([b"\x80"]) if kind == "stream_stream" else b"\x80", timeout=30))
    channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "the request is not a valid protobuf message: Error parsing message" in (caught.value.details() or "")
    _check_good(env)
    log = env.server.log[start:]
    assert "Traceback" not in log and "[ERROR]" not in log, log


def test_client_error_log_is_bounded_over_all_models(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from engine.errors import Code, ServingError
    from engine.frontend.client_log import MAX_KEYS, MAX_LINES, ClientErrorLog

    now = [0.0]
    errors = ClientErrorLog(interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "hotserve.requests"):
        for i in range(5000):  # a client making up a model name per request
            errors.report("kserve", f"made-up-{i}", ServingError(Code.MODEL_NAME_MISSING))
        assert len(caplog.records) == MAX_LINES
        now[0] = 11.0
        errors.report("kserve", "made-up-0", ServingError(Code.MODEL_NAME_MISSING))
    assert "Rejected 4980 more client requests" in caplog.records[MAX_LINES].getMessage()
    assert len(errors._seen) <= MAX_KEYS


def test_a_bytes_tensor_of_millions_of_elements_is_refused_before_any_loop() -> None:
    from engine.errors import ServingError
    from engine.frontend.tensor import MAX_BYTES_ELEMENTS, make_tensor

    count = MAX_BYTES_ELEMENTS * 4
    with pytest.raises(ServingError, match=rf"{count} BYTES elements, more than the limit.*input name: s"):
        make_tensor("s", "BYTES", [count], raw=b"\0\0\0\0" * count)  # all empty strings: 16 MiB of prefixes
    ok = make_tensor("s", "BYTES", [2], raw=b"\1\0\0\0a\0\0\0\0")
    assert ok.data.tolist() == [b"a", b""]
