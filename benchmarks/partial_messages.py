"""What gRPC requests that never complete cost the server (issue 10): memory held, with and without the receive limit.

A client (raw HTTP/2 frames, tests/raw_h2.py) opens C connections of S ModelInfer calls each; every call announces
a --announce_mb message, sends --send_mb of it, then nothing. grpc's C core buffers what came until the call ends.
Two hotserve processes run side by side: as shipped (`--grpc_receive_timeout_seconds T`, frontend/receive.py), and
one with its unary methods registered as grpc.aio unary ones (`--serve unary`: what hotserve did before the limit).
For each: server RSS before, once everything is sent, T + 2 s later, and once the client has gone; the calls
ended by the server, and a good request answered meanwhile. Writes benchmarks/results/partial_messages.json.

    .venv/bin/python benchmarks/partial_messages.py [--connections 2] [--streams 10] [--send_mb 50] [--timeout 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("limited", "unary")


def serve(mode: str, argv: list[str]) -> int:
    """This process becomes hotserve; `unary`: without the receive limit."""
    from engine import cli
    from engine.frontend import registration

    if mode == "unary":
        registration.bounded = lambda method, handler, deadlines: handler  # type: ignore[assignment]
    return cli.main(["serve", *argv])


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def good_request(address: str) -> bool:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=30).live)


def attack(pid: int, address: str, args: argparse.Namespace) -> dict[str, Any]:
    from raw_h2 import RawGrpc, frame

    row: dict[str, Any] = {"rss_before_mb": rss_mb(pid)}
    clients = [RawGrpc(address) for _ in range(args.connections)]
    part = frame(b"\0" * (args.send_mb << 20), claimed=args.announce_mb << 20)
    calls = [(c, c.start("/inference.GRPCInferenceService/ModelInfer")) for c in clients for _ in range(args.streams)]
    began = time.monotonic()
    for client, stream in calls:
        client.send(stream, part)
    row["send_seconds"] = round(time.monotonic() - began, 2)
    row["rss_sent_mb"] = rss_mb(pid)
    row["good_request_meanwhile"] = good_request(address)
    for client in clients:
        client.sock.settimeout(0.2)
    ended = 0
    wait_until = began + args.timeout + 2
    while time.monotonic() < wait_until:
        for client, stream in calls:
            if stream not in client.ended:
                with contextlib.suppress(TimeoutError, OSError):
                    client._read_events()
        ended = sum(stream in client.ended for client, stream in calls)
        if ended == len(calls):
            break
    time.sleep(max(0.0, wait_until - time.monotonic()))
    row["ended_by_server"] = ended
    row["statuses"] = sorted({client.ended[s].status for client, s in calls if s in client.ended})
    row["rss_after_timeout_mb"] = rss_mb(pid)
    for client in clients:
        client.close()
    time.sleep(2)
    row["rss_client_gone_mb"] = rss_mb(pid)
    return row


def main() -> None:
    import modelgen
    from harness import ServerProcess

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--send_mb", type=int, default=50)
    parser.add_argument("--announce_mb", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = modelgen.const_config(root)
        argv = ["--config_path", str(config), "--port", "0", "--file_system_poll_wait_seconds", "0",
                "--grpc_receive_timeout_seconds", f"{args.timeout:g}"]  # fmt: skip
        servers = {
            mode: ServerProcess(
                argv, root / f"{mode}.log", program=[sys.executable, str(Path(__file__).resolve()), "--serve", mode]
            )
            for mode in MODES
        }
        try:
            for server in servers.values():
                server.wait_ready()
            for mode, server in servers.items():
                rows[mode] = attack(server.proc.pid, server.address, args)
        finally:
            for server in servers.values():
                server.stop()
    calls = args.connections * args.streams
    print(f"{args.connections} connections × {args.streams} ModelInfer calls, each {args.send_mb} of "
          f"{args.announce_mb} MB sent; receive limit {args.timeout:g} s")  # fmt: skip
    head = ("server", "RSS before", "all sent", "limit+2s", "client gone", "ended", "sending")
    print("{:8} {:>10} {:>9} {:>9} {:>11} {:>7} {:>8}  good".format(*head))
    for mode, r in rows.items():
        rss = (r["rss_before_mb"], r["rss_sent_mb"], r["rss_after_timeout_mb"], r["rss_client_gone_mb"])
        print(
            f"{mode:8} {rss[0]:>8.0f}MB {rss[1]:>7.0f}MB {rss[2]:>7.0f}MB {rss[3]:>9.0f}MB "
            f"{r['ended_by_server']:>3}/{calls:<3} {r['send_seconds']:>7.1f}s  {r['good_request_meanwhile']}"
        )
    out = Path(__file__).resolve().parent / "results" / "partial_messages.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2], sys.argv[3:]))
    main()
