"""The custom loader hook: the C ABI, the aesgcm sample, the test loader and the cffi bridge, all real.

The C libraries are built once per session with `make -C loaders OUT=<repo>/build`.
"""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import modelgen
import numpy as np
import openvino as ov
import pytest
from harness import ROOT
from loader_fixtures import BUILD, Encrypted, X, infer, read_loaded

from engine import encrypt
from engine.loader_bridge import CDEF, Loader, LoaderError, Status, error_for

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
    testloader.close()  # loads still live: their buffers may be read elsewhere, so deinit waits for them
    assert (counters["live_buffers"], counters["deinit"]) == (1, 0)
    with pytest.raises(LoaderError, match="closed"):
        testloader.load("m", plain_model, 1, PLAIN_IR)
    loaded.unload()
    onnx.unload()  # the last live load: releases its buffer, tells the loader, then deinit
    assert (counters["live_buffers"], counters["unload_model"], counters["deinit"]) == (0, 3, 1)
    assert onnx.released and onnx.unloaded
    onnx.unload()
    assert counters["unload_model"] == 3, "unload is sent once per load"


def test_close_force_releases_and_unloads_what_is_live(plain_model: Path, testloader: Loader, counters: Any) -> None:
    loaded = testloader.load("m", plain_model, 1, PLAIN_IR)
    testloader.close(force=True)  # shutdown, once no thread reads the buffers
    assert loaded.released and loaded.unloaded
    assert (counters["live_buffers"], counters["unload_model"], counters["deinit"]) == (0, 1, 1)


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
    loaded = loader.load("m", plain_model, 1, PLAIN_IR)
    loaded.release()
    loader.is_blacklisted("m", 1)
    loaded.unload()
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
