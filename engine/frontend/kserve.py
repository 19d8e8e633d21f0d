"""KServe v2 gRPC (`inference.GRPCInferenceService`) as tritonclient and perf_analyzer speak it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from .. import __version__
from ..errors import Code, ServingError
from ..safe_text import safe
from ..status import State
from ..tensors import KSERVE_TO_NUMPY, TensorSpec
from . import codec, kserve_wire, offload, stream
from .dataplane import DataPlane, Tensor, parse_version
from .generated.inference import grpc_service_pb2 as pb
from .generated.inference import grpc_service_pb2_grpc as pb_grpc
from .generated.inference import model_config_pb2 as mc
from .grpc_errors import guarded
from .registration import GenericOnly
from .routing_wire import labels_note, route_key
from .tensor import make_tensor

SERVER_NAME = "hotserve"


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def _config_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    api = "kserve"

    def __init__(self, plane: DataPlane, streams: stream.Streams) -> None:
        self.plane = plane
        self.streams = streams

    @guarded
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @guarded
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready and not self.plane.draining)  # as health says

    @guarded
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=["model_repository(read-only)"]
        )

    @guarded
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, parse_version(request.version)))

    @guarded
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.plane.metadata(request.name, parse_version(request.version))
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=[str(v) for v in meta.versions],
            platform="OpenVINO",
            inputs=[_tensor_metadata(s) for s in meta.inputs],
            outputs=[_tensor_metadata(s) for s in meta.outputs],
        )

    @guarded
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        meta = self.plane.metadata(request.name, parse_version(request.version))
        config = mc.ModelConfig(
            name=meta.name,
            platform="openvino",
            backend="openvino",
            max_batch_size=0,  # dims below include the batch axis, as the model declares it
            input=[
                mc.ModelInput(name=s.name, data_type=_config_type(s.datatype), dims=list(s.shape)) for s in meta.inputs
            ],
            output=[
                mc.ModelOutput(name=s.name, data_type=_config_type(s.datatype), dims=list(s.shape))
                for s in meta.outputs
            ],
        )
        return pb.ModelConfigResponse(config=config)

    @guarded
    async def ModelInfer(self, wire: kserve_wire.InferRequest, context: Any) -> pb.ModelInferResponse:
        return await self.infer_one(wire, context)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[kserve_wire.InferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for response in stream.serve(requests, lambda wire: self.infer_one(wire, context), self.streams):
            yield response

    async def infer_one(self, wire: kserve_wire.InferRequest, context: Any) -> pb.ModelInferResponse:
        """One ModelInferRequest answered (ModelInfer, and each message of ModelStreamInfer: the stream's context,
        whose metadata may carry the routing key)."""
        if wire.malformed is not None:
            raise ServingError(Code.INVALID_ARGUMENT, f"the request is not a valid ModelInferRequest: {wire.malformed}")
        request = wire.message
        inputs = await offload.decode(wire.size, _decode_inputs, wire)
        outputs = [o.name for o in request.outputs]
        version = parse_version(request.model_version)
        key = route_key(request.parameters, context, not version and self.plane.routed(request.model_name))
        version, results = await self.plane.infer(request.model_name, version, inputs, outputs, route_key=key)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=str(version), id=request.id)
        for tensor in results:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(codec.encode(tensor.data))
        return response

    @guarded
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for view in self.plane.models():
            if not view.versions:
                response.models.add(name=view.name, version="", state="UNAVAILABLE", reason=view.error or "no version")
            for status in view.versions:
                ready = status.state == State.AVAILABLE
                if request.ready and not ready:
                    continue
                reason = status.error_message if status.error_message != "OK" else view.error or ""
                if ready:  # a served version's reason says how it was compiled (for `hotserve status`)
                    reason = f"cache: {status.cache}" + ("; loaded from cache" if status.loaded_from_cache else "")
                reason += labels_note(view.labels(status.version), view.pending_labels(status.version))
                response.models.add(
                    name=view.name,
                    version=str(status.version),
                    state="READY" if ready else status.state.name,
                    reason=reason,
                )
        return response

    @guarded
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        names = [request.name] if request.name else [v.name for v in self.plane.models()]
        wanted = parse_version(request.version)
        if isinstance(wanted, str):
            if not request.name:
                raise ServingError(Code.INVALID_ARGUMENT, f"version label {wanted} needs a model name")
            wanted = self.plane.slot(request.name, wanted)[0]  # a label: the version it serves now
        response = pb.ModelStatisticsResponse()
        for name in names:
            for number, slot in sorted(self.plane.registry.model(name).slots.items()):
                if wanted and number != wanted:
                    continue
                stats = slot.stats
                entry = response.model_stats.add(
                    name=name,
                    version=str(number),
                    last_inference=stats.last_inference_ms,
                    inference_count=stats.success,
                    execution_count=stats.executions,
                )
                entry.inference_stats.success.count = stats.success
                entry.inference_stats.success.ns = stats.success_ns
                entry.inference_stats.fail.count = stats.failure
                entry.inference_stats.fail.ns = stats.failure_ns
                entry.inference_stats.compute_infer.count = stats.success
                entry.inference_stats.compute_infer.ns = stats.success_ns
        return response

    @guarded
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        raise ServingError(Code.CONFIG_FROM_FILE_ONLY, "add the model to models.json to load it")

    @guarded
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        raise ServingError(Code.CONFIG_FROM_FILE_ONLY, "remove the model from models.json to unload it")


def _decode_inputs(wire: kserve_wire.InferRequest) -> list[Tensor]:
    request, raw = wire.message, wire.raw
    if raw and any(c is not None for c in wire.contents):
        raise ServingError(Code.INVALID_MESSAGE_STRUCTURE)
    if raw and len(raw) != len(request.inputs):
        raise ServingError(
            Code.INVALID_MESSAGE_STRUCTURE,
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs",
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        if raw:
            tensors.append(make_tensor(tensor.name, tensor.datatype, tensor.shape, raw=raw[i]))
            continue
        field = codec.CONTENTS_FIELD.get(tensor.datatype)
        if field is None and tensor.datatype in KSERVE_TO_NUMPY:
            raise ServingError(
                Code.INVALID_MESSAGE_STRUCTURE,
                f"{tensor.datatype} must be sent in raw_input_contents; input name: {safe(tensor.name)}",
            )
        values = kserve_wire.typed(tensor.name, wire.contents[i], field) if field else []
        tensors.append(make_tensor(tensor.name, tensor.datatype, tensor.shape, values=values))
    return tensors


def register(server: GenericOnly, plane: DataPlane, streams: stream.Streams) -> str:
    servicer = KServeServicer(plane, streams)
    infer = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=kserve_wire.parse,  # raw contents stay views into the received bytes
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    streamed = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=kserve_wire.parse,
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    replaced = {"ModelInfer": infer, "ModelStreamInfer": streamed}
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server.replacing(replaced))
    return pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
