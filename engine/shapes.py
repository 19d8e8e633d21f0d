"""The string forms of shape, layout and batch_size (config entries and the CLI's single-model flags)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

AUTO: Literal["auto"] = "auto"

# One dimension as the config wrote it, normalised: "1", "-1" (any) or "1:10" (range).
Dims = tuple[str, ...]
ShapeValue = Dims | Literal["auto"]


# ---- parsing of the string forms (shared with the CLI's single-model flags) ----
_DIM = r"(?:-1|\d+|\d+:\d+)"
_SHAPE = re.compile(rf"^\(\s*{_DIM}(?:\s*,\s*{_DIM})*\s*\)$")
_LAYOUT_SIDE = re.compile(r"^[A-Z?]*(?:\.\.\.)?[A-Z?]*$")  # OpenVINO's Layout grammar: letters, ?, one "..."


def parse_dims(text: str) -> Dims:
    """ "(1,3,-1,10:20)" → ("1", "3", "-1", "10:20"). ValueError with the reason otherwise."""
    if not isinstance(text, str) or not _SHAPE.match(text.strip()):
        raise ValueError(f'invalid shape "{text}": expected "auto" or dims like "(1,3,224,224)", with -1 or a:b')
    dims = tuple(d.strip() for d in text.strip()[1:-1].split(","))
    for d in dims:
        if ":" in d:
            lo, hi = (int(x) for x in d.split(":"))
            if lo > hi:
                raise ValueError(f'invalid shape "{text}": range {d} has its minimum above its maximum')
    return tuple(str(int(d)) if ":" not in d else ":".join(str(int(x)) for x in d.split(":")) for d in dims)


def _items(value: str | Mapping[str, Any], what: str) -> list[tuple[str | None, Any]]:
    if isinstance(value, str):
        return [(None, value)]
    if not isinstance(value, Mapping):
        raise ValueError(f"invalid {what} {value!r}: expected a string or an object of name to string")
    for key in value:
        if key is not None and (not isinstance(key, str) or not key):  # None: anonymous, from an already-parsed value
            raise ValueError(f"invalid {what}: tensor names must be non-empty strings, got {key!r}")
    return list(value.items())


def parse_shape(value: str | Mapping[str, Any]) -> dict[str | None, ShapeValue]:
    """A `shape` value → {input name or None (anonymous): dims or "auto"}. Already-parsed dims pass through."""
    out: dict[str | None, ShapeValue] = {}
    for key, text in _items(value, "shape"):
        if isinstance(text, tuple) and all(isinstance(d, str) for d in text):
            out[key] = parse_dims(f"({','.join(text)})")
            continue
        try:
            out[key] = AUTO if isinstance(text, str) and text.strip().lower() == AUTO else parse_dims(text)
        except ValueError as exc:
            raise ValueError(f"input {key}: {exc}" if key is not None else str(exc)) from None
    return out


def _layout(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f'invalid layout "{text}": expected a string such as "NCHW" or "NHWC:NCHW"')
    layout = text.strip().upper()
    sides = layout.split(":")
    if len(sides) > 2 or not all(sides) or not all(_LAYOUT_SIDE.match(side) for side in sides):
        raise ValueError(
            f'invalid layout "{text}": expected letters and "?" such as "NCHW" or "NHWC:NCHW" '
            '(<request>:<model>), with at most one "..." per side'
        )
    for side in sides:
        letters = [c for c in side if c.isalpha()]
        if len(letters) != len(set(letters)):
            raise ValueError(f'invalid layout "{text}": a dimension letter appears twice in {side}')
    if len(sides) == 2 and "..." not in layout and len(sides[0]) != len(sides[1]):
        raise ValueError(f'invalid layout "{text}": both sides need the same number of dimensions')
    return layout


def parse_layout(value: str | Mapping[str, str]) -> dict[str | None, str]:
    """A `layout` value → {tensor name or None: "NHWC:NCHW" upper-cased}."""
    out: dict[str | None, str] = {}
    for key, text in _items(value, "layout"):
        try:
            out[key] = _layout(text)
        except ValueError as exc:
            raise ValueError(f"tensor {key}: {exc}" if key is not None else str(exc)) from None
    return out


def parse_batch_size(value: int | str) -> int | str:
    """An int (fixed), "auto", "-1" (any) or "a:b" (range); "N" strings become ints."""
    if isinstance(value, bool):
        raise ValueError(f'invalid batch_size {value!r}: expected an integer, "auto", "-1" or "a:b"')
    if isinstance(value, int):
        if value == -1:
            return "-1"
        if value < 0:
            raise ValueError(f'invalid batch_size {value}: expected an integer >= 0, "auto", "-1" or "a:b"')
        return value
    text = str(value).strip().lower()
    if text == AUTO or text == "-1":
        return text
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.fullmatch(r"\d+:\d+", text):
        lo, hi = (int(x) for x in text.split(":"))
        if lo <= hi:
            return f"{lo}:{hi}"
        raise ValueError(f'invalid batch_size "{value}": the range has its minimum above its maximum')
    raise ValueError(f'invalid batch_size "{value}": expected an integer, "auto", "-1" or "a:b"')
