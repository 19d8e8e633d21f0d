"""Version states (TF Serving's numbers), error codes, and the STATUS CHANGE log line operators grep."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from enum import IntEnum

log = logging.getLogger("hotserve.serving")


class State(IntEnum):
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


class ErrorCode(IntEnum):
    OK = 0
    UNKNOWN = 2
    FAILED_PRECONDITION = 9


@dataclass(frozen=True)
class VersionStatus:
    """What status queries report for one version. `error_message` is the real error of a failed load."""

    version: int
    state: State = State.START
    error_code: ErrorCode = ErrorCode.OK
    error_message: str = "OK"
    cache: str = "no cache dir"  # whether the compiled-model cache is used, and why not
    loaded_from_cache: bool = False
    load_seconds: float = 0.0  # how long the last successful load took

    @property
    def failed(self) -> bool:
        return self.state == State.LOADING and self.error_code != ErrorCode.OK

    def moved(self, state: State, error: str | None = None) -> VersionStatus:
        """The next status; `error` marks a failure (code UNKNOWN) and keeps its text."""
        if error is None:
            return replace(self, state=state, error_code=ErrorCode.OK, error_message="OK")
        return replace(self, state=state, error_code=ErrorCode.UNKNOWN, error_message=error)


def log_change(model: str, status: VersionStatus) -> None:
    log.info(
        'STATUS CHANGE: Version %d of model %s status change. New status: ( "state": "%s", "error_code": "%s" )',
        status.version,
        model,
        status.state.name,
        status.error_code.name,
    )


@dataclass(frozen=True)
class ReloadResult:
    """The outcome of one reconcile: what status queries show as the last reload result."""

    ok: bool
    changed: bool
    errors: tuple[str, ...] = ()
    config_valid: bool = True
    at: float = field(default_factory=time.time)
