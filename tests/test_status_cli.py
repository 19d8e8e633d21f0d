"""`hotserve status` against a real server (issue 6)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "CACHE", "LABELS", "ERROR"]
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
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("AVAILABLE" in line for line in lines), "the first table")
        config.write_text(json.dumps({"model_config_list": []}))
        wait_until(lambda: any(line.startswith("m ") and "END" in line for line in lines), "the redraw with END")
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
    redraws = [line for line in lines if "MODEL" in line]
    assert len(redraws) >= 2 and redraws[-1].startswith("\033[2J\033[H")  # cleared and redrawn, not appended


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_unknown_model_is_a_one_line_answer(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "m" / "1")
    server = serve({"model_config_list": [model_entry("m", tmp_path / "m")]})
    result = status("--address", server.address, "--model", "other")
    assert result.returncode == 1 and result.stdout.strip() == "no models named other"


def test_unreachable_server_exits_non_zero() -> None:
    result = status("--address", "127.0.0.1:1")
    assert result.returncode != 0
    assert "cannot reach 127.0.0.1:1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_labels_are_read_only_from_the_note_hotserve_appends() -> None:
    from engine.frontend.routing_wire import labels_note, split_labels

    reason = "cache: enabled" + labels_note(("stable", "canary"), ("next",))
    assert split_labels(reason) == ("cache: enabled", "stable, canary, next (pending)")
    error = "Cannot compile model: layer x; labels: are wrong here"  # an error text that merely says "; labels: "
    assert split_labels(error) == (error, "")
    assert split_labels(error + labels_note(("stable",), ())) == (error, "stable")
