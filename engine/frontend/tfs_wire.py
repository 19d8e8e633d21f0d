"""PredictRequest bytes → the message without its inputs, plus each input's TensorProto still encoded, as views.

As kserve_wire.py does for KServe: protobuf parses only the small rest on the event loop, and each TensorProto is
scanned and its values decoded later in a decoder thread (`tensor()`), with tensor_content left a zero-copy view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ..errors import Code, ServingError
from ..safe_text import safe
from . import wire
from .generated.tensorflow.core.framework import tensor_pb2
from .generated.tensorflow_serving.apis import predict_pb2
from .tensor import MAX_BYTES_ELEMENTS

_INPUTS = predict_pb2.PredictRequest.DESCRIPTOR.fields_by_name["inputs"].number
_KEY, _VALUE = 1, 2  # a map entry's fields
_TENSOR = tensor_pb2.TensorProto.DESCRIPTOR
_CONTENT = _TENSOR.fields_by_name["tensor_content"].number
_VALUE_FIELDS = frozenset(  # tensor_content and every typed *_val: what the scan leaves out of protobuf's parse
    [_CONTENT] + [f.number for f in _TENSOR.fields if f.is_repeated and f.message_type is None]
)


@dataclass(frozen=True)
class Predict:
    message: predict_pb2.PredictRequest  # every field but its inputs
    inputs: tuple[tuple[str, memoryview | bytes], ...]  # each input's name and encoded TensorProto, in wire order
    size: int  # bytes on the wire (protobuf's ByteSize would re-serialize: slow for big requests)
    malformed: str | None = None  # not a PredictRequest: answered INVALID_ARGUMENT by the handler, not UNKNOWN

    @property
    def model_spec(self) -> Any:
        return self.message.model_spec


def parse(data: bytes) -> Predict:
    """The deserializer of Predict: walks the top-level fields and each map entry's, never a tensor's values."""
    try:
        rest, found = wire.split(data, (_INPUTS,))
        message = predict_pb2.PredictRequest.FromString(rest)
        inputs: dict[str, memoryview | bytes] = {}
        for field in found:
            if field.kind != wire.BYTES:  # a wire type that does not fit: protobuf keeps it as an unknown field
                continue
            other, entry = wire.split(field.data, (_KEY, _VALUE))
            if other or any(f.kind != wire.BYTES for f in entry):  # protobuf files such an entry as unknown
                continue
            key = wire.last(entry, _KEY)
            try:
                name = bytes(key).decode() if key is not None else ""
            except UnicodeDecodeError:
                raise wire.Malformed("an input name is not valid UTF-8") from None
            inputs.pop(name, None)  # a repeated key: the last entry wins, in its own place
            inputs[name] = wire.joined(entry, _VALUE) or b""
        return Predict(message, tuple(inputs.items()), len(data))
    except (DecodeError, wire.Malformed) as exc:  # raised here it would reach the client as UNKNOWN
        return Predict(predict_pb2.PredictRequest(), (), len(data), malformed=str(exc) or "cannot be parsed")


@dataclass(frozen=True)
class Scanned:
    """A TensorProto as scanned: protobuf parsed the dtype and shape; the values are still encoded."""

    name: str
    proto: tensor_pb2.TensorProto  # without tensor_content or any *_val
    content: memoryview | None  # tensor_content
    fields: list[wire.Field]

    def values(self, field: str) -> np.ndarray | list[bytes]:
        try:
            return wire.repeated(self.fields, _TENSOR.fields_by_name[field])
        except wire.Malformed as exc:
            raise _malformed(self.name, exc) from None


def tensor(name: str, encoded: memoryview | bytes) -> Scanned:
    try:
        rest, fields = wire.split(encoded, _VALUE_FIELDS, limit=MAX_BYTES_ELEMENTS + 64)
        proto = tensor_pb2.TensorProto.FromString(rest)
    except (DecodeError, wire.Malformed) as exc:
        raise _malformed(name, exc) from None
    return Scanned(name, proto, wire.last(fields, _CONTENT), fields)


def _malformed(name: str, exc: Exception) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, f"the input is not a valid TensorProto: {exc}; input name: {safe(name)}")
