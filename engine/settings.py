"""The serve command's settings, logging and start-up config check: nothing of gRPC or OpenVINO, so the worker
supervisor (`--grpc_workers N`) that imports it stays small."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_mod
from .config import Config, ConfigInvalid
from .schema import read_regular

if TYPE_CHECKING:
    from .tls import TlsFiles

log = logging.getLogger("hotserve.server")

DRAIN_SECONDS = 5.0  # Kubernetes removes a terminating pod's endpoints asynchronously: keep serving meanwhile
TRACE = 5
LOG_LEVELS = {"TRACE": TRACE, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
              "ERROR": logging.ERROR}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    config_path: Path | None = None
    model_name: str | None = None
    model_path: Path | None = None
    model_overrides: dict[str, object] = field(default_factory=dict)
    port: int = 9000
    grpc_bind_address: str = "0.0.0.0"
    rest_port: int = 0
    rest_bind_address: str = "0.0.0.0"
    cache_dir: Path | None = None
    cache_size_limit: int | None = None
    file_system_poll_wait_seconds: float = 1.0
    watch_mode: str = "auto"
    grpc_workers: int = 1
    log_level: str = "INFO"
    drain_seconds: float = DRAIN_SECONDS
    max_request_mb: int = 256
    rest_body_timeout_seconds: float = 30.0
    grpc_receive_timeout_seconds: float = 120.0
    tls: TlsFiles | None = None


def setup_logging(level: str) -> None:
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "[%(asctime)s.%(msecs)03d][%(process)d][%(name)s][%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LOG_LEVELS[level])
    for noisy in ("watchfiles", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, LOG_LEVELS[level]))


def config_source(settings: Settings) -> Callable[[], Config]:
    if settings.config_path is not None:
        return _FileSource(settings.config_path)
    assert settings.model_name is not None and settings.model_path is not None
    single = config_mod.single_model(settings.model_name, settings.model_path, **settings.model_overrides)
    return lambda: single


class _FileSource:
    """Reads models.json; identical bytes give back the same Config, so a re-save changes nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: Config | None = None

    def __call__(self) -> Config:
        if self._last is not None:
            try:
                unchanged = hashlib.sha256(read_regular(self.path)).hexdigest() == self._last.digest
            except OSError:
                unchanged = False
            if unchanged:
                return self._last
        self._last = config_mod.load(self.path)
        return self._last


def validate_startup(settings: Settings) -> list[str]:
    """Only a file that cannot be applied at all (unreadable, not JSON, schema) stops the start-up.

    An entry with a semantic error starts as on a live reload: that model is listed with its error, the rest serve.
    """
    try:
        config_source(settings)()
    except ConfigInvalid as exc:
        return [str(e) for e in exc.errors]
    except ValueError as exc:
        return [str(exc)]
    return []


def startup_checked(settings: Settings) -> bool:
    """Logging set up and the config checked, as every start begins; False: not starting (errors logged)."""
    setup_logging(settings.log_level)
    errors = validate_startup(settings)
    if errors:
        for error in errors:
            log.error("%s", error)
        log.error("Configuration is invalid; not starting (%d error(s))", len(errors))
        return False
    return True
