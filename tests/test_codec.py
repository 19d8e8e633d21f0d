"""The tensor constructor's raw paths (zero-copy, BYTES framing) and the KServe output codec."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from engine.errors import Code, ServingError
from engine.frontend import codec
from engine.frontend.tensor import make_tensor


def framed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def test_raw_numeric_is_a_zero_copy_view() -> None:
    raw = np.arange(6, dtype=np.float32).tobytes()
    array = make_tensor("x", "FP32", (2, 3), raw=raw).data
    assert array.shape == (2, 3) and not array.flags.owndata
    np.testing.assert_array_equal(array.reshape(-1), np.arange(6))


def test_raw_size_mismatch() -> None:
    with pytest.raises(ServingError) as caught:
        make_tensor("x", "INT32", (1, 4), raw=b"\0" * 12)
    assert caught.value.code is Code.INVALID_CONTENT_SIZE and "input name: x" in str(caught.value)


def test_bytes_round_trip_and_framing_errors() -> None:
    array = make_tensor("s", "BYTES", (1, 3), raw=framed(b"a", b"", b"xyz")).data
    assert array.tolist() == [[b"a", b"", b"xyz"]]
    assert codec.encode(array) == framed(b"a", b"", b"xyz")
    for bad in (framed(b"a", b"b", b"c")[:-1], b"\1\0", framed(b"a", b"b"), framed(b"a", b"b", b"c", b"d")):
        with pytest.raises(ServingError) as caught:
            make_tensor("s", "BYTES", (1, 3), raw=bad)
        assert caught.value.code is Code.INVALID_CONTENT_SIZE and "input name: s" in str(caught.value)


def test_typed_contents() -> None:
    np.testing.assert_array_equal(make_tensor("x", "INT64", (2,), values=[5, 6]).data, np.array([5, 6]))
    assert make_tensor("x", "BOOL", (1,), values=[True]).data.dtype == np.bool_
    with pytest.raises(ServingError) as caught:
        make_tensor("x", "FP32", (3,), values=[1.0])
    assert caught.value.code is Code.INVALID_VALUE_COUNT


def test_unknown_datatype() -> None:
    with pytest.raises(ServingError) as caught:
        make_tensor("x", "FP8", (1,), raw=b"\0")
    assert caught.value.code is Code.INVALID_PRECISION and "input name: x" in str(caught.value)
