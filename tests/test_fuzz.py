"""Property-based fuzzing (issue 10): no tensor and no config file produces anything but a value or a clear error.

`make test` runs HOTSERVE_FUZZ_EXAMPLES (default 200) examples per property; set it higher for a longer run.
`make fuzz` runs the coverage-guided atheris harness (tests/fuzz_atheris.py) instead.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import config as config_mod
from engine.config import ConfigInvalid
from engine.errors import ServingError
from engine.frontend.rest_body import parse_infer
from engine.frontend.tensor import MAX_DIMS, make_tensor
from engine.tensors import KSERVE_TO_NUMPY

EXAMPLES = int(os.environ.get("HOTSERVE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DATATYPES = st.one_of(st.sampled_from(sorted(KSERVE_TO_NUMPY)), st.sampled_from(["FP8", "BF16", "", "fp32"]), st.text())
DIM = st.one_of(st.integers(-3, 4), st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**31, 2**32, 2**62]))
SHAPES = st.lists(DIM, max_size=MAX_DIMS + 3)
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.text(max_size=5),
    st.binary(max_size=5), st.none(),
)  # fmt: skip
VALUES = st.recursive(st.lists(SCALARS, max_size=12), lambda inner: st.lists(inner, max_size=3), max_leaves=30)


def _check(datatype: str, shape: list[int], **contents: object) -> None:
    try:
        tensor = make_tensor("in", datatype, shape, **contents)  # type: ignore[arg-type]
    except ServingError as exc:
        assert exc.code.grpc_code == "INVALID_ARGUMENT", exc  # never UNKNOWN / 500
        assert "input name: in" in str(exc) and "\n" not in str(exc)
        return
    assert tensor.data.shape == tuple(shape) and tensor.data.size == math.prod(shape)
    assert tensor.data.dtype == KSERVE_TO_NUMPY[datatype]


@FUZZ
@given(DATATYPES, SHAPES, st.binary(max_size=64))
def test_raw_contents(datatype: str, shape: list[int], raw: bytes) -> None:
    _check(datatype, shape, raw=raw)


@FUZZ
@given(st.sampled_from(["BYTES"]), st.lists(st.integers(0, 4), max_size=3), st.lists(st.binary(max_size=6), max_size=6),
       st.binary(max_size=3))  # fmt: skip
def test_bytes_framing(datatype: str, shape: list[int], items: list[bytes], tail: bytes) -> None:
    raw = b"".join(len(i).to_bytes(4, "little") + i for i in items) + tail
    _check(datatype, shape, raw=raw)


@FUZZ
@given(DATATYPES, SHAPES, VALUES, st.booleans())
def test_typed_values(datatype: str, shape: list[int], values: list, half_bits: bool) -> None:  # type: ignore[type-arg]
    _check(datatype, shape, values=values, half_bits=half_bits and datatype == "FP16")


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=25,
)
INPUT = st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=6), JSONISH), "datatype": DATATYPES, "shape": st.one_of(SHAPES, JSONISH),
     "data": st.one_of(VALUES, JSONISH)}
)  # fmt: skip


@FUZZ
@given(st.one_of(st.fixed_dictionaries({"inputs": st.lists(INPUT, max_size=3)}), JSONISH))
def test_rest_bodies(body: object) -> None:
    try:
        parsed = parse_infer(json.dumps(body, default=lambda b: b.decode("latin-1")).encode())
    except ServingError as exc:
        assert exc.code.grpc_code == "INVALID_ARGUMENT" and "\n" not in str(exc), exc
        return
    assert all(isinstance(t.data, np.ndarray) for t in parsed.inputs)


VALID = {
    "model_config_list": [
        {"config": {"name": "m", "base_path": "m", "shape": "(1,3)", "batch_size": "auto", "nireq": 2,
                    "plugin_config": {"NUM_STREAMS": 1}, "model_version_policy": {"latest": {"num_versions": 2}}}},
        {"config": {"name": "x", "base_path": "x", "custom_loader_options": {"loader_name": "l", "k": "v"}}},
    ],
    "custom_loader_config_list": [{"config": {"loader_name": "l", "library_path": "lib.so"}}],
}  # fmt: skip
NASTY_TEXT = st.one_of(st.text(), st.sampled_from(["..", "a/b", "\ud800", "x\ny", "~1/", "\x1b[2J", "é", ""]))


def _mutate(data: st.DataObject, node: object, depth: int = 0) -> object:
    """Replace, drop or keep parts of a valid config: most of the file stays valid, so deep checks run too."""
    choice = data.draw(st.integers(0, 9))
    if choice == 0:
        return data.draw(JSONISH)
    if choice == 1:
        return data.draw(NASTY_TEXT)
    if isinstance(node, dict):
        out = {k: _mutate(data, v, depth + 1) for k, v in node.items() if data.draw(st.integers(0, 7))}
        if data.draw(st.integers(0, 5)) == 0:
            out[data.draw(NASTY_TEXT)] = data.draw(JSONISH)
        return out
    if isinstance(node, list):
        return [_mutate(data, v, depth + 1) for v in node]
    return node


def _check_config(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "models.json"
        path.write_bytes(raw)
        try:
            errors = [str(e) for e in config_mod.load(path).errors]
        except ConfigInvalid as exc:
            errors = [str(e) for e in exc.errors]
            assert errors
        for line in errors:  # one printable line each, whatever the file held
            assert line.isprintable(), repr(line)
            line.encode("utf-8")


@FUZZ
@given(st.data())
def test_mutated_configs(data: st.DataObject) -> None:
    doc = _mutate(data, VALID)
    _check_config(json.dumps(doc).encode())


@FUZZ
@given(st.one_of(st.binary(max_size=200), JSONISH.map(lambda d: json.dumps(d).encode()),
                 st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
                 st.integers(1, 2000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)))  # fmt: skip
def test_arbitrary_config_bytes(raw: bytes) -> None:
    _check_config(raw)
