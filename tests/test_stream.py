"""ModelStreamInfer (issue 13): answers in request order; every error the unary path gives comes back as that
message's error_message and the stream goes on; metrics and the client-error log count streamed requests as unary
ones; a stream feeds the dynamic batcher; shutdown ends open streams with OK after their in-flight messages."""

from __future__ import annotations

import queue
import re
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import model_entry
from harness import free_port
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
UNARY = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
def server(serve, tmp_path: Path):  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1")
    modelgen.add_const(tmp_path / "dyn" / "1", shape=(-1, 10))
    batching = {"max_batch_size": 8, "max_queue_delay_us": 10_000_000}  # batches leave full, never on the clock
    config = {"model_config_list": [
        model_entry("dummy", tmp_path / "dummy"),
        model_entry("batched", tmp_path / "dyn", dynamic_batching=batching),
    ]}  # fmt: skip
    rest = free_port()
    started = serve(config, "--rest_port", str(rest))
    started.rest = f"http://127.0.0.1:{rest}"
    return started


def request(rid: str, x: np.ndarray | None = None, model: str = "dummy", **edit: object) -> bytes:
    """A ModelInferRequest for input b, serialized; `edit` breaks it on purpose."""
    x = np.full((1, 10), float(len(rid)), np.float32) if x is None else x
    message = pb.ModelInferRequest(model_name=model, id=rid, model_version=str(edit.pop("version", "")))
    tensor = message.inputs.add(name=str(edit.pop("name", "b")), datatype=str(edit.pop("datatype", "FP32")))
    tensor.shape.extend(edit.pop("shape", x.shape))  # type: ignore[call-overload]
    raw = edit.pop("raw", x.tobytes())
    if edit.pop("contents", False):
        tensor.contents.fp32_contents.extend([1.0] * 10)
    if raw is not None:
        message.raw_input_contents.append(raw)  # type: ignore[arg-type]
    assert not edit, edit
    return message.SerializeToString()


# Each is refused by the unary path: decoding, wire structure, lookup, validation (OVMS's order).
BAD = {
    "not-a-message": b"\xff\xff\xff",
    "unknown-model": request("u", model="nosuch-stream"),
    "bad-version": request("v", version="1.5"),  # neither a number nor a label name ("abc" is a label)
    "missing-version": request("w", version="7"),
    "precision": request("p", datatype="INT32"),
    "shape": request("s", shape=(1, 11), raw=np.zeros((1, 11), np.float32).tobytes()),
    "rank": request("r", shape=(10,)),
    "batch": request("n", shape=(2, 10), raw=np.zeros((2, 10), np.float32).tobytes()),
    "content-size": request("c", raw=b"\x00" * 12),
    "both-contents": request("b", contents=True),
    "input-name": request("i", name="nope"),
    "raw-count": request("k", raw=None) + pb.ModelInferRequest(raw_input_contents=[b"1", b"2"]).SerializeToString(),
}


def unary_error(channel: grpc.Channel, data: bytes) -> str:
    call = channel.unary_unary(
        UNARY, request_serializer=lambda b: b, response_deserializer=pb.ModelInferResponse.FromString
    )
    with pytest.raises(grpc.RpcError) as caught:
        call(data, timeout=30)
    return str(caught.value.details())


def stream(channel: grpc.Channel, messages: Iterator[bytes]) -> Iterator[pb.ModelStreamInferResponse]:
    call = channel.stream_stream(
        STREAM, request_serializer=lambda b: b, response_deserializer=pb.ModelStreamInferResponse.FromString
    )
    return call(messages, timeout=60)


def counted(rest: str) -> np.ndarray:
    """(requests, failures) in the server's metrics, over every model and api."""
    with urllib.request.urlopen(f"{rest}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals = {"hotserve_requests_total": 0.0, "hotserve_request_failures_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return np.array(list(totals.values()))


def test_answers_in_order_and_each_unary_error_as_error_message(server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.address) as channel:
        before = counted(server.rest)
        unary = {kind: unary_error(channel, data) for kind, data in BAD.items()}
        unary_counted = counted(server.rest) - before
        messages, expected = [], []
        for i, (kind, data) in enumerate(BAD.items()):  # a good message between any two bad ones
            x = np.full((1, 10), i, np.float32)
            messages += [request(f"ok-{i}", x), data]
            expected += [("ok", f"ok-{i}", x + 1), (kind, None, unary[kind])]
        before = counted(server.rest)
        answers = list(stream(channel, iter(messages)))
        streamed = counted(server.rest) - before
        assert unary_counted.tolist() == [7, 7]  # lookup and validation errors are counted, decoding ones not
        assert streamed.tolist() == np.add(unary_counted, (len(BAD), 0)).tolist()  # as unary, plus the good ones
    assert len(answers) == len(expected)
    for answer, (kind, rid, want) in zip(answers, expected, strict=True):
        if kind == "ok":
            assert answer.error_message == "" and answer.infer_response.id == rid
            got = np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32).reshape(1, 10)
            np.testing.assert_array_equal(got, want)
        else:
            assert answer.error_message == want, kind
    assert re.search(r"Rejected kserve request for model nosuch-stream: Model with requested name", server.log)


def test_tritonclient_stream_survives_a_bad_message(server) -> None:  # type: ignore[no-untyped-def]
    client = grpcclient.InferenceServerClient(server.address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    sent = []
    for i in range(9):
        x = np.full((1, 10), i, np.float32)
        tensor = grpcclient.InferInput("b", [1, 10], "FP32" if i != 4 else "INT32")
        tensor.set_data_from_numpy(x if i != 4 else x.astype(np.int32))
        client.async_stream_infer("dummy", [tensor], request_id=str(i))
        sent.append(x)
    got = [results.get(timeout=30) for _ in sent]
    client.stop_stream()
    for i, (result, error) in enumerate(got):
        if i == 4:
            assert result is None and "Invalid input precision - Expected: FP32; Actual: INT32" in str(error)
        else:
            assert error is None and result.get_response().id == str(i)
            np.testing.assert_array_equal(result.as_numpy("a"), sent[i] + 1)


def test_one_stream_fills_the_dynamic_batch_and_keeps_the_order(server) -> None:  # type: ignore[no-untyped-def]
    inputs = [np.arange(10 * i, 10 * i + 10, dtype=np.float32).reshape(1, 10) for i in range(32)]
    with grpc.insecure_channel(server.address) as channel:
        answers = list(stream(channel, iter([request(str(i), x, model="batched") for i, x in enumerate(inputs)])))
    for i, (answer, x) in enumerate(zip(answers, inputs, strict=True)):
        assert answer.error_message == "" and answer.infer_response.id == str(i)
        got = np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32).reshape(1, 10)
        np.testing.assert_array_equal(got, x + 1)
    with urllib.request.urlopen(f"{server.rest}/metrics", timeout=30) as response:
        text = response.read().decode()
    (count,) = re.findall(r'^hotserve_batch_size_count\{model="batched"\} (\S+)$', text, re.M)
    assert float(count) == len(inputs) / 8  # messages of one stream ran concurrently, in full batches of 8


def test_shutdown_ends_an_open_stream_with_ok(server) -> None:  # type: ignore[no-untyped-def]
    more = threading.Event()

    def messages() -> Iterator[bytes]:
        yield request("first")
        more.wait(60)  # the client keeps its side open

    with grpc.insecure_channel(server.address) as channel:
        answers = stream(channel, messages())
        assert next(answers).infer_response.id == "first"
        server.signal(signal.SIGTERM)
        assert list(answers) == []  # ended by the server, with OK (an error status would raise here)
        assert answers.code() == grpc.StatusCode.OK
        more.set()
    assert server.proc.wait(30) == 0
