"""The one mapping of serving errors to gRPC status codes, applied to every RPC handler."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..errors import ServingError
from .client_log import client_errors

log = logging.getLogger("hotserve.grpc")

R = TypeVar("R")


def guarded(handler: Callable[[Any, Any, Any], Awaitable[R]]) -> Callable[[Any, Any, Any], Awaitable[R]]:
    """ServingError → its OVMS gRPC code and message, logged in one line (rate-limited); anything else is a server
    fault → UNKNOWN, logged with its traceback."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await handler(self, request, context)
        except ServingError as exc:
            client_errors.report(getattr(self, "api", "grpc"), _model_of(request), exc)
            await context.abort(grpc.StatusCode[exc.code.grpc_code], str(exc))
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            log.exception("Unhandled error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.UNKNOWN, f"Unknown error: {type(exc).__name__}")
        raise AssertionError("unreachable")  # context.abort always raises

    return wrapper


def _model_of(request: Any) -> str:
    """The model a request names: KServe's model_name or name, TF Serving's model_spec.name."""
    for attr in ("model_name", "name"):
        value = getattr(request, attr, None)
        if isinstance(value, str):
            return value
    spec = getattr(request, "model_spec", None)
    return spec.name if spec is not None else ""
