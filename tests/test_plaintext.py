"""A decrypted model's weights in the runtime (issue 10): OpenVINO aliases them, so the runtime keeps its own copy
alive exactly as long as the compiled model and wipes it when that is freed; load errors never quote the model."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from loader_fixtures import BUILD, IR_OPTIONS, big_add

from engine import encrypt
from engine.config import ModelConfig
from engine.loader_bridge import Loader
from engine.plaintext import WipedOnFree, owned_copy
from engine.runtime import RESHAPE_FAILED, WITHHELD, LoadError, Runtime, Source

N = 50_000


@pytest.fixture
def aes_model(tmp_path: Path, build: Path) -> tuple[Loader, Path, np.ndarray]:
    addend = big_add(tmp_path / "plain", N)
    (tmp_path / "keys").mkdir()
    key = encrypt.keygen(tmp_path / "keys" / "aes.key")
    encrypt.encrypt_dir(key, tmp_path / "plain", tmp_path / "models" / "m" / "1")
    config = tmp_path / "keys" / "aes.json"
    config.write_text(json.dumps({"key_file": "aes.key"}))
    loader = Loader.open("aes", BUILD / "libaesgcm.so", config)
    yield loader, tmp_path / "models" / "m", addend
    loader.close()


def test_openvino_aliases_shared_weights(tmp_path: Path) -> None:
    """The fact the design rests on: wiping a shared weights buffer after compile_model changes the outputs."""
    addend = big_add(tmp_path / "m", N)
    core = ov.Core()
    weights = owned_copy(np.frombuffer((tmp_path / "m" / "model.bin").read_bytes(), np.uint8))
    compiled = core.compile_model(
        core.read_model((tmp_path / "m" / "model.xml").read_bytes(), ov.Tensor(weights, shared_memory=True)), "CPU"
    )
    x = np.ones((1, N), np.float32)
    np.testing.assert_allclose(compiled({0: x})[0], x + addend)
    weights[:] = 0
    assert not np.allclose(compiled({0: x})[0], x + addend)


def test_loader_weights_live_with_the_compiled_model_and_are_wiped_after(aes_model) -> None:  # type: ignore[no-untyped-def]
    loader, base, addend = aes_model
    runtime = Runtime(None)
    model = ModelConfig(name="m", base_path=base, custom_loader_options=IR_OPTIONS)
    served = runtime.load(model, 1, Source(base / "1", loader.load("m", base, 1, IR_OPTIONS)))
    gc.collect()
    x = np.ones((1, N), np.float32)
    (out,) = asyncio.run(served.infer({"b": x}))
    np.testing.assert_allclose(out, x + addend)  # the loader's buffer is wiped by now: this is our copy
    weights_size = len(served.compiled.plaintext_weights)
    before = WipedOnFree.wiped_bytes
    served.close()
    del served
    gc.collect()
    assert WipedOnFree.wiped_bytes - before == weights_size


def test_load_errors_do_not_quote_a_loader_model(aes_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loader, base, _ = aes_model
    runtime = Runtime(None)
    model = ModelConfig(name="m", base_path=base, custom_loader_options=IR_OPTIONS, shape={"b": ("1", "7", "3")})
    with pytest.raises(LoadError) as caught:
        runtime.load(model, 1, Source(base / "1", loader.load("m", base, 1, IR_OPTIONS)))
    assert str(caught.value) == f"{RESHAPE_FAILED}: {WITHHELD}"
    bad = ModelConfig(name="m", base_path=base, custom_loader_options=IR_OPTIONS, target_device="NOSUCHDEVICE")
    with pytest.raises(LoadError) as caught:
        runtime.load(bad, 1, Source(base / "1", loader.load("m", base, 1, IR_OPTIONS)))
    assert str(caught.value) == f"Cannot compile model into target device NOSUCHDEVICE: {WITHHELD}"


def test_a_failed_load_wipes_the_weights_before_the_caller_sees_the_error(aes_model) -> None:  # type: ignore[no-untyped-def]
    """No frame of the failed compile outlives the error: the copy is wiped while the caller still holds it."""
    loader, base, _ = aes_model
    runtime = Runtime(None)
    gc.collect()
    gc.disable()  # only reference counting frees: a traceback keeping the weights alive would show
    try:
        for bad in (
            ModelConfig(name="m", base_path=base, custom_loader_options=IR_OPTIONS, shape={"b": ("1", "7", "3")}),
            ModelConfig(name="m", base_path=base, custom_loader_options=IR_OPTIONS, target_device="NOSUCHDEVICE"),
        ):
            before = WipedOnFree.wiped_bytes
            with pytest.raises(LoadError) as caught:
                runtime.load(bad, 1, Source(base / "1", loader.load("m", base, 1, IR_OPTIONS)))
            assert WipedOnFree.wiped_bytes - before >= 4 * N, caught.value  # the weights (N float32) are zeroed
            assert caught.value.__context__ is None and caught.value.__cause__ is None
    finally:
        gc.enable()
