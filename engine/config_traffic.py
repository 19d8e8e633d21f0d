"""models.json's traffic settings, checked and typed: version labels, traffic weights, dynamic batching.

Each check reports to the entry it runs for (`Errors.error(field path, message)`) and keeps what is valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .shapes import AUTO, ShapeValue
from .versions import MAX_VERSION


class Errors(Protocol):
    def error(self, key: str | list[object], message: str) -> None: ...


class Policy(Protocol):
    kind: str
    versions: tuple[int, ...]


@dataclass(frozen=True)
class Routing:
    """How requests that name no number find a version: labels and traffic weights, as configured."""

    labels: Mapping[str, int] = field(default_factory=dict)  # version label → version number
    traffic: tuple[tuple[int | str, int], ...] = ()  # (version number or label, weight), in file order

    def __bool__(self) -> bool:
        return bool(self.labels or self.traffic)


@dataclass(frozen=True)
class DynamicBatching:
    """Per model `dynamic_batching`: requests queued for up to max_queue_delay_us are run as one inference."""

    max_batch_size: int = 8  # rows of one batched inference; a request with more rows runs alone
    max_queue_delay_us: int = 0  # how long the oldest queued request may wait for more rows
    preferred_batch_sizes: tuple[int, ...] = ()  # a batch of one of these sizes leaves without waiting
    max_queue_size: int = 64  # requests waiting (the running batches not counted); more → RESOURCE_EXHAUSTED

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> DynamicBatching:
        """A schema-valid `dynamic_batching` value."""
        sizes = tuple(sorted(value.get("preferred_batch_sizes", ())))
        return cls(
            max_batch_size=value.get("max_batch_size", cls.max_batch_size),
            max_queue_delay_us=value.get("max_queue_delay_us", cls.max_queue_delay_us),
            preferred_batch_sizes=sizes,
            max_queue_size=value.get("max_queue_size", cls.max_queue_size),
        )


LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
LABEL_RULE = (
    "a version label is 1 to 64 characters: letters A-Z a-z, digits, '_', '.' and '-', starting with a letter "
    "or '_' (so that it is never a version number)"
)
VERSION_KEY = re.compile(r"[1-9][0-9]{0,18}")


def label_problem(label: str) -> str | None:
    """Why `label` cannot be a version label, or None."""
    return None if LABEL.fullmatch(label) else f"invalid version label {json.dumps(label)}: {LABEL_RULE}"


def labels(entry: Errors, value: Mapping[str, int]) -> dict[str, int]:
    found = {}
    for label, version in value.items():
        problem = label_problem(label)
        if problem:
            entry.error(["version_labels", label], problem)
        else:
            found[label] = version
    return found


Traffic = tuple[tuple[int | str, int], ...]


def traffic(entry: Errors, value: Mapping[str, int], labels: Mapping[str, int]) -> Traffic:
    weights: list[tuple[int | str, int]] = []
    for key, weight in value.items():
        if key.isascii() and VERSION_KEY.fullmatch(key) and int(key) <= MAX_VERSION:
            weights.append((int(key), weight))
        elif label_problem(key) is None and key in labels:
            weights.append((key, weight))
        elif label_problem(key) is None:
            known = ", ".join(sorted(labels)) or "none"
            entry.error(["traffic", key], f"unknown version label {json.dumps(key)}: a traffic key is a version "
                                          f"number or a label of version_labels (labels: {known})")  # fmt: skip
        else:
            entry.error(["traffic", key], f"traffic key {json.dumps(key)} is neither a version number (1, 2, …) "
                                          f"nor a label ({LABEL_RULE})")  # fmt: skip
    if value and not any(weight > 0 for _, weight in value.items()):
        entry.error("traffic", "every weight is 0: at least one version must get traffic")
    return tuple(weights)


def within_policy(entry: Errors, policy: Policy, labels: Mapping[str, int], traffic: Traffic) -> None:
    """A specific policy names every version it serves: a label or weight on another would point at a retired one
    (a label moved to a version this very edit retires would leave its AVAILABLE version for it)."""
    if policy.kind != "specific":
        return
    listed = list(policy.versions)
    for path, version in [*((["version_labels", k], v) for k, v in labels.items()),
                          *((["traffic", str(k)], k) for k, _ in traffic if isinstance(k, int))]:  # fmt: skip
        if version not in policy.versions:
            entry.error(path, f"version {version} is not in model_version_policy specific versions {listed}")


BATCHING_NEEDS_RANGE = (
    'dynamic_batching needs a batch dimension that takes any size up to max_batch_size: set batch_size to "-1" or '
    'a range such as "1:8" (or use a model with a dynamic batch)'
)


def batching(
    entry: Errors, raw: Mapping[str, Any], batch: int | str | None, shape: Mapping[str | None, ShapeValue] | None
) -> DynamicBatching | None:
    """The checks that need no model: the sizes agree, and the configured shapes leave a batch to fill."""
    if "dynamic_batching" not in raw:
        return None
    settings = DynamicBatching.from_json(raw["dynamic_batching"])
    for i, size in enumerate(raw["dynamic_batching"].get("preferred_batch_sizes", ())):
        if size > settings.max_batch_size:
            message = f"preferred batch size {size} is larger than max_batch_size {settings.max_batch_size}"
            entry.error(["dynamic_batching", "preferred_batch_sizes", i], message)
    if batch == AUTO or any(v == AUTO for v in (shape or {}).values()):
        where = "batch_size" if batch == AUTO else "shape"
        entry.error(where, f"{where} auto reshapes the model for each request and cannot batch: {BATCHING_NEEDS_RANGE}")
    elif isinstance(batch, int) and batch > 0:
        entry.error("batch_size", f"batch_size {batch} is a static batch: {BATCHING_NEEDS_RANGE}")
    elif isinstance(batch, str) and ":" in batch and int(batch.split(":")[1]) < settings.max_batch_size:
        entry.error("batch_size", f"batch_size {batch} cannot take max_batch_size {settings.max_batch_size} rows "
                                  "(dynamic_batching): raise the range's maximum or lower max_batch_size")  # fmt: skip
    return settings
