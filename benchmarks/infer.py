"""Inference through the server (tritonclient, gRPC) vs in-process OpenVINO, side by side in one run.

Latency p50/p99 and throughput at concurrency 1, 4 and 16 for a tiny model and a ~17 GFLOP conv model.
Prints a table and writes benchmarks/results/infer.json.

    .venv/bin/python benchmarks/infer.py [--seconds 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import modelgen
from harness import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"


def closed_loop(call, concurrency: int, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """`concurrency` threads each call `call(worker)` back to back for `seconds`; latencies in ms."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            call(i)
            latencies[i].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = np.array([x for per in latencies for x in per])
    return {
        "requests": int(flat.size),
        "throughput": flat.size / elapsed,
        "p50_ms": float(np.percentile(flat, 50)),
        "p99_ms": float(np.percentile(flat, 99)),
    }


def in_process(xml: Path, name: str, x: np.ndarray, concurrency: int, seconds: float) -> dict[str, float]:
    """The same model compiled the way the server compiles it (PERFORMANCE_HINT=LATENCY), one request per thread."""
    compiled = ov.Core().compile_model(xml, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    nireq = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    requests = [compiled.create_infer_request() for _ in range(nireq)]
    locks = [threading.Lock() for _ in requests]

    def call(i: int) -> None:
        with locks[i % nireq]:
            requests[i % nireq].infer({name: x})

    for _ in range(3):
        call(0)
    return closed_loop(call, concurrency, seconds)


def served(address: str, model: str, name: str, x: np.ndarray, concurrency: int, seconds: float) -> dict[str, float]:
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(address) for _ in range(concurrency)]
    inputs = []
    for _ in range(concurrency):
        tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        inputs.append([tensor])

    def call(i: int) -> None:
        clients[i].infer(model, inputs[i])

    for _ in range(5):
        call(0)
    return closed_loop(call, concurrency, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="concurrency 1 and 4 only, 1.5 s each")
    args = parser.parse_args()
    seconds = 1.5 if args.quick else args.seconds
    levels = [1, 4] if args.quick else [1, 4, 16]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = modelgen.add_const(root / "tiny" / "1")
        conv = modelgen.conv(root / "conv" / "1")
        config = root / "models.json"
        config.write_text(json.dumps({"model_config_list": [
            {"config": {"name": "tiny", "base_path": str(root / "tiny")}},
            {"config": {"name": "conv", "base_path": str(root / "conv")}},
        ]}))  # fmt: skip
        server = ServerProcess(["--config_path", str(config), "--port", "0"], root / "log")
        server.wait_ready()
        rows = []
        try:
            cases = [("tiny", tiny, "b", np.zeros((1, 10), np.float32)),
                     ("conv", conv, "input", np.ones((1, 3, 224, 224), np.float32))]  # fmt: skip
            for model, xml, name, x in cases:
                for c in levels:
                    srv = served(server.address, model, name, x, c, seconds)
                    loc = in_process(xml, name, x, c, seconds)
                    rows.append({"model": model, "concurrency": c, "served": srv, "in_process": loc,
                                 "throughput_ratio": srv["throughput"] / loc["throughput"]})  # fmt: skip
        finally:
            server.stop()
    print(f"{'model':6} {'conc':>4} | {'served p50':>10} {'p99':>8} {'req/s':>8} | {'in-proc p50':>11} {'p99':>8} "
          f"{'req/s':>8} | {'ratio':>5}")  # fmt: skip
    for r in rows:
        s, i = r["served"], r["in_process"]
        print(
            f"{r['model']:6} {r['concurrency']:>4} | {s['p50_ms']:>8.2f}ms {s['p99_ms']:>6.2f}ms "
            f"{s['throughput']:>8.1f} | "
            f"{i['p50_ms']:>9.2f}ms {i['p99_ms']:>6.2f}ms {i['throughput']:>8.1f} | {r['throughput_ratio']:>5.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "infer.json").write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=2))
    print(f"wrote {RESULTS / 'infer.json'}")


if __name__ == "__main__":
    main()
