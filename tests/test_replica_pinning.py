"""`--grpc_workers N`: a worker compiles for CPU without thread pinning (engine/runtime.py). OpenVINO pins the thread
that runs an inference — for an inline model, the worker's event loop — to the same core in every worker, so N
workers shared one core. One process keeps OpenVINO's default; an explicit plugin_config wins either way."""

from __future__ import annotations

from pathlib import Path

import modelgen
import pytest

from engine.config import ModelConfig
from engine.runtime import Runtime, Source


@pytest.mark.parametrize(
    ("replica", "plugin_config", "pinned"),
    [(True, {}, False), (True, {"ENABLE_CPU_PINNING": True}, True), (False, {"ENABLE_CPU_PINNING": False}, False)],
)
def test_a_worker_compiles_without_cpu_pinning(
    tmp_path: Path, replica: bool, plugin_config: dict[str, object], pinned: bool
) -> None:
    modelgen.add_const(tmp_path / "m" / "1")
    model = ModelConfig(name="m", base_path=tmp_path / "m", plugin_config=plugin_config)
    served = Runtime(None, replica=replica).load(model, 1, Source(tmp_path / "m" / "1", None))
    assert served.compiled is not None and served.compiled.get_property("ENABLE_CPU_PINNING") is pinned


def test_one_process_keeps_openvinos_default(tmp_path: Path) -> None:
    import openvino as ov

    modelgen.add_const(tmp_path / "m" / "1")
    served = Runtime(None).load(ModelConfig(name="m", base_path=tmp_path / "m"), 1, Source(tmp_path / "m" / "1", None))
    default = ov.Core().get_property("CPU", "ENABLE_CPU_PINNING")
    assert served.compiled is not None and served.compiled.get_property("ENABLE_CPU_PINNING") == default


def test_a_cache_warmed_by_one_process_serves_the_workers(tmp_path: Path) -> None:
    """Going from one process to `--grpc_workers N` (or back) keeps the cache warm: pinning is not in the blob's key."""
    from engine.cache import ModelCache

    modelgen.add_const(tmp_path / "m" / "1")
    model, source = ModelConfig(name="m", base_path=tmp_path / "m"), Source(tmp_path / "m" / "1", None)
    first = Runtime(ModelCache.open(tmp_path / "cache")).load(model, 1, source)
    worker = Runtime(ModelCache.open(tmp_path / "cache"), replica=True).load(model, 1, source)
    assert not first.loaded_from_cache and worker.loaded_from_cache
