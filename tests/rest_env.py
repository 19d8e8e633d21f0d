"""A real server for the REST body tests (test_rest_spool, test_rest_body_timeout, test_offload) and what they look at:
its memory files (memfds), its decoder processes by lane, and raw HTTP/1.1 on a socket."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import modelgen
import numpy as np
from conftest import ServerProcess, model_entry
from harness import free_port

from engine.frontend.rest import SPOOLED_BODIES

LIMIT_MB = 16
T = TypeVar("T")
WIDE = 300_000  # FP32 values: a JSON body of ~2 MB, past the 1 MiB inline bound


@dataclass
class Env:
    server: ServerProcess
    port: int

    @property
    def pid(self) -> int:
        return self.server.proc.pid


def start(root: Path, program: list[str] | None = None, args: tuple[str, ...] = ()) -> Env:
    modelgen.add_const(root / "wide" / "1", delta=1.0, shape=(1, -1))
    config = root / "models.json"
    config.write_text(json.dumps({"model_config_list": [model_entry("wide", root / "wide")]}))
    port = free_port()
    server = ServerProcess(
        ["--config_path", str(config), "--port", "0", "--rest_port", str(port),
         "--max_request_mb", str(LIMIT_MB), "--file_system_poll_wait_seconds", "0", *args],
        root / "server.log", program=program,
    ).wait_ready()  # fmt: skip
    return Env(server, port)


def stop(env: Env) -> None:
    assert env.server.stop() == 0
    assert "Traceback" not in env.server.log, env.server.log[-3000:]


def body_for(values: np.ndarray) -> bytes:
    shape = [1, int(values.size)]
    return json.dumps({"inputs": [{"name": "b", "datatype": "FP32", "shape": shape, "data": values.tolist()}]}).encode()


def post(env: Env, body: bytes | Iterator[bytes], chunked: bool = False) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
    url = f"http://127.0.0.1:{env.port}/v2/models/wide/infer"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # type: ignore[arg-type]
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def memfds(pid: int) -> list[str]:
    """The memory files process `pid` holds open."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("/memfd:hotserve-body"):
            found.append(target)
    return found


def spooled_sizes(pid: int) -> list[int]:
    sizes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:hotserve-body"):
                sizes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_size)
    return sizes


def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def decoders(pid: int) -> dict[str, int]:
    """The server's decoder processes by lane ("s": bodies under 1 MiB, "l": larger), named in /proc/<pid>/comm."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(FileNotFoundError):
            comm = Path(f"/proc/{child}/comm").read_text().strip()
            if comm.startswith("hotserve-json-"):
                found[comm[-1]] = int(child)
    return found


def check_answer(env: Env, size: int = WIDE, chunked: bool = False) -> None:
    values = np.arange(size, dtype=np.float32) / 7
    status, answer = post(env, iter([body_for(values)]) if chunked else body_for(values), chunked=chunked)
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], values + 1, rtol=1e-6)


def send_head(sock: socket.socket, size: int) -> None:
    sock.sendall(
        b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    )


def answer_of(sock: socket.socket) -> tuple[bytes, dict]:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, text = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(text)


def response_of(sock: socket.socket) -> tuple[bytes, dict]:
    """One response, read by its Content-Length (not to the connection's end)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, text = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(text) < length:
        text += sock.recv(65536)
    return head.split(b"\r\n")[0], json.loads(text)


def all_answered(socks: list[socket.socket], values: np.ndarray) -> None:
    """Each socket's request (a body of `values`, one per socket) answered 200 with values + 1; the sockets closed."""
    for sock in socks:
        with sock:
            status, answer = answer_of(sock)
        assert status == b"HTTP/1.1 200 OK", answer
        np.testing.assert_allclose(answer["outputs"][0]["data"], values + 1, rtol=1e-6)


@contextlib.contextmanager
def slots_filled(env: Env, values: np.ndarray) -> Iterator[None]:
    """The large lane's decoder held stopped, every spool slot holding a whole body of `values`, and a 5th such
    request being sent (it waits for a slot); on leaving, the decoder goes on and all 5 must be answered right."""
    check_answer(env)
    decoder = decoders(env.pid)["l"]
    body = body_for(values)
    socks = [socket.create_connection(("127.0.0.1", env.port), timeout=60) for _ in range(SPOOLED_BODIES + 1)]
    os.kill(decoder, signal.SIGSTOP)
    try:
        for sock in socks[:SPOOLED_BODIES]:
            send_head(sock, len(body))
            sock.sendall(body)
        until(lambda: spooled_sizes(env.pid) == [len(body)] * SPOOLED_BODIES, "every slot's body spooled")
        send_head(socks[-1], len(body))
        rest = threading.Thread(target=socks[-1].sendall, args=(body,))  # blocks once the socket buffers are full
        rest.start()
        yield
    finally:
        os.kill(decoder, signal.SIGCONT)
    rest.join(60)
    all_answered(socks, values)


def answered_meanwhile(env: Env, lane: str, send: Callable[[], T], spooled: int, size: int) -> list[T]:
    """`lane`'s decoder held stopped while `send()` runs in a thread: once its body (`spooled` bytes) waits in a
    memory file, a request of `size` values is answered and `send` is not; then the decoder goes on. `send`'s
    result, once it is done."""
    decoder = decoders(env.pid)[lane]
    done: list[T] = []
    os.kill(decoder, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=lambda: done.append(send()))
        sender.start()
        until(lambda: spooled_sizes(env.pid) == [spooled], f"the body waiting for the {lane} decoder")
        check_answer(env, size=size)
        assert not done
    finally:
        os.kill(decoder, signal.SIGCONT)
    sender.join(60)
    return done
