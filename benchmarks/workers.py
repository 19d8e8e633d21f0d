"""`--grpc_workers 1` vs `--grpc_workers 2` on the tiny model, driven by h2load, side by side in one run; and the same
for the bare grpc.aio server (benchmarks/bare_grpc.py: one process vs two sharing the port), the stack's own scaling.

SO_REUSEPORT balances connections, not streams: h2load opens C connections with one stream each. All four servers
run at once and are measured in turn (best of --rounds per cell). Reports req/s, mean latency, the ratio two / one,
the CPU of the server (every process of it, from /proc) and of h2load, and memory: RSS and PSS (a shared page
counted once, split among the processes that map it) of each hotserve after the run.
Writes benchmarks/results/workers.json.

    .venv/bin/python benchmarks/workers.py [--seconds 4] [--rounds 3] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelgen
from grpc_limit import RESULTS, check, cpu_seconds, ensure_h2load, h2load, request_bytes
from harness import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> list[int]:
    """A process and all its descendants (workers, and multiprocessing's resource tracker)."""
    pids, i = [pid], 0
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


@dataclass
class Target:
    port: int
    roots: list[int]  # the processes whose CPU (with their descendants') is the server's

    def pids(self) -> list[int]:
        return [p for root in self.roots for p in descendants(root)]


def measure(exe: str, target: Target, frame: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    h2load(exe, target.port, frame, concurrency, 0.5, connections=concurrency)  # warm-up, not measured
    pids = target.pids()
    start_cpu, start = sum(cpu_seconds(p) for p in pids), time.perf_counter()
    result = h2load(exe, target.port, frame, concurrency, seconds, connections=concurrency)
    cpu, wall = sum(cpu_seconds(p) for p in pids) - start_cpu, time.perf_counter() - start
    result["server_cpu_pct"] = 100 * cpu / wall
    result["server_cpu_us_per_req"] = 1e6 * cpu / max(result["requests"], 1)
    result["client_cpu_pct"] = 100 * result.pop("client_cpu_s") / wall
    return result


def start_bare(root: Path, name: str, port: int = 0) -> tuple[subprocess.Popen[bytes], int]:
    port_file = root / f"{name}.port"
    script = ROOT / "benchmarks" / "bare_grpc.py"
    proc = subprocess.Popen([sys.executable, str(script), str(port_file), "--port", str(port)])
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "bare server did not start"
        time.sleep(0.05)
    return proc, int(port_file.read_text())


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
    servers: dict[int, ServerProcess] = {}
    bares: list[subprocess.Popen[bytes]] = []
    try:
        config = modelgen.const_config(root)
        body = request_bytes("tiny", "b", np.zeros((1, 10), np.float32))
        frame = root / "tiny.grpc"
        frame.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
        common = ["--config_path", str(config), "--port", "0", "--cache_dir", str(root / "cache")]
        servers = {n: ServerProcess([*common, "--grpc_workers", str(n)], root / f"log{n}") for n in (1, 2)}
        shared = free_port()
        for name, port in (("bare1", 0), ("bare2a", shared), ("bare2b", shared)):
            bares.append(start_bare(root, name, port)[0])
        targets = {"hotserve 1": Target(0, []), "hotserve 2": Target(0, []),
                   "bare 1": Target(int((root / "bare1.port").read_text()), [bares[0].pid]),
                   "bare 2": Target(shared, [bares[1].pid, bares[2].pid])}  # fmt: skip
        for n, server in servers.items():
            server.wait_ready()
            targets[f"hotserve {n}"] = Target(server.port, [server.proc.pid])
        for target in targets.values():
            check(f"127.0.0.1:{target.port}", body)
        for c in levels:
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in targets}
            for _ in range(args.rounds):  # in turn, so all see the same interference from the machine
                for label, target in targets.items():
                    runs[label].append(measure(exe, target, frame, c, seconds))
                    print(f"  C={c} {label}: {runs[label][-1]['throughput']:.0f} req/s", flush=True)
            best = {label: max(r, key=lambda x: x["throughput"]) for label, r in runs.items()}
            tput = {label: b["throughput"] for label, b in best.items()}
            every = {label: [r["throughput"] for r in results] for label, results in runs.items()}
            rows.append({"concurrency": c, "best": best, "all": every,
                         "ratio": tput["hotserve 2"] / max(tput["hotserve 1"], 1e-9),
                         "bare_ratio": tput["bare 2"] / max(tput["bare 1"], 1e-9)})  # fmt: skip
        memory = {n: {"processes": len(targets[f"hotserve {n}"].pids()), **memory_mib(targets[f"hotserve {n}"].pids())}
                  for n in servers}  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
        for bare in bares:
            bare.terminate()
            bare.wait(10)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load = [load_before, os.getloadavg()[0]]
    print(f"load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f}")
    print(f"h2load, C connections × 1 stream, tiny model; best of {args.rounds} runs of {seconds:g} s, servers in "
          "turn; CPU: 100% = one core, server = all its processes; µs = server CPU per request")  # fmt: skip
    cell = f"{'req/s':>6} {'mean':>7} {'cpu':>5} {'µs':>4}"
    print(f"{'C':>3} | {'hotserve 1 worker':^25} | {'hotserve 2 workers':^25} | {'2/1':>4} | {'h2load cpu':>10} | "
          f"{'bare 1 process':^25} | {'bare 2 processes':^25} | {'2/1':>4}")  # fmt: skip
    print(f"{'':>3} | {cell} | {cell} | {'':>4} | {'1w / 2w':>10} | {cell} | {cell} |")
    for r in rows:
        b = r["best"]

        def show(x: dict[str, Any]) -> str:
            return (f"{x['throughput']:>6.0f} {x['mean_ms']:>5.2f}ms {x['server_cpu_pct']:>4.0f}% "
                    f"{x['server_cpu_us_per_req']:>4.0f}")  # fmt: skip

        clients = f"{b['hotserve 1']['client_cpu_pct']:.0f}% / {b['hotserve 2']['client_cpu_pct']:.0f}%"
        print(f"{r['concurrency']:>3} | {show(b['hotserve 1'])} | {show(b['hotserve 2'])} | {r['ratio']:>4.2f} | "
              f"{clients:>10} | {show(b['bare 1'])} | {show(b['bare 2'])} | {r['bare_ratio']:>4.2f}")  # fmt: skip
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
