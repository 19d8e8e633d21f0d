"""The one mapping of serving errors to gRPC status codes, applied to every RPC handler."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..errors import ServingError

log = logging.getLogger("hotserve.grpc")

R = TypeVar("R")


def guarded(handler: Callable[[Any, Any, Any], Awaitable[R]]) -> Callable[[Any, Any, Any], Awaitable[R]]:
    """ServingError → its OVMS gRPC code and message; anything else → UNKNOWN, logged with its traceback."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await handler(self, request, context)
        except ServingError as exc:
            await context.abort(grpc.StatusCode[exc.code.grpc_code], str(exc))
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            log.exception("Unhandled error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.UNKNOWN, f"Unknown error: {type(exc).__name__}")
        raise AssertionError("unreachable")  # context.abort always raises

    return wrapper
