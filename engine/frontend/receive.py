"""A unary method served as a client-streaming one, so a request message that never completes is ended.

grpc.aio runs a unary method's behaviour only once C-core holds the whole request message: until then nothing in
Python knows the call exists, and a client that sends part of a message and stops keeps that part in the server's
memory for as long as it keeps the connection open (measured: 20 such calls of 50 MB took the server from 128 MB to
1.1 GB, held until the client left). grpcio exposes no C-core resource quota. Served as a stream-request method, the
behaviour starts at the call's headers, reads the one message under a time limit, then runs the unary behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from ..errors import Code, ServingError
from .client_log import client_errors

log = logging.getLogger("hotserve.grpc")

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]


class Deadlines:
    """The calls waiting for their request message, oldest first, and one timer for the oldest of them: a per-call
    `asyncio.timeout` would put a timer on the loop's heap for every request (~7 µs), this is two dict operations."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # in the order the calls began; an OrderedDict finds its first entry in O(1) however many went before it
        self._started: OrderedDict[grpc.aio.ServicerContext, tuple[float, str]] = OrderedDict()
        self._late: set[grpc.aio.ServicerContext] = set()  # past their time, their abort not yet begun
        self._aborts: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._timer: asyncio.TimerHandle | None = None

    async def read(self, method: str, context: grpc.aio.ServicerContext) -> object:
        """The call's one request message, or the call aborted with MESSAGE_TIMEOUT (or INTERNAL: no message)."""
        loop = asyncio.get_running_loop()
        self._started[context] = (loop.time(), method)
        if self._timer is None:
            self._timer = loop.call_at(loop.time() + self.seconds, self._expire, loop)
        try:
            # never cancelled: a message C-core completes as the time runs out is freed only once this read has it
            request = await context.read()  # raises the abort's AbortError once _abort_late has ended the call
        except DecodeError as exc:
            await _refuse(method, context, exc)
        finally:
            self._started.pop(context, None)
            self._late.discard(context)
        if request is grpc.aio.EOF:  # half-closed with no message, or a call C-core ended (a message it refused)
            await _abort(context, grpc.StatusCode.INTERNAL, "the call ended without its request message")
        return request

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        limit = loop.time() - self.seconds
        while self._started:  # from the oldest, and no further than the first call still in time
            context, (started, method) = next(iter(self._started.items()))
            if started > limit:
                self._timer = loop.call_at(started + self.seconds, self._expire, loop)
                return
            del self._started[context]
            self._late.add(context)
            task = loop.create_task(self._abort_late(method, context))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    async def _abort_late(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """From its own task, so the call's read is left to end when C-core ends the call."""
        if context not in self._late:
            return  # the message came in the loop step the time ran out in: it is answered
        self._late.discard(context)
        late = ServingError(Code.MESSAGE_TIMEOUT, f"{self.seconds:g} s since the call's headers")
        client_errors.report(method, "", late)  # the model is named in the message that never came
        with contextlib.suppress(grpc.aio.AbortError, grpc.aio.InternalError):  # sent; or the call had ended
            await context.abort(grpc.StatusCode[late.code.grpc_code], str(late))


async def _messages(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
    """A stream's request messages, as grpc.aio's request iterator gives them, but bytes that are no message refused."""
    while True:
        try:
            message = await context.read()
        except DecodeError as exc:
            await _refuse(method, context, exc)
        if message is grpc.aio.EOF:
            return
        yield message


async def _refuse(method: str, context: grpc.aio.ServicerContext, exc: DecodeError) -> NoReturn:
    """INVALID_ARGUMENT in one rate-limited line, where grpc.aio would answer UNKNOWN and log a traceback per call."""
    error = ServingError(Code.INVALID_ARGUMENT, f"the request is not a valid protobuf message: {exc}")
    client_errors.report(method, "", error)
    await _abort(context, grpc.StatusCode[error.code.grpc_code], str(error))


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """context.abort; if C-core had ended the call itself (with its own status), ended as a call the client
    cancelled is: grpc.aio would log the failed send with a traceback, once per such call."""
    try:
        await context.abort(code, details)
    except grpc.aio.InternalError:  # ExecuteBatchError: the status was not sent, the call is over
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable")  # context.abort always raises


def bounded(method: str, handler: grpc.RpcMethodHandler, deadlines: Deadlines) -> grpc.RpcMethodHandler:
    """`handler` with its one request message read within `deadlines.seconds` of the call's start
    (DEADLINE_EXCEEDED if not), and bytes that are not its request message answered INVALID_ARGUMENT. A stream is
    idle between messages by right (README, Known limits): its messages are only checked, and not even that where
    the deserializer is one of ours (kserve_wire.parse answers bad bytes itself)."""
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and not hasattr(getattr(deserialize, "__self__", None), "DESCRIPTOR"):
        return handler
    behaviour: Behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        # a library's servicer grown a sync method: grpc.aio runs it in a thread, served as before rather than not
        log.warning("%s is not async: served without --grpc_receive_timeout_seconds and message checks", method)
        return handler

    request: Callable[[grpc.aio.ServicerContext], Awaitable[object]]
    if handler.request_streaming:

        async def request(context: grpc.aio.ServicerContext) -> object:  # the behaviour's request iterator
            return _messages(method, context)

    else:
        request = functools.partial(deadlines.read, method)  # no coroutine of ours between the call and its read

    if not handler.response_streaming:

        async def unary(_: object, context: grpc.aio.ServicerContext) -> object:
            return await behaviour(await request(context), context)

        return grpc.stream_unary_rpc_method_handler(unary, deserialize, serialize)
    if inspect.isasyncgenfunction(behaviour):

        async def streamed(_: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            async for response in behaviour(await request(context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(streamed, deserialize, serialize)

    async def written(_: object, context: grpc.aio.ServicerContext) -> None:  # writes its replies with context.write
        await behaviour(await request(context), context)

    return grpc.stream_stream_rpc_method_handler(written, deserialize, serialize)
