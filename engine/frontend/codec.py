"""KServe v2 tensors: which typed field carries each datatype, and outputs → raw contents (BYTES length-prefixed).

Decoding is engine.frontend.tensor.make_tensor's job, shared by every protocol.
"""

from __future__ import annotations

import struct

import numpy as np

# The typed `contents` field that carries each datatype (FP16/BF16 have none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def encode(array: np.ndarray) -> bytes:
    if array.dtype == object or array.dtype.kind in "SU":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, bytes) and len(base) == array.nbytes and array.flags.c_contiguous:
        return base  # served.py's outputs are already their bytes: no second copy
    return np.ascontiguousarray(array).tobytes()
