"""`hotserve status`: what a running server serves, read over gRPC (RepositoryIndex), as a table."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import grpc

from .frontend.routing_wire import split_labels
from .usage import Parser

EX_UNAVAILABLE = 69
WATCH_SECONDS = 1.0
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


Row = tuple[str, str, str, str, str, str]


def fetch(address: str, model: str | None, timeout: float = 5.0) -> list[Row]:
    """Rows of (model, version, state, cache, labels, error)."""
    from .frontend.generated.inference import grpc_service_pb2 as pb
    from .frontend.generated.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        index = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout)
    rows = []
    for entry in index.models:
        if model is not None and entry.name != model:
            continue
        ready = entry.state == "READY"
        reason, labels = split_labels(entry.reason)
        cache = reason.removeprefix("cache: ") if ready else ""
        rows.append((entry.name, entry.version or "-", "AVAILABLE" if ready else entry.state, cache, labels,
                     "" if ready else reason))  # fmt: skip
    return rows


def render(rows: list[Row]) -> str:
    header = ("MODEL", "VERSION", "STATE", "CACHE", "LABELS", "ERROR")
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in table]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str]) -> int:
    parser = Parser(prog="hotserve status", description="Show the models, versions, states and errors of a server.")
    parser.add_argument(
        "--address", default="localhost:9000", help="HOST:PORT of the gRPC port (default localhost:9000)"
    )
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--watch", action="store_true", help="redraw when something changes (Ctrl-C to stop)")
    args = parser.parse_args(argv)
    try:
        return _show(args.address, args.model, args.watch)
    except KeyboardInterrupt:  # Ctrl-C ends --watch (or a slow first fetch) quietly
        return 0


def _show(address: str, model: str | None, watch: bool) -> int:
    shown = None
    while True:
        try:
            rows = fetch(address, model)
        except grpc.RpcError as exc:
            why = "cannot reach" if exc.code() in UNREACHABLE else "error from"
            print(f"hotserve status: {why} {address}: {exc.code().name}", file=sys.stderr)
            return EX_UNAVAILABLE
        text = render(rows) if rows else f"no models{f' named {model}' if model else ''}"
        if text != shown:
            if watch and shown is not None:
                print("\033[2J\033[H", end="")  # clear the screen, cursor home
            print(text, flush=True)
            shown = text
        if not watch:
            return 0 if rows or model is None else 1
        time.sleep(WATCH_SECONDS)
