"""A bare grpc.aio server that answers KServe ModelInfer with a canned reply: the physical limit of hotserve's stack.

Same venv, same grpc.aio, same server options as engine/server.py; the request is not even parsed (raw bytes in,
prebuilt bytes out), so what it costs per request is what grpc.aio itself costs.

    .venv/bin/python benchmarks/bare_grpc.py PORT_FILE [--port N] [--tls CERT KEY]

--port: bind it (grpc's default SO_REUSEPORT), so several of these share it as hotserve's workers do.
--tls: serve TLS with that certificate and key, as hotserve's --tls_cert/--tls_key do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.frontend.generated.inference import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def canned(model: str, output: str, shape: list[int]) -> bytes:
    """A real ModelInferResponse as hotserve would send it for `model` (zeros in the output)."""
    response = pb.ModelInferResponse(model_name=model, model_version="1")
    response.outputs.add(name=output, datatype="FP32", shape=shape)
    count = 1
    for d in shape:
        count *= d
    response.raw_output_contents.append(bytes(4 * count))
    return response.SerializeToString()


REPLIES = {b"tiny": canned("tiny", "a", [1, 10]), b"conv": canned("conv", "output", [1, 128])}


async def infer(request: bytes, context: Any) -> bytes:
    # field 1 (model_name) is first on the wire for the benchmark's requests: pick the reply without parsing
    name_len = request[1]
    return REPLIES.get(bytes(request[2 : 2 + name_len]), REPLIES[b"tiny"])


async def main(port_file: Path, port: int, tls: list[str] | None) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    )
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server.add_generic_rpc_handlers((handler,))
    if tls:
        cert, key = (Path(p).read_bytes() for p in tls)
        port = server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port_file", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args()
    asyncio.run(main(args.port_file, args.port, args.tls))
