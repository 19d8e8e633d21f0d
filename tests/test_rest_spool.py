"""Large REST bodies (issue 10): spooled as they arrive into a memory file that the decoder process reads.

Checked on a real server: large and chunked bodies are answered right, the limit holds for chunked bodies, no
memory file outlives its request (refused, abandoned mid-body, or decoder killed mid-parse), and the decoder runs
niced and first in line for the OOM killer.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import certs
import numpy as np
import pytest
from rest_env import (
    LIMIT_MB,
    WIDE,
    Env,
    answered_meanwhile,
    body_for,
    check_answer,
    decoders,
    memfds,
    post,
    slots_filled,
    spooled_sizes,
    start,
    stop,
    until,
)

from engine.frontend.rest import SPOOLED_BODIES


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    started = start(tmp_path_factory.mktemp("spool"))
    yield started
    stop(started)


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


def test_a_decoder_killed_mid_request_fails_that_request_alone(env: Env) -> None:
    """The large lane's decoder killed in a body (held stopped) while a second whole body waits for it: the first
    request gets a clear 500, the second is answered by a fresh decoder, and so is the next."""
    check_answer(env)  # the large bodies' decoder process is up
    decoder = decoders(env.pid)["l"]
    body = body_for(np.zeros(WIDE, dtype=np.float32))
    waiting = np.arange(WIDE, dtype=np.float32)
    done: list[tuple[int, dict]] = []
    os.kill(decoder, signal.SIGSTOP)  # it cannot finish this body before it is killed
    try:
        with socket.create_connection(("127.0.0.1", env.port)) as sock:
            sock.sendall(
                b"POST /v2/models/wide/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            until(lambda: spooled_sizes(env.pid) == [len(body)], "the whole body spooled")
            sender = threading.Thread(target=lambda: done.append(post(env, body_for(waiting))))
            sender.start()
            until(lambda: len(spooled_sizes(env.pid)) == 2, "the second body spooled, waiting for the decoder")
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
    sender.join(60)
    ((status, answer),) = done
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], waiting + 1, rtol=1e-6)
    assert memfds(env.pid) == []
    check_answer(env)  # by a fresh decoder
    assert decoders(env.pid)["l"] != decoder


def test_a_medium_body_is_parsed_off_the_loop(env: Env) -> None:
    """A 20 KB body waits for the decoder process (held stopped) while a small one is answered on the loop."""
    check_answer(env, size=3000)
    medium = np.arange(3000, dtype=np.float32)  # ~20 KB of JSON: past the 16 KiB inline bound, far below 1 MiB
    body = body_for(medium)
    ((status, answer),) = answered_meanwhile(env, "s", lambda: post(env, body), len(body), size=10)  # inline
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], medium + 1)


def test_at_most_a_few_large_bodies_are_held_at_once_and_the_rest_wait_unread(env: Env) -> None:
    """With the decoder held stopped, 4 bodies fill every slot; a 5th, whose headers the server read before a small
    request it answers, is not read (no memory file) until a slot frees; then all 5 are answered."""
    with slots_filled(env, np.arange(WIDE, dtype=np.float32)):
        check_answer(env, size=10)  # inline, answered after the loop read the 5th request's headers
        assert len(memfds(env.pid)) == SPOOLED_BODIES
        check_answer(env, size=3000)  # a medium body with a Content-Length takes no slot: the other decoder's
    until(lambda: memfds(env.pid) == [], "every memory file closed")


def test_a_medium_body_does_not_wait_behind_a_large_one(env: Env) -> None:
    """The large bodies' decoder is held stopped with a body on it; a 20 KB body is answered by the other decoder."""
    check_answer(env)
    check_answer(env, size=3000)
    body = body_for(np.zeros(WIDE, dtype=np.float32))
    done = answered_meanwhile(env, "l", lambda: post(env, body), len(body), size=3000)
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


def test_a_compressed_body_is_judged_by_what_it_expands_to(env: Env) -> None:
    """aiohttp inflates gzip bodies: a few KB on the wire that expand to MBs of JSON must be spooled and parsed by
    the large bodies' decoder (held stopped here), not parsed on the loop by their Content-Length."""
    check_answer(env)
    values = np.zeros(WIDE, dtype=np.float32)
    raw = body_for(values)
    packed = gzip.compress(raw)
    assert len(packed) < 16 << 10 <= (1 << 20) <= len(raw)
    url = f"http://127.0.0.1:{env.port}/v2/models/wide/infer"
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}

    def send() -> int:
        request = urllib.request.Request(url, data=packed, method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            np.testing.assert_allclose(json.loads(response.read())["outputs"][0]["data"], values + 1)
            return int(response.status)

    assert answered_meanwhile(env, "l", send, len(raw), size=10) == [200]  # spooled at its inflated size
