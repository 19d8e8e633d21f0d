"""The one mapping of serving errors to gRPC status codes, applied to every RPC handler; handler replacement."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
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


class Replacing:
    """Hands the generated registration code a server whose handlers for some methods are swapped for ours."""

    def __init__(self, server: grpc.aio.Server, replace: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server = server
        self._replace = replace

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # add_registered_method_handlers below registers the generic handler, with the swapped methods

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        handlers = {**handlers, **self._replace}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)
