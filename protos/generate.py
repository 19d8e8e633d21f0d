"""Regenerates engine/frontend/generated from the .proto files in protos/ (`make protos`).

protoc writes absolute imports (`from inference import …`); they are rewritten to package-relative ones under
`engine.frontend.generated` so the generated code imports as a normal sub-package. Output is deterministic, and
tests/test_protos.py fails when the committed tree drifts from what this script produces.

    .venv/bin/python protos/generate.py [OUTDIR]
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
DEFAULT_OUT = ROOT / "engine" / "frontend" / "generated"
PACKAGE = "engine.frontend.generated"


def _top_packages() -> list[str]:
    return sorted({p.relative_to(PROTOS).parts[0] for p in PROTOS.rglob("*.proto")})


def generate(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        tops = "|".join(map(re.escape, _top_packages()))
        pattern = re.compile(rf"^(from|import) ({tops})((?:\.\w+)*)( import .*)?$", re.M)
        for path in sorted(Path(tmp).rglob("*.py*")):
            text = path.read_text()
            text = pattern.sub(lambda m: _rewrite(m), text)
            path.write_text(text)
        for folder in [Path(tmp), *sorted(p for p in Path(tmp).rglob("*") if p.is_dir())]:
            (folder / "__init__.py").write_text("")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)


def _rewrite(m: re.Match[str]) -> str:
    keyword, top, rest, tail = m.group(1), m.group(2), m.group(3), m.group(4) or ""
    if keyword == "from":
        return f"from {PACKAGE}.{top}{rest}{tail}"
    return f"import {PACKAGE}.{top}{rest}{tail}"


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
    print(f"generated code written to {sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT}")
