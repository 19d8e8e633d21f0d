"""ModelStreamInfer against a version's life, paused deterministically with the lifecycle's "batch" gate: a retiring
version answers the messages it accepted, shutdown's `Streams.close()` delivers in-flight answers then OK, and a
client that cancels mid-stream leaves no lease behind.

The scenarios run the real KServe servicer in-process (Env + Gates + grpc.aio on 127.0.0.1) and so import the
server's generated protos, which clash with tritonclient's: each runs in its own interpreter (this file as a script).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(scenario: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, scenario],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"scenario {scenario} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_retiring_version_answers_the_stream_messages_it_accepted() -> None:
    seen = _run("retire")
    assert seen["v1_while_held"] == "UNLOADING" and seen["v1_compiled_while_held"]
    assert seen["answers"] == [["1", 1.0], ["1", 2.0], ["1", 3.0], ["2", 5.0], ["2", 6.0]]  # x + version
    assert seen["code"] == "OK" and seen["v1_after"] == "END"


def test_close_delivers_in_flight_answers_then_ends_with_ok() -> None:
    seen = _run("close")
    assert seen["answers"] == [["1", 1.0], ["1", 2.0]] and seen["code"] == "OK"
    assert seen["open_after"] == 0


def test_a_cancelled_stream_leaves_no_lease_and_the_held_batch_still_runs() -> None:
    seen = _run("cancel")
    assert seen["inflight_after_cancel"] == 1 and seen["waiting_after_cancel"] == 0  # only the held batch
    assert seen["inflight_after_release"] == 0 and seen["open_after"] == 0
    assert seen["next_answer"] == ["1", 8.0]  # the version still serves


def test_the_streams_route_key_metadata_keeps_every_message_on_its_version() -> None:
    seen = _run("route")
    for key, (expected, versions) in seen.items():
        assert versions == [expected] * len(versions), key  # drawn per message, 20 would hardly agree
    assert {expected for expected, _ in seen.values()} == {"1", "2"}  # the keys do land on both sides


# ---- the scenarios (run as `python tests/test_stream_lifecycle.py NAME`) ----
def _message(pb: Any, rid: int, value: float) -> Any:
    x = np.full((1, 10), value, np.float32)
    request = pb.ModelInferRequest(model_name="m", id=str(rid))
    request.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    request.raw_input_contents.append(x.tobytes())
    return request


def _answer(response: Any) -> list[Any]:
    assert response.error_message == "", response.error_message
    out = np.frombuffer(response.infer_response.raw_output_contents[0], np.float32)
    return [response.infer_response.model_version, float(out[0])]


async def _scenario(name: str, root: Path) -> dict[str, Any]:
    import grpc
    from lifecycle_env import Env

    from engine.frontend import kserve, stream
    from engine.frontend.generated.inference import grpc_service_pb2 as pb
    from engine.frontend.generated.inference import grpc_service_pb2_grpc as pb_grpc
    from engine.frontend.receive import Deadlines
    from engine.frontend.registration import GenericOnly

    env = Env(root)
    if name == "route":
        return await _route(env)
    env.version("m", 1, shape=(-1, 10))
    env.model("m", nireq=1, dynamic_batching={"max_batch_size": 4})
    assert (await env.reload()).ok
    old = env.served("m", 1)
    streams = stream.Streams()
    server = grpc.aio.server()
    kserve.register(GenericOnly(server, Deadlines(120.0)), env.plane, streams)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        gate = env.gates.arm("batch", "m", 1)
        await call.write(_message(pb, 0, 0.0))
        await gate.reached()  # message 0 runs as a batch, held before OpenVINO
        await call.write(_message(pb, 1, 1.0))
        await env.until(lambda: old.batcher.waiting == 1, "message 1 queued behind the held batch")
        if name == "retire":
            await call.write(_message(pb, 2, 2.0))
            await env.until(lambda: old.batcher.waiting == 2, "message 2 queued")
            env.version("m", 2, shape=(-1, 10))
            assert (await env.reload()).ok  # version 2 serves; version 1 retires with its queue
            seen["v1_while_held"] = env.state("m", 1).name
            seen["v1_compiled_while_held"] = old.compiled is not None
            await call.write(_message(pb, 3, 3.0))  # to version 2, answered after the held ones
            gate.release()
            seen["answers"] = [_answer(await call.read()) for _ in range(4)]
            await call.write(_message(pb, 4, 4.0))
            seen["answers"].append(_answer(await call.read()))
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            await env.lifecycle.settle()
            seen["v1_after"] = env.state("m", 1).name if env.state("m", 1) is not None else "END"
        elif name == "close":
            streams.close()  # as shutdown does; the client keeps its side open
            gate.release()
            answers = []
            while (response := await call.read()) != grpc.aio.EOF:
                answers.append(_answer(response))
            seen["answers"] = answers
            seen["open_after"] = streams.open
        elif name == "cancel":
            call.cancel()
            await env.until(lambda: old.inflight == 1, "the cancelled messages' leases released")
            seen["inflight_after_cancel"] = old.inflight
            seen["waiting_after_cancel"] = old.batcher.waiting
            gate.release()
            await env.until(lambda: old.inflight == 0, "the held batch finished")
            seen["inflight_after_release"] = old.inflight
            seen["open_after"] = streams.open
            number, out = await env.infer("m", None, np.full((1, 10), 7.0, np.float32))
            seen["next_answer"] = [str(number), float(out[0, 0])]
        seen["code"] = (await call.code()).name
    await server.stop(None)
    await env.close()
    return seen


async def _route(env: Any) -> dict[str, Any]:
    """20 messages per stream, each stream with its own `hotserve-route-key` metadata, over 50/50 weights."""
    import grpc

    from engine.frontend import kserve, stream
    from engine.frontend.generated.inference import grpc_service_pb2 as pb
    from engine.frontend.generated.inference import grpc_service_pb2_grpc as pb_grpc
    from engine.frontend.receive import Deadlines
    from engine.frontend.registration import GenericOnly

    for version in (1, 2):
        env.version("m", version)
    env.model("m", model_version_policy={"all": {}}, traffic={"1": 50, "2": 50})
    assert (await env.reload()).ok
    routes = env.registry.models["m"].routes
    server = grpc.aio.server()
    kserve.register(GenericOnly(server, Deadlines(120.0)), env.plane, stream.Streams())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    seen: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for key in (f"user-{i}" for i in range(8)):
            call = stub.ModelStreamInfer(iter([_message(pb, i, 0.0) for i in range(20)]),
                                         metadata=(("hotserve-route-key", key),))  # fmt: skip
            versions = [_answer(response)[0] async for response in call]
            seen[key] = [str(routes.route(key)), versions]
    await server.stop(None)
    await env.close()
    return seen


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        result = asyncio.run(asyncio.wait_for(_scenario(sys.argv[1], Path(folder)), 90))
    print(json.dumps(result))
