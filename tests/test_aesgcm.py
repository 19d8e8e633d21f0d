"""The aesgcm sample loader through the bridge: decryption in memory, authentication, blacklists, no plaintext."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import pytest
from loader_fixtures import IR_OPTIONS, Encrypted, X, big_add, infer, read_loaded

from engine import encrypt
from engine.loader_bridge import Loader, LoaderError, Status

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
