"""ModelInferRequest bytes → the message without its tensor contents, plus each content still encoded, as views.

Protobuf would copy every raw content and turn typed contents into Python numbers, on the event loop; here only the
small rest is parsed there (see wire.py), and the contents are decoded later in a decoder thread by `typed()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import Code, ServingError
from ..safe_text import safe
from . import wire
from .generated.inference import grpc_service_pb2 as pb
from .tensor import MAX_BYTES_ELEMENTS

_FIELDS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
_INPUTS, _RAW = _FIELDS["inputs"].number, _FIELDS["raw_input_contents"].number
_CONTENTS = pb.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name["contents"].number
_TYPED = pb.InferTensorContents.DESCRIPTOR.fields_by_name


@dataclass(frozen=True)
class InferRequest:
    message: pb.ModelInferRequest  # every field but raw_input_contents and the inputs' contents
    raw: tuple[memoryview, ...]  # views into the received bytes
    contents: tuple[memoryview | bytes | None, ...]  # each input's encoded InferTensorContents, None when absent
    size: int  # bytes on the wire
    malformed: str | None = None  # not a ModelInferRequest: answered INVALID_ARGUMENT by the handler, not UNKNOWN

    @property
    def model_name(self) -> str:
        return self.message.model_name


def parse(data: bytes) -> InferRequest:
    """The deserializer of ModelInfer: walks the top-level fields and each input's, never a content's values."""
    try:
        rest, found = wire.split(data, (_INPUTS, _RAW))
        message = pb.ModelInferRequest.FromString(rest)
        raw: list[memoryview] = []
        contents: list[memoryview | bytes | None] = []
        for field in found:
            if field.kind != wire.BYTES:  # a wire type that does not fit: protobuf keeps it as an unknown field
                continue
            if field.number == _RAW:
                raw.append(field.data)
                continue
            tensor_rest, tensor_found = wire.split(field.data, (_CONTENTS,))
            message.inputs.add().MergeFromString(tensor_rest)
            contents.append(wire.joined(tensor_found, _CONTENTS))
        return InferRequest(message, tuple(raw), tuple(contents), len(data))
    except (DecodeError, wire.Malformed) as exc:  # raised here it would reach the client as UNKNOWN
        return InferRequest(pb.ModelInferRequest(), (), (), len(data), malformed=str(exc) or "cannot be parsed")


def typed(name: str, contents: memoryview | bytes | None, field: str) -> np.ndarray | list[bytes]:
    """Input `name`'s values in the InferTensorContents field its datatype uses, decoded without Python numbers."""
    if contents is None:
        return []
    descriptor = _TYPED[field]
    try:
        _, found = wire.split(contents, (descriptor.number,), limit=MAX_BYTES_ELEMENTS + 64)
        return wire.repeated(found, descriptor)
    except wire.Malformed as exc:
        raise ServingError(
            Code.INVALID_ARGUMENT, f"the contents are not a valid InferTensorContents: {exc}; input name: {safe(name)}"
        ) from None
