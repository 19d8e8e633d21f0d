"""KServe `ModelStreamInfer` (Triton's non-decoupled streaming): one answer per request, in the order they came.

Up to MAX_INFLIGHT messages of one stream run at once (so a stream fills a model's dynamic batch, and a slow message
does not hold back the reading of the next ones); answers are still written in request order. When that many are
running the stream is not read further, so gRPC's flow control pushes back on the client: no unbounded queue. A bad
message is answered with `error_message` and the stream goes on. `Streams.close()` (shutdown) makes every stream
stop reading, answer what it has read, and end with OK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from ..errors import ServingError
from .client_log import client_errors
from .generated.inference import grpc_service_pb2 as pb
from .kserve_wire import InferRequest

log = logging.getLogger("hotserve.grpc")

MAX_INFLIGHT = 16  # messages of one stream being answered at once
Answer = Callable[[InferRequest], Awaitable[pb.ModelInferResponse]]
_END = None


class Streams:
    """The server's open streams; closing ends them after their in-flight messages."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.open = 0

    def close(self) -> None:
        self.closing.set()


async def serve(
    requests: AsyncIterator[InferRequest], answer: Answer, streams: Streams
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Answers of one stream, in order; each message is answered by `answer`, as a unary ModelInfer would be."""
    slots = asyncio.Semaphore(MAX_INFLIGHT)
    order: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue()
    reader = asyncio.create_task(_read(requests, answer, streams, slots, order))
    streams.open += 1
    try:
        while (task := await order.get()) is not _END:
            response = await task
            slots.release()
            yield response
        await reader  # its exception (a broken stream) ends the RPC
    finally:
        streams.open -= 1
        reader.cancel()
        while not order.empty():  # the client went away: what is still running is not answered
            left = order.get_nowait()
            if left is not None:
                left.cancel()


async def _read(
    requests: AsyncIterator[InferRequest],
    answer: Answer,
    streams: Streams,
    slots: asyncio.Semaphore,
    order: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None],
) -> None:
    closing = asyncio.ensure_future(streams.closing.wait())
    try:
        while not streams.closing.is_set():
            await slots.acquire()
            message = asyncio.ensure_future(anext(requests, _END))
            await asyncio.wait((message, closing), return_when=asyncio.FIRST_COMPLETED)
            if not message.done():  # shutting down: what the client sends from now on is not read
                message.cancel()
                break
            wire = message.result()
            if wire is _END:
                break
            order.put_nowait(asyncio.create_task(_one(wire, answer)))
    finally:
        closing.cancel()
        order.put_nowait(_END)


async def _one(wire: InferRequest, answer: Answer) -> pb.ModelStreamInferResponse:
    try:
        return pb.ModelStreamInferResponse(infer_response=await answer(wire))
    except ServingError as exc:
        client_errors.report("kserve", wire.model_name, exc)
        error = str(exc)
    except Exception as exc:  # a server fault: logged with its trace; the stream goes on
        log.exception("Unhandled error in ModelStreamInfer")
        error = f"Unknown error: {type(exc).__name__}"
    message = wire.message
    failed = pb.ModelInferResponse(model_name=message.model_name, model_version=message.model_version, id=message.id)
    return pb.ModelStreamInferResponse(error_message=error, infer_response=failed)
