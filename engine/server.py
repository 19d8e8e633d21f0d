"""Wires it together: start-up, the gRPC server, watching, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable
from pathlib import Path

import grpc
from aiohttp import web

from . import cache as cache_rules
from .frontend import kserve, offload, rest, stream, tfs
from .frontend.dataplane import DataPlane
from .frontend.health import Health, enable_reflection
from .frontend.receive import Deadlines
from .frontend.registration import GenericOnly
from .metrics import Metrics
from .reconciler import Reconciler
from .registry import Registry
from .runtime import Runtime
from .settings import Settings, config_source, startup_checked
from .status import ReloadResult
from .supervise import Supervisor
from .tls import Certificates, TlsError
from .watcher import Watcher
from .worker_link import WorkerLink

log = logging.getLogger("hotserve.server")

MAX_MESSAGE = 1 << 30  # 1 GiB, as OVMS
SHUTDOWN_GRACE_SECONDS = 30.0


class Server:
    def __init__(self, settings: Settings, link: WorkerLink | None = None) -> None:
        self.settings = settings
        self.link = link  # one worker of `--grpc_workers N`: reloads go to the whole fleet, metrics are shared
        self.certificates = Certificates(settings.tls) if settings.tls is not None else None  # TlsError: no start
        self.source = config_source(settings)
        cache = cache_rules.ModelCache.open(settings.cache_dir, settings.cache_size_limit)
        self.registry = Registry()
        runtime = Runtime(cache, replica=link is not None)
        self.reconciler = Reconciler(self.source, self.registry, runtime)
        self.metrics = Metrics(self.registry, self.reconciler, cache, multiprocess=link is not None)
        runtime.batch_observer = self.metrics
        self.plane = DataPlane(
            self.registry,
            self._reload,
            lambda: self.reconciler.last_result,
            self.reconciler.reshape,
            self.metrics.observe,
        )
        self.watcher = Watcher(
            settings.config_path,
            self._base_paths,
            self.reconciler.trigger,
            settings.file_system_poll_wait_seconds,
            force_polling=settings.watch_mode == "poll",
        )
        self.health = Health(self.plane)
        self.streams = stream.Streams()  # ModelStreamInfer's open streams, ended after their in-flight messages
        self.supervisor = Supervisor()  # the watcher and the health sync: restarted if they crash
        self.grpc: grpc.aio.Server | None = None
        self.rest: web.AppRunner | None = None
        self.port = 0
        self._stop = asyncio.Event()
        self._drain_cut = asyncio.Event()  # a second SIGTERM/SIGINT ends the drain window early
        self._ready_at_signal = False

    async def _reload(self) -> ReloadResult:
        if self.link is not None:
            return await self.link.fleet_reload()  # answered once every worker has reloaded
        return await self._reload_here()

    async def _reload_here(self) -> ReloadResult:
        return await self.reconciler.trigger(force=True)

    def _base_paths(self) -> set[Path]:
        return {m.base_path for m in self.reconciler.config.models} if self.reconciler.config else set()

    async def start(self) -> None:
        max_request = self.settings.max_request_mb << 20
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", max_request),  # RESOURCE_EXHAUSTED before any decoding
                # a busy port must fail, not be shared silently; workers share theirs (engine/ports.py guards it)
                ("grpc.so_reuseport", int(self.link is not None)),
            ]
        )
        self._register_services(self.grpc)
        await self.health.start()  # "" NOT_SERVING before the first RPC can ask
        if self.link is None:
            await self._listen(max_request)
        result = await self.reconciler.trigger()
        # a worker joins the shared ports once it can serve (the kernel routes to it at once), unless already stopping
        if self.link is not None and not self._stop.is_set():
            await self._listen(max_request)
        self.plane.ready = True
        log.info(
            "Server ready: %d model(s); initial load %s",
            len(self.registry.models),
            "OK" if result.ok else f"with {len(result.errors)} error(s)",
        )
        await self.health.sync()
        self.supervisor.keep("health sync", self.health.run)
        if self.link is not None:
            self.supervisor.keep("metrics sync", self.metrics.run)
            self.link.ready()
        self.watcher.start(self.supervisor)

    def _register_services(self, server: grpc.aio.Server) -> None:
        # KServe first: generic handlers are tried in the order they came
        registrar = GenericOnly(server, Deadlines(self.settings.grpc_receive_timeout_seconds))
        services = [kserve.register(registrar, self.plane, self.streams), *tfs.register(registrar, self.plane)]
        services.append(self.health.register(registrar))
        enable_reflection(registrar, services)

    async def _listen(self, max_request: int) -> None:
        assert self.grpc is not None
        address = f"{self.settings.grpc_bind_address}:{self.settings.port}"
        try:
            if self.certificates is not None:
                self.port = self.grpc.add_secure_port(address, self.certificates.grpc_credentials())
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise SystemExit(
                f"Cannot start gRPC server on {address}: port is busy or the address is invalid ({exc})"
            ) from None
        await self.grpc.start()
        log.info("Started gRPC server on port %d%s", self.port, " (TLS)" if self.certificates else "")
        if self.settings.rest_port:
            try:
                self.rest = await rest.start(
                    self.plane,
                    self.settings.rest_bind_address,
                    self.settings.rest_port,
                    self.metrics.render,
                    max_request,
                    self.certificates.ssl_context() if self.certificates is not None else None,
                    SHUTDOWN_GRACE_SECONDS,
                    reuse_port=self.link is not None,
                    body_timeout=self.settings.rest_body_timeout_seconds,
                )
            except OSError as exc:
                raise SystemExit(
                    f"Cannot start REST server on port {self.settings.rest_port}: {exc.strerror}"
                ) from None
            log.info("Started REST server on port %d", rest.bound_port(self.rest))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # a worker ignores SIGINT: Ctrl-C reaches the whole process group and the supervisor sends SIGTERM
        for sig in (signal.SIGTERM,) if self.link is not None else (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_term, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        if self.link is not None:
            self.link.start(self._reload_here, lambda: self._on_term(signal.SIGTERM))
        try:
            await self.start()
            await self._stop.wait()
            await self.drain()
            await self.stop()
        finally:
            if self.link is not None:
                self.link.close()
        return 0

    def _on_term(self, sig: signal.Signals) -> None:
        """First signal: health NOT_SERVING now, drain, stop. Second: end the drain window at once."""
        if self._stop.is_set():
            if not self._drain_cut.is_set():
                log.info("%s again: ending the drain window now", sig.name)
                self._drain_cut.set()
            return
        self._ready_at_signal = self.plane.ready
        if not self.plane.ready:
            self.reconciler.begin_shutdown()  # still loading: no further compile starts, the start-up ends now
        self.plane.draining = True  # REST /v2/health/ready answers 503 from here on
        self.health.drain()  # gRPC health "" and every model NOT_SERVING from the next loop step on
        log.info("%s: health is NOT_SERVING; draining", sig.name)
        self._stop.set()

    async def drain(self) -> None:
        """Keep serving for --drain_seconds after health went NOT_SERVING, so balancers stop routing here first."""
        seconds = self.settings.drain_seconds
        if seconds <= 0 or self._drain_cut.is_set():
            return
        if not self._ready_at_signal:
            log.info("Not ready when signalled (nothing routes here yet): no drain window")
            return
        log.info("Draining: still serving for %.1f s while load balancers stop routing here", seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_cut.wait(), seconds)
        log.info("Drain window over")

    def _on_hup(self) -> None:
        log.info("SIGHUP: reloading configuration")
        self.reconciler.trigger(force=True)

    async def stop(self) -> None:
        """No new reconcile or compile → loops stopped → both front ends stop accepting together and finish their
        in-flight requests (one grace) → the running reconcile finishes → every version drained and freed →
        loaders deinitialised. Each step runs whatever the one before it did."""
        log.info("Shutting down: no new RPCs; waiting for in-flight ones (up to %.0f s)", SHUTDOWN_GRACE_SECONDS)
        self.reconciler.begin_shutdown()
        await self._step("stopping the watcher and health sync", self.supervisor.stop())
        await self._step("stopping health", self.health.stop())
        fronts = []
        if self.rest is not None:
            fronts.append(self._step("stopping the REST server", self.rest.cleanup()))
        if self.grpc is not None:
            if self.streams.open:
                log.info("Ending %d open stream(s) after their in-flight messages", self.streams.open)
            self.streams.close()  # each stream answers what it read, then ends: the grace below waits for it
            fronts.append(self._step("stopping the gRPC server", self.grpc.stop(SHUTDOWN_GRACE_SECONDS)))
        await asyncio.gather(*fronts)
        offload.shutdown()  # the request decoders: no request is left to decode
        await self._step("finishing the running reconcile", self.reconciler.quiesce())
        await self._step("freeing the models and loaders", self.reconciler.close())
        log.info("Shutdown complete")

    @staticmethod
    async def _step(what: str, step: Awaitable[object]) -> None:
        try:
            await step
        except Exception:  # shutdown goes on: later steps still free what they own
            log.exception("Shutdown: %s failed", what)


def serve(settings: Settings, link: WorkerLink | None = None) -> int:
    """Serve in this process: the single-process server, or one worker of `--grpc_workers N` (with its link)."""
    if not startup_checked(settings):
        return 1
    try:
        return asyncio.run(Server(settings, link).run())
    except TlsError as exc:
        log.error("Cannot start with TLS: %s", exc)
        return 1
