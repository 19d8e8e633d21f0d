"""--rest_body_timeout_seconds on a real server: a stalled body gets 408, frees its place and its connection;
waiting for a place or for the decoder is not stalling."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
from rest_env import (
    WIDE,
    body_for,
    check_answer,
    memfds,
    post,
    response_of,
    send_head,
    slots_filled,
    start,
    stop,
    until,
)

from engine.frontend.rest import SPOOLED_BODIES


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
        with slots_filled(env, np.arange(WIDE, dtype=np.float32)):
            check_answer(env, size=10)  # the 5th request's headers are read: it waits for a slot from here on
            with socket.create_connection(("127.0.0.1", env.port), timeout=30) as stalled:
                send_head(stalled, 100)
                stalled.sendall(b'{"inputs": [')
                assert response_of(stalled)[0] == b"HTTP/1.1 408 Request Timeout"  # a timeout's length went by
    finally:
        stop(env)


def test_a_body_under_the_minimum_rate_is_refused_and_a_slow_steady_one_is_not(tmp_path: Path) -> None:
    """--rest_body_timeout_seconds 1: a client trickling 100 bytes every 50 ms (never a second without a byte) gets
    408 once its first second is over; a body sent over 2 s at ~1 MB/s, past the timeout in all, is answered."""
    env = start(tmp_path, args=("--rest_body_timeout_seconds", "1"))
    try:
        values = np.arange(WIDE, dtype=np.float32)
        body = body_for(values)
        answered = threading.Event()
        with socket.create_connection(("127.0.0.1", env.port), timeout=30) as trickler:

            def trickle() -> None:
                with contextlib.suppress(OSError):  # the server closes the connection after its 408
                    for offset in range(0, min(len(body), 400 * 100), 100):  # 20 s of it at most
                        if answered.wait(0.05):
                            return
                        trickler.sendall(body[offset : offset + 100])

            send_head(trickler, len(body))
            sender = threading.Thread(target=trickle)
            sender.start()
            status, answer = response_of(trickler)
            answered.set()
            sender.join(30)
        assert status == b"HTTP/1.1 408 Request Timeout", answer
        assert "under the 64 KiB/s a body must keep after its first 1 s" in answer["error"], answer
        steady = (body[i : i + len(body) // 32 + 1] for i in range(0, len(body), len(body) // 32 + 1))
        status, answer = post(env, (time.sleep(0.0625) or piece for piece in steady), chunked=True)
        assert status == 200, answer
        np.testing.assert_allclose(answer["outputs"][0]["data"], values + 1, rtol=1e-6)
    finally:
        stop(env)
