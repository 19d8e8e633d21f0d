"""Decrypted model bytes that OpenVINO keeps using: owned by us, zeroed when the last reference goes.

OpenVINO's CPU plugin shares a model's constant weights with the compiled model instead of copying them (checked:
wiping the buffer after compile_model zeroes the outputs), so the weights must live as long as the compiled model,
and be wiped only when OpenVINO lets go of them: that is when this bytearray's last reference is dropped.
"""

from __future__ import annotations

import ctypes

import numpy as np


class WipedOnFree(bytearray):
    wiped_bytes = 0  # bytes zeroed so far, all instances: what the tests observe

    def __del__(self) -> None:
        if self:
            ctypes.memset((ctypes.c_char * len(self)).from_buffer(self), 0, len(self))
            WipedOnFree.wiped_bytes += len(self)


def owned_copy(view: np.ndarray) -> np.ndarray:
    """A uint8 array over a WipedOnFree copy of `view` (the loader wipes its own buffer as soon as it is released)."""
    return np.frombuffer(WipedOnFree(view), np.uint8)
