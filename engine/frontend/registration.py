"""How services go onto the grpc.aio server: as generic handlers only, some methods swapped for ours, and every
unary method's request read under a time limit (frontend/receive.py).

grpc.aio keeps one waiting task per *registered* method and, for every call that arrives, runs an `asyncio.wait`
over all of them: with the ~20 methods of KServe, TF Serving, health and reflection that cost 60–150 µs of server
CPU per request (measured side by side: benchmarks/request_path.py). A generic handler is one dict lookup per
service. The generated `add_*_to_server` functions register each service both ways; `GenericOnly` builds the generic
handler itself from the method table the registered half is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from .receive import Deadlines, bounded


class GenericOnly:
    """The server as the generated registration code sees it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        deadlines: Deadlines,
        replace: Mapping[str, grpc.RpcMethodHandler] | None = None,
    ) -> None:
        self._server = server
        self._deadlines = deadlines  # one for the whole server: one timer
        self._replace = dict(replace or {})

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Ignored: the same methods come to add_registered_method_handlers as a table (every generated file since
        grpcio-tools 1.62 calls both; tests/registration_check.py fails if a service goes missing)."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        table = {
            name: bounded(f"/{service}/{name}", handler, self._deadlines)
            for name, handler in {**handlers, **self._replace}.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, table),))

    def replacing(self, replace: Mapping[str, grpc.RpcMethodHandler]) -> GenericOnly:
        return GenericOnly(self._server, self._deadlines, replace)
