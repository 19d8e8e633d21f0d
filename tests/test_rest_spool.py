"""Large REST bodies (issue 10): spooled as they arrive into a memory file that the decoder process reads.

Checked on a real server: large and chunked bodies are answered right, the limit holds for chunked bodies, no
memory file outlives its request (refused, abandoned mid-body, or decoder killed mid-parse), and the decoder runs
niced and first in line for the OOM killer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import certs
import modelgen
import numpy as np
import pytest
from conftest import ServerProcess, model_entry
from harness import free_port

from engine.frontend import offload
from engine.frontend.rest import SPOOLED_BODIES
from engine.frontend.rest_spool import Spool

LIMIT_MB = 16
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


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    started = start(tmp_path_factory.mktemp("spool"))
    yield started
    stop(started)


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


def test_a_large_body_is_answered_through_the_decoder_process(env: Env) -> None:
    check_answer(env)
    assert "l" in decoders(env.pid), "a body past 1 MiB is parsed in the large bodies' decoder process"
    assert memfds(env.pid) == []


def test_chunked_bodies_small_and_large(env: Env) -> None:
    check_answer(env, size=10, chunked=True)  # no Content-Length: spooled, then parsed inline
    check_answer(env, chunked=True)


def test_a_chunked_body_past_the_limit_is_refused(env: Env) -> None:
    piece = b"0," * (1 << 19)  # 1 MiB per chunk, no Content-Length to check up front
    head = b'{"inputs":[{"name":"b","datatype":"FP32","shape":[1,1],"data":['
    chunks = iter([head, *[piece] * (LIMIT_MB + 2), b"0]}]}"])
    status, answer = post(env, chunks, chunked=True)
    assert status == 413 and "max_request_mb" in answer["error"] and f"{LIMIT_MB << 20} bytes" in answer["error"]
    assert memfds(env.pid) == []
    check_answer(env)


def test_a_body_abandoned_half_way_leaves_no_memory_file(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port)) as sock:
        sock.sendall(
            b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000000\r\n\r\n" + b"[" * 2_000_000
        )
        until(lambda: len(memfds(env.pid)) == 1, "the body being spooled")
    until(lambda: memfds(env.pid) == [], "the abandoned body's memory file to be closed")
    check_answer(env)


def test_a_decoder_killed_mid_request_is_a_clear_error_and_the_next_body_is_served(env: Env) -> None:
    check_answer(env)  # the large bodies' decoder process is up
    decoder = decoders(env.pid)["l"]
    body = body_for(np.zeros(WIDE, dtype=np.float32))
    os.kill(decoder, signal.SIGSTOP)  # it cannot finish this body before it is killed
    try:
        with socket.create_connection(("127.0.0.1", env.port)) as sock:
            sock.sendall(
                b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            until(lambda: spooled_sizes(env.pid) == [len(body)], "the whole body spooled")
            os.kill(decoder, signal.SIGKILL)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(decoder, signal.SIGKILL)
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500"), answer[:300]
    assert "the request decoder process died (out of memory or killed); try again" in json.loads(text)["error"]
    assert memfds(env.pid) == []
    check_answer(env)  # by a fresh decoder
    assert decoders(env.pid)["l"] != decoder


def test_a_medium_body_is_parsed_off_the_loop(env: Env) -> None:
    """A 20 KB body waits for the decoder process (held stopped) while a small one is answered on the loop."""
    check_answer(env, size=3000)
    decoder = decoders(env.pid)["s"]
    medium = np.arange(3000, dtype=np.float32)  # ~20 KB of JSON: past the 16 KiB inline bound, far below 1 MiB
    body = body_for(medium)
    done: list[tuple[int, dict]] = []
    os.kill(decoder, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=lambda: done.append(post(env, body)))
        sender.start()
        until(lambda: spooled_sizes(env.pid) == [len(body)], "the medium body handed to the decoder")
        check_answer(env, size=10)  # parsed inline meanwhile
        assert not done
    finally:
        os.kill(decoder, signal.SIGCONT)
    sender.join(60)
    ((status, answer),) = done
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], medium + 1)


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


def test_at_most_a_few_large_bodies_are_held_at_once_and_the_rest_wait_unread(env: Env) -> None:
    """With the decoder held stopped, 4 bodies fill every slot; a 5th, whose headers the server read before a small
    request it answers, is not read (no memory file) until a slot frees; then all 5 are answered."""
    check_answer(env)
    decoder = decoders(env.pid)["l"]
    values = np.arange(WIDE, dtype=np.float32)
    body = body_for(values)
    socks = [socket.create_connection(("127.0.0.1", env.port)) for _ in range(SPOOLED_BODIES + 1)]
    os.kill(decoder, signal.SIGSTOP)
    try:
        for sock in socks[:SPOOLED_BODIES]:
            send_head(sock, len(body))
            sock.sendall(body)
        until(lambda: spooled_sizes(env.pid) == [len(body)] * SPOOLED_BODIES, "every slot's body spooled")
        send_head(socks[-1], len(body))
        rest = threading.Thread(target=socks[-1].sendall, args=(body,))  # blocks once the socket buffers are full
        rest.start()
        check_answer(env, size=10)  # inline, answered after the loop read the 5th request's headers
        assert len(memfds(env.pid)) == SPOOLED_BODIES
        check_answer(env, size=3000)  # a medium body with a Content-Length takes no slot: the other decoder's
    finally:
        os.kill(decoder, signal.SIGCONT)
    rest.join(60)
    for sock in socks:
        with sock:
            status, answer = answer_of(sock)
        assert status == b"HTTP/1.1 200 OK", answer
        np.testing.assert_allclose(answer["outputs"][0]["data"], values + 1, rtol=1e-6)
    until(lambda: memfds(env.pid) == [], "every memory file closed")


def test_a_medium_body_does_not_wait_behind_a_large_one(env: Env) -> None:
    """The large bodies' decoder is held stopped with a body on it; a 20 KB body is answered by the other decoder."""
    check_answer(env)
    check_answer(env, size=3000)
    large = decoders(env.pid)["l"]
    body = body_for(np.zeros(WIDE, dtype=np.float32))
    done: list[tuple[int, dict]] = []
    os.kill(large, signal.SIGSTOP)
    try:
        sender = threading.Thread(target=lambda: done.append(post(env, body)))
        sender.start()
        until(lambda: spooled_sizes(env.pid) == [len(body)], "the large body handed to its decoder")
        check_answer(env, size=3000)
        assert not done
    finally:
        os.kill(large, signal.SIGCONT)
    sender.join(60)
    assert done and done[0][0] == 200, done


def test_the_decoders_yield_the_cpu_and_memory_to_the_server(env: Env) -> None:
    check_answer(env)
    check_answer(env, size=3000)
    found = decoders(env.pid)
    assert sorted(found) == ["l", "s"]
    for decoder in found.values():
        nice = int(Path(f"/proc/{decoder}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == 10
        assert Path(f"/proc/{decoder}/oom_score_adj").read_text().strip() == "1000"
    assert Path(f"/proc/{env.pid}/oom_score_adj").read_text().strip() == "0"


def test_shutdown_ends_a_decoder_that_holds_a_body_and_frees_it() -> None:
    """offload.shutdown() with the decoder stuck (held stopped) in a cancelled request's body: it is killed, so the
    body is freed and nothing waits for it (the interpreter's exit joined the pool: a server that never exited)."""
    asyncio.run(_shutdown_while_decoding())


async def _shutdown_while_decoding() -> None:
    with spooled() as warm:
        await offload.infer_body(warm)  # the decoder process is up
    decoder = decoders(os.getpid())["l"]
    work = offload._process_pool("large")._pending_work_items  # type: ignore[attr-defined]
    os.kill(decoder, signal.SIGSTOP)
    try:
        with spooled() as body:
            waiting = asyncio.create_task(offload.infer_body(body))
            await asyncio.sleep(0)  # submitted
            until(lambda: [item.future.running() for item in work.values()] == [True], "the path handed to the decoder")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert len(memfds(os.getpid())) == 1  # kept for the decoder
        offload.shutdown()
        until(lambda: decoder not in decoders(os.getpid()).values(), "the decoder ended", timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(decoder, signal.SIGCONT)
    until(lambda: memfds(os.getpid()) == [], "the body freed", timeout=10)


def spooled() -> Spool:
    body = Spool()
    body.write(body_for(np.arange(WIDE, dtype=np.float32)))
    return body


def test_a_cancelled_request_keeps_its_body_open_until_the_decoder_is_done() -> None:
    """Shutdown cancels a request waiting for the decoder (in this process, the real decoder process): if its fd
    were closed then, the decoder would open whatever file took the number next, here a pipe of this process."""
    try:
        asyncio.run(_cancel_while_queued())
    finally:
        offload.shutdown()


async def _cancel_while_queued() -> None:
    with spooled() as warm:
        await offload.infer_body(warm)  # the decoder process is up
    decoder = decoders(os.getpid())["l"]
    work = offload._process_pool("large")._pending_work_items  # type: ignore[attr-defined]
    os.kill(decoder, signal.SIGSTOP)
    try:
        with spooled() as body:
            waiting = asyncio.create_task(offload.infer_body(body))
            await asyncio.sleep(0)  # submitted
            until(lambda: [item.future.running() for item in work.values()] == [True], "the path handed to the decoder")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        reader, writer = os.pipe()
        os.write(writer, b"not a body")
        os.close(writer)
    finally:
        os.kill(decoder, signal.SIGCONT)
    with spooled() as after:
        await offload.infer_body(after)  # one decoder, first in first out: it is done with the cancelled body
    try:
        assert os.read(reader, 100) == b"not a body", "the decoder read the pipe that took the body's fd number"
    finally:
        os.close(reader)
    assert memfds(os.getpid()) == []


# `serve` in a process that is not dumpable, as one running a python with file capabilities is (setcap, to bind
# port 80 without root): its /proc/<pid>/fd is closed to its own children unless they hold CAP_SYS_PTRACE (root
# here: dropped)
NOT_DUMPABLE = [
    *(["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace"] if os.geteuid() == 0 else []),
    sys.executable, "-c",
    "import ctypes, runpy, sys; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); sys.argv[0] = 'engine';"
    " runpy.run_module('engine', run_name='__main__')",
    "serve",
]  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop a capability")
def test_a_server_whose_fds_the_decoder_may_not_open_copies_large_bodies_to_it(tmp_path: Path) -> None:
    env = start(tmp_path, program=NOT_DUMPABLE)
    try:
        check_answer(env)
        check_answer(env, chunked=True)
        decoder = decoders(env.pid)["l"]
        check_answer(env)
        assert decoders(env.pid) == {"l": decoder}
        assert memfds(env.pid) == []
    finally:
        stop(env)
    assert env.server.log.count("cannot open this process's files through /proc") == 1, env.server.log[-3000:]


def test_every_worker_of_a_tls_fleet_spools_and_parses_large_bodies(tmp_path: Path) -> None:
    """--grpc_workers 2 (REST shared through reuse_port) over TLS: each worker's own decoder reads its own memfds."""
    ca = certs.CA(tmp_path / "tls")
    pair = ca.issue("server")
    env = start(tmp_path, args=("--grpc_workers", "2", "--tls_cert", str(pair.cert), "--tls_key", str(pair.key)))
    try:
        workers = [int(p) for p in re.findall(r"All 2 workers ready \(pids ([\d, ]+)\)", env.server.log)[-1].split(",")]
        tls = ssl.create_default_context(cafile=str(ca.cert))
        values = np.arange(WIDE, dtype=np.float32) / 7
        url = f"https://127.0.0.1:{env.port}/v2/models/wide/infer"
        for _ in range(40):  # a new connection each: all 40 on one worker is a 2^-39 chance
            request = urllib.request.Request(url, data=body_for(values), method="POST")
            with urllib.request.urlopen(request, timeout=60, context=tls) as response:
                answer = json.loads(response.read())
            np.testing.assert_allclose(answer["outputs"][0]["data"], values + 1, rtol=1e-6)
            if all("l" in decoders(worker) for worker in workers):
                break
        assert all(decoders(worker).keys() == {"l"} for worker in workers)
        assert all(memfds(worker) == [] for worker in workers)
    finally:
        stop(env)


F_SEAL_EXEC = 0x0020


def test_a_spooled_body_can_never_be_executed() -> None:
    """Sealed non-executable where the kernel knows the seal (6.3+), so vm.memfd_noexec=2 lets it be made at all."""
    with Spool() as body:
        release = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
        if release >= (6, 3):
            assert fcntl.fcntl(body.fd, fcntl.F_GET_SEALS) & F_SEAL_EXEC
            assert os.fstat(body.fd).st_mode & 0o111 == 0
        body.write(b"{}")
        assert body.read() == b"{}"


def test_bodies_that_stall_are_refused_and_free_their_slots(tmp_path: Path) -> None:
    """--rest_body_timeout_seconds 1: every slot held by a body that stopped coming, then a 5th large body waiting
    for one; each stalled body gets 408 (a small one too) and the 5th is answered in a freed slot."""
    env = start(tmp_path, args=("--rest_body_timeout_seconds", "1"))
    try:
        values = np.arange(WIDE, dtype=np.float32)
        body = body_for(values)
        stalled = [socket.create_connection(("127.0.0.1", env.port), timeout=30) for _ in range(SPOOLED_BODIES)]
        for sock in stalled:
            send_head(sock, len(body))
            sock.sendall(body[: len(body) // 2])  # and no more
        small = socket.create_connection(("127.0.0.1", env.port), timeout=30)
        send_head(small, 100)
        small.sendall(b'{"inputs": [')
        done: list[tuple[int, dict]] = []
        waiting = threading.Thread(target=lambda: done.append(post(env, body)))
        waiting.start()
        for sock in [*stalled, small]:
            with sock:  # the answer comes at once; aiohttp then reads the rest for 10 s before it closes
                status, answer = response_of(sock)
            assert status == b"HTTP/1.1 408 Request Timeout", answer
            assert "Request body stalled past --rest_body_timeout_seconds" in answer["error"], answer
        waiting.join(60)
        ((status, answer),) = done
        assert status == 200, answer
        np.testing.assert_allclose(answer["outputs"][0]["data"], values + 1, rtol=1e-6)
        until(lambda: memfds(env.pid) == [], "every memory file closed")
    finally:
        stop(env)
    assert env.server.log.count("Rejected rest request for model wide: Request body stalled") >= 1


def test_a_stalled_body_closes_its_connection(tmp_path: Path) -> None:
    """After a 408 the rest of a late body must never be read as the next request (RFC 9110 15.5.9: close), for an
    inline body and a spooled one: the late rest and a request after it on the same connection get no answer."""
    env = start(tmp_path, args=("--rest_body_timeout_seconds", "1"))
    try:
        large = body_for(np.arange(WIDE, dtype=np.float32))
        for size in (100, len(large)):
            with socket.create_connection(("127.0.0.1", env.port), timeout=30) as sock:
                sock.sendall(
                    b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {size}\r\n\r\n".encode()  # keep-alive, HTTP/1.1's default
                )
                sock.sendall(b'{"inputs": [')
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                head = data.partition(b"\r\n\r\n")[0]
                assert head.startswith(b"HTTP/1.1 408 "), head
                assert re.search(rb"(?i)\r\nconnection: close(\r\n|$)", head), head
                sock.sendall(b" " * (size - 12) + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    while chunk := sock.recv(65536):
                        data += chunk
                assert b"HTTP/1.1 200" not in data, data
    finally:
        stop(env)


def test_waiting_for_a_slot_or_the_decoder_is_not_a_stalled_body(tmp_path: Path) -> None:
    """--rest_body_timeout_seconds 1, the decoder held stopped: 4 whole bodies wait for it and a 5th for a slot while
    a stalled body's 408 shows the timeout has passed; the 5 clients sent everything and are all answered."""
    env = start(tmp_path, args=("--rest_body_timeout_seconds", "1"))
    try:
        check_answer(env)
        decoder = decoders(env.pid)["l"]
        values = np.arange(WIDE, dtype=np.float32)
        body = body_for(values)
        socks = [socket.create_connection(("127.0.0.1", env.port), timeout=60) for _ in range(SPOOLED_BODIES + 1)]
        os.kill(decoder, signal.SIGSTOP)
        try:
            for sock in socks[:SPOOLED_BODIES]:
                send_head(sock, len(body))
                sock.sendall(body)
            until(lambda: spooled_sizes(env.pid) == [len(body)] * SPOOLED_BODIES, "every slot's body spooled")
            send_head(socks[-1], len(body))
            rest = threading.Thread(target=socks[-1].sendall, args=(body,))
            rest.start()
            check_answer(env, size=10)  # the 5th request's headers are read: it waits for a slot from here on
            with socket.create_connection(("127.0.0.1", env.port), timeout=30) as stalled:
                send_head(stalled, 100)
                stalled.sendall(b'{"inputs": [')
                assert response_of(stalled)[0] == b"HTTP/1.1 408 Request Timeout"  # a timeout's length went by
        finally:
            os.kill(decoder, signal.SIGCONT)
        rest.join(60)
        for sock in socks:
            with sock:
                status, answer = answer_of(sock)
            assert status == b"HTTP/1.1 200 OK", answer
            np.testing.assert_allclose(answer["outputs"][0]["data"], values + 1, rtol=1e-6)
    finally:
        stop(env)
