"""How inputs reach OpenVINO (engine/served.py): a small input is copied into the infer request's own tensor, a large
one wrapped in place, an odd one (a non-contiguous array) handed to OpenVINO's own conversion — and whichever path the
previous call took, every answer is this call's. Real OpenVINO, one infer request so every call reuses it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import modelgen
import numpy as np
import openvino as ov
import pytest

from engine import served as served_module
from engine.served import SMALL_INPUT_BYTES, ServedVersion


def served(folder: Path, shape: tuple[int, ...]) -> ServedVersion:
    path = modelgen.add_const(folder, shape=shape)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU")
    return ServedVersion("m", 1, compiled, 1, False, "disabled", {})


@pytest.mark.parametrize("inline", [False, True], ids=["async", "inline"])  # each path sets inputs itself
@pytest.mark.parametrize("shape", [(2, 5), (64, 64)])  # 40 bytes: the own tensor; 16 KiB: wrapped in place
def test_each_call_answers_its_own_inputs_whichever_path_the_last_took(
    tmp_path: Path, shape: tuple[int, ...], inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(served_module, "INLINE_AFTER", 10**9)  # the path stays the one chosen, however fast
    monkeypatch.setattr(served_module, "INLINE_SLOW_RUNS", 10**9)  # or slow (a busy host)
    version = served(tmp_path / "m", shape)
    small = int(np.prod(shape)) * 4 < SMALL_INPUT_BYTES
    (call,) = [c for _, c in version._start(asyncio.new_event_loop())._queue]  # type: ignore[attr-defined]
    version._inline = inline
    assert (call.own[0] is not None) == small

    def run(x: np.ndarray) -> np.ndarray:
        async def one() -> np.ndarray:
            version._loop = asyncio.get_running_loop()
            (out,) = await version.infer({"b": x})
            return out

        return asyncio.run(one())

    rng = np.random.default_rng(0)
    for order in ["C", "F", "C", "C", "F", "F", "C"]:  # F: not C-contiguous, OpenVINO converts it itself
        x = np.asarray(rng.standard_normal(shape, dtype=np.float32), order=order)
        readonly = np.frombuffer(x.tobytes(order="C"), np.float32).reshape(shape) if order == "C" else x
        np.testing.assert_array_equal(run(readonly), x + 1)
        assert call.bound[0] == (small and order == "C")  # the own tensor is set again after a converted call
        assert version._inline == inline
