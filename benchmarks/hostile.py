"""Hostile clients and transport security (issue 10), measured against real server processes.

1. p50/p99 of a tiny model for a well-behaved tritonclient alone, then while another process sends junk in a loop:
   200 MB KServe requests whose raw contents do not fit the shape, 1 000-element BYTES garbage, and (REST) a 200 MB
   JSON body. Goal: p99 with junk ≤ 2 × p99 alone.
2. Request latency over TLS vs plaintext, tiny and conv models. Goal: tiny p50 overhead ≤ 0.15 ms.

Prints a table and writes benchmarks/results/hostile.json.

    .venv/bin/python benchmarks/hostile.py [--seconds 6] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
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
from harness import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
X = np.arange(10, dtype=np.float32).reshape(1, 10)
JUNK_MB = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def latencies(client, model: str, name: str, x: np.ndarray, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
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
    flat = np.array(samples)
    return {"requests": int(flat.size), "p50_ms": float(np.percentile(flat, 50)),
            "p99_ms": float(np.percentile(flat, 99)), "max_ms": float(flat.max())}  # fmt: skip


def _junk_grpc(address: str, stop: Any, sent: Any) -> None:
    """Pre-serialized junk, sent as raw bytes: the junk client's own CPU stays small."""
    import grpc
    from tritonclient.grpc import service_pb2

    big = service_pb2.ModelInferRequest(model_name="tiny")
    big.inputs.add(name="b", datatype="FP32", shape=[1, 10])
    big.raw_input_contents.append(b"\0" * (JUNK_MB << 20))
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


def _junk_rest(url: str, stop: Any, sent: Any) -> None:
    count = (JUNK_MB << 20) // 2
    body = b'{"inputs":[{"name":"b","datatype":"FP32","shape":[1,10],"data":[' + b"0," * count + b"0]}]}"
    while not stop.is_set():
        request = urllib.request.Request(f"{url}/v2/models/tiny/infer", data=body, method="POST")
        with contextlib.suppress(Exception):
            urllib.request.urlopen(request, timeout=120).read()
        with sent.get_lock():
            sent.value += 1


def under_junk(kind: str, target: str, measure) -> tuple[dict[str, float], int]:  # type: ignore[no-untyped-def]
    ctx = multiprocessing.get_context("spawn")
    stop, sent = ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=_junk_grpc if kind == "grpc" else _junk_rest, args=(target, stop, sent))
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--quick", action="store_true", help="2 s per measurement")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    import tritonclient.grpc as grpcclient

    results: dict[str, object] = {"seconds": seconds, "junk_mb": JUNK_MB}
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

        # ---- 1. a junk client next to a well-behaved one ----
        port = free_port()
        server = ServerProcess(["--config_path", str(config), "--port", "0", "--rest_port", str(port),
                                "--file_system_poll_wait_seconds", "0"], tmp / "plain.log").wait_ready()  # fmt: skip
        try:
            client = grpcclient.InferenceServerClient(server.address)
            alone = latencies(client, "tiny", "b", X, seconds)
            grpc_junk, grpc_sent = under_junk("grpc", server.address,
                                              lambda: latencies(client, "tiny", "b", X, seconds))  # fmt: skip
            rest_junk, rest_sent = under_junk("rest", f"http://127.0.0.1:{port}",
                                              lambda: latencies(client, "tiny", "b", X, seconds))  # fmt: skip
            plain_tiny = latencies(client, "tiny", "b", X, seconds)
            conv_x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            plain_conv = latencies(client, "conv", "input", conv_x, seconds)
        finally:
            server.stop()
        results["junk"] = {
            "alone": alone,
            "grpc_junk": {**grpc_junk, "junk_requests": grpc_sent, "p99_ratio": grpc_junk["p99_ms"] / alone["p99_ms"]},
            "rest_junk": {**rest_junk, "junk_requests": rest_sent, "p99_ratio": rest_junk["p99_ms"] / alone["p99_ms"]},
        }

        # ---- 2. TLS vs plaintext ----
        server = ServerProcess(["--config_path", str(config), "--port", "0", "--tls_cert", str(pair.cert),
                                "--tls_key", str(pair.key), "--file_system_poll_wait_seconds", "0"],
                               tmp / "tls.log").wait_ready()  # fmt: skip
        try:
            client = grpcclient.InferenceServerClient(server.address, ssl=True, root_certificates=str(ca.cert))
            tls_tiny = latencies(client, "tiny", "b", X, seconds)
            tls_conv = latencies(client, "conv", "input", conv_x, seconds)
        finally:
            server.stop()
        results["tls"] = {
            name: {"plain": plain, "tls": tls, "p50_overhead_ms": tls["p50_ms"] - plain["p50_ms"]}
            for name, plain, tls in (("tiny", plain_tiny, tls_tiny), ("conv", plain_conv, tls_conv))
        }

    junk = results["junk"]
    head = f"{'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 ×':>6}"
    print(f"{'tiny model, well-behaved client':40} {head}")
    for label, key in (("alone", "alone"), (f"+ gRPC junk ({JUNK_MB} MB, BYTES garbage)", "grpc_junk"),
                       (f"+ REST junk ({JUNK_MB} MB JSON)", "rest_junk")):  # fmt: skip
        row = junk[key]  # type: ignore[index]
        ratio = f"{row['p99_ratio']:6.2f}" if "p99_ratio" in row else ""
        print(f"{label:40} {row['requests']:9d} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['max_ms']:8.1f} {ratio}")
    print(f"junk requests sent: gRPC {junk['grpc_junk']['junk_requests']}, REST {junk['rest_junk']['junk_requests']}")  # type: ignore[index]
    head = f"{'plain p50':>10} {'TLS p50':>10} {'overhead':>10} {'plain p99':>10} {'TLS p99':>10}"
    print(f"\n{'TLS vs plaintext (gRPC)':24} {head}")
    for model in ("tiny", "conv"):
        row = results["tls"][model]  # type: ignore[index]
        print(f"{model:24} {row['plain']['p50_ms']:10.3f} {row['tls']['p50_ms']:10.3f} {row['p50_overhead_ms']:10.3f} "
              f"{row['plain']['p99_ms']:10.3f} {row['tls']['p99_ms']:10.3f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {RESULTS / 'hostile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
