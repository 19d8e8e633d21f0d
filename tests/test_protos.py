"""The committed generated code must be exactly what `make protos` produces from protos/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

GENERATED = ROOT / "engine" / "frontend" / "generated"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(out)], check=True, capture_output=True)
    expected, committed = _files(out), _files(GENERATED)
    assert expected == committed, f"generated files differ ({expected ^ committed}); run `make protos` and commit"
    changed = [name for name in sorted(expected) if not filecmp.cmp(out / name, GENERATED / name, shallow=False)]
    assert not changed, f"{changed} drifted from protos/; run `make protos` and commit"


def test_every_service_is_in_the_generated_descriptors() -> None:
    code = (
        "from engine.frontend.generated.inference import grpc_service_pb2 as pb;"
        "print(sorted(pb.DESCRIPTOR.services_by_name))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert "GRPCInferenceService" in out.stdout
