"""Bounded state (issue 9/10): the last few END versions are kept, metrics drop forgotten series, arrows hold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from lifecycle_env import Env, aio
from loader_fixtures import BUILD

from engine.lifecycle import KEEP_ENDED
from engine.status import State


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_metrics_drop_the_series_of_forgotten_versions() -> None:
    from engine.metrics import Metrics
    from engine.registry import Registry
    from engine.status import VersionStatus

    registry = Registry()
    for version in (1, 2):
        registry.set_status("m", VersionStatus(version, State.AVAILABLE))

    @dataclass(frozen=True)
    class Counts:
        runs: int = 1
        failed_runs: int = 0

    metrics = Metrics(registry, Counts(), None)
    metrics.observe("m", 1, "kserve", True, 0.001)
    metrics.observe("m", 2, "kserve", True, 0.001)
    assert b'version="1"' in metrics.render()
    registry.forget("m", 1)
    text = metrics.render()
    assert b'hotserve_requests_total{api="kserve",model="m",version="2",version_label=""}' in text
    assert b'hotserve_requests_total{api="kserve",model="m",version="1",version_label=""}' not in text


@aio
async def test_only_the_last_ended_versions_are_kept(env: Env) -> None:
    env.model("m")
    for version in range(1, KEEP_ENDED + 4):
        env.version("m", version)
        assert (await env.reload()).ok
    await env.reconciler.settle()
    slots = env.registry.models["m"].slots
    assert len(slots) == KEEP_ENDED + 1 and max(slots) == KEEP_ENDED + 3
    assert sum(s.status.state == State.END for s in slots.values()) == KEEP_ENDED
    await env.close()


def test_the_design_arrows_hold() -> None:
    """registry ↛ runtime, tensors ↛ openvino, cli ↮ status_cli, metrics ↛ reconciler (imports, read from source)."""
    root = BUILD.parent / "engine"

    def imports(module: str) -> str:
        return "\n".join(line for line in (root / module).read_text().splitlines() if "import" in line)

    assert "runtime" not in imports("registry.py")
    assert "openvino" not in imports("tensors.py")
    assert ".cli" not in imports("status_cli.py") and "status_cli" not in imports("usage.py")
    assert "reconciler" not in imports("metrics.py")
    assert "runtime" not in imports("frontend/dataplane.py")
