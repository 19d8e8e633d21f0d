"""grpc.health.v1 (overall and per model, as Kubernetes gRPC probes ask) and server reflection (issue 6)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import modelgen
import pytest
from conftest import model_entry
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from engine.frontend.dataplane import DataPlane
from engine.frontend.health import Health
from engine.frontend.receive import Deadlines
from engine.frontend.registration import GenericOnly
from engine.registry import Registry
from engine.status import ReloadResult, State, VersionStatus

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
    modelgen.add_const(tmp_path / "dummy" / "1")
    modelgen.add_const(tmp_path / "late" / "1")
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not onnx")
    config = tmp_path / "models.json"
    write(config, [model_entry("dummy", tmp_path / "dummy"), model_entry("broken", tmp_path / "broken")])
    return serve(config), config, tmp_path


def test_health_overall_and_per_model_follows_the_registry(env) -> None:  # type: ignore[no-untyped-def]
    server, config, tmp_path = env
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))

    def status(name: str) -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

    assert status("") == SERVING
    assert status("dummy") == SERVING
    assert status("broken") == NOT_SERVING  # configured, but no AVAILABLE version
    with pytest.raises(grpc.RpcError) as caught:
        status("late")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # never configured
    write(config, [model_entry("late", tmp_path / "late"), model_entry("broken", tmp_path / "broken")])
    wait_until(lambda: status("dummy") == NOT_SERVING, what="removed model NOT_SERVING")
    wait_until(lambda: status("late") == SERVING, what="added model SERVING")
    assert status("") == SERVING


def test_health_list_is_a_snapshot_of_every_name(env) -> None:  # type: ignore[no-untyped-def]
    """grpc.health.v1's List (reflection lists it) answers what Check would for each name, not UNIMPLEMENTED."""
    server, _, _ = env
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert {name: answer.status for name, answer in listed.items()} == {
        "": SERVING,
        "dummy": SERVING,
        "broken": NOT_SERVING,
    }


def test_health_watch_streams_a_change(env) -> None:  # type: ignore[no-untyped-def]
    server, config, tmp_path = env
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="dummy"), timeout=30)
    assert next(stream).status == SERVING
    write(config, [model_entry("broken", tmp_path / "broken")])
    assert next(stream).status == NOT_SERVING
    stream.cancel()


def test_overall_is_not_serving_until_ready_and_after_shutdown() -> None:
    """In process: grpcio's servicer starts out answering "" SERVING; Health must say otherwise before it is ready."""

    async def scenario() -> list[int]:
        async def reload() -> ReloadResult:
            return ReloadResult(True, False)

        async def reshape(name: str, version: int, shapes: dict[str, tuple[int, ...]]) -> None:
            return None

        registry = Registry()
        registry.set_status("m", VersionStatus(1, State.LOADING))
        plane = DataPlane(registry, reload, lambda: None, reshape)
        health = Health(plane)
        server = grpc.aio.server()
        health.register(GenericOnly(server, Deadlines(120.0)))
        port = server.add_insecure_port("127.0.0.1:0")
        await health.start()
        # start() itself must have set it (the server starts gRPC next), not a task that runs later
        seen = [(await health.servicer.Check(health_pb2.HealthCheckRequest(service=""), None)).status]
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def check(name: str) -> int:
                return (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status

            seen += [await check(""), await check("m")]
            plane.ready = True
            await health.sync()
            seen += [await check(""), await check("m")]
            await health.stop()
            seen.append(await check(""))
        await server.stop(None)
        return seen

    assert asyncio.run(scenario()) == [NOT_SERVING, NOT_SERVING, NOT_SERVING, SERVING, NOT_SERVING, NOT_SERVING]


def test_reflection_lists_and_resolves_every_service(env) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = env
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(server.address))
    services = set(database.get_services())
    expected = {
        "inference.GRPCInferenceService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert expected <= services, services
    pool = DescriptorPool(database)  # resolving pulls every file a service needs, transitively, over reflection
    methods = {name: {m.name for m in pool.FindServiceByName(name).methods} for name in expected}
    assert {"Predict", "GetModelMetadata"} <= methods["tensorflow.serving.PredictionService"]
    assert methods["tensorflow.serving.ModelService"] == {"GetModelStatus", "HandleReloadConfigRequest"}
    assert {"ModelInfer", "ModelMetadata", "RepositoryIndex"} <= methods["inference.GRPCInferenceService"]
    assert methods["grpc.health.v1.Health"] >= {"Check", "Watch"}
    predict = pool.FindMessageTypeByName("tensorflow.serving.PredictRequest")
    assert predict.fields_by_name["inputs"].message_type.fields_by_name["value"].message_type.full_name == (
        "tensorflow.TensorProto"
    )
    assert pool.FindMessageTypeByName("tensorflow.serving.SignatureDefMap").fields_by_name["signature_def"]


def test_every_listed_method_reaches_its_handler_over_the_wire(env) -> None:  # type: ignore[no-untyped-def]
    """Every method reflection lists is served (services go onto grpc.aio as generic handlers only): an empty
    request gets the method's own answer, never grpc's "Method not found!", which an unknown method still gets."""
    server, _, _ = env
    channel = grpc.insecure_channel(server.address)
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    missing = "Method not found!"

    def details(path: str, streaming: tuple[bool, bool]) -> str:
        try:
            if streaming == (False, False):
                channel.unary_unary(path)(b"", timeout=10)
            elif streaming == (False, True):
                next(channel.unary_stream(path)(b"", timeout=10))
            else:
                next(channel.stream_stream(path)(iter([b""]), timeout=10), None)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "OK"

    answers = {
        f"/{name}/{m.name}": details(f"/{name}/{m.name}", (m.client_streaming, m.server_streaming))
        for name in database.get_services()
        for m in pool.FindServiceByName(name).methods
    }
    assert len(answers) >= 20, answers
    assert not [path for path, said in answers.items() if missing in said], answers
    assert answers["/tensorflow.serving.ModelService/HandleReloadConfigRequest"] == "OK"
    assert answers["/inference.GRPCInferenceService/ModelInfer"].startswith("NOT_FOUND")  # our handler said so
    for unknown in ["/inference.GRPCInferenceService/Nope", "/nope.Service/ModelInfer"]:
        assert details(unknown, (False, False)) == f"UNIMPLEMENTED: {missing}"
