"""A cache dir on a full disk (issue 10): OpenVINO silently writes no blob; the server notices and says so once."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import modelgen
import numpy as np
import openvino as ov
import pytest
from conftest import model_entry

from engine import cache as cache_rules
from engine import cache_manifest


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_cache_is_noticed_once(tmp_path: Path, tiny_disk: Path, serve) -> None:  # type: ignore[no-untyped-def]
    big = np.ones((1, 1 << 20), np.float32)  # 4 MB of weights: the blob cannot fit on a 2 MB disk
    for name in ("big1", "big2"):
        modelgen.add_const(tmp_path / name / "1", shape=(1, 1 << 20), addend=big)
    config = {"model_config_list": [model_entry(n, tmp_path / n) for n in ("big1", "big2")]}
    server = serve(config, "--cache_dir", str(tiny_disk / "cache"))
    lines = [line for line in server.log.splitlines() if "is not working" in line]
    assert len(lines) == 1, server.log
    assert str(tiny_disk / "cache") in lines[0] and "MiB free" in lines[0] and "disk full" in lines[0]
    assert not list((tiny_disk / "cache").rglob("*.blob"))


def test_a_full_disk_does_not_cost_a_blob_already_there(
    tmp_path: Path, tiny_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first warm start records the blob's settled stat in the manifest; on a full disk that write fails, and
    the blob must still be imported (it used to be dropped for an uncached compile, on every start)."""
    xml = modelgen.add_const(tmp_path / "m" / "1", shape=(1, 1000), addend=np.ones((1, 1000), np.float32))
    cache = cache_rules.ModelCache(tiny_disk / "cache")
    folder = cache.dir_for("m", [xml, xml.with_suffix(".bin")], "CPU")
    cache_rules.compile_model(ov.Core(), xml, "CPU", {}, folder)
    with open(tiny_disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(1 << 16))
    monkeypatch.setattr(cache_manifest, "RACY_NS", 0)  # as on a restart 2 s later: the blob's stat has settled
    compiled, from_cache = cache_rules.compile_model(ov.Core(), xml, "CPU", {}, folder)
    assert from_cache
    np.testing.assert_allclose(compiled(np.zeros((1, 1000), np.float32))[0], np.ones((1, 1000)))
