"""Hostile clients and transport security (issue 10), measured against real server processes.

1. p50/p99 of a tiny model for a well-behaved tritonclient alone, then while another process sends junk in a loop:
   200 MB KServe requests whose raw contents do not fit the shape, 1 000-element BYTES garbage, 300 MB ones (past
   --max_request_mb), and (REST) 200 MB and 0.9 MB JSON bodies. Goal: p99 with junk ≤ 2 × p99 alone.
   A control sends the same junk to a second server process: what the junk costs the machine (2 shared cores),
   as against what it costs the server it is sent to.
2. Request latency over TLS vs plaintext, tiny and conv models, hotserve and the bare grpc.aio server
   (benchmarks/bare_grpc.py) all running at once and measured in turns. Goal: tiny p50 overhead ≤ 0.15 ms.

Prints a table and writes benchmarks/results/hostile.json.

    .venv/bin/python benchmarks/hostile.py [--seconds 6] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import contextlib

import modelgen
from certs import CA
from harness import ServerProcess, free_port

RESULTS = Path(__file__).resolve().parent / "results"
X = np.arange(10, dtype=np.float32).reshape(1, 10)
JUNK_MB = 200
JUNK = [  # (key, protocol, MB): each sent in a loop, alternating with 1 000-element BYTES garbage for gRPC
    ("grpc_junk", "grpc", JUNK_MB),
    ("grpc_junk_over_limit", "grpc", 300),  # past --max_request_mb's default 256: grpc's C core refuses it
    ("rest_junk", "rest", JUNK_MB),
    ("rest_junk_medium", "rest", 0.9),  # below the old 1 MiB inline bound: parsed on the loop, ~70 ms each
]
LABELS = {
    "grpc_junk": f"gRPC junk ({JUNK_MB} MB, BYTES garbage)",
    "grpc_junk_over_limit": "gRPC junk (300 MB: over the limit)",
    "rest_junk": f"REST junk ({JUNK_MB} MB JSON)",
    "rest_junk_medium": "REST junk (0.9 MB JSON, many)",
}


def _samples(client, model: str, name: str, x: np.ndarray, seconds: float) -> list[float]:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for _ in range(20):
        client.infer(model, [tensor])
    samples = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        client.infer(model, [tensor])
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def _stats(samples: list[float]) -> dict[str, float]:
    flat = np.array(samples)
    return {"requests": int(flat.size), "p50_ms": float(np.percentile(flat, 50)),
            "p99_ms": float(np.percentile(flat, 99)), "max_ms": float(flat.max())}  # fmt: skip


def latencies(client, model: str, name: str, x: np.ndarray, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return _stats(_samples(client, model, name, x, seconds))


def _junk_grpc(address: str, stop: Any, sent: Any, mb: int = JUNK_MB) -> None:
    """Pre-serialized junk, sent as raw bytes: the junk client's own CPU stays small."""
    import grpc
    from tritonclient.grpc import service_pb2

    big = service_pb2.ModelInferRequest(model_name="tiny")
    big.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    big.raw_input_contents.append(b"\0" * (mb << 20))
    garbage = service_pb2.ModelInferRequest(model_name="tiny")
    garbage.inputs.add(name="b", datatype="BYTES", shape=[1, 1000])
    garbage.raw_input_contents.append(b"\xff" * 4000)
    payloads = [big.SerializeToString(), garbage.SerializeToString()]
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    while not stop.is_set():
        for payload in payloads:
            with contextlib.suppress(grpc.RpcError):
                call(payload, timeout=60)
            with sent.get_lock():
                sent.value += 1


def _junk_rest(url: str, stop: Any, sent: Any, mb: float = JUNK_MB) -> None:
    count = int(mb * (1 << 20)) // 2
    body = b'{"inputs":[{"name":"b","datatype":"FP32","shape":[1,10],"data":[' + b"0," * count + b"0]}]}"
    while not stop.is_set():
        request = urllib.request.Request(f"{url}/v2/models/tiny/infer", data=body, method="POST")
        with contextlib.suppress(Exception):
            urllib.request.urlopen(request, timeout=120).read()
        with sent.get_lock():
            sent.value += 1


def under_junk(kind: str, target: str, measure, mb: float = JUNK_MB) -> tuple[dict[str, float], int]:  # type: ignore[no-untyped-def]
    ctx = multiprocessing.get_context("spawn")
    stop, sent = ctx.Event(), ctx.Value("i", 0)
    junk = _junk_grpc if kind == "grpc" else _junk_rest
    args = (target, stop, sent, mb)
    proc = ctx.Process(target=junk, args=args)
    proc.start()
    time.sleep(3.0)  # the junk is flowing (and its 200 MB is built) before measuring
    try:
        result = measure()
    finally:
        stop.set()
        proc.join(120)
        if proc.is_alive():
            proc.kill()
    return result, int(sent.value)


def _bare(tmp: Path, name: str, tls: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / f"{name}.port"
    script = Path(__file__).with_name("bare_grpc.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port_file), *(["--tls", *tls] if tls else [])])
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{name}: bare server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def interleaved(targets: dict[str, tuple[Any, str, str, np.ndarray]], seconds: float, rounds: int = 8
                ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each target measured in turn, `rounds` times: drifting machine load hits every target alike."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for index in range(rounds):
        order = list(targets)[index % len(targets) :] + list(targets)[: index % len(targets)]
        for name in order:
            client, model, input_name, x = targets[name]
            samples[name].extend(_samples(client, model, input_name, x, seconds / rounds))
    return {name: _stats(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement")
    parser.add_argument("--junk_only", action="store_true", help="part 1 only")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    import tritonclient.grpc as grpcclient

    results: dict[str, Any] = {"seconds": seconds, "junk_mb": JUNK_MB}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        modelgen.add_const(tmp / "models" / "tiny" / "1")
        modelgen.conv(tmp / "models" / "conv" / "1", layers=6)
        config = tmp / "models.json"
        config.write_text(json.dumps({"model_config_list": [
            {"config": {"name": "tiny", "base_path": str(tmp / "models" / "tiny")}},
            {"config": {"name": "conv", "base_path": str(tmp / "models" / "conv")}},
        ]}))  # fmt: skip
        ca = CA(tmp / "pki")
        pair = ca.issue("server")
        conv_x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

        # ---- 1. a junk client next to a well-behaved one; the control sends the same junk to another process ----
        def serve(name: str, *extra: str) -> ServerProcess:
            return ServerProcess(["--config_path", str(config), "--port", "0", "--file_system_poll_wait_seconds", "0",
                                  *extra], tmp / f"{name}.log").wait_ready()  # fmt: skip

        port, other_port = free_port(), free_port()
        server, other = serve("plain", "--rest_port", str(port)), serve("other", "--rest_port", str(other_port))
        try:
            client = grpcclient.InferenceServerClient(server.address)
            measure = lambda: latencies(client, "tiny", "b", X, seconds)  # noqa: E731
            alone = measure()
            measured = {}
            for key, kind, mb in JUNK:
                grpc_target = {"control": other.address, "this": server.address}
                rest_target = {"control": f"http://127.0.0.1:{other_port}", "this": f"http://127.0.0.1:{port}"}
                for where in ("control", "this"):  # the same junk to the other process, then to this one
                    target = (grpc_target if kind == "grpc" else rest_target)[where]
                    measured[key, where] = under_junk(kind, target, measure, mb)
        finally:
            server.stop()
            other.stop()

        results["junk"] = {"alone": alone}
        for key, _, _ in JUNK:
            (base, _), (stats, sent) = measured[key, "control"], measured[key, "this"]
            for name, values, count in ((f"{key}_control", base, measured[key, "control"][1]), (key, stats, sent)):
                results["junk"][name] = {**values, "junk_requests": count,
                                         "p99_ratio": values["p99_ms"] / alone["p99_ms"],
                                         "p99_ratio_to_control": values["p99_ms"] / base["p99_ms"]}  # fmt: skip

        if args.junk_only:
            return _report(results)
        # ---- 2. TLS vs plaintext: hotserve and the bare grpc.aio server, all four up at once, measured in turns ----
        tls_args = ["--tls_cert", str(pair.cert), "--tls_key", str(pair.key)]
        plain, secure = serve("plain2"), serve("tls", *tls_args)
        bare_plain, bare_plain_address = _bare(tmp, "bare-plain", [])
        bare_tls, bare_tls_address = _bare(tmp, "bare-tls", [str(pair.cert), str(pair.key)])
        try:

            def connect(address: str, tls: bool) -> Any:
                if tls:
                    return grpcclient.InferenceServerClient(address, ssl=True, root_certificates=str(ca.cert))
                return grpcclient.InferenceServerClient(address)

            clients = {
                "plain": connect(plain.address, False), "tls": connect(secure.address, True),
                "bare_plain": connect(bare_plain_address, False), "bare_tls": connect(bare_tls_address, True),
            }  # fmt: skip
            tiny = interleaved({k: (c, "tiny", "b", X) for k, c in clients.items()}, 4 * seconds)
            conv = interleaved({k: (clients[k], "conv", "input", conv_x) for k in ("plain", "tls")}, 2 * seconds)
        finally:
            plain.stop()
            secure.stop()
            for proc in (bare_plain, bare_tls):
                proc.terminate()
                proc.wait(10)
        results["tls"] = {
            "tiny": {**tiny, "p50_overhead_ms": tiny["tls"]["p50_ms"] - tiny["plain"]["p50_ms"],
                     "bare_p50_overhead_ms": tiny["bare_tls"]["p50_ms"] - tiny["bare_plain"]["p50_ms"]},
            "conv": {**conv, "p50_overhead_ms": conv["tls"]["p50_ms"] - conv["plain"]["p50_ms"]},
        }  # fmt: skip
    return _report(results)


def _report(results: dict[str, Any]) -> int:
    junk = results["junk"]
    head = f"{'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 ×':>6} {'× ctrl':>6} {'junk':>5}"
    print(f"{'tiny model, well-behaved client':66} {head}")
    rows = [("alone", "alone")]
    for key, _, _ in JUNK:
        rows += [(f"+ {LABELS[key]}, to another process (control)", f"{key}_control"), (f"+ {LABELS[key]}", key)]
    for label, key in rows:
        r = junk[key]
        ratios = (
            f"{r['p99_ratio']:6.2f} {r['p99_ratio_to_control']:6.2f} {r['junk_requests']:5d}" if key != "alone" else ""
        )
        print(f"{label:66} {r['requests']:9d} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['max_ms']:8.1f} {ratios}")
    tls = results.get("tls")
    if tls is None:
        return 0  # part 1 alone: nothing written over the full run's results
    print(f"\n{'TLS vs plaintext (gRPC), p50 / p99 ms':40} {'plain':>15} {'TLS':>15} {'p50 overhead':>13}")
    for label, model, plain_key, tls_key, over in (
        ("tiny, hotserve", "tiny", "plain", "tls", "p50_overhead_ms"),
        ("tiny, bare grpc.aio (the stack's own)", "tiny", "bare_plain", "bare_tls", "bare_p50_overhead_ms"),
        ("conv, hotserve", "conv", "plain", "tls", "p50_overhead_ms"),
    ):
        p, t = tls[model][plain_key], tls[model][tls_key]
        print(f"{label:40} {p['p50_ms']:7.3f}/{p['p99_ms']:7.3f} {t['p50_ms']:7.3f}/{t['p99_ms']:7.3f} "
              f"{tls[model][over]:13.3f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {RESULTS / 'hostile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
