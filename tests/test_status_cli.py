"""`hotserve status` against a real server (issue 6)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import modelgen
from conftest import ROOT, model_entry


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", "status", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_table_shows_states_cache_and_the_real_error(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "good" / "1")
    bad = tmp_path / "bad" / "1"
    bad.mkdir(parents=True)
    (bad / "model.xml").write_text("<net/>")
    (bad / "model.bin").write_bytes(b"")
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": [model_entry("good", tmp_path / "good"),
                                                        model_entry("bad", tmp_path / "bad")]}))  # fmt: skip
    server = serve(config, "--cache_dir", str(tmp_path / "cache"))
    result = status("--address", server.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "CACHE", "ERROR"]
    good = next(line for line in lines if line.startswith("good"))
    assert "AVAILABLE" in good and "enabled" in good
    bad_line = next(line for line in lines if line.startswith("bad"))
    assert "LOADING" in bad_line and "Cannot compile model" in bad_line
    only = status("--address", server.address, "--model", "good")
    assert [line.split()[0] for line in only.stdout.splitlines()] == ["MODEL", "good"]


def test_watch_redraws_on_change(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "m" / "1")
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": [model_entry("m", tmp_path / "m")]}))
    server = serve(config)
    watcher = subprocess.Popen([sys.executable, "-m", "engine", "status", "--address", server.address, "--watch"],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(2.0)
        config.write_text(json.dumps({"model_config_list": []}))
        time.sleep(3.0)
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
    assert "AVAILABLE" in out and "END" in out


def test_unreachable_server_exits_non_zero() -> None:
    result = status("--address", "127.0.0.1:1")
    assert result.returncode != 0
    assert "cannot reach 127.0.0.1:1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
