"""How services go onto the grpc.aio server: as generic handlers only, some methods swapped for ours.

grpc.aio keeps one waiting task per *registered* method and, for every call that arrives, runs an `asyncio.wait`
over all of them: with the ~20 methods of KServe, TF Serving, health and reflection that cost 60–150 µs of server
CPU per request (measured side by side: benchmarks/request_path.py). A generic handler is one dict lookup per
service. The generated `add_*_to_server` functions register each service both ways; `GenericOnly` keeps the generic
half (rebuilt from the method table when some methods are swapped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc


class GenericOnly:
    """The server as the generated registration code sees it."""

    def __init__(self, server: grpc.aio.Server, replace: Mapping[str, grpc.RpcMethodHandler] | None = None) -> None:
        self._server = server
        self._replace = dict(replace or {})

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        if not self._replace:  # with replacements, add_registered_method_handlers builds the handler instead
            self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        if self._replace:
            table = {**handlers, **self._replace}
            self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, table),))

    def replacing(self, replace: Mapping[str, grpc.RpcMethodHandler]) -> GenericOnly:
        return GenericOnly(self._server, replace)
