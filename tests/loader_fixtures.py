"""Fixtures and helpers shared by the loader tests (registered in conftest.py as a pytest plugin).

The C libraries are built once per session with `make -C loaders OUT=<repo>/build`.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from cffi import FFI
from harness import ROOT

from engine import encrypt
from engine.loader_bridge import LoadedModel, Loader

BUILD = ROOT / "build"
IR_OPTIONS = {"loader_name": "aes", "model_file": "model.xml.enc", "bin_file": "model.bin.enc"}
X = np.arange(10, dtype=np.float32).reshape(1, 10)


def read_loaded(core: ov.Core, loaded: LoadedModel) -> ov.Model:
    """Read a loader's buffers into OpenVINO 2026.4 without touching disk (the code engine/runtime.py should use).

    IR: read_model(xml, Tensor) takes the XML as str/bytes/bytearray only (not memoryview, numpy or cffi buffers),
    so the XML is one bytearray copy that release() wipes. ov.Tensor(array) COPIES the weights (shared_memory=False):
    measured, the CPU plugin keeps pointing at Constant data it did not need to repack (e.g. an Add with a large
    constant), so a shared tensor would leave the compiled model reading the loader's wiped, freed buffer.
    ONNX: read_model(bytes) works but bytes cannot be wiped; read_model(bytearray, empty Tensor) works and can.
    Release right after read_model: OpenVINO owns what it keeps from then on.
    """
    if loaded.kind == "IR":
        xml, weights = loaded.ir_inputs()
        return core.read_model(xml, ov.Tensor(weights))
    return core.read_model(loaded.onnx_input(), ov.Tensor(np.empty(0, np.uint8)))


@pytest.fixture(scope="session")
def build() -> Path:
    done = subprocess.run(["make", "-C", str(ROOT / "loaders"), f"OUT={BUILD}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return BUILD


@pytest.fixture(scope="session")
def counters(build: Path) -> Any:
    """The test loader's exported counters (the same library instance the bridge opens)."""
    ffi = FFI()
    ffi.cdef("int64_t hs_test_counter(const char *); void hs_test_reset(void); const char *hs_test_last_options(void);")
    lib = ffi.dlopen(str(build / "libtestloader.so"))

    class Counters:
        def __getitem__(self, name: str) -> int:
            value = int(lib.hs_test_counter(name.encode()))
            assert value >= 0, name
            return value

        def reset(self) -> None:
            lib.hs_test_reset()

        def last_options(self) -> str:
            return ffi.string(lib.hs_test_last_options()).decode()

    found = Counters()
    found.reset()
    return found


@pytest.fixture
def core() -> ov.Core:
    return ov.Core()


def infer(core: ov.Core, model: ov.Model) -> np.ndarray:
    return core.compile_model(model, "CPU")({0: X})[0].copy()


def big_add(folder: Path, n: int = 50_000) -> np.ndarray:
    """a = b + C with a large random C: the CPU plugin aliases C's memory in the compiled model (unless copied)."""
    c = np.random.default_rng(7).standard_normal((1, n)).astype(np.float32)
    p = ops.parameter([1, n], np.float32, name="b")
    out = ops.add(p, ops.constant(c))
    out.output(0).get_tensor().set_names({"a"})
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([out], [p], "big"), folder / "model.xml", compress_to_fp16=False)
    return c


@dataclass
class Encrypted:
    root: Path
    base: Path  # base_path; the model is in base/1
    key: Path
    config: Path
    plain: Path  # the plaintext version folder

    def open(self) -> Loader:
        return Loader.open("aes", BUILD / "libaesgcm.so", self.config)


@pytest.fixture
def encrypted(tmp_path: Path, build: Path) -> Encrypted:
    plain = tmp_path / "plain"
    modelgen.add_const(plain, delta=2.5)
    modelgen.onnx_add_const(plain, delta=4.0)
    (tmp_path / "keys").mkdir()
    key = encrypt.keygen(tmp_path / "keys" / "aes.key")
    encrypt.encrypt_dir(key, plain, tmp_path / "models" / "m" / "1")
    config = tmp_path / "keys" / "aes.json"
    config.write_text(json.dumps({"key_file": "aes.key"}))  # relative to the JSON file's folder
    return Encrypted(tmp_path, tmp_path / "models" / "m", key, config, plain)


@pytest.fixture
def aes(encrypted: Encrypted) -> Iterator[Loader]:
    loader = encrypted.open()
    yield loader
    loader.close()
