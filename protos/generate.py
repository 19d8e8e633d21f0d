"""Regenerates engine/frontend/generated from the .proto files in protos/ (`make protos`).

protoc writes absolute imports (`from inference import …`) and absolute module names; both are rewritten to
package-relative ones under `engine.frontend.generated`, so the generated code imports as a normal sub-package and its
message classes pickle. Output is deterministic, and tests/test_protos.py fails when the committed tree drifts from what
this script produces.

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
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "__init__.py")


def proto_sources() -> list[str]:
    """Every .proto under protos/, relative to it, in a stable order."""
    return sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))


def generate(out: Path) -> None:
    """Writes the generated package to `out`, replacing what a previous run left there."""
    _check_replaceable(out)
    sources = proto_sources()
    tops = "|".join(re.escape(top) for top in sorted({s.split("/")[0] for s in sources}, key=len, reverse=True))
    imports = re.compile(rf"^(from|import) ((?:{tops})(?:\.\w+)*)\b", re.M)
    # the module name protoc hands the builder becomes the classes' __module__ (pickle, repr)
    module_names = re.compile(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')((?:{tops})\.[\w.]+')")
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
            raise SystemExit("protoc failed on protos/ (see its message above)")
        for path in sorted(Path(tmp).rglob("*.py*")):
            text = imports.sub(rf"\1 {PACKAGE}.\2", path.read_text())
            path.write_text(module_names.sub(rf"\1{PACKAGE}.\2", text))
        for folder in [Path(tmp), *sorted(p for p in Path(tmp).rglob("*") if p.is_dir())]:
            (folder / "__init__.py").write_text("")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)


def _check_replaceable(out: Path) -> None:
    # the output folder is deleted first, so refuse a folder holding anything this script would not have written
    if not out.exists():
        return
    foreign = [
        p
        for p in out.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(GENERATED_SUFFIXES)
    ]
    if foreign:
        raise SystemExit(f"{out} holds files protos/generate.py did not write (e.g. {foreign[0]}); not replacing it")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    generate(target)
    print(f"generated code written to {target}")
