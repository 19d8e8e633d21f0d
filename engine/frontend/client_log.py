"""Client errors in the log: one line each, no traceback, at most one per (model, reason) per interval, and at most
MAX_LINES per interval in all (client-chosen model names must not buy a line each)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..errors import ServingError
from ..safe_text import safe

INTERVAL_SECONDS = 10.0
MAX_KEYS = 1024  # client-chosen model names must not grow this table without bound
MAX_LINES = 20  # per interval, over all keys; then one line says how many were left out

log = logging.getLogger("hotserve.requests")


class ClientErrorLog:
    def __init__(self, interval: float = INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # key → (when last logged, suppressed since); oldest first, so the table drops its oldest key when full
        self._seen: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self._window = (0.0, 0, 0)  # (start of the current interval, lines logged in it, lines left out of it)

    def report(self, api: str, model: str, error: ServingError) -> None:
        key = (model[:200], error.code.name)
        now = self._clock()
        with self._lock:
            last, suppressed = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[key] = (last, suppressed + 1)
                return
            start, lines, dropped = self._window
            if now - start >= self.interval:
                if dropped:
                    log.info("Rejected %d more client requests in the last %.0f s (not logged one by one)", dropped,
                             now - start)  # fmt: skip
                start, lines, dropped = now, 0, 0
            if lines >= MAX_LINES:
                self._window = (start, lines, dropped + 1)
                return
            self._window = (start, lines + 1, dropped)
            self._seen.pop(key, None)
            self._seen[key] = (now, 0)
            while len(self._seen) > MAX_KEYS:
                self._seen.popitem(last=False)
        more = (
            f" (and {suppressed} more like it in the last {now - last:.0f} s)"
            if suppressed and last is not None
            else ""
        )
        log.info("Rejected %s request for model %s: %s%s", api, safe(model) or '""', safe(error, 500), more)


client_errors = ClientErrorLog()
