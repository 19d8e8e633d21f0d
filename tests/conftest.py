"""Test harness: a real server subprocess on 127.0.0.1 with an ephemeral port, and its log.

Nothing here imports the server's generated protos: tritonclient's `inference` package would clash with them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ROOT, ServerProcess

__all__ = ["ROOT", "ServerProcess", "model_entry"]

pytest_plugins = ["loader_fixtures"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(config_dict_or_path, *extra_args) → a ready ServerProcess; all are stopped at teardown."""
    started: list[ServerProcess] = []
    logs = tmp_path.parent / f"{tmp_path.name}-logs"  # outside the watched config folder

    def start(config: dict | Path | None, *args: str, ready: bool = True, env: dict[str, str] | None = None):
        argv = list(args)
        if isinstance(config, dict):
            path = tmp_path / "models.json"
            path.write_text(json.dumps(config, indent=2))
            argv = ["--config_path", str(path), *argv]
        elif config is not None:
            argv = ["--config_path", str(config), *argv]
        if "--port" not in argv:
            argv += ["--port", "0"]
        logs.mkdir(exist_ok=True)
        server = ServerProcess(argv, logs / f"server{len(started)}.log", env)
        started.append(server)
        return server.wait_ready() if ready else server

    yield start
    for server in started:
        server.stop()


def model_entry(name: str, base_path: Path | str, **config: object) -> dict:
    return {"config": {"name": name, "base_path": str(base_path), **config}}


def triton(address: str):  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(address)
