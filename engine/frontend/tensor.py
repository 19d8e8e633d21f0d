"""The one tensor constructor every protocol adapter calls: a request's (name, datatype, shape, contents) → Tensor.

Everything a client can get wrong is checked here, cheapest first and before any loop over the contents: the
datatype, every dim (an int, ≥ 0), the element count (math.prod, bounded), the byte count, then the values
(range per datatype, BYTES length prefixes). Every failure is a ServingError (INVALID_ARGUMENT / HTTP 400) naming
the input. No OpenVINO import: REST bodies are decoded by this module in a worker process.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import Code, ServingError
from ..safe_text import safe
from ..tensors import KSERVE_TO_NUMPY

MAX_DIMS = 32  # more axes than any model has; numpy itself stops at 64
MAX_ELEMENTS = 1 << 32  # a bound on the element count (zero dims aside), far above what a request's bytes can carry
MAX_BYTES_ELEMENTS = 1 << 20  # BYTES elements are Python objects (~0.5 µs and ~60 bytes each): bound the cost

_PREFIX = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


def _fail(code: Code, detail: str, name: str) -> ServingError:
    return ServingError(code, f"{detail}; input name: {safe(name)}")


def shape_text(shape: Sequence[object]) -> str:
    return "(" + ",".join(safe(d, 30) for d in shape) + ")"


def check_shape(name: str, shape: Sequence[object]) -> tuple[tuple[int, ...], int]:
    """(shape as ints, element count), or INVALID_SHAPE: each dim an int ≥ 0, at most MAX_DIMS, count bounded."""
    if len(shape) > MAX_DIMS:
        raise _fail(Code.INVALID_SHAPE, f"{len(shape)} dimensions, more than the limit of {MAX_DIMS}", name)
    dims: list[int] = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int | np.integer):
            raise _fail(Code.INVALID_SHAPE, f"dimensions must be integers: {shape_text(shape)}", name)
        if d < 0:
            raise _fail(Code.INVALID_SHAPE, f"Negative dimension size is not acceptable: {shape_text(shape)}", name)
        dims.append(int(d))
    # zero dims make the count 0, but numpy still refuses a shape whose other dims overflow, so bound those too
    nonzero = math.prod(d for d in dims if d)
    if nonzero > MAX_ELEMENTS:
        raise _fail(Code.INVALID_SHAPE, f"shape {shape_text(dims)} is too large (limit: {MAX_ELEMENTS} elements)", name)
    return tuple(dims), math.prod(dims)


def _dtype(name: str, datatype: object) -> np.dtype:
    dtype = KSERVE_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise _fail(Code.INVALID_PRECISION, f"Unsupported datatype {safe(repr(datatype), 40)}", name)
    return dtype


def make_tensor(
    name: str,
    datatype: str,
    shape: Sequence[object],
    *,
    raw: bytes | memoryview | None = None,
    values: Sequence[object] | np.ndarray | None = None,
    half_bits: bool = False,
) -> Tensor:
    """Exactly one of `raw` (KServe raw contents / TF tensor_content) or `values` (typed contents, JSON data).

    `half_bits`: FP16 values are IEEE half bit patterns, one per integer (TF Serving's half_val).
    """
    if not isinstance(name, str):
        raise ServingError(Code.INVALID_ARGUMENT, f"an input name must be a string, got {safe(repr(name), 40)}")
    dtype = _dtype(name, datatype)
    dims, count = check_shape(name, shape)
    if datatype == "BYTES" and count > MAX_BYTES_ELEMENTS:  # before any loop over the contents
        raise _fail(Code.INVALID_SHAPE, f"{count} BYTES elements, more than the limit of {MAX_BYTES_ELEMENTS}", name)
    if raw is not None:
        data = _from_raw(name, datatype, dtype, count, raw)
    else:
        data = _from_values(name, datatype, dtype, count, values if values is not None else (), half_bits)
    return Tensor(name, datatype, dims, data.reshape(dims))


def _from_raw(name: str, datatype: str, dtype: np.dtype, count: int, raw: bytes | memoryview) -> np.ndarray:
    if datatype == "BYTES":
        return decode_bytes(name, count, raw)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise _fail(Code.INVALID_CONTENT_SIZE, f"Expected: {expected} bytes; Actual: {len(raw)} bytes", name)
    if datatype == "BOOL":
        octets = np.frombuffer(raw, np.uint8)
        if octets.size and int(octets.max()) > 1:
            raise _fail(Code.INVALID_ARGUMENT, "BOOL contents must be bytes 0 or 1", name)
    return np.frombuffer(raw, dtype)  # zero-copy: a view over the message's bytes


def decode_bytes(name: str, count: int, raw: bytes | memoryview) -> np.ndarray:
    """`count` elements, each a 4-byte little-endian length then that many bytes, and nothing after them."""
    size = len(raw)
    if size < 4 * count:  # before the loop: each element needs at least its prefix
        raise _fail(
            Code.INVALID_CONTENT_SIZE, f"Expected: {count} BYTES elements (at least {4 * count} bytes); "
            f"Actual: {size} bytes", name,
        )  # fmt: skip
    view = memoryview(raw)
    items: list[bytes] = []
    offset = 0
    for index in range(count):
        (length,) = _PREFIX.unpack_from(view, offset)
        offset += 4
        if length > size - offset:
            raise _fail(
                Code.INVALID_CONTENT_SIZE,
                f"BYTES element {index} says {length} bytes but only {size - offset} remain",
                name,
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
        if size - offset < 4 * (count - index - 1):  # the remaining elements cannot all fit: stop now
            raise _fail(
                Code.INVALID_CONTENT_SIZE, f"Expected: {count} BYTES elements; the contents end after {index + 1}",
                name,
            )  # fmt: skip
    if offset != size:
        raise _fail(
            Code.INVALID_CONTENT_SIZE, f"{size - offset} bytes left after the {count} BYTES elements of the shape",
            name,
        )  # fmt: skip
    return _objects(items)


def _objects(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _from_values(
    name: str, datatype: str, dtype: np.dtype, count: int, values: Sequence[object] | np.ndarray, half_bits: bool
) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_values(name, count, values)
    try:
        flat = np.asarray(values)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise _fail(Code.INVALID_ARGUMENT, f"{datatype} values must be a flat or evenly nested list", name) from None
    if flat.size != count:
        raise _fail(Code.INVALID_VALUE_COUNT, f"Expected: {count}; Actual: {flat.size}", name)
    flat = flat.reshape(-1)
    if count == 0:
        return np.empty(0, dtype)
    kind = flat.dtype.kind
    if half_bits:
        if kind not in "iu" or int(flat.min()) < 0 or int(flat.max()) > 0xFFFF:
            raise _fail(Code.INVALID_ARGUMENT, "FP16 half_val entries must be 16-bit patterns 0..65535", name)
        return flat.astype(np.uint16).view(np.float16)
    if datatype == "BOOL":
        if kind != "b":
            raise _fail(Code.INVALID_ARGUMENT, "BOOL values must be true or false", name)
        return flat.astype(np.bool_)
    if dtype.kind in "iu":
        if kind not in "iu":  # numpy made floats or objects: integers near 2**64 do that too, so look exactly
            return _exact_integers(name, datatype, dtype, values)
        _check_range(name, datatype, dtype, int(flat.min()), int(flat.max()))
        return flat.astype(dtype)
    if kind not in "iuf":  # FP16/FP32/FP64 take numbers, not booleans or strings
        raise _fail(Code.INVALID_ARGUMENT, f"{datatype} values must be numbers", name)
    with np.errstate(over="ignore", invalid="ignore"):
        converted = flat.astype(dtype)
    overflow = np.isinf(converted) & np.isfinite(flat.astype(np.float64))
    if overflow.any():
        bad = flat[int(np.argmax(overflow))]
        raise _fail(Code.INVALID_ARGUMENT, f"value {bad} is out of the {datatype} range", name)
    return converted


def _exact_integers(name: str, datatype: str, dtype: np.dtype, values: Sequence[object] | np.ndarray) -> np.ndarray:
    """Values numpy did not see as integers: each must be a Python int (not a bool, a float or a string)."""
    items = np.asarray(values, dtype=object).reshape(-1).tolist()
    if not all(type(v) is int for v in items):
        raise _fail(Code.INVALID_ARGUMENT, f"{datatype} values must be integers", name)
    _check_range(name, datatype, dtype, min(items), max(items))
    return np.array(items, dtype=dtype)


def _check_range(name: str, datatype: str, dtype: np.dtype, lo: int, hi: int) -> None:
    info = np.iinfo(dtype)
    if lo < info.min or hi > info.max:
        bad = lo if lo < info.min else hi
        raise _fail(Code.INVALID_ARGUMENT, f"value {bad} is out of the {datatype} range {info.min}..{info.max}", name)


def _bytes_values(name: str, count: int, values: Sequence[object] | np.ndarray) -> np.ndarray:
    items = list(_flatten(name, values))
    if len(items) != count:
        raise _fail(Code.INVALID_VALUE_COUNT, f"Expected: {count}; Actual: {len(items)}", name)
    return _objects(items)


def _flatten(name: str, values: Sequence[object] | np.ndarray, depth: int = 0) -> list[bytes]:
    """BYTES values: bytes (protobuf) or str (JSON, sent as UTF-8), flat or nested (at most MAX_DIMS deep)."""
    out: list[bytes] = []
    for item in values:
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, str):
            try:
                out.append(item.encode())
            except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
                raise _fail(Code.INVALID_ARGUMENT, "BYTES strings must be valid Unicode", name) from None
        elif isinstance(item, list | tuple) and depth < MAX_DIMS:
            out.extend(_flatten(name, item, depth + 1))
        else:
            raise _fail(Code.INVALID_ARGUMENT, f"BYTES values must be strings, got {type(item).__name__}", name)
    return out
