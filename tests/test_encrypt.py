"""`hotserve keygen` / `hotserve encrypt`: key files, the encrypted file format, the command line."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import modelgen
import pytest

from engine import encrypt


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)  # keygen must not rely on the umask for 0600
    yield
    os.umask(previous)


def test_keygen_writes_64_hex_characters_mode_0600(tmp_path: Path, open_umask: None) -> None:
    path = encrypt.keygen(tmp_path / "aes.key")
    text = path.read_text()
    assert len(text) == 65 and text.endswith("\n")
    assert bytes.fromhex(text.strip()) == bytes(encrypt.load_key(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert encrypt.keygen(tmp_path / "other.key").read_text() != text


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = encrypt.keygen(tmp_path / "aes.key")
    before = path.read_bytes()
    with pytest.raises(encrypt.EncryptError, match=r"aes.key already exists; refusing to overwrite"):
        encrypt.keygen(path)
    assert encrypt.main(["keygen", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hotserve keygen: ") and err.count("\n") == 1
    assert path.read_bytes() == before


def test_load_key_accepts_raw_and_hex_and_rejects_the_rest(tmp_path: Path) -> None:
    key = bytes(range(32))
    cases = {"raw": key, "hex": key.hex().encode(), "crlf": key.hex().upper().encode() + b"\r\n"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert bytes(encrypt.load_key(tmp_path / name)) == key, name
    for name, content in {"short": b"abc\n", "nothex": b"zz" * 32, "spaces": key.hex().encode() + b"\n\n"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(encrypt.EncryptError, match="must hold 32 raw bytes or 64 hex characters") as caught:
            encrypt.load_key(tmp_path / name)
        assert content.decode().strip() not in str(caught.value)
    with pytest.raises(encrypt.EncryptError, match=r"cannot read key file .*absent"):
        encrypt.load_key(tmp_path / "absent")


def test_round_trip_encrypts_model_files_and_skips_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "plain"
    modelgen.add_const(src)
    modelgen.onnx_add_const(src)
    (src / "notes.txt").write_text("not a model")
    key = encrypt.keygen(tmp_path / "aes.key")
    result = encrypt.encrypt_dir(key, src, tmp_path / "enc" / "1")
    assert sorted(p.name for p in result.written) == ["model.bin.enc", "model.onnx.enc", "model.xml.enc"]
    assert [p.name for p in result.skipped] == ["notes.txt"]
    assert sorted(p.name for p in (tmp_path / "enc" / "1").iterdir()) == sorted(p.name for p in result.written)
    for path in result.written:
        plaintext = (src / path.name.removesuffix(".enc")).read_bytes()
        data = path.read_bytes()
        assert data[:8] == b"HSENC1\0\0" and data[8:12] == (1).to_bytes(4, "little")
        assert len(data) == 8 + 4 + 12 + len(plaintext) + 16
        assert plaintext[:32] not in data
        assert encrypt.decrypt_file(key, path) == plaintext
    again = encrypt.encrypt_dir(key, src, tmp_path / "again")
    assert again.written[0].read_bytes()[12:24] != result.written[0].read_bytes()[12:24], "a fresh nonce per file"


def test_renamed_tampered_or_wrong_key_files_do_not_decrypt(tmp_path: Path) -> None:
    modelgen.add_const(tmp_path / "plain")
    key = encrypt.keygen(tmp_path / "aes.key")
    out = encrypt.encrypt_dir(key, tmp_path / "plain", tmp_path / "enc")
    xml = next(p for p in out.written if p.name == "model.xml.enc")
    renamed = xml.with_name("other.xml.enc")
    renamed.write_bytes(xml.read_bytes())
    tampered = tmp_path / "enc" / "model.bin.enc"
    data = bytearray(tampered.read_bytes())
    data[-20] ^= 0x80
    tampered.write_bytes(bytes(data))
    other = encrypt.keygen(tmp_path / "other.key")
    for path, key_file in ((renamed, key), (tampered, key), (xml, other)):
        with pytest.raises(encrypt.EncryptError, match=f"{path.name}: authentication failed"):
            encrypt.decrypt_file(key_file, path)


def test_cli_usage_errors_exit_64_and_failures_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = encrypt.keygen(tmp_path / "aes.key")
    for argv in (["encrypt", str(tmp_path)], ["encrypt", "--key-file"], ["keygen"], ["keygen", "a", "b"], []):
        assert encrypt.main(argv) == 64, argv
        assert capsys.readouterr().err.startswith("hotserve ")
    (tmp_path / "empty").mkdir()
    failures = {
        "missing src": ["encrypt", "--key-file", str(key), str(tmp_path / "absent"), str(tmp_path / "out")],
        "no models": ["encrypt", "--key-file", str(key), str(tmp_path / "empty"), str(tmp_path / "out")],
        "same dir": ["encrypt", "--key-file", str(key), str(tmp_path / "empty"), str(tmp_path / "empty")],
    }
    for name, argv in failures.items():
        assert encrypt.main(argv) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("hotserve encrypt: ") and err.count("\n") == 1, err
    modelgen.add_const(tmp_path / "plain")
    assert encrypt.main(["encrypt", "--key-file", str(key), str(tmp_path / "plain"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert '"model_file": "model.xml.enc", "bin_file": "model.bin.enc"' in out
    assert (tmp_path / "out" / "model.bin.enc").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temp files left
