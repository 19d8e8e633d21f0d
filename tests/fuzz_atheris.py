"""Coverage-guided fuzzing of the request and config parsers (`make fuzz`; not in CI: it runs until stopped).

python tests/fuzz_atheris.py [tensor|rest|kserve|config] [atheris/libFuzzer flags, e.g. -runs=100000]
Any exception other than the clear errors each parser documents is a finding; atheris prints the input.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from engine import config as config_mod
    from engine.config import ConfigInvalid
    from engine.errors import ServingError
    from engine.frontend import kserve_wire
    from engine.frontend.rest_body import parse_infer
    from engine.frontend.tensor import make_tensor
    from engine.tensors import KSERVE_TO_NUMPY

DATATYPES = [*sorted(KSERVE_TO_NUMPY), "FP8", ""]
_TMP = Path(tempfile.mkdtemp(prefix="hotserve-fuzz-"))


def tensor(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    datatype = DATATYPES[fdp.ConsumeIntInRange(0, len(DATATYPES) - 1)]
    shape = [fdp.ConsumeIntInRange(-(2**63), 2**63 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-2, 5)
             for _ in range(fdp.ConsumeIntInRange(0, 40))]  # fmt: skip
    try:
        if fdp.ConsumeBool():
            make_tensor("in", datatype, shape, raw=fdp.ConsumeBytes(fdp.remaining_bytes()))
        else:
            values = [
                fdp.ConsumeInt(9) if fdp.ConsumeBool() else fdp.ConsumeFloat()
                for _ in range(fdp.ConsumeIntInRange(0, 64))
            ]
            make_tensor("in", datatype, shape, values=values, half_bits=fdp.ConsumeBool())
    except ServingError as exc:
        assert exc.code.grpc_code == "INVALID_ARGUMENT"


def rest(data: bytes) -> None:
    try:
        parse_infer(data)
    except ServingError as exc:
        assert exc.code.grpc_code == "INVALID_ARGUMENT"


def kserve(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    with contextlib.suppress(DecodeError):
        kserve_wire.parse(data)


def config(data: bytes) -> None:
    path = _TMP / "models.json"
    path.write_bytes(data)
    try:
        errors = [str(e) for e in config_mod.load(path).errors]
    except ConfigInvalid as exc:
        errors = [str(e) for e in exc.errors]
    for line in errors:
        assert line.isprintable(), repr(line)


TARGETS = {"tensor": tensor, "rest": rest, "kserve": kserve, "config": config}

if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in TARGETS else "tensor"
    argv = [sys.argv[0], *[a for a in sys.argv[1:] if a != target]]
    atheris.Setup(argv, TARGETS[target])
    atheris.Fuzz()
