"""Start-up has live-reload semantics (issue 9): one bad entry fails that model, not the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ROOT, model_entry

X = np.zeros((1, 10), np.float32)


def test_a_semantically_invalid_entry_fails_only_that_model_at_start_up(tmp_path: Path, serve, build: Path) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "good" / "1", delta=1.0)
    modelgen.add_const(tmp_path / "bad" / "1", delta=2.0)
    config = {
        "custom_loader_config_list": [
            {"config": {"loader_name": "t", "library_path": str(build / "libtestloader.so")}}
        ],
        "model_config_list": [
            model_entry("good", tmp_path / "good"),
            model_entry("bad", tmp_path / "bad", allow_cache=True,
                        custom_loader_options={"loader_name": "t", "model_file": "model.xml", "bin_file": "model.bin"}),
        ],
    }  # fmt: skip
    server = serve(config)
    client = grpcclient.InferenceServerClient(server.address)
    inputs = [grpcclient.InferInput("b", [1, 10], "FP32")]
    inputs[0].set_data_from_numpy(X)
    np.testing.assert_allclose(client.infer("good", inputs).as_numpy("a"), X + 1.0)
    (bad,) = [m for m in client.get_model_repository_index().models if m.name == "bad"]
    assert bad.state == "UNAVAILABLE" and "allow_cache" in bad.reason and "/model_config_list/1/config" in bad.reason
    assert "Invalid entry not loaded" in server.log and "allow_cache" in server.log
    checked = subprocess.run([sys.executable, "-m", "engine", "validate", str(tmp_path / "models.json")],
                             cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 1 and "allow_cache" in checked.stdout


def test_a_schema_invalid_file_still_stops_the_start_up(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_config_list": [{"config": {"name": "x", "base_path": 5}}]}))
    server = serve(path, ready=False)
    assert server.proc.wait(60) == 1
    assert "Configuration is invalid; not starting" in server.log


@pytest.mark.parametrize("count", ["0", str((os.cpu_count() or 1) + 1)])
def test_grpc_workers_outside_one_to_the_core_count_is_refused(tmp_path: Path, count: str) -> None:
    argv = [sys.executable, "-m", "engine", "serve", "--model_name", "m", "--model_path", str(tmp_path)]
    done = subprocess.run([*argv, "--grpc_workers", count], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 64 and "grpc_workers count should be from 1 to CPU core count" in done.stderr


@pytest.mark.parametrize("flag", ["--rest_body_timeout_seconds", "--grpc_receive_timeout_seconds"])
@pytest.mark.parametrize("seconds", ["0", "-1", "3601", "nan"])
def test_a_receive_timeout_outside_its_range_is_refused(tmp_path: Path, flag: str, seconds: str) -> None:
    argv = [sys.executable, "-m", "engine", "serve", "--model_name", "m", "--model_path", str(tmp_path)]
    done = subprocess.run([*argv, flag, seconds], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 64 and f"{flag} must be more than 0 and at most 3600" in done.stderr, done.stderr


def test_config_warnings_reach_the_log(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "m" / "1")
    server = serve({"model_config_list": [model_entry("m", tmp_path / "m")], "pipeline_config_list": []})
    assert "pipeline_config_list is not supported by hotserve and is ignored" in server.log
