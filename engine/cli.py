"""`hotserve serve|validate|status|keygen|encrypt`: argument parsing only. Usage errors exit 64, with one line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .usage import EX_USAGE, Parser, UsageError

COMMANDS = ("serve", "validate", "status", "keygen", "encrypt")
MODEL_PARAMS = ("batch_size", "shape", "layout", "nireq", "model_version_policy", "target_device", "plugin_config")


def safe_line(value: object) -> str:
    from .safe_text import safe

    return safe(value, None)


def _serve_parser() -> Parser:
    p = Parser(prog="hotserve serve", description="Serve OpenVINO models over gRPC (OVMS flag names).")
    p.add_argument("--config_path", type=Path, help="models.json (a folder means its models.json or config.json)")
    p.add_argument("--model_name", help="single-model mode: the served name")
    p.add_argument("--model_path", type=Path, help="single-model mode: the base_path with version folders")
    p.add_argument("--port", type=int, default=9000, help="gRPC port (default 9000; 0 picks a free one)")
    p.add_argument("--grpc_bind_address", default="0.0.0.0")
    p.add_argument("--rest_port", type=int, default=0, help="REST port (0 = off)")
    p.add_argument("--rest_bind_address", default="0.0.0.0")
    p.add_argument("--grpc_workers", type=int, default=1, help="worker processes sharing the ports (1..CPU count)")
    p.add_argument("--log_level", default="INFO", choices=["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--cache_dir", type=Path, help="compiled-model cache (default /opt/cache when it exists)")
    p.add_argument("--cache_size_limit", help="evict least-recently-used cache entries above this size (e.g. 10G)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0, help="rescan interval; 0 = no watching")
    p.add_argument("--watch_mode", choices=["auto", "poll"], default="auto", help="poll: for NFS/fuse without inotify")
    p.add_argument("--max_request_mb", type=int, default=256, help="largest request body, in MiB (default 256)")
    p.add_argument("--rest_body_timeout_seconds", type=float, default=30.0,
                   help="REST: refuse a body (408) that sends no bytes for this long, or under 64 KiB/s after it "
                        "(default 30)")  # fmt: skip
    p.add_argument("--grpc_receive_timeout_seconds", type=float, default=120.0,
                   help="gRPC: end a unary call (DEADLINE_EXCEEDED) whose request message is not all there this long "
                        "after its headers (default 120)")  # fmt: skip
    p.add_argument("--tls_cert", type=Path, help="PEM certificate (chain): TLS on both ports; needs --tls_key")
    p.add_argument("--tls_key", type=Path, help="PEM private key of --tls_cert (unencrypted)")
    p.add_argument("--tls_client_ca", type=Path, help="PEM CA: clients must present a certificate it signed (mTLS)")
    p.add_argument("--drain_seconds", type=float, default=5.0, help="SIGTERM: serve on this long, not ready (0 = no)")
    for name in MODEL_PARAMS:
        p.add_argument(f"--{name}", help="single-model mode only")
    return p


def _settings(argv: Sequence[str]):  # type: ignore[no-untyped-def]
    from . import config
    from .settings import Settings

    args = _serve_parser().parse_args(argv)
    given = {n: getattr(args, n) for n in MODEL_PARAMS if getattr(args, n) is not None}
    if args.config_path is not None and (args.model_path is not None or args.model_name is not None):
        raise UsageError("Use either config_path or model_path with model_name")
    if args.config_path is not None and given:
        raise UsageError("Model parameters in CLI are exclusive with the config file")
    if args.config_path is None and (args.model_path is None or args.model_name is None):
        raise UsageError("Use config_path or model_path with model_name")
    for flag in ("port", "rest_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            raise UsageError(f"--{flag} must be between 0 and 65535")
    if args.port and args.port == args.rest_port:
        raise UsageError("--port and --rest_port must differ")
    cores = os.cpu_count() or 1
    if not 1 <= args.grpc_workers <= cores:  # OVMS's rule: more workers than cores only share the same cores
        raise UsageError(f"--grpc_workers count should be from 1 to CPU core count : {cores}")
    if not 0 <= args.drain_seconds < float("inf"):
        raise UsageError("--drain_seconds must be >= 0 (0 skips the drain window)")
    if args.file_system_poll_wait_seconds < 0:
        raise UsageError("--file_system_poll_wait_seconds must be >= 0 (0 disables watching)")
    if not 1 <= args.max_request_mb <= 2047:
        raise UsageError("--max_request_mb must be between 1 and 2047")
    if not 0 < args.rest_body_timeout_seconds <= 3600:
        raise UsageError("--rest_body_timeout_seconds must be more than 0 and at most 3600")
    if not 0 < args.grpc_receive_timeout_seconds <= 3600:
        raise UsageError("--grpc_receive_timeout_seconds must be more than 0 and at most 3600")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls_cert and --tls_key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise UsageError("--tls_client_ca needs --tls_cert and --tls_key (mTLS is TLS with client certificates)")
    tls = None
    if args.tls_cert is not None:
        from .tls import TlsFiles

        tls = TlsFiles(args.tls_cert.absolute(), args.tls_key.absolute(),
                       args.tls_client_ca.absolute() if args.tls_client_ca else None)  # fmt: skip
    limit = None
    if args.cache_size_limit is not None:
        from . import cache  # imports OpenVINO: only when needed, so a worker supervisor stays small

        try:
            limit = cache.parse_size(args.cache_size_limit)
        except ValueError as exc:
            raise UsageError(f"--cache_size_limit: {exc}") from None
    config_path = args.config_path
    if config_path is not None and config_path.is_dir():
        candidates = [config_path / "models.json", config_path / "config.json"]
        config_path = next((c for c in candidates if c.exists()), candidates[0])
    overrides: dict[str, object] = {}
    try:
        if "shape" in given:
            overrides["shape"] = config.parse_shape(given["shape"])
        if "layout" in given:
            overrides["layout"] = config.parse_layout(given["layout"])
        if "batch_size" in given:
            overrides["batch_size"] = config.parse_batch_size(given["batch_size"])
        if "nireq" in given:
            overrides["nireq"] = int(given["nireq"])
        if "target_device" in given:
            overrides["target_device"] = given["target_device"]
        for key in ("plugin_config", "model_version_policy"):
            if key in given:
                overrides[key] = json.loads(given[key])
    except (ValueError, json.JSONDecodeError) as exc:
        raise UsageError(f"{exc}") from None
    if config_path is None:
        try:  # bad single-model flags are usage errors, caught before anything starts
            config.single_model(args.model_name, args.model_path, **overrides)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return Settings(
        config_path=config_path.absolute() if config_path is not None else None,
        model_name=args.model_name,
        model_path=args.model_path.absolute() if args.model_path is not None else None,
        model_overrides=overrides,
        port=args.port,
        grpc_bind_address=args.grpc_bind_address,
        rest_port=args.rest_port,
        rest_bind_address=args.rest_bind_address,
        cache_dir=args.cache_dir,
        cache_size_limit=limit,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        watch_mode=args.watch_mode,
        grpc_workers=args.grpc_workers,
        log_level=args.log_level,
        drain_seconds=args.drain_seconds,
        max_request_mb=args.max_request_mb,
        rest_body_timeout_seconds=args.rest_body_timeout_seconds,
        grpc_receive_timeout_seconds=args.grpc_receive_timeout_seconds,
        tls=tls,
    )


def _validate(argv: Sequence[str]) -> int:
    from . import config
    from .safe_text import safe

    p = Parser(prog="hotserve validate", description="Check a models.json without serving it.")
    p.add_argument("path", type=Path)
    args = p.parse_args(argv)
    errors = config.validate_file(args.path)
    if errors:
        for error in errors:
            print(error)
        print(f"{safe(args.path, None)}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    print(safe(config.summary(config.load(args.path)), None))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "serve"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
    try:
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}; expected one of: {', '.join(COMMANDS)}")
        if command == "serve":
            settings = _settings(argv)
            if settings.grpc_workers > 1:
                from .workers import run  # the supervisor: nothing of gRPC or OpenVINO in this process

                return run(settings)
            from .server import serve

            return serve(settings)
        if command == "validate":
            return _validate(argv)
        if command == "status":
            from .status_cli import main as status_main

            return status_main(argv)
        from .encrypt import main as encrypt_main

        return encrypt_main([command, *argv])
    except UsageError as exc:
        print(f"hotserve {command}: {safe_line(exc)}", file=sys.stderr)
        return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
