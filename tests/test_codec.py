"""KServe tensor codec: raw contents (zero-copy), BYTES framing, typed contents, and the errors of each."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from engine.errors import Code, ServingError
from engine.frontend import codec


def framed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def test_raw_numeric_is_a_zero_copy_view() -> None:
    raw = np.arange(6, dtype=np.float32).tobytes()
    array = codec.decode_raw("x", "FP32", (2, 3), raw)
    assert array.shape == (2, 3) and not array.flags.owndata
    np.testing.assert_array_equal(array.reshape(-1), np.arange(6))


def test_raw_size_mismatch() -> None:
    with pytest.raises(ServingError) as caught:
        codec.decode_raw("x", "INT32", (1, 4), b"\0" * 12)
    assert caught.value.code is Code.INVALID_CONTENT_SIZE and "input name: x" in str(caught.value)


def test_bytes_round_trip_and_framing_errors() -> None:
    array = codec.decode_raw("s", "BYTES", (1, 3), framed(b"a", b"", b"xyz"))
    assert array.tolist() == [[b"a", b"", b"xyz"]]
    assert codec.encode(array) == framed(b"a", b"", b"xyz")
    for bad, code in [(framed(b"a")[:-1], Code.INVALID_CONTENT_SIZE), (b"\1\0", Code.INVALID_CONTENT_SIZE),
                      (framed(b"a", b"b"), Code.INVALID_VALUE_COUNT)]:  # fmt: skip
        with pytest.raises(ServingError) as caught:
            codec.decode_raw("s", "BYTES", (1, 3), bad)
        assert caught.value.code is code


def test_typed_contents() -> None:
    np.testing.assert_array_equal(codec.decode_typed("x", "INT64", (2,), [5, 6]), np.array([5, 6]))
    assert codec.decode_typed("x", "BOOL", (1,), [True]).dtype == np.bool_
    with pytest.raises(ServingError) as caught:
        codec.decode_typed("x", "FP32", (3,), [1.0])
    assert caught.value.code is Code.INVALID_VALUE_COUNT
    with pytest.raises(ServingError) as caught:
        codec.decode_typed("h", "FP16", (1,), [1.0])
    assert caught.value.code is Code.INVALID_MESSAGE_STRUCTURE  # FP16 travels raw only


def test_unknown_datatype() -> None:
    with pytest.raises(ServingError) as caught:
        codec.decode_raw("x", "FP8", (1,), b"\0")
    assert caught.value.code is Code.INVALID_PRECISION
