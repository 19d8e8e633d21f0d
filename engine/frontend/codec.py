"""KServe v2 tensors ⇄ numpy: raw contents zero-copy with np.frombuffer; BYTES as 4-byte length-prefixed elements."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from ..errors import Code, ServingError
from ..tensors import KSERVE_TO_NUMPY

# The typed `contents` field that carries each datatype (FP16/BF16 have none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _dtype(datatype: str, name: str) -> np.dtype:
    dtype = KSERVE_TO_NUMPY.get(datatype)
    if dtype is None:
        raise ServingError(Code.INVALID_PRECISION, f"Unsupported datatype {datatype!r}; input name: {name}")
    return dtype


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    dtype = _dtype(datatype, name)
    count = _count(shape)
    if datatype == "BYTES":
        return decode_bytes(name, shape, raw)
    if len(raw) != count * dtype.itemsize:
        raise ServingError(
            Code.INVALID_CONTENT_SIZE,
            f"Expected: {count * dtype.itemsize} bytes; Actual: {len(raw)} bytes; input name: {name}",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def decode_bytes(name: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    items: list[bytes] = []
    offset, view = 0, memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ServingError(Code.INVALID_CONTENT_SIZE, f"truncated BYTES element length; input name: {name}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ServingError(Code.INVALID_CONTENT_SIZE, f"truncated BYTES element; input name: {name}")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    if len(items) != _count(shape):
        raise ServingError(
            Code.INVALID_VALUE_COUNT, f"Expected: {_count(shape)}; Actual: {len(items)}; input name: {name}"
        )
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(tuple(shape))


def decode_typed(name: str, datatype: str, shape: Sequence[int], values: Sequence[object]) -> np.ndarray:
    dtype = _dtype(datatype, name)
    if datatype not in CONTENTS_FIELD:
        raise ServingError(
            Code.INVALID_MESSAGE_STRUCTURE, f"{datatype} must be sent in raw_input_contents; input name: {name}"
        )
    if len(values) != _count(shape):
        raise ServingError(
            Code.INVALID_VALUE_COUNT, f"Expected: {_count(shape)}; Actual: {len(values)}; input name: {name}"
        )
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(tuple(shape))
    return np.asarray(values, dtype=dtype).reshape(tuple(shape))


def encode(array: np.ndarray) -> bytes:
    if array.dtype == object or array.dtype.kind in "SU":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(array).tobytes()
