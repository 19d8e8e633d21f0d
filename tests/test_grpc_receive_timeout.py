"""A unary gRPC call whose request message never completes is ended after --grpc_receive_timeout_seconds (issue 10):
C-core would otherwise hold the part that came for as long as the client keeps the connection."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import grpc
import modelgen
import numpy as np
import pytest
from conftest import model_entry, triton
from raw_h2 import RawGrpc, frame
from tritonclient.grpc import InferInput, service_pb2

from engine.frontend.generated.tensorflow_serving.apis import predict_pb2

UNARY = [
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/tensorflow.serving.PredictionService/Predict",
    "/tensorflow.serving.ModelService/GetModelStatus",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",  # unary request, streamed replies
]


@pytest.fixture
def server(tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "m" / "1", delta=1.0)
    config = {"model_config_list": [model_entry("m", tmp_path / "m")]}
    return serve(config, "--grpc_receive_timeout_seconds", "1", "--file_system_poll_wait_seconds", "0")


def good_infer(address: str) -> None:
    client = triton(address)
    x = InferInput("b", [1, 10], "FP32")
    x.set_data_from_numpy(np.ones((1, 10), np.float32))
    out = client.infer("m", [x]).as_numpy("a")
    np.testing.assert_array_equal(out, np.full((1, 10), 2.0, np.float32))
    client.close()


def test_a_request_message_that_never_completes_ends_the_call_and_nothing_else(server) -> None:  # type: ignore[no-untyped-def]
    start = len(server.log)
    raw = RawGrpc(server.address)
    stalled = {method: raw.start(method) for method in UNARY}
    for stream in stalled.values():
        raw.send(stream, frame(b"\0" * 1000, claimed=1 << 20))  # 1 MiB announced, 1000 bytes sent, then nothing
    good_infer(server.address)  # served while they hang
    for method, stream in stalled.items():
        ended = raw.wait(stream)
        assert ended.status == 4, (method, ended.headers)  # DEADLINE_EXCEEDED
        assert ended.message == (
            "Request message not received within --grpc_receive_timeout_seconds - 1 s since the call's headers"
        ), method
    # the connection itself goes on: a whole message on it is answered
    live = raw.start("/inference.GRPCInferenceService/ServerLive")
    raw.send(live, frame(b""), end=True)
    assert raw.wait(live).status == 0
    raw.close()
    good_infer(server.address)
    log = server.log[start:]
    rejected = 'Rejected /inference.GRPCInferenceService/ModelInfer request for model "": Request message not received'
    assert rejected in log, log
    assert "Traceback" not in log, log


def test_grpc_workers_keep_the_limit(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """--grpc_workers N: each worker process serves with the supervisor's settings, the limit among them."""
    modelgen.add_const(tmp_path / "m" / "1", delta=1.0)
    config = {"model_config_list": [model_entry("m", tmp_path / "m")]}
    fleet = serve(config, "--grpc_workers", "2", "--grpc_receive_timeout_seconds", "1")
    raws = [RawGrpc(fleet.address) for _ in range(4)]  # the kernel spreads connections over the workers
    stalled = [(raw, raw.start("/inference.GRPCInferenceService/ModelInfer")) for raw in raws]
    for raw, stream in stalled:
        raw.send(stream, frame(b"\0" * 1000, claimed=1 << 20))
    for raw, stream in stalled:
        assert raw.wait(stream).status == 4  # DEADLINE_EXCEEDED
        raw.close()
    good_infer(fleet.address)


def test_a_call_is_ended_on_its_own_time_whenever_it_began(server) -> None:  # type: ignore[no-untyped-def]
    """One timer serves every waiting call: it must re-arm for a later call when the call it was set for is gone
    (answered meanwhile), and arm again once it has gone idle."""
    raw = RawGrpc(server.address)
    gone = raw.start("/inference.GRPCInferenceService/ServerLive")  # the timer is set for this call's time
    time.sleep(0.5)  # not a wait for anything: `later` begins half the limit after, past any slack of that timer
    later = raw.start("/inference.GRPCInferenceService/ModelInfer")
    raw.send(later, frame(b"\0" * 1000, claimed=1 << 20))
    raw.send(gone, frame(b""), end=True)
    assert raw.wait(gone).status == 0
    assert raw.wait(later).status == 4  # DEADLINE_EXCEEDED: the timer fired for `gone`, found it answered, re-armed
    idle = raw.start("/inference.GRPCInferenceService/ModelInfer")  # nothing waits: the timer must be set anew
    raw.send(idle, frame(b"\0" * 1000, claimed=1 << 20))
    assert raw.wait(idle).status == 4
    raw.close()


def test_an_ended_call_leaves_nothing_behind() -> None:
    """In process: the abort comes from a task of its own and the call's read is never cancelled, so the read must
    still end when C-core ends the call; else each expired call would keep its task and grpc.aio's call for good."""
    from grpc_health.v1 import health_pb2_grpc

    from engine.frontend.health import _Servicer
    from engine.frontend.receive import Deadlines
    from engine.frontend.registration import GenericOnly

    def calls() -> int:  # grpc.aio's task of each call (named after the method)
        return sum(task.get_name().startswith("HandleExceptions[") for task in asyncio.all_tasks())

    async def until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def scenario() -> tuple[int, list[int], int, tuple[int, int, int]]:
        server = grpc.aio.server()
        deadlines = Deadlines(0.5)
        health_pb2_grpc.add_HealthServicer_to_server(_Servicer(), GenericOnly(server, deadlines))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        raw = RawGrpc(f"127.0.0.1:{port}")
        streams = [raw.start("/grpc.health.v1.Health/Check") for _ in range(50)]
        for stream in streams:
            raw.send(stream, frame(b"\0" * 10, claimed=100))
        await until(lambda: calls() == 50)
        waiting = calls()
        statuses = await asyncio.to_thread(lambda: [raw.wait(stream).status for stream in streams])
        raw.close()
        await until(lambda: calls() == 0 and not deadlines._aborts)  # the aborts' own batches end too
        state = (len(deadlines._started), len(deadlines._late), len(deadlines._aborts))
        left = calls()
        await server.stop(None)
        return waiting, statuses, left, state

    waiting, statuses, left, state = asyncio.run(scenario())
    assert waiting == 50 and statuses == [4] * 50, (waiting, statuses)  # 50 calls waited, each DEADLINE_EXCEEDED
    assert left == 0 and state == (0, 0, 0), (left, state)


def test_the_timer_does_no_work_for_the_calls_still_in_time() -> None:
    """The timer fires once per distinct deadline; if each firing walked every waiting call, a client that keeps
    N calls waiting (HEADERS frames, a few bytes each) would buy O(N) loop work per call it lets expire (measured:
    11 000 waiting, 6.6 ms a firing, 15.6 s of the loop in 20 s). Allocation stands in for work: no timing."""
    from engine.frontend.receive import Deadlines

    async def fire() -> int:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(60.0)
        now = loop.time()
        for i in range(100_000):
            deadlines._started[object()] = (now + i * 1e-3, "/m")  # waiting, none due: the keys are never touched
        tracemalloc.start()
        deadlines._expire(loop)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert deadlines._timer is not None and not deadlines._late
        deadlines._timer.cancel()
        return peak

    assert asyncio.run(fire()) < 64 << 10  # a copy of the waiting calls' table would be ~7 MB


def test_a_message_in_pieces_within_the_time_is_answered(server) -> None:  # type: ignore[no-untyped-def]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["b"].CopyFrom(_tensor_proto())
    body = frame(request.SerializeToString())
    raw = RawGrpc(server.address)
    stream = raw.start("/tensorflow.serving.PredictionService/Predict")
    raw.send(stream, body[:7])  # the prefix and two bytes: the call has begun, the message has not come
    raw.send(stream, body[7:], end=True)
    ended = raw.wait(stream)
    assert ended.status == 0, ended.headers
    reply = predict_pb2.PredictResponse.FromString(ended.data[5:])
    out = reply.outputs["a"]
    assert np.frombuffer(out.tensor_content, np.float32).tolist() == [2.0] * 10, out
    raw.close()


def test_a_unary_call_with_no_message_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    raw = RawGrpc(server.address)
    stream = raw.start("/inference.GRPCInferenceService/ModelInfer")
    raw.send(stream, b"", end=True)
    ended = raw.wait(stream)
    assert (ended.status, ended.message) == (13, "the call ended without its request message")  # INTERNAL
    raw.close()
    good_infer(server.address)


def test_a_call_grpc_itself_ends_while_its_message_is_read_logs_no_error(server) -> None:  # type: ignore[no-untyped-def]
    """C-core ends a call whose message it refuses (here: the compressed flag without grpc-encoding) and the read
    sees no message: not a client's half-close to answer, nor a servicer fault to log with a traceback (about one
    call in three raced C-core's own status and logged one)."""
    start = len(server.log)
    raw = RawGrpc(server.address)
    for _ in range(300):
        stream = raw.start("/inference.GRPCInferenceService/ModelMetadata")
        raw.send(stream, frame(b"abc", compressed=True), end=True)
        ended = raw.wait(stream)
        assert (ended.status, ended.message) == (13, "Compression bit set but no encoding configured"), ended.headers
    raw.close()
    good_infer(server.address)
    log = server.log[start:]
    assert "Traceback" not in log and "[ERROR]" not in log, log[-3000:]


def test_a_message_completed_as_its_time_runs_out_is_freed(server) -> None:  # type: ignore[no-untyped-def]
    """The server is stopped (SIGSTOP) with all but the last byte of a 32 MB message read, gets that byte and wakes
    past the call's limit: the message completes in C-core as the limit ends the call. Answered or DEADLINE_EXCEEDED,
    what came must be freed: a read cancelled after C-core had the message never took it into Python, where it is
    freed (measured: almost every round kept its 32 MB for good)."""
    size = 32 << 20
    name = service_pb2.ModelMetadataRequest(name="m").SerializeToString()
    body = frame(name + b"\x7a" + _varint(size) + b"\0" * size)  # field 15 (bytes), unknown to the message: kept
    rss, statuses = [_rss_mb(server.proc.pid)], []
    for _ in range(12):
        raw = RawGrpc(server.address)
        stream = raw.start("/inference.GRPCInferenceService/ModelMetadata")
        raw.send(stream, body[:-1])
        _wait_read(server.port)  # C-core holds all of it but the last byte
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            raw.send(stream, body[-1:])
            time.sleep(1.5)  # the server's clock runs on while it is stopped: past the call's 1 s when it wakes
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        statuses.append(raw.wait(stream).status)
        raw.close()
        rss.append(_rss_mb(server.proc.pid))
    # what the allocator keeps levels off after a few rounds; one message kept per round does not
    assert rss[-1] - rss[3] < 3 * (size >> 20), rss
    assert set(statuses) <= {0, 4}, statuses  # answered, or DEADLINE_EXCEEDED
    assert "Traceback" not in server.log, server.log[-3000:]


def _wait_read(port: int) -> None:
    """Until the server has read everything sent to its port (the receive queues in /proc/net/tcp are empty)."""
    deadline = time.monotonic() + 30
    while any(
        int(fields[1].split(":")[1], 16) == port and int(fields[4].split(":")[1], 16)
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
    ):
        assert time.monotonic() < deadline, "the server did not read what was sent"
        time.sleep(0.01)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def _rss_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) >> 10 for line in status if line.startswith("VmRSS:"))


def _tensor_proto():  # type: ignore[no-untyped-def]
    from engine.frontend.generated.tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in (1, 10)])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[1.0] * 10)


def test_a_sync_behaviour_is_served_as_it_was_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A library servicer that grows a sync method keeps serving it (grpc.aio runs it in a thread), said once."""
    import logging

    import grpc

    from engine.frontend.receive import Deadlines, bounded

    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    with caplog.at_level(logging.WARNING, "hotserve.grpc"):
        assert bounded("/x.Y/Z", handler, Deadlines(1.0)) is handler
    assert "/x.Y/Z is not async: served without --grpc_receive_timeout_seconds" in caplog.text
