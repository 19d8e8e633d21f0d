"""safe_json: nesting measured without recursion, and long arrays of numbers skipped rather than walked."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def old_depth(value: object) -> int:
    """depth() before arrays of scalars were skipped: every child looked at in Python."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=3)
documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=2), inner, max_size=4)
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_depth_is_the_old_definition(doc: object) -> None:
    assert safe_json.depth(doc) == old_depth(doc)
    assert safe_json.depth(json.loads(json.dumps(doc))) == old_depth(doc)
