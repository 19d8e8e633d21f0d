"""Client errors in the log: one line each, no traceback, at most one per (model, reason) per interval."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ServingError
from ..safe_text import safe

INTERVAL_SECONDS = 10.0
MAX_KEYS = 1024  # client-chosen model names must not grow this table without bound

log = logging.getLogger("hotserve.requests")


class ClientErrorLog:
    def __init__(self, interval: float = INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key → (when last logged, suppressed since)

    def report(self, api: str, model: str, error: ServingError) -> None:
        key = (model[:200], error.code.name)
        now = self._clock()
        with self._lock:
            last, suppressed = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[key] = (last, suppressed + 1)
                return
            if len(self._seen) >= MAX_KEYS:
                self._seen.clear()
            self._seen[key] = (now, 0)
        more = (
            f" (and {suppressed} more like it in the last {now - last:.0f} s)"
            if suppressed and last is not None
            else ""
        )
        log.info("Rejected %s request for model %s: %s%s", api, safe(model) or '""', safe(error, 500), more)


client_errors = ClientErrorLog()
