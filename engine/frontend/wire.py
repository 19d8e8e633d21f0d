"""The protobuf wire format, scanned: a request's big fields become zero-copy views and protobuf parses only the rest.

Protobuf parses on the event loop (gRPC calls the deserializer there) and copies every bytes field while holding the
GIL; turning 20 M typed values into Python numbers takes seconds more. The scan walks field headers only, and
`repeated()` turns a repeated scalar field into a numpy array with vectorised code that leaves the loop free.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

MAX_FIELDS = 1 << 16  # field occurrences in one message; a real request has a handful (bounds the Python loop)

VARINT, FIXED64, BYTES, GROUP_START, GROUP_END, FIXED32 = range(6)  # wire types


class Malformed(Exception):
    """Not a protobuf message (protobuf would raise DecodeError), or beyond this scanner's bounds."""


@dataclass(frozen=True, slots=True)
class Field:
    number: int
    kind: int  # wire type
    data: memoryview  # a length-delimited field's payload, or a scalar's own encoded bytes


def varint(data: memoryview, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise Malformed("truncated or overlong varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def split(data: bytes | memoryview, wanted: Collection[int], limit: int = MAX_FIELDS) -> tuple[bytes, list[Field]]:
    """(the bytes of every field not wanted, for protobuf to parse; the wanted fields' occurrences in order)."""
    view = memoryview(data)
    rest: list[memoryview] = []
    found: list[Field] = []
    offset = count = 0
    groups: list[int] = []  # open groups (deprecated; no field of ours is one, so protobuf keeps them as unknown)
    group_start = 0
    while offset < len(view):
        count += 1
        if count > limit:
            raise Malformed(f"more than {limit} fields in one message")
        start = offset
        tag, offset = varint(view, offset)
        number, kind, body = tag >> 3, tag & 7, offset
        if not 0 < number < 1 << 29:
            raise Malformed(f"invalid field number {number}")
        if kind == VARINT:
            _, offset = varint(view, offset)
        elif kind == FIXED64:
            offset += 8
        elif kind == FIXED32:
            offset += 4
        elif kind == BYTES:
            length, body = varint(view, offset)
            offset = body + length
        elif kind == GROUP_START:
            if not groups:
                group_start = start
            groups.append(number)
            continue
        elif kind == GROUP_END:
            if not groups or groups.pop() != number:
                raise Malformed("unmatched end of group")
            if not groups:
                rest.append(view[group_start:offset])
            continue
        else:
            raise Malformed(f"invalid wire type {kind}")
        if offset > len(view):
            raise Malformed("truncated field")
        if groups:
            continue
        if number in wanted:
            found.append(Field(number, kind, view[body:offset]))
        else:
            rest.append(view[start:offset])
    if groups:
        raise Malformed("unterminated group")
    return b"".join(rest), found


def last(fields: Sequence[Field], number: int) -> memoryview | None:
    """A singular bytes/string/message field: protobuf keeps the last occurrence (messages merge; see `joined`)."""
    for field in reversed(fields):
        if field.number == number and field.kind == BYTES:
            return field.data
    return None


def joined(fields: Sequence[Field], number: int) -> memoryview | bytes | None:
    """A singular message field: several occurrences merge, which for our messages is their concatenation."""
    parts = [f.data for f in fields if f.number == number and f.kind == BYTES]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"".join(parts)


_FIXED = {FieldDescriptor.TYPE_FLOAT: "<f4", FieldDescriptor.TYPE_DOUBLE: "<f8"}
_VARINTS = {
    FieldDescriptor.TYPE_INT32: np.int32, FieldDescriptor.TYPE_UINT32: np.uint32,
    FieldDescriptor.TYPE_INT64: np.int64, FieldDescriptor.TYPE_UINT64: np.uint64, FieldDescriptor.TYPE_BOOL: np.bool_,
}  # fmt: skip


def repeated(fields: Sequence[Field], field: FieldDescriptor) -> np.ndarray | list[bytes]:
    """The values of a repeated scalar field, packed or not, exactly as protobuf reads them."""
    if field.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING):
        return [bytes(f.data) for f in fields if f.number == field.number and f.kind == BYTES]
    if field.type in _FIXED:
        scalar = FIXED64 if field.type == FieldDescriptor.TYPE_DOUBLE else FIXED32
    elif field.type in _VARINTS:
        scalar = VARINT
    else:
        raise TypeError(f"{field.full_name}: unsupported field type {field.type}")
    # a packed run and a lone scalar's encoding are both plain concatenations of encoded values
    parts = [f.data for f in fields if f.number == field.number and f.kind in (BYTES, scalar)]
    payload = parts[0] if len(parts) == 1 else b"".join(parts)
    if field.type in _FIXED:
        dtype = np.dtype(_FIXED[field.type])
        if len(payload) % dtype.itemsize:
            raise Malformed(f"{field.name}: {len(payload)} bytes is not a whole number of values")
        return np.frombuffer(payload, dtype)
    values = _varints(np.frombuffer(payload, np.uint8))
    target = _VARINTS[field.type]
    if target is np.bool_:
        return values != 0
    if target in (np.int32, np.uint32):  # protobuf keeps the low 32 bits of a 32-bit field's varint
        return values.astype(np.uint32).view(target)
    return values.view(target)


def _varints(octets: np.ndarray) -> np.ndarray:
    """Decode a run of varints, vectorised: numpy's loops release the GIL, a Python loop would hold it per value."""
    if octets.size == 0:
        return np.empty(0, np.uint64)
    if octets[-1] & 0x80:
        raise Malformed("truncated varint")
    ends = np.flatnonzero(octets < 0x80)
    if ends.size == octets.size:  # every value below 128 (BOOL, small integers): one byte each
        return octets.astype(np.uint64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > 10:
        raise Malformed("overlong varint")
    values = (octets[starts] & 0x7F).astype(np.uint64)
    for k in range(1, longest):
        rows = np.flatnonzero(lengths > k)
        values[rows] |= (octets[starts[rows] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values
