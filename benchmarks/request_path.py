"""Where a tiny request's server CPU goes (issue 12): hotserve with its request path cut short after each stage,
next to the full server and the bare grpc.aio server (benchmarks/bare_grpc.py), all running, measured in turns.

Each cut is a real hotserve process (started through this script with `--serve CUT`, which swaps one function
before serving) answering with a canned reply from that point on:

    parse     ModelInfer answers at once: grpc.aio's per-call work plus the request's field scan (kserve_wire.parse)
    handler   + the KServe handler (decode into tensors, version, route key, the reply built): DataPlane.infer canned
    plane     + the data plane (lease, validate, statistics, metrics, the idle infer request): OpenVINO's run canned
    full      + OpenVINO's inference and the outputs copied out
    unary     the full server with its unary methods registered as grpc.aio unary ones, not read under
              --grpc_receive_timeout_seconds (frontend/receive.py): its step is minus what that limit costs

The step from one row to the next is what that stage costs per request in server CPU (all threads, /proc), so a
profile by subtraction that no sampler distorts. h2load (C++), one connection, C streams; best of --rounds.
Writes benchmarks/results/request_path.json.

    .venv/bin/python benchmarks/request_path.py [--seconds 3] [--rounds 5] [--concurrency 1 16] [--cuts full unary]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CUTS = ("parse", "handler", "plane", "full", "unary")


def serve(cut: str, argv: list[str]) -> int:
    """This process becomes hotserve with the request path cut at `cut`."""
    from engine import cli, served
    from engine.frontend import dataplane, kserve, registration
    from engine.frontend.generated.inference import grpc_service_pb2 as pb
    from engine.frontend.tensor import Tensor

    zeros = np.zeros((1, 10), np.float32)
    reply = pb.ModelInferResponse(model_name="tiny", model_version="1")
    reply.outputs.add(name="a", datatype="FP32", shape=[1, 10])
    reply.raw_output_contents.append(zeros.tobytes())

    async def canned_reply(self: Any, wire: Any, context: Any) -> Any:
        return reply

    async def canned_plane(self: Any, *args: Any, **kwargs: Any) -> tuple[int, list[Tensor]]:
        return 1, [Tensor("a", "FP32", (1, 10), zeros)]

    async def canned_run(self: Any, inputs: Any) -> list[np.ndarray]:
        return [zeros]

    if cut == "parse":
        kserve.KServeServicer.ModelInfer = canned_reply  # type: ignore[method-assign]
    elif cut == "handler":
        dataplane.DataPlane.infer = canned_plane  # type: ignore[method-assign]
    elif cut == "plane":
        served.ServedVersion.infer = canned_run  # type: ignore[method-assign]
    elif cut == "unary":
        registration.bounded = lambda method, handler, deadlines: handler  # type: ignore[assignment]
    return cli.main(["serve", *argv])


def main() -> None:
    import grpc_limit as gl
    import modelgen
    from harness import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--cuts", nargs="+", choices=CUTS, default=list(CUTS), help="the servers to run (and bare)")
    args = parser.parse_args()
    exe = gl.ensure_h2load()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = modelgen.const_config(root)
        body = gl.request_bytes("tiny", "b", np.arange(10, dtype=np.float32).reshape(1, 10))
        frame = root / "tiny.grpc"
        frame.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
        servers: dict[str, ServerProcess] = {}
        port_file = root / "bare.port"
        bare = subprocess.Popen([sys.executable, str(Path(__file__).parent / "bare_grpc.py"), str(port_file)])
        rows: list[dict[str, Any]] = []
        try:
            for cut in args.cuts:
                program = [sys.executable, str(Path(__file__).resolve()), "--serve", cut]
                server = ServerProcess(
                    ["--config_path", str(config), "--port", "0"], root / f"{cut}.log", program=program
                )
                servers[cut] = server.wait_ready()
                gl.check(server.address, body)
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                assert time.monotonic() < deadline and bare.poll() is None, "bare server did not start"
                time.sleep(0.05)
            targets = {**{cut: (s.proc.pid, s.port) for cut, s in servers.items()},
                       "bare": (bare.pid, int(port_file.read_text()))}  # fmt: skip
            for c in args.concurrency:
                runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
                for _ in range(args.rounds):  # in turn: every server meets the same interference
                    for name, (pid, port) in targets.items():
                        runs[name].append(gl.measure(exe, pid, port, frame, c, args.seconds))
                for name, results in runs.items():
                    best = max(results, key=lambda r: r["throughput"])
                    rows.append({"concurrency": c, "server": name, **best,
                                 "all": [round(r["throughput"]) for r in results]})  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
            bare.terminate()
            bare.wait(10)
    print(f"h2load, one connection, C streams, tiny model; best of {args.rounds} runs of {args.seconds:g} s in turn")
    print(f"{'C':>3} {'server':8} {'req/s':>7} {'µs/req':>7} {'step':>7}  {'runs (req/s)'}")
    for c in args.concurrency:
        previous = None
        for row in (r for r in rows if r["concurrency"] == c):
            cost = row["server_cpu_us_per_req"]
            step = "" if previous is None or row["server"] == "bare" else f"{cost - previous:+.0f}"
            print(f"{c:>3} {row['server']:8} {row['throughput']:>7.0f} {cost:>7.0f} {step:>7}  {row['all']}")
            previous = cost
    out = Path(__file__).resolve().parent / "results" / "request_path.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2], sys.argv[3:]))
    main()
