"""The wire scanner (engine/frontend/wire.py) reads exactly what protobuf reads, and leaves the values for later.

Run by tests/test_wire.py in a fresh interpreter: the server's KServe protos clash with tritonclient's, which other
test modules import into the pytest process.

Properties over messages hypothesis builds (packed, unpacked, split into merged chunks, truncated, with a byte
flipped): the scanner fails exactly when protobuf does, and otherwise gives the same values. HOTSERVE_FUZZ_EXAMPLES
sets the example count (default 200).
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import Code, ServingError
from engine.frontend import kserve_wire, tfs_wire, wire
from engine.frontend.generated.inference import grpc_service_pb2 as pb
from engine.frontend.generated.tensorflow.core.framework import tensor_pb2
from engine.frontend.generated.tensorflow_serving.apis import predict_pb2

EXAMPLES = int(os.environ.get("HOTSERVE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_T = FieldDescriptor
_VALUES = {
    _T.TYPE_BOOL: st.booleans(), _T.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    _T.TYPE_INT64: st.integers(-(2**63), 2**63 - 1), _T.TYPE_UINT32: st.integers(0, 2**32 - 1),
    _T.TYPE_UINT64: st.integers(0, 2**64 - 1), _T.TYPE_FLOAT: st.floats(width=32),
    _T.TYPE_DOUBLE: st.floats(), _T.TYPE_BYTES: st.binary(max_size=6),
}  # fmt: skip


def _scalar_fields(descriptor):  # type: ignore[no-untyped-def]
    return [f for f in descriptor.fields if f.is_repeated and f.type in _VALUES]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _unpacked(field: FieldDescriptor, values: list) -> bytes:  # type: ignore[type-arg]
    """The same values, one tag each (what proto2 encoders write): a parser must read both forms."""
    out = bytearray()
    for value in values:
        if field.type == _T.TYPE_FLOAT:
            out += _varint(field.number << 3 | 5) + struct.pack("<f", value)
        elif field.type == _T.TYPE_DOUBLE:
            out += _varint(field.number << 3 | 1) + struct.pack("<d", value)
        else:
            out += _varint(field.number << 3) + _varint(int(value))
    return bytes(out)


@st.composite
def _contents(draw, message_class):  # type: ignore[no-untyped-def]
    """Encoded bytes of a message_class with random repeated scalar values, in one of the encodings protobuf reads."""
    message = message_class()
    chunks = []
    for field in _scalar_fields(message_class.DESCRIPTOR):
        values = draw(st.lists(_VALUES[field.type], max_size=8))
        getattr(message, field.name).extend(values)
        part = message_class()
        getattr(part, field.name).extend(values)
        if field.type != _T.TYPE_BYTES and draw(st.booleans()):
            chunks.append(_unpacked(field, values))
        else:
            chunks.append(part.SerializeToString())
    chunks = draw(st.permutations(chunks)) if draw(st.booleans()) else chunks
    return b"".join(chunks)  # concatenation is merge: every field here is repeated


def _same_values(ours: np.ndarray | list[bytes], theirs: list) -> bool:  # type: ignore[type-arg]
    if isinstance(ours, list):
        return ours == list(theirs)
    expected = np.array(theirs, dtype=ours.dtype)
    return ours.shape == expected.shape and ours.tobytes() == expected.tobytes()  # bit for bit (NaN, -0.0)


@pytest.mark.parametrize("message_class", [pb.InferTensorContents, tensor_pb2.TensorProto])
@FUZZ
@given(data=st.data())
def test_repeated_values_equal_protobufs(message_class: type[Message], data: st.DataObject) -> None:
    encoded = data.draw(_contents(message_class))
    parsed = message_class.FromString(encoded)
    fields = _scalar_fields(message_class.DESCRIPTOR)
    rest, found = wire.split(encoded, {f.number for f in fields})
    assert rest == b""
    for field in fields:
        assert _same_values(wire.repeated(found, field), getattr(parsed, field.name)), field.name


def _mutate(data: st.DataObject, encoded: bytes) -> bytes:
    choice = data.draw(st.sampled_from(["keep", "truncate", "flip", "append"]))
    if choice == "truncate" and encoded:
        return encoded[: data.draw(st.integers(0, len(encoded) - 1))]
    if choice == "flip" and encoded:
        at = data.draw(st.integers(0, len(encoded) - 1))
        return encoded[:at] + bytes([encoded[at] ^ data.draw(st.integers(1, 255))]) + encoded[at + 1 :]
    if choice == "append":
        return encoded + data.draw(st.binary(max_size=6))
    return encoded


@st.composite
def _infer_request(draw):  # type: ignore[no-untyped-def]
    request = pb.ModelInferRequest(model_name=draw(st.text(max_size=4)), id=draw(st.text(max_size=3)))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(st.text(max_size=3)), datatype=draw(st.sampled_from(["FP32", "INT8"])))
        tensor.shape.extend(draw(st.lists(st.integers(-2, 2**40), max_size=3)))
        if draw(st.booleans()):
            tensor.contents.MergeFromString(draw(_contents(pb.InferTensorContents)))
    request.outputs.add(name="out")
    request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=9), max_size=3)))
    return request.SerializeToString()


@FUZZ
@given(data=st.data())
def test_kserve_request_reads_as_protobuf_reads_it(data: st.DataObject) -> None:
    encoded = _mutate(data, data.draw(_infer_request()))
    try:
        expected: pb.ModelInferRequest | None = pb.ModelInferRequest.FromString(encoded)
    except DecodeError:
        expected = None
    ours = kserve_wire.parse(encoded)
    if ours.malformed is not None:
        assert expected is None, ours.malformed
        return
    rebuilt = pb.ModelInferRequest()
    rebuilt.CopyFrom(ours.message)
    rebuilt.raw_input_contents.extend(bytes(r) for r in ours.raw)
    try:  # the contents are scanned later, in the decoder thread: a broken one is found there
        for tensor, contents in zip(rebuilt.inputs, ours.contents, strict=True):
            if contents is not None:
                wire.split(contents, ())
                tensor.contents.MergeFromString(bytes(contents))
    except (wire.Malformed, DecodeError):
        assert expected is None
        return
    assert expected is not None and _known(rebuilt) == _known(expected)


def _known(message: Message) -> Message:
    """A field with a wire type that does not fit is an unknown field to protobuf, skipped by us: nobody reads them."""
    message.DiscardUnknownFields()
    return message


@st.composite
def _predict_request(draw):  # type: ignore[no-untyped-def]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = draw(st.text(max_size=4))
    for name in draw(st.lists(st.text(max_size=3), max_size=3)):
        tensor = request.inputs[name]
        tensor.dtype = draw(st.integers(0, 30))
        tensor.tensor_shape.dim.add(size=draw(st.integers(-1, 9)))
        if draw(st.booleans()):
            tensor.tensor_content = draw(st.binary(max_size=8))
        else:
            tensor.MergeFromString(draw(_contents(tensor_pb2.TensorProto)))
    request.output_filter.extend(draw(st.lists(st.text(max_size=3), max_size=2)))
    return request.SerializeToString()


@FUZZ
@given(data=st.data())
def test_predict_request_reads_as_protobuf_reads_it(data: st.DataObject) -> None:
    encoded = _mutate(data, data.draw(_predict_request()))
    try:
        expected: predict_pb2.PredictRequest | None = predict_pb2.PredictRequest.FromString(encoded)
    except DecodeError:
        expected = None
    ours = tfs_wire.parse(encoded)
    if ours.malformed is not None:
        assert expected is None, ours.malformed
        return
    rebuilt = predict_pb2.PredictRequest()
    rebuilt.CopyFrom(ours.message)
    try:
        for name, tensor in ours.inputs:
            scanned = tfs_wire.tensor(name, tensor)
            rebuilt.inputs[name].CopyFrom(tensor_pb2.TensorProto.FromString(bytes(tensor)))
            assert scanned.content == (rebuilt.inputs[name].tensor_content or None)
    except (ServingError, DecodeError):
        assert expected is None
        return
    assert expected is not None and _known(rebuilt) == _known(expected)


def test_parse_leaves_contents_encoded_as_views_into_the_received_bytes() -> None:
    """The event loop only walks field headers: a tensor's values are neither copied nor turned into numbers there."""
    values = np.arange(100_000, dtype=np.float32)
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[values.size]).contents.fp32_contents.extend(values.tolist())
    encoded = request.SerializeToString()
    parsed = kserve_wire.parse(encoded)
    assert not parsed.message.inputs[0].HasField("contents")
    (contents,) = parsed.contents
    assert isinstance(contents, memoryview) and contents.obj is encoded
    decoded = kserve_wire.typed("x", contents, "fp32_contents")
    assert isinstance(decoded, np.ndarray) and decoded.base is not None and np.array_equal(decoded, values)

    tensor = predict_pb2.PredictRequest()
    tensor.inputs["x"].float_val.extend(values.tolist())
    encoded = tensor.SerializeToString()
    ((name, proto),) = tfs_wire.parse(encoded).inputs
    assert name == "x" and isinstance(proto, memoryview) and proto.obj is encoded


def test_scan_is_bounded_and_malformed_contents_name_the_input() -> None:
    many = b"".join(_varint(7 << 3) + _varint(0) for _ in range(wire.MAX_FIELDS + 1))  # 65 537 tiny fields
    assert "more than 65536 fields" in str(kserve_wire.parse(many).malformed)
    with pytest.raises(ServingError) as caught:
        kserve_wire.typed("pixels", b"\x32\x05\x00", "fp32_contents")  # says 5 bytes, has 1
    assert caught.value.code is Code.INVALID_ARGUMENT and "pixels" in str(caught.value)
    with pytest.raises(ServingError) as caught:
        kserve_wire.typed("pixels", b"\x32\x03\x00\x00\x00", "fp32_contents")  # 3 bytes of packed floats
    assert "not a whole number of values" in str(caught.value)
