"""A gRPC client at the HTTP/2 frame level (h2 over a socket), for what no gRPC library will send: part of a request
message and then nothing, or a unary call with no message at all."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class Ended:
    """How the server ended one stream: its trailers (or trailers-only headers) and any response bytes."""

    headers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""

    @property
    def status(self) -> int:
        return int(self.headers["grpc-status"])

    @property
    def message(self) -> str:
        from urllib.parse import unquote

        return unquote(self.headers.get("grpc-message", ""))


class RawGrpc:
    def __init__(self, address: str, timeout: float = 60.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self._flush()
        self.ended: dict[int, Ended] = {}
        self._open: dict[int, Ended] = {}

    def start(self, method: str) -> int:
        """Open a call of `method` (e.g. /inference.GRPCInferenceService/ModelInfer): headers only."""
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream,
            [(":method", "POST"), (":scheme", "http"), (":path", method), (":authority", "localhost"),
             ("content-type", "application/grpc"), ("te", "trailers")],
        )  # fmt: skip
        self._open[stream] = Ended()
        self._flush()
        return stream

    def send(self, stream: int, data: bytes, end: bool = False) -> None:
        """Bytes of the call's body (use `frame` for a message's length prefix), as far as flow control allows;
        the rest is dropped once the server has ended the call."""
        while data:
            while stream not in self.ended and self.conn.local_flow_control_window(stream) == 0:
                self._read_events()
            if stream in self.ended:
                return
            size = min(len(data), self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size)
            self.conn.send_data(stream, data[:size])
            data = data[size:]
            self._flush()
        if end and stream not in self.ended:
            self.conn.end_stream(stream)
            self._flush()

    def wait(self, stream: int) -> Ended:
        """Read until the server has ended `stream`."""
        while stream not in self.ended:
            self._read_events()
        return self.ended[stream]

    def close(self) -> None:
        self.sock.close()

    def _read_events(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        for event in self.conn.receive_data(chunk):
            stream = getattr(event, "stream_id", 0)
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                self._open[stream].headers.update(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self._open[stream].data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset) and stream in self._open:
                self.ended[stream] = self._open.pop(stream)  # trailers, then RST_STREAM when the client sends on
        self._flush()

    def _flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())


def frame(message: bytes, claimed: int | None = None, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message; `claimed` lengths other than len(message) announce bytes that never come;
    `compressed` sets the flag a call without grpc-encoding may not set (C-core itself ends the call)."""
    return struct.pack(">BI", int(compressed), len(message) if claimed is None else claimed) + message
