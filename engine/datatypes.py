"""KServe v2 datatypes ⇄ numpy dtypes (no OpenVINO import: the request decoder's worker process needs only this)."""

from __future__ import annotations

import numpy as np

KSERVE_TO_NUMPY: dict[str, np.dtype] = {
    "FP64": np.dtype(np.float64), "FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16),
    "INT64": np.dtype(np.int64), "INT32": np.dtype(np.int32), "INT16": np.dtype(np.int16), "INT8": np.dtype(np.int8),
    "UINT64": np.dtype(np.uint64), "UINT32": np.dtype(np.uint32), "UINT16": np.dtype(np.uint16),
    "UINT8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_), "BYTES": np.dtype(np.object_),
}  # fmt: skip

NUMPY_TO_KSERVE: dict[np.dtype, str] = {v: k for k, v in KSERVE_TO_NUMPY.items()}
