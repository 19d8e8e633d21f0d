"""What weighted traffic costs per request: the tiny model without `traffic`, with weights (a random draw), and with
weights and a routing key (rendezvous hashing), one server, driven by h2load (a C++ client) side by side.

Three entries serve the same two versions of the tiny model (modelgen.add_const): "plain" (no traffic: the default
version), "weighted" ({"1": 90, "2": 10}) and the same with the `hotserve-route-key` metadata on every request.
The three run in turn, --rounds times; each cell shows the best run and the median of the per-round ratios (a shared
machine's load drifts: a ratio of neighbouring runs is steadier than one of bests). Writes
benchmarks/results/traffic.json.

    .venv/bin/python benchmarks/traffic.py [--seconds 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc_limit
import modelgen
from harness import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
KEYED = ("hotserve-route-key: user-4242",)


def per_call_ns(calls: int = 200_000) -> dict[str, float]:
    """In-process cost of the routing decision itself, per call: the default version, a draw, a keyed route."""
    from engine.config import Routing
    from engine.routing import NO_ROUTES, resolve

    routes = resolve("m", Routing({}, ((1, 90), (2, 10))), {1, 2}, NO_ROUTES)[0]
    cases = {"draw (90/10)": routes.draw, "route key (90/10)": lambda: routes.route("user-4242")}
    out = {}
    for name, call in cases.items():
        start = time.perf_counter_ns()
        for _ in range(calls):
            call()
        out[name] = (time.perf_counter_ns() - start) / calls
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=7, help="runs per cell (the machine may be shared)")
    args = parser.parse_args()
    exe = grpc_limit.ensure_h2load()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        modelgen.add_const(root / "tiny" / "1", delta=1.0)
        modelgen.add_const(root / "tiny" / "2", delta=2.0)
        base = {"base_path": str(root / "tiny"), "model_version_policy": {"all": {}}}
        config = root / "models.json"
        config.write_text(json.dumps({"model_config_list": [
            {"config": {"name": "plain", **base}},
            {"config": {"name": "weighted", **base, "traffic": {"1": 90, "2": 10}}},
        ]}))  # fmt: skip
        frames = {}
        for model in ("plain", "weighted"):
            body = grpc_limit.request_bytes(model, "b", np.zeros((1, 10), np.float32))
            frames[model] = (body, root / f"{model}.grpc")
            frames[model][1].write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
        cases = [("no traffic", "plain", ()), ("traffic 90/10", "weighted", ()),
                 ("traffic + route key", "weighted", KEYED)]  # fmt: skip
        server = ServerProcess(["--config_path", str(config), "--port", "0"], root / "log")
        rows = []
        try:
            server.wait_ready()
            for _, model, _ in cases:
                grpc_limit.check(server.address, frames[model][0])
            for c in (1, 16):
                runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in cases}
                for _ in range(args.rounds):  # in turn: all three see the same interference from the machine
                    for name, model, headers in cases:
                        frame = frames[model][1]
                        runs[name].append(grpc_limit.measure(exe, server.proc.pid, server.port, frame, c,
                                                             args.seconds, headers))  # fmt: skip
                best = {name: max(r, key=lambda x: x["throughput"]) for name, r in runs.items()}
                plain = [r["throughput"] for r in runs["no traffic"]]
                for name, _, _ in cases:
                    paired = sorted(r["throughput"] / p for r, p in zip(runs[name], plain, strict=True))
                    rows.append({"case": name, "concurrency": c, **best[name],
                                 "ratio": best[name]["throughput"] / best["no traffic"]["throughput"],
                                 "paired_median": paired[len(paired) // 2],
                                 "all": [r["throughput"] for r in runs[name]]})  # fmt: skip
        finally:
            server.stop()
    print(f"h2load, one connection, C streams, tiny model; best of {args.rounds} runs of {args.seconds:g} s, in turn")
    print("ratio: best vs best; paired: the median over rounds of (this case / no traffic in the same round)")
    print(f"{'case':20} {'C':>3} | {'req/s':>7} {'mean':>8} {'µs/req':>7} | {'ratio':>6} {'paired':>6}")
    for r in rows:
        print(f"{r['case']:20} {r['concurrency']:>3} | {r['throughput']:>7.0f} {r['mean_ms']:>6.2f}ms "
              f"{r['server_cpu_us_per_req']:>7.0f} | {r['ratio']:>6.3f} {r['paired_median']:>6.3f}")  # fmt: skip
    calls = per_call_ns()
    for name, ns in calls.items():
        print(f"in-process, per call: {name}: {ns / 1000:.2f} µs")
    RESULTS.mkdir(exist_ok=True)
    summary = {"seconds": args.seconds, "rounds": args.rounds, "rows": rows, "per_call_ns": calls}
    (RESULTS / "traffic.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS / 'traffic.json'}")


if __name__ == "__main__":
    main()
