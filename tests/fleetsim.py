"""A fleet on one machine (tests/test_fleet.py, benchmarks/fleet.py): replicas on 127.0.0.1 sharing one models
folder, one ConfigMap-style config folder (kubelet's `..data` swap) and one cache dir, and a load that balances
across them as a Service's endpoints do: round_robin over every replica, with gRPC client-side health checking of
service "" so a replica that is not ready (starting or draining) gets no new requests.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import kube
import numpy as np
from harness import ServerProcess, free_port
from tritonclient.grpc import service_pb2, service_pb2_grpc

STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]"
X = np.zeros((1, 10), np.float32)
# A Service's endpoints follow readiness; round_robin with health checking of "" is the client-side equivalent.
# Short reconnect backoff: a restarted replica rejoins as soon as it is up, as a new pod's endpoint does when ready.
BALANCED = [
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                        "healthCheckConfig": {"serviceName": ""}})),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]  # fmt: skip


def logged_at(text: str, pattern: str, start: int = 0) -> float | None:
    """The server's clock (time.time() scale) at the first log line from `start` matching `pattern`."""
    found = re.search(STAMP + r".*" + pattern, text[start:])
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()


@dataclass
class Replica:
    index: int
    port: int
    rest_port: int
    server: ServerProcess | None = None
    generation: int = 0
    logs: list[Path] = field(default_factory=list)


class Fleet:
    def __init__(self, root: Path, replicas: int = 3, drain_seconds: float = 2.0, extra: Sequence[str] = ()) -> None:
        self.root = root
        self.models = root / "models"
        self.config = root / "config"  # the ConfigMap volume: config/models.json -> ..data/models.json
        self.cache = root / "cache"
        self.drain_seconds = drain_seconds
        self.extra = list(extra)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.replicas = [Replica(i, free_port(), free_port()) for i in range(replicas)]

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in self.replicas)

    def write_config(self, entries: list[dict]) -> float:
        """Publish models.json the way kubelet updates a ConfigMap volume; returns when the swap happened."""
        kube.atomic_write(self.config, {"models.json": json.dumps({"model_config_list": entries}).encode()})
        return time.time()

    def launch(self, replica: Replica) -> ServerProcess:
        replica.generation += 1
        log = self.root / "logs" / f"replica{replica.index}-{replica.generation}.log"
        replica.logs.append(log)
        argv = ["--config_path", str(self.config / "models.json"), "--port", str(replica.port),
                "--rest_port", str(replica.rest_port), "--cache_dir", str(self.cache),
                "--drain_seconds", str(self.drain_seconds), *self.extra]  # fmt: skip
        replica.server = ServerProcess(argv, log)
        replica.server.port = replica.port
        return replica.server

    def start(self, replica: Replica) -> ServerProcess:
        server = self.launch(replica)
        server.wait_ready()
        return server

    def requests_served(self, replica: Replica) -> float:
        """hotserve_requests_total summed over models: how many requests this replica answered."""
        url = f"http://127.0.0.1:{replica.rest_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(float(v) for v in re.findall(r"^hotserve_requests_total\{[^}]*\} (\S+)$", text, re.M))

    def stop(self) -> None:
        for replica in self.replicas:
            if replica.server is not None:
                replica.server.signal(signal.SIGINT)  # then the harness's SIGTERM: no drain window at teardown
                replica.server.stop()


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    model: str
    ok: bool
    value: float | None
    error: str = ""


def infer_request(model: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    request.raw_input_contents.append(X.tobytes())
    return request


def first_value(response: service_pb2.ModelInferResponse) -> float:
    return float(np.frombuffer(response.raw_output_contents[0], np.float32)[0])


class Load:
    """Requests sent without pause by `concurrency` workers through one channel, each outcome recorded."""

    def __init__(
        self,
        target: str,
        models: Callable[[], Sequence[str]],
        concurrency: int = 4,
        balanced: bool = True,
        pause: float = 0.002,
    ) -> None:
        self.target = target
        self.models = models
        self.concurrency = concurrency
        self.options = BALANCED if balanced else []
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        assert self._ready.wait(30), "the load's channel never became ready"
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(60)
        return self.outcomes

    async def _main(self) -> None:
        async with grpc.aio.insecure_channel(self.target, options=self.options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            if self.options:  # a straggler sends at once, whatever the replica's state: its failures count
                await asyncio.wait_for(channel.channel_ready(), 30)
            self._ready.set()
            await asyncio.gather(*(self._worker(stub, i) for i in range(self.concurrency)))

    async def _worker(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            models = self.models()
            model = models[turn % len(models)]
            turn += 1
            started = time.time()
            try:
                response = await stub.ModelInfer(infer_request(model), timeout=10)
                self.outcomes.append(Outcome(started, time.time(), model, True, first_value(response)))
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
                self.outcomes.append(Outcome(started, time.time(), model, False, None, error))
            await asyncio.sleep(self.pause)


def answer(address: str, model: str, timeout: float = 10) -> float | None:
    """One request straight to one replica: the first output value, or None when the model is not there."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(model), timeout=timeout
            )
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return None
            raise
        return first_value(response)


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> float:
    """Poll until `check()`; returns the time.time() it first held."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.time()


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
