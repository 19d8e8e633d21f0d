"""tests/wire_properties.py in a fresh interpreter (the server's KServe protos clash with tritonclient's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_wire_scanner_properties() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "wire_properties.py")],
        cwd=HERE.parent, capture_output=True, text=True, env={**os.environ}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
