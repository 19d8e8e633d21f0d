"""Run by tests/test_registration.py in a fresh interpreter (the server's KServe protos clash with tritonclient's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from engine.frontend import kserve_wire, tfs_wire
from engine.server import Server
from engine.settings import Settings


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_every_service_is_generic_only_with_our_deserializers(tmp_path: Path) -> None:
    """No method is a grpc.aio *registered* one (each costs an asyncio.wait entry on every call); every service
    still answers, and the swapped methods keep our wire scanners."""
    config = tmp_path / "models.json"
    config.write_text('{"model_config_list": []}')
    server = grpc.aio.server()
    registered: list[str] = []
    generic: list[Any] = []
    real = server.add_generic_rpc_handlers
    server.add_registered_method_handlers = lambda service, handlers: registered.append(service)  # type: ignore[method-assign]
    server.add_generic_rpc_handlers = lambda handlers: (generic.extend(handlers), real(handlers))  # type: ignore[method-assign, func-returns-value]
    Server(Settings(config_path=config))._register_services(server)
    assert registered == []

    def handler(method: str) -> Any:
        found = [h for h in (g.service(Details(method)) for g in generic) if h is not None]
        assert found, method
        return found[0]

    assert handler("/inference.GRPCInferenceService/ModelInfer").request_deserializer is kserve_wire.parse
    assert handler("/inference.GRPCInferenceService/ModelStreamInfer").request_deserializer is kserve_wire.parse
    assert handler("/tensorflow.serving.PredictionService/Predict").request_deserializer is tfs_wire.parse
    others = [
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/RepositoryIndex",
        "/tensorflow.serving.PredictionService/GetModelMetadata",
        "/tensorflow.serving.ModelService/GetModelStatus",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    for method in others:
        handler(method)
