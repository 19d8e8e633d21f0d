"""The custom loader hook: the C ABI, the aesgcm sample, the test loader and the cffi bridge, all real.

The C libraries are built once per session with `make -C loaders OUT=<repo>/build`.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import threading
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
from engine.loader_bridge import CDEF, LoadedModel, Loader, LoaderError, Status, error_for

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


# ---- the header is the contract --------------------------------------------------------------------------


def test_bridge_declarations_match_the_header() -> None:
    header = (ROOT / "loaders" / "hotserve_loader.h").read_text()
    defines = dict(re.findall(r"#define HS_(\w+) (\d+)u?\b", header))
    assert defines.pop("LOADER_ABI_VERSION") == "1"
    assert {name: int(v) for name, v in defines.items()} == {s.name: s.value for s in Status}
    code = re.sub(r"/\*.*?\*/", "", header, flags=re.S).replace("HS_LOADER_EXPORT ", "")
    code = " ".join(code.replace("extern const uint32_t", "extern uint32_t").split())
    typedef, functions = " ".join(CDEF.split()).split("} hs_buffer;")
    assert typedef == "typedef struct hs_buffer { uint8_t *data; size_t size; "
    assert "typedef struct hs_buffer { uint8_t *data; size_t size; } hs_buffer;" in code
    declarations = [d.strip() + ";" for d in functions.split(";") if d.strip()]
    assert len(declarations) == 9
    for declaration in declarations:
        assert declaration in code, declaration


# ---- opening libraries ---------------------------------------------------------------------------------------


def test_open_and_close_call_init_and_deinit_once(counters: Any) -> None:
    counters.reset()
    loader = Loader.open("t", BUILD / "libtestloader.so", None)
    assert (counters["init"], counters["deinit"]) == (1, 0)
    assert not loader.closed
    loader.close()
    loader.close()
    assert (counters["init"], counters["deinit"]) == (1, 1)
    with pytest.raises(LoaderError, match="closed"):
        loader.load("m", "/nowhere", 1, {"loader_name": "t"})
    loader.unload_model("m", 1)  # notifications after close are no-ops, not errors
    loader.retire_model("m")
    assert counters["unload_model"] == counters["retire_model"] == 0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", r"library not found"),
        ("text", r"cannot open library: .*(file too short|invalid ELF header)"),
        ("symbols", r"missing symbols: hs_loader_blacklist_status, hs_loader_retire_model$"),
        ("abi", r"hs_loader_abi_version is 99, this server needs 1"),
        ("init", r"init failed \(HS_INTERNAL_ERROR\): .*loader.cfg asks init to fail \(FAIL_INIT\)"),
        ("config", r"loader_config_file .*absent.cfg not found"),
    ],
)
def test_a_bad_library_is_a_loader_error_naming_path_and_reason(
    tmp_path: Path, build: Path, case: str, reason: str
) -> None:
    library = {
        "missing": tmp_path / "libnothere.so",
        "text": tmp_path / "libtext.so",
        "symbols": build / "libmissing.so",
        "abi": build / "libbadabi.so",
    }.get(case, build / "libtestloader.so")
    (tmp_path / "libtext.so").write_text("not a shared object\n")
    (tmp_path / "loader.cfg").write_text("FAIL_INIT\n")
    config = {"init": tmp_path / "loader.cfg", "config": tmp_path / "absent.cfg"}.get(case)
    with pytest.raises(LoaderError) as caught:
        Loader.open("bad", library, config)
    assert str(caught.value).startswith(f"custom loader bad ({library}): ")
    assert re.search(reason, caught.value.reason), caught.value.reason


def test_aesgcm_init_needs_a_usable_key(tmp_path: Path, build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {
        "none.json": ({}, "expected exactly one of"),
        "both.json": ({"key_file": "k", "key_env": "K"}, "expected exactly one of"),
        "typo.json": ({"keyfile": "k"}, 'unknown key "keyfile"'),
        "short.json": ({"key_file": "short.key"}, r"short.key must hold 32 raw bytes or 64 hex characters"),
        "unset.json": ({"key_env": "HS_TEST_UNSET_KEY"}, "HS_TEST_UNSET_KEY .*is not set"),
        "badenv.json": ({"key_env": "HS_TEST_BAD_KEY"}, "HS_TEST_BAD_KEY .*must hold 64 hex characters"),
    }
    (tmp_path / "short.key").write_text("abcd\n")
    (tmp_path / "nested.json").write_text('{"key_file": {"path": "x"}}')
    monkeypatch.delenv("HS_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("HS_TEST_BAD_KEY", "zz" * 32)
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(LoaderError, match=reason):
            Loader.open("aes", build / "libaesgcm.so", tmp_path / name)
    with pytest.raises(LoaderError, match="nested objects and arrays are not supported"):
        Loader.open("aes", build / "libaesgcm.so", tmp_path / "nested.json")
    with pytest.raises(LoaderError, match="loader_config_file is required"):
        Loader.open("aes", build / "libaesgcm.so", None)


# ---- aesgcm: decrypt in memory, read into OpenVINO -----------------------------------------------------------


def test_encrypted_ir_serves_the_same_results_as_the_plaintext(
    encrypted: Encrypted, aes: Loader, core: ov.Core
) -> None:
    expected = infer(core, core.read_model(encrypted.plain / "model.xml"))
    loaded = aes.load("m", encrypted.base, 1, IR_OPTIONS)
    assert (loaded.kind, loaded.model_size) == ("IR", (encrypted.plain / "model.xml").stat().st_size)
    model = read_loaded(core, loaded)
    xml_copy = loaded._copies[0]
    loaded.release()  # before compiling: OpenVINO has its own copy now
    assert not any(xml_copy), "release() must wipe the XML copy handed to read_model"
    np.testing.assert_allclose(infer(core, model), expected)
    np.testing.assert_allclose(expected, X + 2.5)


def test_encrypted_onnx_reads_from_memory(encrypted: Encrypted, aes: Loader, core: ov.Core) -> None:
    with aes.load("m", encrypted.base, 1, {"loader_name": "aes", "model_file": "model.onnx.enc"}) as loaded:
        assert (loaded.kind, loaded.weights_size) == ("ONNX", 0)
        model = read_loaded(core, loaded)
    assert loaded.released
    np.testing.assert_allclose(infer(core, model), X + 4.0)


def test_weights_are_copied_so_the_compiled_model_survives_the_wipe(tmp_path: Path, build: Path) -> None:
    constant = big_add(tmp_path / "plain")
    key = encrypt.keygen(tmp_path / "aes.key")
    encrypt.encrypt_dir(key, tmp_path / "plain", tmp_path / "m" / "1")
    (tmp_path / "aes.json").write_text(json.dumps({"key_file": str(key)}))
    core = ov.Core()
    loader = Loader.open("aes", build / "libaesgcm.so", tmp_path / "aes.json")
    try:
        with loader.load("m", tmp_path / "m", 1, IR_OPTIONS) as loaded:
            model = read_loaded(core, loaded)
        compiled = core.compile_model(model, "CPU")
        del model
        gc.collect()
        x = np.ones((1, constant.shape[1]), np.float32)
        np.testing.assert_allclose(compiled({0: x})[0], x + constant)
    finally:
        loader.close()


def test_key_from_env_and_raw_key_file(encrypted: Encrypted, monkeypatch: pytest.MonkeyPatch) -> None:
    key = encrypt.load_key(encrypted.key)
    monkeypatch.setenv("HS_TEST_AES_KEY", key.hex())
    raw = encrypted.root / "keys" / "raw.key"
    raw.write_bytes(bytes(key))
    for content in ({"key_env": "HS_TEST_AES_KEY"}, {"key_file": str(raw)}):
        encrypted.config.write_text(json.dumps(content))
        loader = encrypted.open()
        try:
            with loader.load("m", encrypted.base, 1, IR_OPTIONS) as loaded:
                assert loaded.kind == "IR"
        finally:
            loader.close()


def _assert_auth_failure(loader: Loader, base: Path, file_name: str, secret: str = "") -> None:
    with pytest.raises(LoaderError) as caught:
        loader.load("m", base, 1, IR_OPTIONS)
    message = str(caught.value)
    assert "authentication failed" in message and file_name in message, message
    assert caught.value.status == Status.MODEL_LOAD_ERROR
    assert caught.value.version_error == "File not found or cannot open"
    if secret:
        assert secret not in message.lower()


def test_wrong_key_fails_authentication_without_leaking_it(encrypted: Encrypted) -> None:
    other = encrypt.keygen(encrypted.root / "keys" / "other.key")
    encrypted.config.write_text(json.dumps({"key_file": "other.key"}))
    loader = encrypted.open()
    try:
        _assert_auth_failure(loader, encrypted.base, "model.xml.enc", other.read_text().strip())
    finally:
        loader.close()


def test_a_tampered_byte_fails_authentication(encrypted: Encrypted, aes: Loader) -> None:
    target = encrypted.base / "1" / "model.bin.enc"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    _assert_auth_failure(aes, encrypted.base, "model.bin.enc")


def test_swapped_files_fail_authentication(encrypted: Encrypted, aes: Loader) -> None:
    folder = encrypted.base / "1"
    (folder / "model.bin.enc").rename(folder / "swap")
    (folder / "model.xml.enc").rename(folder / "model.bin.enc")
    (folder / "swap").rename(folder / "model.xml.enc")
    _assert_auth_failure(aes, encrypted.base, "model.xml.enc")


def test_not_an_encrypted_file_is_a_load_error(encrypted: Encrypted, aes: Loader) -> None:
    (encrypted.base / "1" / "model.xml.enc").write_bytes(b"<?xml version='1.0'?><net/>" * 4)
    with pytest.raises(LoaderError, match=r"model.xml.enc: not a hotserve encrypted file \(bad magic\)"):
        aes.load("m", encrypted.base, 1, IR_OPTIONS)
    (encrypted.base / "1" / "model.xml.enc").unlink()
    with pytest.raises(LoaderError, match=r"model.xml.enc: cannot open: No such file"):
        aes.load("m", encrypted.base, 1, IR_OPTIONS)
    with pytest.raises(LoaderError, match=r"must name an encrypted file"):
        aes.load("m", encrypted.base, 1, {"model_file": "model.xml", "bin_file": "model.bin.enc"})
    with pytest.raises(LoaderError, match=r"has no bin_file"):
        aes.load("m", encrypted.base, 1, {"model_file": "model.xml.enc"})
    with pytest.raises(LoaderError, match=r"version folder .*/m/7: No such file"):
        aes.load("m", encrypted.base, 7, IR_OPTIONS)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"model_file": "../1/model.xml.enc", "bin_file": "model.bin.enc"}, r"model_file .*must not leave"),
        ({"model_file": "model.xml.enc", "bin_file": "sub/../../x.enc"}, r"bin_file .*must not leave"),
        ({"model_file": "/etc/passwd.xml.enc", "bin_file": "model.bin.enc"}, r"model_file .*must be relative"),
        ({"model_file": "link.xml.enc", "bin_file": "model.bin.enc"}, r"model_file \"link.xml.enc\" resolves outside"),
        ({**IR_OPTIONS, "enable_file": "../status"}, r"enable_file .*must not leave"),
        ({**IR_OPTIONS, "extra": [1]}, r"nested objects and arrays are not supported"),
    ],
)
def test_options_that_escape_the_version_folder_are_rejected(
    encrypted: Encrypted, aes: Loader, options: dict[str, Any], reason: str
) -> None:
    (encrypted.base / "1" / "link.xml.enc").symlink_to(encrypted.base / "outside.xml.enc")
    (encrypted.base / "outside.xml.enc").write_bytes((encrypted.base / "1" / "model.xml.enc").read_bytes())
    with pytest.raises(LoaderError, match=reason) as caught:
        aes.load("m", encrypted.base, 1, options)
    assert caught.value.status == Status.MODEL_LOAD_ERROR


def test_enable_file_blacklists_at_load_and_on_every_check(encrypted: Encrypted, aes: Loader) -> None:
    status = encrypted.base / "1" / "m.status"
    options = {**IR_OPTIONS, "enable_file": "m.status"}
    status.write_text("DISABLED\n")
    with pytest.raises(LoaderError, match=r"HS_MODEL_BLACKLISTED: disabled by enable_file .*m.status") as caught:
        aes.load("m", encrypted.base, 1, options)
    assert (caught.value.status, caught.value.version_error) == (Status.MODEL_BLACKLISTED, "Internal server error")
    assert aes.is_blacklisted("m", 1)
    assert not aes.is_blacklisted("m", 2) and not aes.is_blacklisted("other", 1)
    status.unlink()
    assert not aes.is_blacklisted("m", 1)
    aes.load("m", encrypted.base, 1, options).release()
    status.write_text("DISABLED\r\n")  # re-read on every call, no restart needed
    assert aes.is_blacklisted("m", 1)
    aes.unload_model("m", 1)
    assert aes.is_blacklisted("m", 1), "an unloaded version keeps reporting its enable file"
    status.write_text("ENABLED\nDISABLED\n")
    assert not aes.is_blacklisted("m", 1)
    status.write_text("DISABLED")
    aes.retire_model("m")
    assert not aes.is_blacklisted("m", 1), "a retired model is forgotten"


def test_no_plaintext_reaches_the_disk(tmp_path: Path, build: Path) -> None:
    plain = tmp_path / "plain"
    constant = big_add(plain, n=4096)
    needles = [constant.tobytes()[4000:4064], b'<net name="big"', b"<layer id="]

    def files_with_plaintext() -> list[Path]:
        hits = []
        for path in tmp_path.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [path for needle in needles if needle in data]
        return hits

    key = encrypt.keygen(tmp_path / "aes.key")
    encrypt.encrypt_dir(key, plain, tmp_path / "m" / "1")
    assert {p.name for p in files_with_plaintext()} == {"model.xml", "model.bin"}  # the scan does find plaintext
    for path in plain.iterdir():
        path.unlink()
    (tmp_path / "aes.json").write_text(json.dumps({"key_file": "aes.key"}))
    core = ov.Core()
    loader = Loader.open("aes", build / "libaesgcm.so", tmp_path / "aes.json")
    try:
        with loader.load("m", tmp_path / "m", 1, IR_OPTIONS) as loaded:
            model = read_loaded(core, loaded)
        compiled = core.compile_model(model, "CPU")
        np.testing.assert_allclose(compiled({0: np.zeros((1, 4096), np.float32)})[0][0], constant[0])
    finally:
        loader.close()
    assert files_with_plaintext() == []


# ---- the test loader: counters and misbehaviour ----------------------------------------------------------------


@pytest.fixture
def plain_model(tmp_path: Path) -> Path:
    modelgen.add_const(tmp_path / "m" / "1", delta=1.0)
    modelgen.onnx_add_const(tmp_path / "m" / "1", delta=3.0)
    return tmp_path / "m"


PLAIN_IR = {"loader_name": "t", "model_file": "model.xml", "bin_file": "model.bin"}


@pytest.fixture
def testloader(build: Path, counters: Any) -> Iterator[Loader]:
    counters.reset()
    loader = Loader.open("t", build / "libtestloader.so", None)
    yield loader
    loader.close()


def test_every_call_reaches_the_loader_once(
    plain_model: Path, testloader: Loader, counters: Any, core: ov.Core
) -> None:
    loaded = testloader.load("m", plain_model, 1, PLAIN_IR)
    assert (counters["load_model"], counters["live_buffers"]) == (1, 2)
    assert counters.last_options() == '{"loader_name":"t","model_file":"model.xml","bin_file":"model.bin"}'
    np.testing.assert_allclose(infer(core, read_loaded(core, loaded)), X + 1.0)
    loaded.release()
    loaded.release()
    assert (counters["release"], counters["live_buffers"]) == (2, 0)
    with pytest.raises(ValueError, match="released"):
        loaded.ir_inputs()
    assert not testloader.is_blacklisted("m", 1)
    testloader.unload_model("m", 1)
    testloader.retire_model("m")
    assert (counters["blacklist_status"], counters["unload_model"], counters["retire_model"]) == (1, 1, 1)
    onnx = testloader.load("m", plain_model, 1, {"loader_name": "t", "model_file": "model.onnx", "mode": ""})
    assert counters["live_buffers"] == 1
    assert onnx.kind == "ONNX" and "ONNX" in repr(onnx)
    testloader.close()  # releases what is still out, then deinit
    assert (counters["live_buffers"], counters["deinit"]) == (0, 1)
    assert onnx.released


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [
        ("load_error", Status.MODEL_LOAD_ERROR, r"HS_MODEL_LOAD_ERROR: mode load_error"),
        ("internal_error", Status.INTERNAL_ERROR, r"HS_INTERNAL_ERROR: mode internal_error"),
        ("blacklisted", Status.MODEL_BLACKLISTED, r"HS_MODEL_BLACKLISTED: mode blacklisted"),
        ("null_buffer", Status.INTERNAL_ERROR, r"HS_MODEL_TYPE_IR with a NULL model buffer"),
        ("empty_buffer", Status.INTERNAL_ERROR, r"HS_MODEL_TYPE_IR with an empty model buffer"),
        ("oversize", Status.INTERNAL_ERROR, r"model buffer of 5368709120 bytes is above the limit of 4294967296"),
        ("bad_status", Status.INTERNAL_ERROR, r"unknown status 42"),
    ],
)
def test_misbehaving_loaders_fail_cleanly_and_get_their_buffers_back(
    plain_model: Path, testloader: Loader, counters: Any, mode: str, status: Status, reason: str
) -> None:
    with pytest.raises(LoaderError, match=reason) as caught:
        testloader.load("m", plain_model, 1, {**PLAIN_IR, "mode": mode})
    assert str(caught.value).startswith(f"custom loader t ({BUILD / 'libtestloader.so'}): model m version 1: ")
    assert caught.value.status == status
    assert caught.value.version_error == error_for(status)
    assert counters["live_buffers"] == 0


def test_mode_from_environment_and_a_lower_size_limit(
    plain_model: Path, build: Path, counters: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    counters.reset()
    loader = Loader.open("t", build / "libtestloader.so", None, max_buffer_bytes=100)
    try:
        with pytest.raises(LoaderError, match=r"model buffer of \d+ bytes is above the limit of 100 bytes"):
            loader.load("m", plain_model, 1, PLAIN_IR)
        monkeypatch.setenv("HS_TESTLOADER_MODE", "load_error")
        with pytest.raises(LoaderError, match="mode load_error"):
            loader.load("m", plain_model, 1, PLAIN_IR)
    finally:
        loader.close()
    assert counters["live_buffers"] == 0


def test_a_forgotten_loaded_model_is_released_by_the_garbage_collector(
    plain_model: Path, testloader: Loader, counters: Any
) -> None:
    testloader.load("m", plain_model, 1, PLAIN_IR)
    gc.collect()
    assert (counters["release"], counters["live_buffers"]) == (2, 0)


def test_calls_from_many_threads_are_serialised(plain_model: Path, testloader: Loader, counters: Any) -> None:
    (plain_model / "1" / "m.status").write_text("ENABLED\n")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                options = {**PLAIN_IR, "enable_file": "m.status"}
                with testloader.load(f"m{i % 3}", plain_model, 1, options) as loaded:
                    assert loaded.model_view()[:5].tobytes() == b"<?xml"
                assert not testloader.is_blacklisted(f"m{i % 3}", 1)
                testloader.retire_model(f"m{(i + 1) % 3}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert (counters["load_model"], counters["release"], counters["live_buffers"]) == (80, 160, 0)


def test_repr_and_errors_never_show_model_bytes(plain_model: Path, testloader: Loader) -> None:
    with testloader.load("m", plain_model, 1, PLAIN_IR) as loaded:
        assert re.fullmatch(r"LoadedModel\(IR, model m version 1, \d+\+4 bytes\)", repr(loaded))
        with pytest.raises(ValueError, match="not an ONNX model"):
            loaded.onnx_input()
    with pytest.raises(LoaderError) as caught:
        testloader.load("m", plain_model, 1, {**PLAIN_IR, "model_file": "model.bin"})
    assert "unknown model type" in str(caught.value) and "<?xml" not in str(caught.value)


def test_call_log_records_every_call_for_out_of_process_tests(plain_model: Path, build: Path, tmp_path: Path) -> None:
    (tmp_path / "loader.cfg").write_text(f"CALL_LOG {tmp_path / 'calls.log'}\n")
    loader = Loader.open("t", build / "libtestloader.so", tmp_path / "loader.cfg")
    loader.load("m", plain_model, 1, PLAIN_IR).release()
    loader.is_blacklisted("m", 1)
    loader.unload_model("m", 1)
    loader.retire_model("m")
    loader.close()
    assert (tmp_path / "calls.log").read_text().splitlines() == [
        "init - 0",
        "load_model m 1",
        "blacklist_status m 1",
        "unload_model m 1",
        "retire_model m 0",
        "deinit - 0",
    ]


def test_escaped_and_unicode_names_reach_the_loader_intact(encrypted: Encrypted, core: ov.Core) -> None:
    """The config JSON is read with \\u escapes and surrogate pairs; option values carry quotes and UTF-8."""
    keys = encrypted.root / "keys"
    (keys / "aes.key").rename(keys / "ключ 🔑.key")
    encrypted.config.write_text(json.dumps({"key_file": "ключ 🔑.key"}))  # ensure_ascii: \u043a ... \ud83d\udd11
    assert "\\ud83d\\udd11" in encrypted.config.read_text()
    odd = encrypted.root / "odd"
    (odd / "plain").mkdir(parents=True)
    for suffix in ("xml", "bin"):
        (encrypted.plain / f"model.{suffix}").rename(odd / "plain" / f'mödel "q"\\.{suffix}')
    encrypt.encrypt_dir(keys / "ключ 🔑.key", odd / "plain", odd / "m" / "1")
    loader = encrypted.open()
    try:
        options = {"loader_name": "aes", "model_file": 'mödel "q"\\.xml.enc', "bin_file": 'mödel "q"\\.bin.enc'}
        with loader.load("m", odd / "m", 1, options) as loaded:
            model = read_loaded(core, loaded)
        np.testing.assert_allclose(infer(core, model), X + 2.5)
    finally:
        loader.close()


def test_options_that_cannot_be_passed_are_load_errors(plain_model: Path, testloader: Loader, counters: Any) -> None:
    with pytest.raises(LoaderError, match=r"model m version 1: custom_loader_options: .*not JSON serializable"):
        testloader.load("m", plain_model, 1, {**PLAIN_IR, "x": object()})
    with pytest.raises(LoaderError, match="model name contains a NUL character"):
        testloader.load("m\0x", plain_model, 1, PLAIN_IR)
    assert counters["load_model"] == 0
    with pytest.raises(LoaderError, match=r"custom_loader_options: \\u0000 is not allowed in a string"):
        testloader.load("m", plain_model, 1, {**PLAIN_IR, "model_file": "a\0b.xml"})  # the C reader refuses it
