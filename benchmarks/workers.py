"""`--grpc_workers 1` vs `--grpc_workers 2` on the tiny model, driven by h2load, side by side in one run.

SO_REUSEPORT balances connections, not streams: h2load opens C connections with one stream each. Both servers run
at once and are measured in turn (best of --rounds per cell). Reports req/s, mean latency, the ratio 2 workers / 1,
the CPU of the server (the supervisor and every worker, from /proc) and of h2load, and memory: RSS and PSS (a shared
page counted once, split among the processes that map it) of each server's processes after the run.
Writes benchmarks/results/workers.json.

    .venv/bin/python benchmarks/workers.py [--seconds 4] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelgen
from grpc_limit import RESULTS, check, cpu_seconds, ensure_h2load, h2load, request_bytes
from harness import ServerProcess


def processes(server: ServerProcess) -> list[int]:
    """The server's process and all its descendants (workers, and multiprocessing's resource tracker)."""
    pids, i = [server.proc.pid], 0
    while i < len(pids):
        children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children")
        pids += [int(p) for p in children.read_text().split()] if children.exists() else []
        i += 1
    return pids


def memory_mib(pids: list[int]) -> dict[str, float]:
    rss = pss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                kib = int(value.split()[0])
                rss, pss = (rss + kib, pss) if key == "Rss" else (rss, pss + kib)
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024}


def measure(exe: str, server: ServerProcess, frame: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    pids = processes(server)
    h2load(exe, server.port, frame, concurrency, 0.5, connections=concurrency)  # warm-up, not measured
    start_cpu, start = sum(cpu_seconds(p) for p in pids), time.perf_counter()
    result = h2load(exe, server.port, frame, concurrency, seconds, connections=concurrency)
    cpu, wall = sum(cpu_seconds(p) for p in pids) - start_cpu, time.perf_counter() - start
    result["server_cpu_pct"] = 100 * cpu / wall
    result["server_cpu_us_per_req"] = 1e6 * cpu / max(result["requests"], 1)
    result["client_cpu_pct"] = 100 * result.pop("client_cpu_s") / wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell, best kept (the machine may be shared)")
    parser.add_argument("--quick", action="store_true", help="c=16 only, 2 s each")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs (printed: the working dir)")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    levels = [16] if args.quick else [4, 16, 64]
    exe = ensure_h2load()
    load_before = os.getloadavg()[0]  # other jobs on the machine: the figures are only as clean as this
    rows, memory = [], {}
    root = Path(tempfile.mkdtemp(prefix="hotserve-workers-"))
    print(f"working in {root}", flush=True)
    try:
        modelgen.add_const(root / "tiny" / "1")
        config = root / "models.json"
        config.write_text(
            json.dumps({"model_config_list": [{"config": {"name": "tiny", "base_path": str(root / "tiny")}}]})
        )
        body = request_bytes("tiny", "b", np.zeros((1, 10), np.float32))
        frame = root / "tiny.grpc"
        frame.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
        common = ["--config_path", str(config), "--port", "0", "--cache_dir", str(root / "cache")]
        servers = {n: ServerProcess([*common, "--grpc_workers", str(n)], root / f"log{n}") for n in (1, 2)}
        try:
            for server in servers.values():
                server.wait_ready()
                check(server.address, body)
            for c in levels:
                runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
                for _ in range(args.rounds):  # in turn, so both see the same interference from the machine
                    for n, server in servers.items():
                        runs[n].append(measure(exe, server, frame, c, seconds))
                        print(f"  C={c} workers={n}: {runs[n][-1]['throughput']:.0f} req/s", flush=True)
                best = {n: max(r, key=lambda x: x["throughput"]) for n, r in runs.items()}
                rows.append({"concurrency": c, "one": best[1], "two": best[2],
                             "ratio": best[2]["throughput"] / max(best[1]["throughput"], 1e-9),
                             "all_one": [r["throughput"] for r in runs[1]],
                             "all_two": [r["throughput"] for r in runs[2]]})  # fmt: skip
            memory = {n: {"processes": len(processes(s)), **memory_mib(processes(s))} for n, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load = [load_before, os.getloadavg()[0]]
    print(f"load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f}")
    print(f"h2load, C connections × 1 stream, tiny model; best of {args.rounds} runs of {seconds:g} s, servers in "
          "turn; CPU: 100% = one core (server = supervisor + workers)")  # fmt: skip
    side = f"{'mean':>8} {'srv cpu':>7} {'µs/req':>6} {'cli cpu':>7}"
    print(f"{'C':>3} | {'1 worker req/s':>14} {side} | {'2 workers req/s':>15} {side} | {'ratio':>5}")
    for r in rows:
        o, t = r["one"], r["two"]
        print(f"{r['concurrency']:>3} | {o['throughput']:>14.0f} {o['mean_ms']:>6.2f}ms {o['server_cpu_pct']:>6.0f}% "
              f"{o['server_cpu_us_per_req']:>6.0f} {o['client_cpu_pct']:>6.0f}% | {t['throughput']:>15.0f} "
              f"{t['mean_ms']:>6.2f}ms {t['server_cpu_pct']:>6.0f}% {t['server_cpu_us_per_req']:>6.0f} "
              f"{t['client_cpu_pct']:>6.0f}% | {r['ratio']:>5.2f}")  # fmt: skip
    for n, m in memory.items():
        print(
            f"memory, --grpc_workers {n}: {m['processes']} process(es), RSS {m['rss_mib']:.0f} MiB, "
            f"PSS {m['pss_mib']:.0f} MiB"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "workers.json"
    summary = {"seconds": seconds, "rounds": args.rounds, "load": load, "rows": rows, "memory": memory}
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
