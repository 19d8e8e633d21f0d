"""safe_json: nesting measured without recursion, and long arrays of numbers skipped rather than walked."""

from __future__ import annotations

import json

import pytest

from engine import safe_json


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("1", 0), ("[]", 1), ("{}", 1), ("[1, 2, 3]", 1), ('{"a": 1}', 1),
        ("[1, [2, [3]], 4]", 3),  # containers among scalars are still followed
        ('[{"a": [{}]}, 5, "x"]', 4), ('{"a": [1, {"b": [[]]}]}', 5),
        ("[" * 50 + "]" * 50, 50),
    ],
)  # fmt: skip
def test_depth(text: str, expect: int) -> None:
    assert safe_json.depth(json.loads(text)) == expect


def test_too_deep_and_deep_enough() -> None:
    assert safe_json.loads(b"[[[1]]]", 3) == [[[1]]]
    with pytest.raises(safe_json.TooDeep, match="more than 2 levels"):
        safe_json.loads(b"[0, 1, [[1]]]", 2)
    with pytest.raises(safe_json.TooDeep):
        safe_json.loads(b"[" * 100_000 + b"]" * 100_000, 32)  # past the C scanner's recursion limit


def test_an_object_hook_subclass_is_followed() -> None:
    class Obj(dict):  # type: ignore[type-arg]
        pass

    doc = safe_json.loads(b'{"a": {"b": {"c": 1}}}', 5, object_pairs_hook=lambda pairs: Obj(pairs))
    assert safe_json.depth(doc) == 3
