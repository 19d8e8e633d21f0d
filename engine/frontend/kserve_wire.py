"""ModelInferRequest bytes → the message without its raw contents, plus each raw content as a zero-copy view.

Parsing a 200 MB request with protobuf copies every raw content into a new bytes object while holding the GIL
(≈0.5 s that no other client gets served); scanning the top-level fields finds the raw contents' spans instead, and
only the small rest is parsed by protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from .generated.inference import grpc_service_pb2 as pb

_RAW_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


@dataclass(frozen=True)
class InferRequest:
    message: pb.ModelInferRequest  # every field but raw_input_contents
    raw: tuple[memoryview, ...]  # views into the received bytes
    size: int  # bytes on the wire
    malformed: str | None = None  # not a ModelInferRequest: answered INVALID_ARGUMENT by the handler, not UNKNOWN

    @property
    def model_name(self) -> str:
        return self.message.model_name


class _Malformed(Exception):
    pass


def _varint(data: memoryview, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise _Malformed
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def parse(data: bytes) -> InferRequest:
    """The deserializer of ModelInfer; anything the scanner does not understand is left to protobuf to judge."""
    view = memoryview(data)
    try:
        try:
            header, raw = _split(view)
        except _Malformed:  # e.g. a group field protobuf skips: let protobuf parse it all
            message = pb.ModelInferRequest.FromString(data)
            raw = tuple(memoryview(r) for r in message.raw_input_contents)
            message.ClearField("raw_input_contents")
            return InferRequest(message, raw, len(data))
        return InferRequest(pb.ModelInferRequest.FromString(header), raw, len(data))
    except DecodeError as exc:  # raised here it would reach the client as UNKNOWN, with a traceback in the log
        return InferRequest(pb.ModelInferRequest(), (), len(data), malformed=str(exc) or "cannot be parsed")


def _split(view: memoryview) -> tuple[bytes, tuple[memoryview, ...]]:
    rest: list[memoryview] = []
    raw: list[memoryview] = []
    offset = 0
    while offset < len(view):
        start = offset
        tag, offset = _varint(view, offset)
        kind = tag & 7
        if kind == 0:
            _, offset = _varint(view, offset)
        elif kind == 1:
            offset += 8
        elif kind == 5:
            offset += 4
        elif kind == 2:
            length, offset = _varint(view, offset)
            if tag >> 3 == _RAW_FIELD:
                if offset + length > len(view):
                    raise _Malformed
                raw.append(view[offset : offset + length])
                offset += length
                continue
            offset += length
        else:  # groups: no field of this message uses them
            raise _Malformed
        if offset > len(view):
            raise _Malformed
        rest.append(view[start:offset])
    return b"".join(rest), tuple(raw)
