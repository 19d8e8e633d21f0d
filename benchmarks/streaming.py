"""ModelStreamInfer vs ModelInfer on a tiny model (the server's per-request cost), with perf_analyzer (C++ client):
throughput and latency at concurrency 1 and 16, unary and `--streaming`, side by side in one run (three passes:
forward, backward, forward; the median is reported, every pass kept in the JSON).

Prints a table and writes benchmarks/results/streaming.json.

    .venv/bin/python benchmarks/streaming.py [--seconds 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelgen
import perf_analyzer
from harness import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [(mode, c) for c in (1, 16) for mode in ("unary", "streaming")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="3 s measurements, one pass (a smoke run)")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    env = perf_analyzer.ensure()
    runs: dict[tuple[str, int], list[dict[str, float]]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = modelgen.const_config(tmp, "dummy")
        server = ServerProcess(["--config_path", str(config), "--port", "0"], tmp / "server.log").wait_ready()
        try:
            for order in [CASES] if args.quick else [CASES, CASES[::-1], CASES]:
                for mode, concurrency in order:
                    runs[(mode, concurrency)].append(perf_analyzer.run(
                        env, server.address, "dummy", concurrency, "b:1,10", seconds, streaming=mode == "streaming"
                    ))  # fmt: skip
        finally:
            server.stop()
    table = {
        f"{mode} c{c}": {**{k: float(np.median([r[k] for r in rs])) for k in rs[0]}, "passes": rs}
        for (mode, c), rs in runs.items()
    }
    print("\nTiny model (1x10 FP32 add), perf_analyzer over gRPC")
    print(f"{'case':<16}{'infer/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs unary':>10}")
    for (_, c), key in zip(runs, table, strict=True):
        row, unary = table[key], table[f"unary c{c}"]
        print(f"{key:<16}{row['throughput']:>10.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}"
              f"{row['throughput'] / unary['throughput']:>9.2f}x")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'streaming.json'}")


if __name__ == "__main__":
    main()
