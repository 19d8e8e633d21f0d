"""Builds the sample models the default configs/models.json serves (no downloads: OpenVINO's opset API)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import modelgen  # noqa: E402


def main() -> None:
    modelgen.add_const(HERE / "models" / "dummy" / "1", delta=1.0)
    print(f"sample model written to {HERE / 'models' / 'dummy' / '1'}")


if __name__ == "__main__":
    main()
