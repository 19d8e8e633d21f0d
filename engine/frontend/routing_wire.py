"""How requests carry a routing key, and how status text shows version labels (no status message has a field)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

from ..errors import Code, ServingError

ROUTE_KEY_METADATA = "hotserve-route-key"  # gRPC metadata, on KServe and TF Serving requests alike
ROUTE_KEY_PARAMETER = "route_key"  # a KServe request parameter (gRPC `parameters`, REST JSON `parameters`)
KEY_KINDS = frozenset({"string_param", "int64_param", "uint64_param"})
MAX_ROUTE_KEY = 1024  # characters: a key is hashed on the event loop, per request
LABELS_NOTE = "; labels: "
PENDING = " (pending)"


class _Context(Protocol):
    def invocation_metadata(self) -> Any: ...


def checked(key: str) -> str | None:
    """A routing key as given ("" = none), refused when longer than MAX_ROUTE_KEY."""
    if len(key) > MAX_ROUTE_KEY:
        raise ServingError(Code.INVALID_ARGUMENT, f"route key is {len(key)} characters; at most {MAX_ROUTE_KEY}")
    return key or None


def metadata_key(context: _Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == ROUTE_KEY_METADATA:
            return checked(value) if isinstance(value, str) else None
    return None


def route_key(parameters: Mapping[str, Any], context: _Context, used: bool) -> str | None:
    """The request's routing key: the KServe `route_key` parameter, else the `hotserve-route-key` metadata.

    The parameter is checked on every request, as REST checks its body; the key is read only when `used` (a request
    without a version to a model with traffic)."""
    if ROUTE_KEY_PARAMETER in parameters:
        param = parameters[ROUTE_KEY_PARAMETER]
        which = param.WhichOneof("parameter_choice")
        if which not in KEY_KINDS:
            raise ServingError(Code.INVALID_ARGUMENT, "parameter route_key must be a string or an integer")
        key = checked(str(getattr(param, which)))
        return key if used else None
    return metadata_key(context) if used else None


def labels_note(labels: tuple[str, ...], pending: tuple[str, ...]) -> str:
    """Appended to a version's status reason: "; labels: stable, canary (pending)"; "" without labels."""
    names = [*labels, *(label + PENDING for label in pending)]
    return LABELS_NOTE + ", ".join(names) if names else ""


_NOTED = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*(?: \(pending\))?(?:, [A-Za-z_][A-Za-z0-9_.-]*(?: \(pending\))?)*")


def split_labels(reason: str) -> tuple[str, str]:
    """(reason, labels text) of a reason that labels_note extended; an error text that merely contains the note's
    wording (after it, anything but label names) keeps its text."""
    head, found, tail = reason.rpartition(LABELS_NOTE)
    return (head, tail) if found and _NOTED.fullmatch(tail) else (reason, "")
