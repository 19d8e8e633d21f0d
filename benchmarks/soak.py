"""Soak: many reloads of one model under continuous inference (issue 9).

A real server process; models.json is rewritten N times, each time changing `nireq` of model "m" (a reload: a new
compile swapped in, the old one drained and freed) while client threads call "m" without pause. After each reload
is AVAILABLE (seen in the log), the server's RSS, open file descriptors and threads are read from /proc.

Prints a table and writes benchmarks/results/soak.json.   .venv/bin/python benchmarks/soak.py [--reloads 500]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import modelgen
import tritonclient.grpc as grpcclient
from harness import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
X = np.zeros((1, 10), np.float32)


def proc_figures(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def write(path: Path, base: Path, nireq: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_config_list": [{"config": {"name": "m", "base_path": str(base),
                                                                 "nireq": nireq}}]}))  # fmt: skip
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reloads", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        modelgen.add_const(root / "m" / "1", delta=1.0)
        config = root / "models.json"
        write(config, root / "m", 1)
        server = ServerProcess(["--config_path", str(config), "--port", "0"], root.parent / f"soak-{os.getpid()}.log")
        server.wait_ready()
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0}
        errors: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            c = grpcclient.InferenceServerClient(server.address)
            inp = grpcclient.InferInput("b", [1, 10], "FP32")
            inp.set_data_from_numpy(X)
            while not stop.is_set():
                try:
                    out = c.infer("m", [inp]).as_numpy("a")
                    ok = bool(np.allclose(out, X + 1.0))
                except Exception as exc:  # counted, not hidden
                    ok = False
                    with lock:
                        errors.append(str(exc)[:200])
                with lock:
                    counts["ok" if ok else "failed"] += 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for t in threads:
            t.start()
        samples: dict[int, dict[str, int]] = {0: proc_figures(server.proc.pid)}
        started = time.perf_counter()
        for i in range(1, args.reloads + 1):
            offset = len(server.log)
            write(config, root / "m", 1 + i % 2)  # nireq alternates 2, 1: each write is a reload
            server.wait_for(r"Loaded model m; version: 1", 30, start=offset)
            if i in (1, 50, 100, 250, args.reloads) or i % 100 == 0:
                time.sleep(0.2)  # let the old compile drain and free before reading the figures
                samples[i] = proc_figures(server.proc.pid)
        elapsed = time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join(10)
        freed = server.log.count("Will unload") + server.log.count("superseded")
        server.stop()
    first = samples.get(50, samples[1])
    last = samples[args.reloads]
    growth = (last["rss_kb"] - first["rss_kb"]) / first["rss_kb"]
    print(f"{'after reload':>13} {'RSS MiB':>9} {'threads':>8} {'fds':>5}")
    for i, s in sorted(samples.items()):
        print(f"{i:>13} {s['rss_kb'] / 1024:>9.1f} {s['threads']:>8} {s['fds']:>5}")
    print(f"{args.reloads} reloads in {elapsed:.1f} s; requests ok {counts['ok']}, failed {counts['failed']}; "
          f"RSS growth reload 50 → {args.reloads}: {growth * 100:+.1f} % (goal < 5 %)")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps({
        "reloads": args.reloads, "seconds": elapsed, "requests": counts, "errors": errors[:10],
        "samples": samples, "rss_growth_50_to_last": growth, "unload_lines": freed,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
