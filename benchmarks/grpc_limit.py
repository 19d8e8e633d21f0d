"""hotserve vs a bare grpc.aio server (the stack's limit), driven by a C++ client (h2load), side by side in one run.

h2load (Debian nghttp2-client; installed here if missing) sends prebuilt gRPC frames — one connection, C concurrent
streams — at concurrency 1, 4, 16, 64 for the tiny model (modelgen.add_const) and the conv model (modelgen.conv),
to hotserve and to benchmarks/bare_grpc.py in turn. Reports req/s, mean latency, server CPU per request and the
ratio hotserve / bare; each cell is the best of --rounds runs (servers in turn), since the machine may be shared.
Writes benchmarks/results/grpc_limit.json.

    .venv/bin/python benchmarks/grpc_limit.py [--seconds 4] [--quick] [--profile OUT.txt]

--profile: py-spy (pip-installed here if missing) samples hotserve during tiny c=16 and writes the top functions
(by own time and by total time) to OUT.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import modelgen
from harness import ServerProcess

from engine.frontend.generated.inference import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHOD = "/inference.GRPCInferenceService/ModelInfer"
TICK = os.sysconf("SC_CLK_TCK")


def ensure_h2load() -> str:
    found = shutil.which("h2load")
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], check=True)
        found = shutil.which("h2load")
    assert found, "h2load not found after installing nghttp2-client"
    return found


def ensure_py_spy() -> str:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return str(exe)


def request_bytes(model: str, name: str, x: np.ndarray) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def check(address: str, body: bytes) -> None:
    """h2load counts HTTP 200 as success whatever grpc-status says: make sure the request really succeeds."""
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
        reply = channel.unary_unary(METHOD)(body, timeout=30)
    assert pb.ModelInferResponse.FromString(reply).outputs, "no outputs"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def h2load(
    exe: str,
    port: int,
    frame: Path,
    concurrency: int,
    seconds: float,
    connections: int = 1,
    headers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`concurrency` streams over `connections` connections (SO_REUSEPORT balances connections, not streams)."""
    streams = max(1, concurrency // connections)
    extra = [arg for header in headers for arg in ("-H", header)]  # e.g. gRPC metadata "hotserve-route-key: u1"
    cmd = [exe, "-c", str(connections), "-m", str(streams), "-D", f"{int(seconds * 1000)}ms", "-d", str(frame),
           "-H", "content-type: application/grpc", "-H", "te: trailers", *extra,
           f"http://127.0.0.1:{port}{METHOD}"]  # fmt: skip
    before = os.times()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    after = os.times()
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    assert done and rate and mean, out
    return {
        "requests": int(done.group(1)),
        "failed": int(done.group(3)),
        "throughput": float(rate.group(1)),
        "mean_ms": _ms(mean.group(1)),
        "client_cpu_s": (after.children_user + after.children_system) - (before.children_user + before.children_system),
    }


def _ms(text: str) -> float:
    value = float(re.match(r"[\d.]+", text).group(0))  # type: ignore[union-attr]
    return value / 1000 if text.endswith("us") else value * 1000 if text.endswith("s") and "ms" not in text else value


def measure(
    exe: str, pid: int, port: int, frame: Path, concurrency: int, seconds: float, headers: tuple[str, ...] = ()
) -> dict[str, float]:
    h2load(exe, port, frame, concurrency, 0.5, headers=headers)  # warm-up, not measured
    start_cpu, start = cpu_seconds(pid), time.perf_counter()
    result = h2load(exe, port, frame, concurrency, seconds, headers=headers)
    cpu, wall = cpu_seconds(pid) - start_cpu, time.perf_counter() - start
    result["server_cpu_pct"] = 100 * cpu / wall
    result["server_cpu_us_per_req"] = 1e6 * cpu / max(result["requests"], 1)
    result["client_cpu_pct"] = 100 * result.pop("client_cpu_s") / wall
    return result


def profile(py_spy: str, exe: str, pid: int, port: int, frame: Path, out: Path, seconds: float) -> None:
    raw = out.with_suffix(".raw")
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw),
                            "--duration", str(int(seconds) + 1), "--rate", "250", "--nonblocking", "--gil"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(0.5)
    h2load(exe, port, frame, 16, seconds)
    spy.wait()
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n, frames = int(count), stack.split(";")
        samples += n
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            total[f] = total.get(f, 0) + n
    lines = [f"py-spy, hotserve, tiny model, h2load c=16, {samples} samples holding the GIL (py-spy --gil)", "", "own:"]
    lines += [f"{100 * n / samples:6.1f}%  {f}" for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:25]]
    lines += ["", "total (inclusive):"]
    lines += [f"{100 * n / samples:6.1f}%  {f}" for f, n in sorted(total.items(), key=lambda kv: -kv[1])[:40]]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 s each")
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell, best kept (the machine may be shared)")
    parser.add_argument("--profile", type=Path, help="py-spy hotserve at tiny c=16 and write the top costs here")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    exe = ensure_h2load()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        modelgen.add_const(root / "tiny" / "1")
        modelgen.conv(root / "conv" / "1")
        config = root / "models.json"
        config.write_text(json.dumps({"model_config_list": [
            {"config": {"name": "tiny", "base_path": str(root / "tiny")}},
            {"config": {"name": "conv", "base_path": str(root / "conv")}},
        ]}))  # fmt: skip
        frames = {}
        for model, name, x in [("tiny", "b", np.zeros((1, 10), np.float32)),
                               ("conv", "input", np.ones((1, 3, 224, 224), np.float32))]:  # fmt: skip
            body = request_bytes(model, name, x)
            frames[model] = (body, root / f"{model}.grpc")
            frames[model][1].write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
        server = ServerProcess(["--config_path", str(config), "--port", "0"], root / "log")
        port_file = root / "bare.port"
        bare = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bare_grpc.py"), str(port_file)])
        rows = []
        try:
            server.wait_ready()
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                assert time.monotonic() < deadline and bare.poll() is None, "bare server did not start"
                time.sleep(0.05)
            bare_port = int(port_file.read_text())
            models = ["tiny"] if args.quick else ["tiny", "conv"]
            for model in models:
                body, frame = frames[model]
                check(server.address, body)
                check(f"127.0.0.1:{bare_port}", body)
                for c in [1, 4, 16, 64]:
                    hots, lims = [], []
                    for _ in range(args.rounds):  # in turn, so both see the same interference from the machine
                        hots.append(measure(exe, server.proc.pid, server.port, frame, c, seconds))
                        lims.append(measure(exe, bare.pid, bare_port, frame, c, seconds))
                    hot = max(hots, key=lambda r: r["throughput"])
                    lim = max(lims, key=lambda r: r["throughput"])
                    rows.append({"model": model, "concurrency": c, "hotserve": hot, "bare": lim,
                                 "ratio": hot["throughput"] / lim["throughput"],
                                 "all_hotserve": [r["throughput"] for r in hots],
                                 "all_bare": [r["throughput"] for r in lims]})  # fmt: skip
            if args.profile:
                profile(ensure_py_spy(), exe, server.proc.pid, server.port, frames["tiny"][1], args.profile, seconds)
        finally:
            server.stop()
            bare.terminate()
            bare.wait(10)
    print(f"h2load, one connection, C streams; best of {args.rounds} runs of {seconds:g} s, servers in turn; "
          "CPU = server process CPU over the run (100% = one core)")  # fmt: skip
    print(f"{'model':5} {'C':>3} | {'hotserve req/s':>14} {'mean':>8} {'cpu':>5} {'µs/req':>7} | "
          f"{'bare req/s':>10} {'mean':>8} {'cpu':>5} {'µs/req':>7} | {'ratio':>5}")  # fmt: skip
    for r in rows:
        h, b = r["hotserve"], r["bare"]
        print(
            f"{r['model']:5} {r['concurrency']:>3} | {h['throughput']:>14.0f} {h['mean_ms']:>6.2f}ms "
            f"{h['server_cpu_pct']:>4.0f}% {h['server_cpu_us_per_req']:>7.0f} | {b['throughput']:>10.0f} "
            f"{b['mean_ms']:>6.2f}ms {b['server_cpu_pct']:>4.0f}% {b['server_cpu_us_per_req']:>7.0f} | "
            f"{r['ratio']:>5.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    summary = {"seconds": seconds, "rounds": args.rounds, "rows": rows}
    (RESULTS / "grpc_limit.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {RESULTS / 'grpc_limit.json'}")


if __name__ == "__main__":
    main()
