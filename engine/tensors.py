"""Tensor metadata shared by the runtime and the front ends: names, KServe datatypes, shapes with dynamic dims.

Plain data: nothing here needs OpenVINO (engine/served.py turns OpenVINO ports into these).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# OpenVINO element type name → KServe v2 datatype.
OV_TO_KSERVE = {
    "f64": "FP64", "f32": "FP32", "f16": "FP16", "bf16": "BF16",
    "i64": "INT64", "i32": "INT32", "i16": "INT16", "i8": "INT8",
    "u64": "UINT64", "u32": "UINT32", "u16": "UINT16", "u8": "UINT8",
    "boolean": "BOOL", "string": "BYTES",
}  # fmt: skip

KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "FP64": np.dtype(np.float64), "FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16),
    "INT64": np.dtype(np.int64), "INT32": np.dtype(np.int32), "INT16": np.dtype(np.int16), "INT8": np.dtype(np.int8),
    "UINT64": np.dtype(np.uint64), "UINT32": np.dtype(np.uint32), "UINT16": np.dtype(np.uint16),
    "UINT8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_), "BYTES": np.dtype(np.object_),
}  # fmt: skip

NUMPY_TO_KSERVE: dict[np.dtype, str] = {v: k for k, v in KSERVE_TO_NUMPY.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: `bounds` holds (min, max) per dim, max -1 when unbounded; `bounds` None = dynamic rank."""

    name: str
    datatype: str
    bounds: tuple[tuple[int, int], ...] | None
    batch_index: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """Metadata form: a fixed dim as itself, anything dynamic as -1."""
        if self.bounds is None:
            return (-1,)
        return tuple(lo if lo == hi else -1 for lo, hi in self.bounds)

    def shape_text(self) -> str:
        """OVMS's form: (1,10), ranges [lo~hi], any -1."""
        if self.bounds is None:
            return "(...)"
        return "(" + ",".join(_dim_text(lo, hi) for lo, hi in self.bounds) + ")"

    def accepts(self, axis: int, size: int) -> bool:
        lo, hi = self.bounds[axis] if self.bounds is not None else (0, -1)
        return size >= lo and (hi == -1 or size <= hi)


def _dim_text(lo: int, hi: int) -> str:
    if lo == hi:
        return str(lo)
    if lo == 0 and hi == -1:
        return "-1"
    return f"[{lo}~{hi}]"


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"
