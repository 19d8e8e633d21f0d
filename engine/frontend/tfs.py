"""TF Serving gRPC API as ovmsclient and perf_analyzer (`--service-kind tfserving`) speak it: messages ⇄ dataplane.

PredictionService: Predict, GetModelMetadata. ModelService: GetModelStatus, HandleReloadConfigRequest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from ..errors import Code, ServingError
from ..safe_text import safe
from ..status import ErrorCode
from ..tensors import TensorSpec
from . import codec, offload, tfs_wire
from .dataplane import DataPlane, Tensor, Version
from .generated.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from .generated.tensorflow.core.protobuf import meta_graph_pb2
from .generated.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)
from .grpc_errors import guarded
from .registration import GenericOnly
from .routing_wire import metadata_key
from .tensor import make_tensor

SIGNATURE = "serving_default"
_TF_TO_KSERVE = {
    "DT_FLOAT": "FP32", "DT_DOUBLE": "FP64", "DT_HALF": "FP16",
    "DT_INT8": "INT8", "DT_INT16": "INT16", "DT_INT32": "INT32", "DT_INT64": "INT64",
    "DT_UINT8": "UINT8", "DT_UINT16": "UINT16", "DT_UINT32": "UINT32", "DT_UINT64": "UINT64",
    "DT_BOOL": "BOOL", "DT_STRING": "BYTES",
}  # fmt: skip
# BF16 has no numpy type to carry a request, but a model's metadata may still declare it.
_KSERVE_TO_TF = {**{v: types_pb2.DataType.Value(k) for k, v in _TF_TO_KSERVE.items()}, "BF16": types_pb2.DT_BFLOAT16}
# The typed field that carries each datatype when tensor_content is empty (TF's tensor.proto comments).
_VALUES = {
    "FP32": "float_val", "FP64": "double_val", "INT64": "int64_val", "BOOL": "bool_val", "BYTES": "string_val",
    "INT8": "int_val", "INT16": "int_val", "INT32": "int_val", "UINT8": "int_val", "UINT16": "int_val",
    "UINT32": "uint32_val", "UINT64": "uint64_val", "FP16": "half_val",
}  # fmt: skip


def _version(spec: Any) -> Version:
    """ModelSpec's version number, or its version_label (None: the default version, or drawn by traffic)."""
    if spec.HasField("version"):
        return spec.version.value or None
    return spec.version_label or None


def datatype_of(dtype: int, name: str) -> str:
    """TF DataType → KServe datatype, or INVALID_PRECISION naming the input."""
    dtype_name = types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype)
    datatype = _TF_TO_KSERVE.get(dtype_name)
    if datatype is None:
        raise ServingError(Code.INVALID_PRECISION, f"Unsupported dtype {dtype_name}; input name: {safe(name)}")
    return datatype


def decode(name: str, encoded: memoryview | bytes) -> Tensor:
    """tensor_content (raw, zero-copy) or the typed *_val field; the value count must match the shape exactly."""
    scanned = tfs_wire.tensor(name, encoded)
    datatype = datatype_of(scanned.proto.dtype, name)
    shape = [d.size for d in scanned.proto.tensor_shape.dim]
    content = scanned.content
    if content:
        if datatype == "BYTES":
            raise ServingError(
                Code.INVALID_CONTENT_SIZE,
                f"DT_STRING must be sent in string_val, not tensor_content; input name: {safe(name)}",
            )
        return make_tensor(name, datatype, shape, raw=content)
    return make_tensor(name, datatype, shape, values=scanned.values(_VALUES[datatype]), half_bits=datatype == "FP16")


def _decode_all(inputs: Sequence[tuple[str, memoryview | bytes]]) -> list[Tensor]:
    return [decode(name, encoded) for name, encoded in inputs]


def encode(tensor: Tensor) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=_KSERVE_TO_TF[tensor.datatype])
    proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in tensor.shape)
    if tensor.datatype == "BYTES":
        proto.string_val.extend(x if isinstance(x, bytes) else str(x).encode() for x in tensor.data.reshape(-1))
    else:
        proto.tensor_content = codec.encode(tensor.data)  # served outputs are their bytes already: no copy
    return proto


def _tensor_info(spec: TensorSpec) -> meta_graph_pb2.TensorInfo:
    info = meta_graph_pb2.TensorInfo(name=spec.name, dtype=_KSERVE_TO_TF.get(spec.datatype, 0))
    info.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in spec.shape)
    return info


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    api = "tfs"

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @guarded
    async def Predict(self, sized: tfs_wire.Predict, context: Any) -> predict_pb2.PredictResponse:
        if sized.malformed is not None:
            raise ServingError(Code.INVALID_ARGUMENT, f"the request is not a valid PredictRequest: {sized.malformed}")
        request = sized.message
        if not request.HasField("model_spec"):
            raise ServingError(Code.MODEL_SPEC_MISSING)
        spec = request.model_spec
        inputs = await offload.decode(sized.size, _decode_all, sized.inputs)
        version = _version(spec)
        key = metadata_key(context) if not version and self.plane.routed(spec.name) else None
        version, outputs = await self.plane.infer(
            spec.name, version, inputs, list(request.output_filter), api="tfs", route_key=key
        )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        for tensor in outputs:
            response.outputs[tensor.name].CopyFrom(encode(tensor))
        return response

    @guarded
    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: Any
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise ServingError(Code.MODEL_SPEC_MISSING)
        if list(request.metadata_field) != ["signature_def"]:
            raise ServingError(Code.INVALID_SIGNATURE_DEF)
        meta = self.plane.metadata(request.model_spec.name, _version(request.model_spec))
        signature = meta_graph_pb2.SignatureDef(method_name="")
        for spec in meta.inputs:
            signature.inputs[spec.name].CopyFrom(_tensor_info(spec))
        for spec in meta.outputs:
            signature.outputs[spec.name].CopyFrom(_tensor_info(spec))
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def[SIGNATURE].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = meta.name
        response.model_spec.version.value = meta.version
        response.metadata["signature_def"].Pack(signatures)  # type_url: type.googleapis.com/tensorflow.serving.…
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    api = "tfs"

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @guarded
    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: Any
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        response = get_model_status_pb2.GetModelStatusResponse()
        for status in self.plane.version_status(spec.name, _version(spec)):
            entry = response.model_version_status.add(version=status.version, state=int(status.state))
            entry.status.error_code = int(status.error_code)
            entry.status.error_message = status.error_message
        return response

    @guarded
    async def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: Any
    ) -> model_management_pb2.ReloadConfigResponse:
        if request.HasField("config") and request.config.WhichOneof("config") is not None:
            raise ServingError(Code.CONFIG_FROM_FILE_ONLY, "a ReloadConfigRequest must not carry a config")
        result = await self.plane.reload()
        response = model_management_pb2.ReloadConfigResponse()
        if not result.ok:
            code = ErrorCode.UNKNOWN if result.config_valid else ErrorCode.FAILED_PRECONDITION
            response.status.error_code = int(code)  # load errors / an invalid file (nothing applied)
            response.status.error_message = "; ".join(result.errors)
        return response


def register(server: GenericOnly, plane: DataPlane) -> list[str]:
    servicer = PredictionServicer(plane)
    predict = grpc.unary_unary_rpc_method_handler(
        servicer.Predict,
        request_deserializer=tfs_wire.parse,  # tensor contents stay views into the received bytes
        response_serializer=predict_pb2.PredictResponse.SerializeToString,
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        servicer, server.replacing({"Predict": predict})
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(plane), server)
    # importing the services' own pb2 modules also puts their descriptors where reflection looks
    return [
        prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
        model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    ]
