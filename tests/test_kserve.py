"""KServe v2 over gRPC with the real tritonclient against a real server process (issue 2)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ROOT, model_entry
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    modelgen.add_const(root / "dummy" / "1", delta=1.0)
    modelgen.add_const(root / "int32" / "1", delta=3, dtype=np.int32)
    modelgen.add_const(root / "fp16" / "1", delta=0.5, dtype=np.float16)
    modelgen.two_inputs(root / "two" / "1")
    modelgen.add_const(root / "versions" / "1", delta=1.0)
    modelgen.add_const(root / "versions" / "2", delta=2.0)
    modelgen.add_const(root / "versions" / "3", delta=3.0)
    modelgen.onnx_add_const(root / "onnx" / "1", delta=5.0)
    modelgen.add_const(root / "dynamic" / "1", shape=(-1, 10))
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.xml").write_text("<net>this is not an IR</net>")
    (broken / "model.bin").write_bytes(b"\0" * 8)
    return root


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from conftest import ServerProcess

    tmp = tmp_path_factory.mktemp("srv")
    config = {
        "model_config_list": [
            model_entry("dummy", models / "dummy"),
            model_entry("int32", models / "int32"),
            model_entry("fp16", models / "fp16"),
            model_entry("two", models / "two"),
            model_entry("onnx", models / "onnx"),
            model_entry("dynamic", models / "dynamic"),
            model_entry("latest", models / "versions"),
            model_entry("all", models / "versions", model_version_policy={"all": {}}),
            model_entry("specific", models / "versions", model_version_policy={"specific": {"versions": [1, 3, 7]}}),
            model_entry("broken", models / "broken"),
            model_entry("nobase", models / "does-not-exist"),
        ]
    }
    path = tmp / "models.json"
    import json

    path.write_text(json.dumps(config))
    proc = ServerProcess(
        ["--config_path", str(path), "--port", "0"], tmp_path_factory.mktemp("logs") / "server.log"
    ).wait_ready()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> grpcclient.InferenceServerClient:  # type: ignore[no-untyped-def]
    return grpcclient.InferenceServerClient(server.address)


def infer(client, model: str, arrays: dict[str, np.ndarray], version: str = "", outputs=None, request_id: str = ""):  # type: ignore[no-untyped-def]
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), _datatype(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    return client.infer(model, inputs, model_version=version, outputs=requested, request_id=request_id)


def _datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def error_of(call) -> InferenceServerException:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# ---- server and model status ----
def test_live_ready_and_server_metadata(client) -> None:  # type: ignore[no-untyped-def]
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().name == "hotserve"


def test_model_ready_variants(client) -> None:  # type: ignore[no-untyped-def]
    assert client.is_model_ready("dummy")
    assert client.is_model_ready("dummy", "1")
    err = error_of(lambda: client.is_model_ready("dummy", "abc"))  # a name is a version label: none is defined
    assert err.status() == "StatusCode.NOT_FOUND"
    assert err.message() == "Model with requested version label is not found - label: abc"
    err = error_of(lambda: client.is_model_ready("dummy", "a/b"))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "invalid model version format in request - a/b is neither a version number nor" in err.message()
    err = error_of(lambda: client.is_model_ready("dummy", "7"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "Model with requested version is not found" in err.message()
    err = error_of(lambda: client.is_model_ready("nope"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "Model with requested name is not found" in err.message()


def test_model_metadata(client) -> None:  # type: ignore[no-untyped-def]
    meta = client.get_model_metadata("dummy", as_json=True)
    assert meta["name"] == "dummy"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "OpenVINO"
    assert meta["inputs"] == [{"name": "b", "datatype": "FP32", "shape": ["1", "10"]}]
    assert meta["outputs"] == [{"name": "a", "datatype": "FP32", "shape": ["1", "10"]}]
    dyn = client.get_model_metadata("dynamic", as_json=True)
    assert dyn["inputs"][0]["shape"] == ["-1", "10"]


def test_model_config_for_perf_analyzer(client) -> None:  # type: ignore[no-untyped-def]
    config = client.get_model_config("two", as_json=True)["config"]
    assert config["name"] == "two"
    assert [i["name"] for i in config["input"]] == ["x", "y"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == ["1", "4"]


# ---- numerics ----
def test_fp32_numerics(client) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32)
    result = infer(client, "dummy", {"b": x}, request_id="req-42")
    np.testing.assert_allclose(result.as_numpy("a"), x + 1, rtol=1e-6)
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_version == "1"
    assert response.model_name == "dummy"


def test_int32_and_fp16_numerics(client) -> None:  # type: ignore[no-untyped-def]
    x = np.arange(10, dtype=np.int32).reshape(1, 10)
    np.testing.assert_array_equal(infer(client, "int32", {"b": x}).as_numpy("a"), x + 3)
    h = np.linspace(-2, 2, 10, dtype=np.float16).reshape(1, 10)
    out = infer(client, "fp16", {"b": h}).as_numpy("a")
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, h + np.float16(0.5), rtol=1e-3)


def test_onnx_model(client) -> None:  # type: ignore[no-untyped-def]
    x = np.ones((1, 10), np.float32)
    np.testing.assert_allclose(infer(client, "onnx", {"b": x}).as_numpy("a"), x + 5)


def test_dynamic_batch(client) -> None:  # type: ignore[no-untyped-def]
    x = np.ones((3, 10), np.float32)
    np.testing.assert_allclose(infer(client, "dynamic", {"b": x}).as_numpy("a"), x + 1)


def test_two_inputs_and_requested_outputs(client) -> None:  # type: ignore[no-untyped-def]
    x = np.array([[1, 2, 3, 4]], np.float32)
    y = np.array([[4, 3, 2, 1]], np.float32)
    both = infer(client, "two", {"x": x, "y": y})
    np.testing.assert_allclose(both.as_numpy("sum"), x + y)
    np.testing.assert_allclose(both.as_numpy("diff"), x - y)
    only = infer(client, "two", {"x": x, "y": y}, outputs=["diff"])
    response = only.get_response()
    assert [o.name for o in response.outputs] == ["diff"]
    np.testing.assert_allclose(only.as_numpy("diff"), x - y)
    assert only.as_numpy("sum") is None
    err = error_of(lambda: infer(client, "two", {"x": x, "y": y}, outputs=["nope"]))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"


# ---- validation errors (OVMS messages) ----
@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"b": np.ones((1, 5), np.float32)}, "Invalid input shape - Expected: (1,10); Actual: (1,5); input name: b"),
        ({"b": np.ones((2, 10), np.float32)}, "Invalid input batch size - Expected: 1; Actual: 2; input name: b"),
        ({"b": np.ones((1, 10), np.int32)}, "Invalid input precision - Expected: FP32; Actual: INT32; input name: b"),
        (
            {"b": np.ones((1, 10), np.float32), "c": np.ones((1, 10), np.float32)},
            "Invalid number of inputs - Expected: 1; Actual: 2",
        ),
        ({"x": np.ones((1, 10), np.float32)}, "Missing input with specific name - Required input: b"),
        (
            {"b": np.ones((1, 10, 1), np.float32)},
            "Invalid number of shape dimensions - Expected: (1,10); Actual: (1,10,1); input name: b",
        ),
    ],
)
def test_invalid_requests(client, arrays: dict[str, np.ndarray], message: str) -> None:  # type: ignore[no-untyped-def]
    err = error_of(lambda: infer(client, "dummy", arrays))
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in err.message()


def _raw_stub(server):  # type: ignore[no-untyped-def]
    from tritonclient.grpc import service_pb2_grpc

    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))


def test_typed_contents_and_mixed_contents(server) -> None:  # type: ignore[no-untyped-def]
    stub = _raw_stub(server)
    request = service_pb2.ModelInferRequest(model_name="dummy")
    tensor = request.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    tensor.contents.fp32_contents.extend([float(i) for i in range(10)])
    response = stub.ModelInfer(request)
    out = np.frombuffer(response.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(out, np.arange(10) + 1)
    request.raw_input_contents.append(np.zeros(10, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in caught.value.details()


def test_raw_content_of_wrong_size(server) -> None:  # type: ignore[no-untyped-def]
    stub = _raw_stub(server)
    request = service_pb2.ModelInferRequest(model_name="dummy")
    request.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    request.raw_input_contents.append(b"\0" * 12)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Invalid content size" in caught.value.details()


def test_repository_load_unload_refused(client) -> None:  # type: ignore[no-untyped-def]
    err = error_of(lambda: client.load_model("dummy"))
    assert err.status() == "StatusCode.FAILED_PRECONDITION"
    err = error_of(lambda: client.unload_model("dummy"))
    assert err.status() == "StatusCode.FAILED_PRECONDITION"


def test_missing_model_and_version(client) -> None:  # type: ignore[no-untyped-def]
    x = np.ones((1, 10), np.float32)
    err = error_of(lambda: infer(client, "nope", {"b": x}))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "Model with requested name is not found" in err.message()
    err = error_of(lambda: infer(client, "dummy", {"b": x}, version="5"))
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "Model with requested version is not found" in err.message()
    err = error_of(lambda: infer(client, "nobase", {"b": x}))
    assert err.status() == "StatusCode.NOT_FOUND"


# ---- versions ----
def test_version_policies(client) -> None:  # type: ignore[no-untyped-def]
    x = np.zeros((1, 10), np.float32)
    # latest 1 (default): only v3 served; requests without a version get it
    assert infer(client, "latest", {"b": x}).as_numpy("a")[0, 0] == 3
    err = error_of(lambda: infer(client, "latest", {"b": x}, version="1"))
    assert "Model with requested version is not found" in err.message()
    # all: every version, and the default is the highest
    for v in (1, 2, 3):
        assert infer(client, "all", {"b": x}, version=str(v)).as_numpy("a")[0, 0] == v
    assert client.get_model_metadata("all", as_json=True)["versions"] == ["1", "2", "3"]
    # specific [1, 3, 7]: the intersection {1, 3}
    assert client.get_model_metadata("specific", as_json=True)["versions"] == ["1", "3"]


def test_failed_model_next_to_working_ones(client, server) -> None:  # type: ignore[no-untyped-def]
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    broken = index[("broken", "1")]
    assert broken.state == "LOADING"
    assert broken.reason and broken.reason != "OK"
    assert index[("dummy", "1")].state == "READY"
    err = error_of(lambda: infer(client, "broken", {"b": np.ones((1, 10), np.float32)}, version="1"))
    assert err.status() == "StatusCode.UNAVAILABLE"
    assert "Model with requested version is not loaded yet" in err.message()
    assert "Error occurred while loading model: broken; version: 1" in server.log
    change = 'STATUS CHANGE: Version 1 of model dummy status change. New status: ( "state": "AVAILABLE", '
    assert change + '"error_code": "OK" )' in server.log
    assert "Directory does not exist" in server.log


def test_statistics_count_requests(client) -> None:  # type: ignore[no-untyped-def]
    before = client.get_inference_statistics("int32", as_json=True)["model_stats"][0]
    infer(client, "int32", {"b": np.zeros((1, 10), np.int32)})
    after = client.get_inference_statistics("int32", as_json=True)["model_stats"][0]
    assert (
        int(after["inference_stats"]["success"]["count"])
        == int(before["inference_stats"]["success"].get("count", 0)) + 1
    )
    assert int(after.get("execution_count", 0)) == int(before.get("execution_count", 0)) + 1  # unbatched: one each


# ---- start-up and shutdown ----
def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_invalid_config_at_startup_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text('{"model_config_list": [{"config": {"name": "m", "nireq": -1}}]}')
    result = run_cli("serve", "--config_path", str(path), "--port", "0")
    assert result.returncode == 1
    assert "/model_config_list/0/config/nireq" in result.stderr
    assert str(path) in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "0"],
        ["--config_path", "x.json", "--nireq", "2"],
        ["--config_path", "x.json", "--port", "8080", "--rest_port", "8080"],
        ["--config_path", "x.json", "--log_level", "WRONG"],
        ["--config_path", "x.json", "--grpc_workers", "0"],
        ["--config_path", "x.json", "--model_name", "m", "--model_path", "p"],
        ["--config_path", "x.json", "--no_such_flag"],
        ["--model_name", "m", "--model_path", "p", "--shape", "(1,x)"],
        ["--model_name", "m", "--model_path", "p", "--nireq", "100001"],
    ],
)
def test_bad_usage_exits_64(args: list[str]) -> None:
    result = run_cli("serve", *args)
    assert result.returncode == 64, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_all_models_failing_still_starts(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "m" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"garbage")
    server = serve({"model_config_list": [model_entry("m", tmp_path / "m")]})
    client = grpcclient.InferenceServerClient(server.address)
    assert client.is_server_ready()
    assert not client.is_model_ready("m", "1")


def test_single_model_mode(serve, models: Path) -> None:  # type: ignore[no-untyped-def]
    server = serve(None, "--model_name", "solo", "--model_path", str(models / "versions"))
    client = grpcclient.InferenceServerClient(server.address)
    assert infer(client, "solo", {"b": np.zeros((1, 10), np.float32)}).as_numpy("a")[0, 0] == 3


def test_graceful_shutdown_finishes_in_flight_requests(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    modelgen.conv(tmp_path / "conv" / "1")
    server = serve({"model_config_list": [model_entry("conv", tmp_path / "conv", nireq=1)]})
    client = grpcclient.InferenceServerClient(server.address)
    assert client.is_model_ready("conv")
    x = np.ones((1, 3, 224, 224), np.float32)
    results: list[object] = []

    def run() -> None:
        try:
            results.append(infer(client, "conv", {"input": x}).as_numpy("output"))
        except Exception as exc:  # recorded and asserted below
            results.append(exc)

    workers = [threading.Thread(target=run) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.2)  # all four RPCs have arrived; with one infer request they run one after another
    server.signal(signal.SIGTERM)
    for worker in workers:
        worker.join(30)
    assert server.proc.wait(30) == 0
    assert len(results) == 4
    assert all(isinstance(r, np.ndarray) and r.shape == (1, 128) for r in results), results
    assert "Shutdown complete" in server.log


def test_default_config_serves_out_of_the_box(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(ROOT / "configs" / "models.json")
    client = grpcclient.InferenceServerClient(server.address)
    x = np.zeros((1, 10), np.float32)
    np.testing.assert_allclose(infer(client, "dummy", {"b": x}).as_numpy("a"), x + 1)


def test_busy_port_fails_clearly(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = serve(ROOT / "configs" / "models.json")
    result = run_cli(
        "serve",
        "--config_path",
        str(ROOT / "configs" / "models.json"),
        "--port",
        str(first.port),
        "--grpc_bind_address",
        "127.0.0.1",
    )
    assert result.returncode != 0
    assert "port" in result.stderr.lower()


def test_cancelled_request_does_not_break_the_next_ones(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    modelgen.conv(tmp_path / "conv" / "1")
    server = serve({"model_config_list": [model_entry("conv", tmp_path / "conv", nireq=1)]})
    client = grpcclient.InferenceServerClient(server.address)
    x = np.ones((1, 3, 224, 224), np.float32)
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    expected = client.infer("conv", [tensor]).as_numpy("output")
    for _ in range(3):  # the client gives up while its inference runs on the only infer request
        with pytest.raises(InferenceServerException, match="Deadline Exceeded"):
            client.infer("conv", [tensor], client_timeout=0.001)
    for _ in range(3):
        np.testing.assert_allclose(client.infer("conv", [tensor]).as_numpy("output"), expected, rtol=1e-5)
    assert "busy" not in server.log.lower()


def test_many_concurrent_requests_each_get_their_own_answer(server) -> None:  # type: ignore[no-untyped-def]
    """Past the switch to inline inference, with inputs wrapped in place and outputs copied once: no answer is
    another request's (nor a reused buffer's), over KServe and with a dynamic model whose shape changes."""
    import asyncio

    def request(model: str, x: np.ndarray) -> service_pb2.ModelInferRequest:
        message = service_pb2.ModelInferRequest(model_name=model)
        message.inputs.add(name="b", datatype="FP32", shape=list(x.shape))
        message.raw_input_contents.append(x.tobytes())
        return message

    async def run() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
            cases = [("dummy", np.full((1, 10), i, np.float32)) for i in range(200)]
            cases += [("dynamic", np.full((1 + i % 3, 10), i, np.float32)) for i in range(60)]
            for start in range(0, len(cases), 40):
                batch = cases[start : start + 40]
                replies = await asyncio.gather(*(infer(request(m, x)) for m, x in batch))
                for (_, x), reply in zip(batch, replies, strict=True):
                    got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(tuple(reply.outputs[0].shape))
                    np.testing.assert_array_equal(got, x + 1)

    asyncio.run(run())
