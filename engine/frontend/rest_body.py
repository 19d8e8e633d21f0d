"""A KServe v2 REST infer body (JSON bytes) → tensors; runs in the decoder process for large bodies (offload.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import safe_json
from ..errors import Code, ServingError
from ..safe_text import safe
from .routing_wire import checked
from .tensor import MAX_DIMS, Tensor, make_tensor

MAX_DEPTH = MAX_DIMS + 4  # body → inputs → input → data, then one level per dim


@dataclass(frozen=True)
class InferBody:
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...]
    id: Any = None  # echoed back when the request had one
    has_id: bool = False
    route_key: str | None = None  # "parameters": {"route_key": …}: sticky traffic routing


def _bad(detail: str) -> ServingError:
    return ServingError(Code.INVALID_ARGUMENT, detail)


def parse_infer(body: bytes) -> InferBody:
    try:
        doc = safe_json.loads(body, MAX_DEPTH)
    except safe_json.TooDeep as exc:
        raise _bad(f"body: {exc}") from None
    except json.JSONDecodeError as exc:
        raise _bad(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise _bad(f"body is not UTF-8 JSON: {safe(exc)}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise _bad(f"body has a value JSON parsing refused: {safe(exc)}") from None
    if not isinstance(doc, dict):
        raise _bad('body must be a JSON object with "inputs"')
    items = doc.get("inputs")
    if not isinstance(items, list):
        raise _bad('"inputs" must be an array of {"name", "datatype", "shape", "data"} objects')
    inputs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(f"inputs[{i}] must be an object")
        missing = [k for k in ("name", "datatype", "shape", "data") if k not in item]
        if missing:
            raise _bad(f"inputs[{i}] has no {', '.join(repr(k) for k in missing)}")
        name, shape, data = item["name"], item["shape"], item["data"]
        if not isinstance(name, str):
            raise _bad(f"inputs[{i}].name must be a string")
        if not isinstance(shape, list):
            raise ServingError(Code.INVALID_SHAPE, f"shape must be an array of integers; input name: {safe(name)}")
        if not isinstance(data, list):
            data = [data]  # a scalar for a shape of one element
        inputs.append(make_tensor(name, item["datatype"], shape, values=data))
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise _bad('"outputs" must be an array of {"name": ...} objects')
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise _bad('"parameters" must be an object')
    key = parameters.get("route_key")
    if key is not None and (isinstance(key, bool) or not isinstance(key, str | int)):
        raise _bad("parameters.route_key must be a string or an integer")
    key = checked(str(key)) if key is not None else None
    return InferBody(tuple(inputs), tuple(o["name"] for o in outputs), doc.get("id"), "id" in doc, key)
