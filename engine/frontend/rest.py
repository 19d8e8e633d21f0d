"""REST on `--rest_port` (aiohttp, same event loop): OVMS's /v1/config endpoints, KServe v2 REST, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import __version__
from ..errors import Code, ServingError
from ..status import ReloadResult
from ..tensors import TensorSpec
from . import offload
from .client_log import client_errors
from .dataplane import DataPlane, Tensor, parse_version
from .rest_body import parse_infer
from .rest_spool import spool

SERVER_NAME = "hotserve"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format
DEFAULT_MAX_REQUEST = 256 << 20
SPOOLED_BODIES = 4  # bodies of 1 MiB+ or chunked spooled or parsed at once, per process: 4 x --max_request_mb


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Callable[..., Any]:
    """ServingError → its HTTP status and {"error": message}, logged in one line (rate-limited); a bad body → 400."""

    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServingError as exc:
            client_errors.report("rest", request.match_info.get("name", ""), exc)
            response = _error(exc.code.http_status, str(exc))
            if exc.code is Code.BODY_TIMEOUT:  # the body's late rest must never be read as the next request
                response.force_close()
            return response
        except ConnectionResetError:  # the client left before sending its whole body: nobody to answer
            error = ServingError(Code.INVALID_ARGUMENT, "the client closed the connection in the middle of its body")
            client_errors.report("rest", request.match_info.get("name", ""), error)
            return _error(400, str(error))
        except web.HTTPRequestEntityTooLarge as exc:
            error = ServingError(Code.REQUEST_TOO_LARGE, f"limit {exc.max_size} bytes")  # aiohttp's own check
            client_errors.report("rest", request.match_info.get("name", ""), error)
            return _error(413, str(error))

    return wrapper


def config_status(plane: DataPlane) -> dict[str, Any]:
    """GET /v1/config in OVMS's format (models by name, versions ascending, version as a string)."""
    body: dict[str, Any] = {}
    for view in plane.models():
        body[view.name] = {
            "model_version_status": [
                {
                    "version": str(s.version),
                    "state": s.state.name,
                    "status": {"error_code": s.error_code.name, "error_message": s.error_message},
                    "labels": list(view.labels(s.version)),  # the labels this version serves now
                    "pending_labels": list(view.pending_labels(s.version)),  # labels waiting for it to be AVAILABLE
                }
                for s in view.versions
            ]
        }
        listed = {s.version for s in view.versions}
        named = {**view.routes.labels, **view.routes.pending}  # each label's configured version
        waiting = {label: v for label, v in named.items() if v not in listed}
        if waiting:  # labels on a version hotserve has no entry for (not on disk yet): shown, not lost
            body[view.name]["labels_waiting"] = {label: str(v) for label, v in sorted(waiting.items())}
    return body


def _reload_view(result: ReloadResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "ok": result.ok,
        "changed": result.changed,
        "config_valid": result.config_valid,
        "errors": list(result.errors),
    }


def _metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _encode(tensor: Tensor) -> dict[str, Any]:
    data = tensor.data.reshape(-1)
    values = (
        [x.decode(errors="replace") if isinstance(x, bytes) else x for x in data]
        if data.dtype == object
        else data.tolist()
    )
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape), "data": values}


def app(
    plane: DataPlane,
    metrics: Callable[[], bytes] | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST,
    body_timeout: float = 30.0,
) -> web.Application:
    routes = web.RouteTableDef()
    spooling = asyncio.Semaphore(SPOOLED_BODIES)

    @routes.get("/v1/config")
    @_guarded
    async def get_config(request: web.Request) -> web.Response:
        body = config_status(plane)
        body["_last_reload"] = _reload_view(plane.last_reload())
        return web.json_response(body)

    @routes.post("/v1/config/reload")
    @_guarded
    async def reload(request: web.Request) -> web.Response:
        result = await plane.reload()
        if not result.config_valid:
            return _error(
                412, "Reloading config file failed. Check server logs for more info. " + "; ".join(result.errors)
            )
        body = config_status(plane)
        body["_last_reload"] = _reload_view(result)
        return web.json_response(body, status=201 if result.changed else 200)

    @routes.get("/v2")
    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response({"name": SERVER_NAME, "version": __version__, "extensions": []})

    @routes.get("/v2/health/live")
    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    @routes.get("/v2/health/ready")
    async def ready(request: web.Request) -> web.Response:
        is_ready = plane.ready and not plane.draining
        return web.json_response({"ready": is_ready}, status=200 if is_ready else 503)

    @routes.get("/v2/models/{name}")
    @routes.get("/v2/models/{name}/versions/{version}")
    @_guarded
    async def metadata(request: web.Request) -> web.Response:
        meta = plane.metadata(request.match_info["name"], parse_version(request.match_info.get("version", "")))
        return web.json_response({
            "name": meta.name, "versions": [str(v) for v in meta.versions], "platform": "OpenVINO",
            "inputs": [_metadata(s) for s in meta.inputs], "outputs": [_metadata(s) for s in meta.outputs],
        })  # fmt: skip

    @routes.get("/v2/models/{name}/ready")
    @routes.get("/v2/models/{name}/versions/{version}/ready")
    @_guarded
    async def model_ready(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        is_ready = plane.model_ready(name, parse_version(request.match_info.get("version", "")))
        return web.json_response({"name": name, "ready": is_ready}, status=200 if is_ready else 400)

    @routes.post("/v2/models/{name}/infer")
    @routes.post("/v2/models/{name}/versions/{version}/infer")
    @_guarded
    async def infer(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > max_request_bytes:
            raise ServingError(
                Code.REQUEST_TOO_LARGE, f"{request.content_length} bytes; limit {max_request_bytes} bytes"
            )
        # aiohttp inflates gzip/deflate/br bodies: their Content-Length says nothing of what they expand to
        length = request.content_length if request.headers.get("Content-Encoding", "identity") == "identity" else None
        if length is not None and length < offload.JSON_INLINE_BYTES:
            try:
                body = parse_infer(await asyncio.wait_for(request.read(), body_timeout))
            except TimeoutError:
                raise ServingError(Code.BODY_TIMEOUT, f"{length} bytes not sent in time") from None
        else:  # large or chunked: spooled as it arrives, parsed off the loop
            large = length is None or length >= offload.INLINE_BYTES
            async with spooling if large else contextlib.nullcontext():  # the rest wait, their bodies unread
                with await spool(request.content, max_request_bytes, body_timeout) as spooled:
                    body = await offload.infer_body(spooled)
        name = request.match_info["name"]
        version, outputs = await plane.infer(
            name,
            parse_version(request.match_info.get("version", "")),
            body.inputs,
            body.outputs,
            api="rest",
            route_key=body.route_key,
        )
        response = {"model_name": name, "model_version": str(version), "outputs": [_encode(t) for t in outputs]}
        if body.has_id:
            response["id"] = body.id
        return web.json_response(response)

    if metrics is not None:

        @routes.get("/metrics")
        async def scrape(request: web.Request) -> web.Response:
            return web.Response(body=metrics(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    application = web.Application(client_max_size=max_request_bytes)
    application.add_routes(routes)
    return application


async def start(
    plane: DataPlane,
    host: str,
    port: int,
    metrics: Callable[[], bytes] | None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST,
    ssl_context: ssl.SSLContext | None = None,
    grace: float = 30.0,
    reuse_port: bool = False,
    body_timeout: float = 30.0,
) -> web.AppRunner:
    # aiohttp waits shutdown_timeout for a handler, cancels its body and waits as long again: two halves of one grace
    application = app(plane, metrics, max_request_bytes, body_timeout)
    runner = web.AppRunner(application, access_log=None, shutdown_timeout=grace / 2)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, ssl_context=ssl_context)  # True: workers share it
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])
