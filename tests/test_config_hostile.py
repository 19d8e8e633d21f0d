"""A hostile operator's files (issue 10): `hotserve validate` and the live server never crash, print one escaped line
per error, refuse unsafe model names, and answer a live reload of an unreadable or absurd file with 412."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import modelgen
import numpy as np
import pytest
from conftest import ROOT, model_entry
from harness import free_port


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "validate", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("text", "errors", "expect"),
    [
        (NESTED, 1, "nest more than 32 levels"),
        ('{"model_config_list": [' + '{"a":' * 500 + "1" + "}" * 500 + "]}", 1, "nest more than 32 levels"),
        ('{"model_config_list": [{"config": {"name": "m", "base_path": "/x/\\ud800"}}]}', 0, ""),
        ('{"model_config_list": [{"config": {"name": "m", "base_path": "a", "plugin_config": {"k\\nv": [1]}}}]}', 1,
         "/plugin_config/k\\x0av"),
        ('{"model_config_list": [{"config": {"name": "m", "bad/key~\\u001b": 1}}]}', 1, "/bad~1key~0\\x1b"),
        ('{"model_config_list": [{"config": {"name": "..", "base_path": "a"}}]}', 1, 'invalid model name ".."'),
        ('{"model_config_list": [{"config": {"name": "a/b", "base_path": "a"}}]}', 1, 'invalid model name "a/b"'),
        ('{"model_config_list": [{"config": {"name": "a\\u0007", "base_path": "a"}}]}', 1, "invalid model name"),
        ('{"model_config_list": [{"config": {"name": "\\ud800", "base_path": "a"}}]}', 1, "invalid model name"),
    ],
    ids=["deep array", "deep object", "surrogate path", "newline key", "pointer escapes", "dotdot name", "slash name",
         "bell name", "surrogate name"],
)  # fmt: skip
def test_validate_prints_one_escaped_line_per_error(tmp_path: Path, text: str, errors: int, expect: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(text)
    done = validate(path)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    if not errors:
        assert done.returncode == 0, done.stdout + done.stderr
        return
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == errors and expect in lines[0], done.stdout
    assert all(line.isprintable() for line in lines)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "models.json"
    os.mkfifo(fifo)
    done = validate(fifo)
    assert done.returncode == 1 and "not a regular file" in done.stdout, done.stdout + done.stderr


def reload(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/config/reload", method="POST"), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_live_reload_of_bad_files_answers_412_and_keeps_serving(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    modelgen.add_const(tmp_path / "dummy" / "1", delta=1.0)
    cache = tmp_path / "cache" / "inner"
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": [model_entry("dummy", tmp_path / "dummy")]}))
    port = free_port()
    server = serve(config, "--rest_port", str(port), "--file_system_poll_wait_seconds", "0", "--cache_dir", str(cache))
    url = f"http://127.0.0.1:{port}"
    entries = [model_entry("dummy", tmp_path / "dummy"), model_entry("..", tmp_path / "dummy")]
    config.write_text(json.dumps({"model_config_list": entries}))
    status, body = reload(url)  # the file is valid; the one entry is left out, with its reason
    assert status in (200, 201) and 'invalid model name \\"..\\"' in body, body
    assert sorted(p.name for p in cache.parent.iterdir()) == ["inner"]  # nothing made beside the cache dir
    for bad in (NESTED, "not json"):
        config.write_text(bad)
        status, body = reload(url)
        assert status == 412, body
    config.unlink()
    config.mkdir()  # a directory where the file was: unreadable
    status, body = reload(url)
    assert status == 412 and "cannot open" in body, body
    client = grpcclient.InferenceServerClient(server.address)
    x = np.zeros((1, 10), np.float32)
    tensor = grpcclient.InferInput("b", [1, 10], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("dummy", [tensor]).as_numpy("a"), x + 1)
    assert "Traceback" not in server.log and "Reconcile failed" not in server.log
