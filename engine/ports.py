"""The ports of a multi-worker server: held by the supervisor so only its own workers share them.

Linux lets a socket join a port's SO_REUSEPORT group when every socket on it set SO_REUSEPORT and has the same
effective uid. The supervisor binds each port first (SO_REUSEPORT, no SO_REUSEADDR, never listening, so it gets no
connections): a process without SO_REUSEPORT (a single-worker hotserve, most servers) cannot bind it, and port 0
becomes one concrete port every worker binds. A second multi-worker hotserve of the same uid would pass the kernel's
check, so the supervisor also holds an abstract unix socket named after the port, which only one process can bind.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass

WILDCARDS = ("", "0.0.0.0", "::", "[::]")


class PortBusy(Exception):
    """A port this supervisor cannot hold; the message is the one a single-process start gives."""


@dataclass
class HeldPort:
    """One port held for the supervisor's life: the reservation socket and the lock socket."""

    port: int
    reservation: socket.socket
    lock: socket.socket

    def close(self) -> None:
        self.reservation.close()
        self.lock.close()


def _reserve(host: str, port: int) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT only. A wildcard is bound dual-stack, as grpc core binds it."""
    if host in WILDCARDS and socket.has_ipv6:
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    else:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        candidates = [(family, address[:2]) for family, _, _, _, address in infos]
    error: OSError | None = None
    for family, address in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)  # EAFNOSUPPORT where IPv6 is off in the kernel
        except OSError as exc:
            error = exc
            continue
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise
            error = exc  # e.g. no IPv6 on this host: try the next family
    assert error is not None
    raise error


def _lock(kind: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0hotserve-{kind}-port-{port}")  # abstract: released by the kernel when this process ends
    except OSError:
        sock.close()
        raise
    return sock


def hold(kind: str, host: str, port: int) -> HeldPort:
    """Hold `host:port` for this supervisor's workers (port 0: a free one is chosen). `kind`: "gRPC" or "REST"."""
    where = f"gRPC server on {host}:{port}" if kind == "gRPC" else f"REST server on port {port}"  # Server.start's
    try:
        reservation = _reserve(host, port)
    except OSError as exc:
        detail = "port is busy or the address is invalid" if kind == "gRPC" else "port is busy"
        raise PortBusy(f"Cannot start {where}: {detail} ({exc.strerror})") from None
    bound = int(reservation.getsockname()[1])
    try:
        lock = _lock(kind.lower(), bound)
    except OSError:
        reservation.close()
        raise PortBusy(f"Cannot start {where}: port is busy (another multi-worker hotserve holds it)") from None
    return HeldPort(bound, reservation, lock)


def release(held: list[HeldPort]) -> None:
    for port in held:
        with contextlib.suppress(OSError):
            port.close()
