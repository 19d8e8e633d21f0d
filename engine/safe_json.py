"""JSON parsing with a nesting limit: absurd nesting is a clear ValueError, never a RecursionError traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


class TooDeep(ValueError):
    pass


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        kinds = set(map(type, children))  # at C speed: a long array of numbers is skipped, not walked in Python
        if any(issubclass(kind, dict | list) for kind in kinds):
            stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def loads(
    raw: bytes | str,
    max_depth: int,
    object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
    parse_constant: Callable[[str], Any] | None = None,
) -> Any:
    """json.loads, then TooDeep when arrays/objects nest more than `max_depth` levels."""
    try:
        doc = json.loads(raw, object_pairs_hook=object_pairs_hook, parse_constant=parse_constant)
    except RecursionError:  # the C scanner stops cleanly at the interpreter's recursion limit
        raise TooDeep(f"arrays and objects nest more than {max_depth} levels deep") from None
    if depth(doc) > max_depth:
        raise TooDeep(f"arrays and objects nest more than {max_depth} levels deep")
    return doc
