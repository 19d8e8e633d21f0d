"""When `PERFORMANCE_HINT: THROUGHPUT` or a larger `nireq` pays off for the conv model (1×3×224×224), h2load at
c=1 and c=16 (one connection, C streams), one server per setting, all running and measured in turn (best of
--rounds). OVMS's default stays LATENCY: this shows what the other settings cost and give on this machine.
Writes benchmarks/results/conv_hint.json.

    .venv/bin/python benchmarks/conv_hint.py [--seconds 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelgen
from grpc_limit import RESULTS, check, ensure_h2load, measure, request_bytes
from harness import ServerProcess

SETTINGS: dict[str, dict[str, Any]] = {
    "LATENCY (default)": {},
    "LATENCY, nireq 4": {"nireq": 4},
    "THROUGHPUT": {"plugin_config": {"PERFORMANCE_HINT": "THROUGHPUT"}},
    "THROUGHPUT, nireq 16": {"plugin_config": {"PERFORMANCE_HINT": "THROUGHPUT"}, "nireq": 16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell, best kept (the machine may be shared)")
    args = parser.parse_args()
    exe = ensure_h2load()
    load_before = os.getloadavg()[0]  # other jobs on the machine: the figures are only as clean as this
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        modelgen.conv(root / "conv" / "1")
        body = request_bytes("conv", "input", np.ones((1, 3, 224, 224), np.float32))
        frame = root / "conv.grpc"
        frame.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
        servers: dict[str, ServerProcess] = {}
        try:
            for i, (label, extra) in enumerate(SETTINGS.items()):
                config = root / f"models{i}.json"
                entry = {"name": "conv", "base_path": str(root / "conv"), **extra}
                config.write_text(json.dumps({"model_config_list": [{"config": entry}]}))
                servers[label] = ServerProcess(["--config_path", str(config), "--port", "0"], root / f"log{i}")
            nireq = {}
            for label, server in servers.items():
                server.wait_ready()
                check(server.address, body)
                nireq[label] = int(re.search(r"No of InferRequests: (\d+)", server.log).group(1))  # type: ignore[union-attr]
            for c in (1, 16):
                runs: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
                for _ in range(args.rounds):
                    for label, server in servers.items():
                        runs[label].append(measure(exe, server.proc.pid, server.port, frame, c, args.seconds))
                for label, results in runs.items():
                    best = max(results, key=lambda r: r["throughput"])
                    rows.append({"setting": label, "nireq": nireq[label], "concurrency": c, **best,
                                 "all": [r["throughput"] for r in results]})  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
    load = [load_before, os.getloadavg()[0]]
    print(f"load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f}")
    print(f"conv 1×3×224×224, h2load one connection × C streams, best of {args.rounds} runs of {args.seconds:g} s")
    print(f"{'setting':22} {'nireq':>5} {'C':>3} | {'req/s':>7} {'mean':>8} {'server cpu':>10} {'cpu ms/req':>10}")
    for r in rows:
        cpu_ms = r["server_cpu_us_per_req"] / 1000
        print(f"{r['setting']:22} {r['nireq']:>5} {r['concurrency']:>3} | {r['throughput']:>7.0f} "
              f"{r['mean_ms']:>6.2f}ms {r['server_cpu_pct']:>9.0f}% {cpu_ms:>10.1f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "conv_hint.json"
    out.write_text(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "load": load, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
