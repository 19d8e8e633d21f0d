"""Builds the samples the default configs/models.json serves (no downloads: OpenVINO's opset API).

- models/dummy/1: a plain IR, output `a` = input `b` + 1 on shape (1,10)
- models/dummy-encrypted/1: the same model with `a` = `b` + 2, AES-256-GCM encrypted for the sample loader
- keys/demo.key + keys/loader.json: the sample loader's key. DEMO ONLY: it is public, in this repository.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

import modelgen  # noqa: E402

from engine import encrypt  # noqa: E402


def main() -> None:
    modelgen.add_const(HERE / "models" / "dummy" / "1", delta=1.0)
    keys = HERE / "keys"
    keys.mkdir(exist_ok=True)
    key = keys / "demo.key"
    if not key.exists():
        encrypt.keygen(key)
    (keys / "loader.json").write_text(json.dumps({"key_file": "demo.key"}, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "1"
        modelgen.add_const(plain, delta=2.0)
        encrypt.encrypt_dir(key, plain, HERE / "models" / "dummy-encrypted" / "1")
    print(f"samples written under {HERE / 'models'}")


if __name__ == "__main__":
    main()
