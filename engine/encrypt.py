"""`hotserve keygen` and `hotserve encrypt`: AES-256-GCM model files for the sample loader (loaders/aesgcm).

File format (the C loader reads it): b"HSENC1\\0\\0" | u32 LE format version 1 | 12-byte nonce | ciphertext |
16-byte tag. Associated data: the output file's base name (e.g. "model.xml.enc"), so renamed or swapped files fail.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .usage import EX_USAGE, Parser, UsageError

MAGIC = b"HSENC1\0\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sI12s")
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 32
MODEL_SUFFIXES = (".xml", ".bin", ".onnx")
CHUNK = 1 << 20
_HEX = frozenset(b"0123456789abcdefABCDEF")


class EncryptError(Exception):
    """A one-line reason naming the file; never key material."""


@dataclass(frozen=True)
class EncryptResult:
    written: tuple[Path, ...]
    skipped: tuple[Path, ...]  # files that are not model files (not copied)


def keygen(path: Path | str) -> Path:
    """Write 32 random bytes as 64 hex characters and a newline, mode 0600. Refuses to overwrite."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise EncryptError(f"{target} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise EncryptError(f"cannot create {target}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (secrets.token_hex(KEY_LEN) + "\n").encode())
    finally:
        os.close(fd)
    return target


def load_key(key_file: Path | str) -> bytearray:
    """The key as the C loader reads it: 32 raw bytes, or 64 hex characters and an optional newline."""
    path = Path(key_file)
    try:
        data = bytearray(path.read_bytes())
    except OSError as exc:
        raise EncryptError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        if len(data) == KEY_LEN:
            return bytearray(data)
        end = len(data) - data.endswith(b"\n")
        end -= data[:end].endswith(b"\r")
        if end == 2 * KEY_LEN and all(c in _HEX for c in data[:end]):
            key = bytearray(KEY_LEN)
            for i in range(KEY_LEN):  # decoded in place: no immutable copy of the key text
                key[i] = int(data[2 * i : 2 * i + 2], 16)
            return key
        raise EncryptError(f"key file {path} must hold 32 raw bytes or 64 hex characters (it has {len(data)} bytes)")
    finally:
        data[:] = bytes(len(data))


def _encrypt_file(key: bytes | bytearray, src: Path, dst: Path) -> None:
    nonce = secrets.token_bytes(NONCE_LEN)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    encryptor.authenticate_additional_data(dst.name.encode())
    # Ciphertext goes to a temporary file beside the target, renamed into place once complete.
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as plain:
            out.write(HEADER.pack(MAGIC, FORMAT_VERSION, nonce))
            while block := plain.read(CHUNK):
                out.write(encryptor.update(block))
            out.write(encryptor.finalize())
            out.write(encryptor.tag)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encrypt_dir(key_file: Path | str, src: Path | str, dst: Path | str) -> EncryptResult:
    """Encrypt every *.xml, *.bin, *.onnx of the version folder src into dst as <name>.enc; list the rest."""
    src_dir, dst_dir = Path(src), Path(dst)
    if not src_dir.is_dir():
        raise EncryptError(f"{src_dir} is not a folder")
    if dst_dir.exists() and dst_dir.resolve() == src_dir.resolve():
        raise EncryptError(f"the destination {dst_dir} must differ from the source folder")
    files = sorted(p for p in src_dir.iterdir() if p.is_file())
    models = [p for p in files if p.suffix in MODEL_SUFFIXES]
    skipped = tuple(p for p in sorted(src_dir.iterdir()) if p not in models)
    if not models:
        raise EncryptError(f"no model files ({', '.join('*' + s for s in MODEL_SUFFIXES)}) in {src_dir}")
    key = load_key(key_file)
    try:
        dst_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for path in models:
            target = dst_dir / f"{path.name}.enc"
            try:
                _encrypt_file(key, path, target)
            except OSError as exc:
                raise EncryptError(f"cannot encrypt {path} to {target}: {exc.strerror or exc}") from None
            written.append(target)
    finally:
        key[:] = bytes(len(key))
    return EncryptResult(tuple(written), skipped)


def decrypt_file(key_file: Path | str, path: Path | str) -> bytes:
    """The plaintext of one encrypted file (for tests and checks; the server decrypts in the C loader)."""
    source = Path(path)
    data = source.read_bytes()
    if len(data) < HEADER.size + TAG_LEN:
        raise EncryptError(f"{source}: too short to be a hotserve encrypted file")
    magic, version, nonce = HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise EncryptError(f"{source}: not a hotserve encrypted file (format {version})")
    key = load_key(key_file)
    try:
        decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, data[-TAG_LEN:])).decryptor()
        decryptor.authenticate_additional_data(source.name.encode())
        return decryptor.update(data[HEADER.size : -TAG_LEN]) + decryptor.finalize()
    except InvalidTag:
        raise EncryptError(f"{source}: authentication failed (wrong key, tampered file, or renamed file)") from None
    finally:
        key[:] = bytes(len(key))


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hotserve", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    keygen_cmd = commands.add_parser("keygen", help="write a new random AES-256 key (hex, mode 0600)")
    keygen_cmd.add_argument("key_file", metavar="KEYFILE")
    encrypt_cmd = commands.add_parser("encrypt", help="encrypt a version folder's model files for the aesgcm loader")
    encrypt_cmd.add_argument("--key-file", required=True, metavar="KEYFILE")
    encrypt_cmd.add_argument("src", metavar="SRC_DIR")
    encrypt_cmd.add_argument("dst", metavar="DST_DIR")
    return parser


def main(argv: Sequence[str]) -> int:
    """`keygen KEYFILE` | `encrypt --key-file KEYFILE SRC_DIR DST_DIR`. 0 ok, 1 failure, 64 usage error."""
    argv = list(argv)
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        command = argv[0] if argv else "encrypt"
        print(f"hotserve {command}: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        if args.command == "keygen":
            print(f"wrote a new key to {keygen(args.key_file)} (mode 0600); keep it out of version control")
            return 0
        result = encrypt_dir(args.key_file, args.src, args.dst)
    except EncryptError as exc:
        print(f"hotserve {args.command}: {exc}", file=sys.stderr)
        return 1
    for path in result.written:
        print(f"encrypted {path}")
    for path in result.skipped:
        print(f"skipped {path} (not a model file; not copied)")
    names = [p.name for p in result.written]
    models = [n for n in names if n.endswith(".xml.enc")] + [n for n in names if n.endswith(".onnx.enc")]
    model = models[0] if models else None
    if model is not None:
        options = {"loader_name": "...", "model_file": model}
        weights = model.removesuffix(".xml.enc") + ".bin.enc"
        if model.endswith(".xml.enc") and weights in names:
            options["bin_file"] = weights
        print(f"custom_loader_options: {json.dumps(options)}")
    return 0
