"""Dynamic batching: where it pays, measured side by side in one run.

1. In process (OpenVINO alone, compiled as the server compiles: batch -1, PERFORMANCE_HINT LATENCY): rows/s and
   latency per batch size for an MLP with fp32 weights and for the 224x224 conv net, best of 5 interleaved
   rounds. This curve explains 2.
2. Through the server with perf_analyzer (C++ client, 16 concurrent requests): throughput and p99 for the same
   models without dynamic batching and with it, at max_queue_delay_us 0, 200, 1000 and 5000.

Prints tables and writes benchmarks/results/batching.json.

    .venv/bin/python benchmarks/batching.py [--seconds 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelgen
import perf_analyzer
from harness import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = 16
DELAYS_US = (0, 200, 1000, 5000)
ROUNDS = 5
MLP_WIDTHS = (2048, 4096, 2048, 2048, 2048)  # ~100 MB of fp32 weights: at batch 1 the weights are read per row


def batch_curve(xml: Path, row: tuple[int, ...], batches: tuple[int, ...], seconds: float) -> dict[int, dict]:
    """rows/s and ms per inference at each batch size, one infer request, back to back, for the compile the server
    batches with (batch -1) and for a compile of that static batch size: ROUNDS rounds that visit every case in turn,
    best round per case (a shared machine slows some rounds down, never speeds one up)."""
    core = ov.Core()

    def compiled(batch: int) -> ov.InferRequest:
        model = core.read_model(xml)
        model.reshape({"input": ov.PartialShape([batch, *row])})
        return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()

    dynamic = compiled(-1)
    cases = [(kind, b) for b in batches for kind in ("dynamic", "static")]
    requests = {case: dynamic if case[0] == "dynamic" else compiled(case[1]) for case in cases}
    feeds = {b: np.random.default_rng(b).standard_normal((b, *row)).astype(np.float32) for b in batches}
    best: dict[tuple[str, int], float] = dict.fromkeys(cases, float("inf"))  # seconds per inference
    for _ in range(ROUNDS):
        for case in cases:
            request, x = requests[case], feeds[case[1]]
            request.infer({"input": x})
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / ROUNDS / 2:
                request.infer({"input": x})
                n += 1
            best[case] = min(best[case], (time.perf_counter() - started) / n)
    return {
        b: {"rows_per_s": b / best[("dynamic", b)], "ms": best[("dynamic", b)] * 1000,
            "static_rows_per_s": b / best[("static", b)], "static_ms": best[("static", b)] * 1000}
        for b in batches
    }  # fmt: skip


def served(
    tmp: Path, name: str, xml: Path, shape: str, delays: tuple[int, ...], seconds: float, env: dict
) -> dict[str, dict]:
    """One server holding the model unbatched and batched at each delay; perf_analyzer at 16 against each, in three
    passes (forward, backward, forward) whose median is reported, so a machine that slows down meanwhile (other jobs
    share it) favours no configuration; every pass is kept in the JSON."""
    base = xml.parent.parent
    entries = [
        {"config": {"name": f"{name}-static", "base_path": str(base)}},  # the model as built: batch 1
        {"config": {"name": f"{name}-plain", "base_path": str(base), "batch_size": "-1"}},
    ]
    for delay in delays:
        batching = {"max_batch_size": 8, "max_queue_delay_us": delay, "max_queue_size": 64}
        entries.append({"config": {"name": f"{name}-{delay}", "base_path": str(base), "batch_size": "-1",
                                   "dynamic_batching": batching}})  # fmt: skip
    config = tmp / f"{name}.json"
    config.write_text(json.dumps({"model_config_list": entries}))
    server = ServerProcess(["--config_path", str(config), "--port", "0"], tmp / f"{name}.log").wait_ready()
    labels = {
        "static 1": f"{name}-static",
        "plain": f"{name}-plain",
        **{f"delay {d} us": f"{name}-{d}" for d in delays},
    }
    passes: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    try:
        for order in (list(labels), list(reversed(labels)), list(labels)):
            for label in order:
                passes[label].append(perf_analyzer.run(env, server.address, labels[label], CONCURRENCY, shape,
                                                       seconds))  # fmt: skip
    finally:
        server.stop()
    return {
        label: {**{k: float(np.median([p[k] for p in runs])) for k in runs[0]}, "passes": runs}
        for label, runs in passes.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="1 s measurements (a smoke run)")
    parser.add_argument("--models", default="mlp,conv224", help="comma-separated subset of mlp,conv224")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
    env = perf_analyzer.ensure()
    results: dict[str, object] = {"concurrency": CONCURRENCY}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mlp = modelgen.mlp(tmp / "mlp" / "1", widths=MLP_WIDTHS)
        conv = modelgen.conv(tmp / "conv" / "1")
        wanted = args.models.split(",")
        curves = {}
        if "mlp" in wanted:
            curves["mlp"] = batch_curve(mlp, (MLP_WIDTHS[0],), (1, 2, 4, 8, 16), seconds)
        if "conv224" in wanted:
            curves["conv224"] = batch_curve(conv, (3, 224, 224), (1, 2, 4, 8), seconds * 2)
        results["in_process"] = curves
        print("\nIn process, one infer request (rows/s; ms per inference); batch -1 as the server batches, and static")
        print(
            f"{'model':<10}{'batch':>6}{'rows/s':>10}{'ms':>9}{'vs batch 1':>12}{'static rows/s':>15}{'static ms':>11}"
        )
        for model, curve in curves.items():
            for batch, point in curve.items():
                gain = point["rows_per_s"] / curve[1]["rows_per_s"]
                print(f"{model:<10}{batch:>6}{point['rows_per_s']:>10.0f}{point['ms']:>9.2f}{gain:>11.2f}x"
                      f"{point['static_rows_per_s']:>15.0f}{point['static_ms']:>11.2f}")  # fmt: skip
        server_results = {}
        if "mlp" in wanted:
            server_results["mlp"] = served(tmp, "mlp", mlp, f"input:1,{MLP_WIDTHS[0]}", DELAYS_US, seconds, env)
        if "conv224" in wanted:
            server_results["conv224"] = served(tmp, "conv224", conv, "input:1,3,224,224", (1000,), seconds * 2, env)
    results["served"] = server_results
    print(f"\nThrough the server, perf_analyzer, {CONCURRENCY} concurrent requests (max_batch_size 8)")
    print("(static 1: the model as built; plain: batch_size -1 without batching; the ratio is to the better of both)")
    print(f"{'model':<10}{'batching':<16}{'infer/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs unbatched':>14}")
    for model, rows in server_results.items():
        unbatched = max(rows["static 1"]["throughput"], rows["plain"]["throughput"])
        for label, row in rows.items():
            gain = row["throughput"] / unbatched
            print(f"{model:<10}{label:<16}{row['throughput']:>10.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
                  f"{gain:>13.2f}x")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("batching.json" if len(wanted) == 2 else f"batching-{'-'.join(wanted)}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
