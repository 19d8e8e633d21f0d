"""grpc.health.v1 for Kubernetes probes, and server reflection for grpcurl.

Service "" is SERVING once the initial reconcile is done; a model's name is SERVING while a request naming no
version would be served (an AVAILABLE version; with `traffic`, a weighted one). Statuses are synced from the registry
on a short period rather than pushed from the reconciler: versions also change outside a reconcile (a retired one
reaches END when its requests drain, an `auto` reshape swaps one in), and polling the registry sees all of them while
nothing on the loading path knows about the front end.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from .dataplane import DataPlane
from .registration import GenericOnly

SYNC_SECONDS = 0.25
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


WATCH_FLUSH_SECONDS = 1.0  # at stop, how long open Watch streams get to send their last status


class _Sent:
    """A Watch stream's context, recording the last status it wrote."""

    def __init__(self, context: grpc.aio.ServicerContext, service: str) -> None:
        self._context = context
        self.service = service
        self.status: int | None = None

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        self.status = message.status

    def __getattr__(self, name: str) -> object:
        return getattr(self._context, name)


class _Servicer(health.aio.HealthServicer):
    """grpcio's servicer, whose Watch streams can be ended: an open one would hold shutdown for the whole grace."""

    def __init__(self) -> None:
        super().__init__()
        self.watches: dict[asyncio.Task[object], _Sent] = {}

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        task = asyncio.current_task()
        sent = _Sent(context, request.service)
        if task is not None:
            self.watches[task] = sent
        try:
            await super().Watch(request, sent)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            return  # ended by end_watches(), once the client was told the last status
        finally:
            if task is not None:
                self.watches.pop(task, None)

    async def List(  # type: ignore[override]
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """grpcio's servicer leaves List (which reflection lists) unimplemented: each name's status, as Check."""
        statuses = {name: health_pb2.HealthCheckResponse(status=s) for name, s in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)

    async def end_watches(self) -> None:
        """End every open Watch once it has sent the current status (bounded), so it never holds the shutdown."""
        deadline = asyncio.get_running_loop().time() + WATCH_FLUSH_SECONDS
        while asyncio.get_running_loop().time() < deadline and any(
            sent.status != self._server_status.get(sent.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            for sent in self.watches.values()
        ):
            await asyncio.sleep(0.005)
        for task in list(self.watches):
            task.cancel()


class Health:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.servicer = _Servicer()
        self._known: dict[str, int] = {}
        self._draining: asyncio.Task[None] | None = None  # keeps drain()'s task referenced until it is done

    def register(self, server: GenericOnly) -> str:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        return health.SERVICE_NAME

    async def sync(self) -> None:
        serving = self.plane.ready and not self.plane.draining
        wanted = {"": SERVING if serving else NOT_SERVING}
        for view in self.plane.models():
            available = self.plane.registry.model(view.name).main_version()  # what a request naming none gets
            wanted[view.name] = SERVING if serving and available else NOT_SERVING
        for name, status in wanted.items():
            if self._known.get(name) != status:
                await self.servicer.set(name, status)
                self._known[name] = status

    async def start(self) -> None:
        """Call before the gRPC server starts: grpcio's servicer answers "" SERVING until told otherwise."""
        await self.sync()

    async def run(self) -> None:
        """Keep the statuses in step with the registry (run under the server's supervisor)."""
        while True:
            await self.sync()
            await asyncio.sleep(SYNC_SECONDS)

    def drain(self) -> None:
        """Every name NOT_SERVING from the next loop step on (Watch streams are told), and for good: the sync
        loop keeps running until stop() but the servicer ignores it from then on."""
        self._draining = asyncio.create_task(self.servicer.enter_graceful_shutdown())

    async def stop(self) -> None:
        if self._draining is not None:
            await self._draining  # drain() began the shutdown: every status NOT_SERVING first
        await self.servicer.enter_graceful_shutdown()  # idempotent
        await self.servicer.end_watches()


def enable_reflection(server: GenericOnly, services: list[str]) -> None:
    """grpc_reflection's enable_server_reflection for a grpc.aio server, registered through `server`."""
    servicer = reflection.aio.ReflectionServicer([*services, reflection.SERVICE_NAME])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
