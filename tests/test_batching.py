"""Dynamic batching (issue 13): config checks with pointers, the load-time shape check, queue full, a reload while a
batch runs (in-process, paused with the lifecycle's "batch" gate), and a real server under 16 concurrent clients
whose answers must equal unbatched inference row for row."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from pathlib import Path

import modelgen
import numpy as np
import pytest
from conftest import model_entry
from harness import free_port
from lifecycle_env import Env, aio
from prometheus_client.parser import text_string_to_metric_families

from engine import config as C
from engine.errors import Code, ServingError
from engine.frontend.dataplane import Tensor

M0 = "/model_config_list/0/config"


def load(tmp_path: Path, **fields: object) -> C.Config:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_config_list": [{"config": {"name": "m", "base_path": "m", **fields}}]}))
    return C.load(path)


# ---- config ----
def test_defaults_and_values(tmp_path: Path) -> None:
    (model,) = load(tmp_path, dynamic_batching={}).models
    assert model.dynamic_batching == C.DynamicBatching(8, 0, (), 64)
    (model,) = load(tmp_path, batch_size="1:16", dynamic_batching={
        "max_batch_size": 16, "max_queue_delay_us": 500, "preferred_batch_sizes": [8, 4], "max_queue_size": 3,
    }).models  # fmt: skip
    assert model.dynamic_batching == C.DynamicBatching(16, 500, (4, 8), 3)
    assert load(tmp_path).models[0].dynamic_batching is None


def test_a_batching_change_reloads_the_version(tmp_path: Path) -> None:
    before = load(tmp_path, dynamic_batching={"max_queue_delay_us": 100}).models[0]
    after = load(tmp_path, dynamic_batching={"max_queue_delay_us": 200}).models[0]
    assert before.needs_reload(after) and before.needs_reload(load(tmp_path).models[0])
    assert not before.needs_reload(load(tmp_path, dynamic_batching={"max_queue_delay_us": 100}).models[0])


# fmt: off
SEMANTIC = [
    ({"dynamic_batching": {"max_batch_size": 4, "preferred_batch_sizes": [2, 8]}},
     "/dynamic_batching/preferred_batch_sizes/1", "preferred batch size 8 is larger than max_batch_size 4"),
    ({"batch_size": "auto", "dynamic_batching": {}}, "/batch_size", "batch_size auto reshapes the model"),
    ({"shape": "auto", "dynamic_batching": {}}, "/shape", "set batch_size to \"-1\" or a range"),
    ({"batch_size": 1, "dynamic_batching": {}}, "/batch_size", "batch_size 1 is a static batch"),
    ({"batch_size": "1:4", "dynamic_batching": {}}, "/batch_size", "cannot take max_batch_size 8 rows"),
]
SCHEMA = [
    ({"max_batch_size": 0}, "/dynamic_batching/max_batch_size", "an integer from 1 to 1024"),
    ({"max_queue_delay_us": -1}, "/dynamic_batching/max_queue_delay_us", "an integer from 0 to 10000000"),
    ({"preferred_batch_sizes": [2, 2]}, "/dynamic_batching/preferred_batch_sizes", "distinct integers"),
    ({"max_queue_size": "64"}, "/dynamic_batching/max_queue_size", "an integer from 1 to 100000"),
    ({"max_delay": 5}, "/dynamic_batching/max_delay", "expected only: max_batch_size, max_queue_delay_us"),
]
# fmt: on


@pytest.mark.parametrize(("fields", "pointer", "needle"), SEMANTIC)
def test_semantic_errors_point_at_the_field(tmp_path: Path, fields: dict, pointer: str, needle: str) -> None:
    config = load(tmp_path, **fields)
    assert config.models == ()  # the entry is set aside
    (error,) = config.model_errors["m"]
    assert (error.pointer, error.model) == (M0 + pointer, "m") and needle in error.message, error


@pytest.mark.parametrize(("batching", "pointer", "needle"), SCHEMA)
def test_schema_errors_point_at_the_field(tmp_path: Path, batching: dict, pointer: str, needle: str) -> None:
    with pytest.raises(C.ConfigInvalid) as caught:
        load(tmp_path, dynamic_batching=batching)
    (error,) = caught.value.errors
    assert error.pointer == M0 + pointer and needle in error.message, error


# ---- in-process: load check, queue full, reload during a batch ----
def rows(n: int, first: int) -> np.ndarray:
    return np.arange(first * 10, (first + n) * 10, dtype=np.float32).reshape(n, 10)


async def infer(env: Env, x: np.ndarray) -> tuple[int, np.ndarray]:
    number, outputs = await env.plane.infer("m", None, [Tensor("b", "FP32", tuple(x.shape), x)])
    return number, outputs[0].data


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@aio
async def test_a_static_batch_fails_the_load_naming_model_input_and_why(env: Env) -> None:
    env.version("m", 1)  # (1,10): static batch 1
    env.model("m", dynamic_batching={})
    assert not (await env.reload()).ok
    status = env.status("m", 1)
    expected = "dynamic_batching: model m: input b (shape (1,10), batch axis 0) has a static batch 1, which cannot"
    assert status.failed and expected in status.error_message, status.error_message
    assert 'set batch_size to "-1" or a range such as "1:8"' in status.error_message
    env.model("m", batch_size="-1", dynamic_batching={})  # the fix the message gives
    assert (await env.reload()).ok
    assert (await infer(env, rows(3, 0)))[1].tolist() == (rows(3, 0) + 1).tolist()
    await env.close()


@aio
async def test_queue_full_is_resource_exhausted_at_once_and_the_running_batch_is_not_counted(env: Env) -> None:
    env.version("m", 1, shape=(-1, 10))
    env.model("m", nireq=1, dynamic_batching={"max_batch_size": 2, "max_queue_size": 2})
    assert (await env.reload()).ok
    batcher = env.served("m", 1).batcher
    gate = env.gates.arm("batch", "m", 1)
    running = asyncio.create_task(infer(env, rows(2, 0)))  # a full batch: it leaves at once and is held
    await gate.reached()
    queued = [asyncio.create_task(infer(env, rows(1, i))) for i in (2, 3)]
    await env.until(lambda: batcher.waiting == 2, "two requests queued behind the held batch")
    with pytest.raises(ServingError) as caught:
        await infer(env, rows(1, 9))
    assert caught.value.code == Code.QUEUE_FULL and caught.value.code.grpc_code == "RESOURCE_EXHAUSTED"
    assert "2 requests are waiting (max_queue_size 2); model: m; version: 1" in str(caught.value)
    gate.release()
    answers = await asyncio.gather(running, *queued)
    for (number, out), x in zip(answers, [rows(2, 0), rows(1, 2), rows(1, 3)], strict=True):
        assert number == 1 and out.tolist() == (x + 1).tolist()
    assert env.gates.passed[("batch", "m", 1)] == 2  # the two queued ones ran as one batch
    await env.close()


@aio
async def test_a_preferred_size_leaves_at_once_when_more_rows_queued_meanwhile(env: Env) -> None:
    env.version("m", 1, shape=(-1, 10))
    batching = {"max_batch_size": 8, "preferred_batch_sizes": [4], "max_queue_delay_us": 10_000_000}
    env.model("m", nireq=1, dynamic_batching=batching)
    assert (await env.reload()).ok
    batcher = env.served("m", 1).batcher
    gate = env.gates.arm("batch", "m", 1)
    running = asyncio.create_task(infer(env, rows(8, 0)))  # max_batch_size rows: leaves at once, held
    await gate.reached()
    queued = [asyncio.create_task(infer(env, rows(1, i))) for i in range(8, 13)]  # 5 rows queue behind it
    await env.until(lambda: batcher.waiting == 5, "five requests queued behind the held batch")
    second = env.gates.arm("batch", "m", 1)
    gate.release()
    await second.reached()  # without waiting the 10 s delay: the first four rows are a preferred size
    assert batcher.waiting == 1
    more = [asyncio.create_task(infer(env, rows(1, i))) for i in range(13, 16)]  # 1 + 3 rows: preferred again
    second.release()
    answers = await asyncio.gather(running, *queued, *more)
    for (_, out), x in zip(answers, [rows(8, 0), *(rows(1, i) for i in range(8, 16))], strict=True):
        assert out.tolist() == (x + 1).tolist()
    assert env.gates.passed[("batch", "m", 1)] == 3
    await env.close()


@aio
async def test_a_reload_while_a_batch_runs_drains_the_old_queue_and_fails_nothing(env: Env) -> None:
    env.version("m", 1, shape=(-1, 10))
    env.model("m", nireq=1, dynamic_batching={"max_batch_size": 4})
    assert (await env.reload()).ok
    old = env.served("m", 1)
    gate = env.gates.arm("batch", "m", 1)
    held = asyncio.create_task(infer(env, rows(1, 0)))
    await gate.reached()  # v1's first compile runs a batch, held here
    queued = [asyncio.create_task(infer(env, rows(1, i))) for i in (1, 2, 3)]
    await env.until(lambda: old.batcher.waiting == 3, "three requests queued on the old compile")
    env.model("m", nireq=1, dynamic_batching={"max_batch_size": 4, "max_queue_delay_us": 100})  # a settings change
    assert (await env.reload()).ok
    new = env.served("m", 1)
    assert new is not old and new.batcher is not old.batcher
    assert old.inflight == 5  # four leases and the running batch: the old compile cannot be freed yet
    fresh = [await infer(env, rows(2, 10 + 2 * i)) for i in range(3)]  # served by the new compile meanwhile
    assert old.compiled is not None and old.batcher.waiting == 3
    gate.release()
    answers = await asyncio.gather(held, *queued)
    await env.lifecycle.settle()
    assert old.compiled is None and old.inflight == 0  # drained, then freed
    for (number, out), x in zip(answers, [rows(1, i) for i in range(4)], strict=True):
        assert number == 1 and out.tolist() == (x + 1).tolist()
    for (number, out), i in zip(fresh, range(3), strict=True):
        assert number == 1 and out.tolist() == (rows(2, 10 + 2 * i) + 1).tolist()
    await env.close()


@aio
async def test_an_openvino_failure_fails_every_request_of_the_batch_and_hangs_nothing(env: Env) -> None:
    for name in ("m", "plain"):  # (N,10) → (-1,3): OpenVINO fails unless N*10 divides by 3
        modelgen.regroup(env.root / "models" / name / "1")
    env.model("m", nireq=1, dynamic_batching={"max_batch_size": 4})
    env.model("plain", nireq=1)  # the same failure without a batcher: its one infer request must come back
    assert (await env.reload()).ok
    for _ in range(2):
        with pytest.raises(RuntimeError, match="reshape"):
            await env.plane.infer("plain", None, [Tensor("b", "FP32", (1, 10), rows(1, 0))])
    gate = env.gates.arm("batch", "m", 1)
    held = asyncio.create_task(infer(env, rows(1, 0)))  # a batch of 1 row, held
    await gate.reached()
    queued = [asyncio.create_task(infer(env, rows(1, i))) for i in (1, 2)]  # the next batch: 2 rows, fails too
    await env.until(lambda: env.served("m", 1).batcher.waiting == 2, "two requests queued")
    gate.release()
    for failed in await asyncio.gather(held, *queued, return_exceptions=True):
        assert isinstance(failed, RuntimeError) and "reshape" in str(failed), failed
    assert env.served("m", 1).inflight == 0
    number, out = await infer(env, rows(3, 0))  # 30 values: OpenVINO succeeds, the batcher still serves
    assert number == 1 and out.shape == (10, 3)
    await env.close()


# ---- a real server, 16 concurrent tritonclient clients ----
CLIENTS = 16
PER_CLIENT = 12


def metric(text: str, name: str, model: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == model:
                return sample.value
    raise AssertionError(f"{name} for {model} not in metrics")


def test_batched_answers_equal_unbatched_inference_row_for_row(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    modelgen.mlp(tmp_path / "mlp" / "1", widths=(16, 64, 8))
    batching = {"max_batch_size": 8, "max_queue_delay_us": 20000, "preferred_batch_sizes": [4], "max_queue_size": 64}
    config = {"model_config_list": [
        model_entry("batched", tmp_path / "mlp", batch_size="-1", dynamic_batching=batching),
        model_entry("plain", tmp_path / "mlp", batch_size="-1"),
    ]}  # fmt: skip
    rest = free_port()
    server = serve(config, "--rest_port", str(rest))
    rng = np.random.default_rng(7)
    sizes = [[1 + (c + i) % 3 for i in range(PER_CLIENT)] for c in range(CLIENTS)]  # 1, 2 and 3 rows, mixed
    inputs = [[rng.standard_normal((n, 16)).astype(np.float32) for n in per] for per in sizes]
    answers: list[list[np.ndarray]] = [[] for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        triton = grpcclient.InferenceServerClient(server.address)
        start.wait()
        for x in inputs[c]:
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            answers[c].append(triton.infer("batched", [tensor]).as_numpy("output"))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plain = grpcclient.InferenceServerClient(server.address)
    for c in range(CLIENTS):
        assert len(answers[c]) == PER_CLIENT, f"client {c} failed"
        for x, got in zip(inputs[c], answers[c], strict=True):
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            alone = plain.infer("plain", [tensor]).as_numpy("output")
            assert got.shape == alone.shape
            np.testing.assert_allclose(got, alone, rtol=1e-4, atol=1e-5)  # a mixed-up row differs by far more
    with urllib.request.urlopen(f"http://127.0.0.1:{rest}/metrics", timeout=30) as response:
        text = response.read().decode()
    total_rows = sum(sum(per) for per in sizes)
    assert metric(text, "hotserve_batch_size_sum", "batched") == total_rows
    executions = metric(text, "hotserve_batch_size_count", "batched")
    assert executions < CLIENTS * PER_CLIENT  # requests did share inferences
    assert metric(text, "hotserve_queue_duration_seconds_count", "batched") == CLIENTS * PER_CLIENT
    (stats,) = plain.get_inference_statistics("batched").model_stats  # Triton's meaning: a batch is one execution
    assert stats.inference_count == CLIENTS * PER_CLIENT and stats.execution_count == executions
