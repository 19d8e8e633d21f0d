"""The compiled-model cache (issue 4): OVMS's rules and model_cache_test rows, stale weights, bad blobs, limits."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import modelgen
import numpy as np
import openvino as ov
import pytest
import tritonclient.grpc as grpcclient
from conftest import ROOT, ServerProcess, model_entry

from engine import cache as cache_rules
from engine import cache_manifest
from engine.config import ModelConfig

X = np.ones((1, 10), np.float32)


def blobs(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.blob") if p.is_file())


def value(address: str, name: str = "dummy") -> np.ndarray:
    """Ones of the model's own input shape in; its first output back."""
    client = grpcclient.InferenceServerClient(address)
    meta = client.get_model_metadata(name, as_json=True)
    spec, out = meta["inputs"][0], meta["outputs"][0]["name"]
    x = np.ones([max(int(d), 1) for d in spec["shape"]], np.float32)
    tensor = grpcclient.InferInput(spec["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(name, [tensor]).as_numpy(out)


def run_once(tmp_path: Path, cache: Path | None, *entries: dict, env: dict | None = None) -> ServerProcess:
    """A fresh server process (a "restart") that loads, answers one request per model, and stops."""
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": list(entries)}))
    args = ["--config_path", str(config), "--port", "0", "--log_level", "DEBUG"]
    if cache is not None:
        args += ["--cache_dir", str(cache)]
    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    logs.mkdir(exist_ok=True)
    server = ServerProcess(args, logs / f"run{len(list(logs.iterdir()))}.log", env).wait_ready()
    try:
        server.outputs = {e["config"]["name"]: value(server.address, e["config"]["name"]) for e in entries}  # type: ignore[attr-defined]
    finally:
        server.stop()
    return server


@pytest.fixture
def dummy(tmp_path: Path) -> Path:
    modelgen.add_const(tmp_path / "dummy" / "1", shape=(1, 10))
    return tmp_path / "dummy"


# ---- the rule (TestModelCacheSetting) ----
@pytest.mark.parametrize(
    ("fields", "use"),
    [
        ({}, True),
        ({"custom_loader_options": {"loader_name": "x"}}, False),
        ({"custom_loader_options": {"loader_name": "x"}, "allow_cache": False}, False),
        ({"batch_size": "auto"}, False),
        ({"batch_size": "auto", "allow_cache": False}, False),
        ({"shape": {None: "auto"}}, False),
        ({"shape": {"b": "auto"}, "allow_cache": False}, False),
        ({"batch_size": "auto", "allow_cache": True}, True),
        ({"shape": {None: "auto"}, "allow_cache": True}, True),
    ],
)
def test_cache_decision_table(tmp_path: Path, fields: dict, use: bool) -> None:
    cache = cache_rules.ModelCache(tmp_path)
    model = ModelConfig(name="m", base_path=tmp_path, **fields)
    assert cache_rules.decide(model, cache).use is use
    assert cache_rules.decide(model, None).use is False


def test_parse_size() -> None:
    assert cache_rules.parse_size("512") == 512
    assert cache_rules.parse_size("10K") == 10 * 1024
    assert cache_rules.parse_size("2G") == 2 * 1024**3
    with pytest.raises(ValueError, match="invalid size"):
        cache_rules.parse_size("lots")


# ---- enabling ----
def test_enabled_creates_blobs_and_missing_dir_is_created(tmp_path: Path, dummy: Path) -> None:
    cache = tmp_path / "new" / "cache"
    server = run_once(tmp_path, cache, model_entry("dummy", dummy))
    assert f"Model cache is enabled: {cache}" in server.log
    assert f"Cache directory {cache} did not exist, created" in server.log
    assert blobs(cache)


def test_no_cache_dir_means_no_cache(tmp_path: Path, dummy: Path) -> None:
    assert not Path("/opt/cache").exists()
    server = run_once(tmp_path, None, model_entry("dummy", dummy))
    assert "Model cache is enabled" not in server.log
    assert "cache: no cache dir" in server.log


def test_unwritable_cache_dir_runs_without_cache(tmp_path: Path, dummy: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where the cache dir should be")
    server = run_once(tmp_path, blocker / "cache", model_entry("dummy", dummy))
    assert "is not writable" in server.log and "running without model cache" in server.log
    np.testing.assert_allclose(server.outputs["dummy"], X + 1)  # type: ignore[attr-defined]


# ---- model_cache_test rows ----
def test_restart_hits_and_shape_or_layout_add_blobs_but_nireq_and_streams_do_not(tmp_path: Path, dummy: Path) -> None:
    cache = tmp_path / "cache"
    run_once(tmp_path, None, model_entry("dummy", dummy))
    assert not cache.exists()
    first = run_once(tmp_path, cache, model_entry("dummy", dummy))
    count = len(blobs(cache))
    assert count >= 1 and "loaded from cache: False" in first.log
    again = run_once(tmp_path, cache, model_entry("dummy", dummy))
    assert len(blobs(cache)) == count and "loaded from cache: True" in again.log
    run_once(tmp_path, cache, model_entry("dummy", dummy, nireq=3))
    run_once(tmp_path, cache, model_entry("dummy", dummy, plugin_config={"NUM_STREAMS": "2"}))
    assert len(blobs(cache)) == count
    run_once(tmp_path, cache, model_entry("dummy", dummy, shape="(1,10)"))
    assert len(blobs(cache)) > count
    count = len(blobs(cache))
    run_once(tmp_path, cache, model_entry("dummy", dummy, shape="(1,10)"))
    assert len(blobs(cache)) == count
    run_once(tmp_path, cache, model_entry("dummy", dummy, batch_size=5))
    assert len(blobs(cache)) > count
    count = len(blobs(cache))
    run_once(tmp_path, cache, model_entry("dummy", dummy, layout="NC"))
    assert len(blobs(cache)) > count


def test_auto_shape_skips_the_cache_unless_allowed(tmp_path: Path, dummy: Path) -> None:
    cache = tmp_path / "cache"
    server = run_once(tmp_path, cache, model_entry("dummy", dummy, batch_size="auto"))
    assert not blobs(cache)
    assert "auto shape/batch without allow_cache" in server.log
    run_once(tmp_path, cache, model_entry("dummy", dummy, shape="auto", allow_cache=True))
    assert blobs(cache)


def test_cache_dir_in_plugin_config_is_rejected(tmp_path: Path, dummy: Path) -> None:
    config = tmp_path / "models.json"
    config.write_text(
        json.dumps({"model_config_list": [model_entry("dummy", dummy, plugin_config={"CACHE_DIR": "/x"})]})
    )
    result = subprocess.run([sys.executable, "-m", "engine", "validate", str(config)], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 1
    assert "/model_config_list/0/config/plugin_config" in result.stdout and "CACHE_DIR" in result.stdout


# ---- no stale results, ever ----
@pytest.mark.parametrize("kind", ["ir", "onnx"])
def test_weights_rewritten_in_place_never_come_back_stale(tmp_path: Path, kind: str) -> None:
    cache = tmp_path / "cache"
    base = tmp_path / "m"
    if kind == "ir":
        modelgen.add_const(base / "1", addend=np.full((1, 10), 1.0, np.float32))
        weights = base / "1" / "model.bin"
        new = np.full((1, 10), 5.0, np.float32).tobytes()
    else:
        modelgen.onnx_add_const(base / "1", delta=1.0)
        weights = base / "1" / "model.onnx"
        new = None
    run_once(tmp_path, cache, model_entry("m", base))
    hit = run_once(tmp_path, cache, model_entry("m", base))
    assert "loaded from cache: True" in hit.log
    if new is not None:
        with open(weights, "r+b") as f:  # same size, same path, new content
            f.write(new)
    else:
        data = weights.read_bytes()
        old = np.float32(1.0).tobytes()
        assert data.count(old) == 1
        weights.write_bytes(data.replace(old, np.float32(5.0).tobytes()))
    after = run_once(tmp_path, cache, model_entry("m", base))
    np.testing.assert_allclose(after.outputs["m"], X + 5)  # type: ignore[attr-defined]


# ---- robust to a bad cache ----
@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_corrupt_blob_still_loads_and_is_replaced(tmp_path: Path, dummy: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    run_once(tmp_path, cache, model_entry("dummy", dummy))
    for blob in blobs(cache):
        size = blob.stat().st_size
        blob.write_bytes(b"" if damage == "truncate" else os.urandom(size))
    after = run_once(tmp_path, cache, model_entry("dummy", dummy))
    np.testing.assert_allclose(after.outputs["dummy"], X + 1)  # type: ignore[attr-defined]
    again = run_once(tmp_path, cache, model_entry("dummy", dummy))
    assert "loaded from cache: True" in again.log


ADDEND = (np.arange(10, dtype=np.float32) + 1000.5).reshape(1, 10)  # constants that can be found in the blob


def test_a_blob_with_a_changed_constant_is_never_imported(tmp_path: Path) -> None:
    """OpenVINO has no checksum: it imports a blob whose constant bytes were changed and serves wrong outputs
    (measured). The folder's manifest no longer vouches for it, so it is removed and the model compiled afresh."""
    cache = tmp_path / "cache"
    modelgen.add_const(tmp_path / "m" / "1", addend=ADDEND)
    run_once(tmp_path, cache, model_entry("m", tmp_path / "m"))
    (blob,) = blobs(cache)
    data = blob.read_bytes()
    at = data.find(ADDEND[0, 3].tobytes())
    assert at > 0
    blob.write_bytes(data[:at] + np.float32(-7.0).tobytes() + data[at + 4 :])
    after = run_once(tmp_path, cache, model_entry("m", tmp_path / "m"))
    np.testing.assert_allclose(after.outputs["m"], X + ADDEND)  # type: ignore[attr-defined]
    assert f"Cache blob {blob} was modified after it was written; removed" in after.log
    again = run_once(tmp_path, cache, model_entry("m", tmp_path / "m"))
    assert "loaded from cache: True" in again.log and "Cache blob" not in again.log
    np.testing.assert_allclose(again.outputs["m"], X + ADDEND)  # type: ignore[attr-defined]


def test_a_blob_of_unknown_origin_is_removed_and_an_intact_copy_kept(tmp_path: Path, dummy: Path) -> None:
    """The same bytes under a new inode (a copied cache, a restored backup) are kept without a word; a blob the
    manifest does not know (a writer killed before it recorded it, a cache from elsewhere) is removed."""
    cache = tmp_path / "cache"
    run_once(tmp_path, cache, model_entry("dummy", dummy))
    (blob,) = blobs(cache)
    copy = blob.with_name("copy")
    copy.write_bytes(blob.read_bytes())
    copy.replace(blob)
    kept = run_once(tmp_path, cache, model_entry("dummy", dummy))
    assert "loaded from cache: True" in kept.log and "Cache blob" not in kept.log
    (blob.parent / cache_manifest.MANIFEST).unlink()
    unknown = run_once(tmp_path, cache, model_entry("dummy", dummy))
    assert f"Cache blob {blob} was never recorded as complete; removed" in unknown.log
    assert "loaded from cache: False" in unknown.log
    np.testing.assert_allclose(unknown.outputs["dummy"], X + 1)  # type: ignore[attr-defined]
    assert "loaded from cache: True" in run_once(tmp_path, cache, model_entry("dummy", dummy)).log


def test_weights_changed_during_the_compile_never_stay_under_the_old_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The files are hashed, then OpenVINO reads them: new weights written in between must not leave a blob in
    the old content's folder (restoring the old bytes would then import the new weights). The blob dropped on
    purpose is not a cache that wrote nothing: no "is the disk full?" warning."""
    xml = modelgen.add_const(tmp_path / "m" / "1", addend=np.full((1, 10), 1.0, np.float32))
    weights = xml.with_suffix(".bin")
    original = weights.read_bytes()
    cache = cache_rules.ModelCache(tmp_path / "cache")
    folder = cache.dir_for("m", [xml, weights], "CPU")
    weights.write_bytes(np.full((1, 10), 5.0, np.float32).tobytes())  # after hashing, before compiling
    with caplog.at_level(logging.WARNING, "hotserve.modelmanager"):
        compiled, _ = cache_rules.compile_model(ov.Core(), xml, "CPU", {}, folder)
    np.testing.assert_allclose(compiled(X)[0], X + 5)
    assert not blobs(folder.path)
    assert "changed while it was being compiled" in caplog.text and "is not working" not in caplog.text
    weights.write_bytes(original)
    again = cache.dir_for("m", [xml, weights], "CPU")
    assert again.path == folder.path
    compiled, from_cache = cache_rules.compile_model(ov.Core(), xml, "CPU", {}, again)
    assert from_cache is False
    np.testing.assert_allclose(compiled(X)[0], X + 1)
    assert len(blobs(folder.path)) == 1


def test_a_rewrite_its_stat_cannot_show_still_leaves_no_blob(tmp_path: Path) -> None:
    """Weights written just now (their stat not yet settled, as on every new version): a rewrite in the same
    timestamp tick leaves the stat as it was. Such a file's digest is not memoised, and after the compile it is
    hashed again: new bytes, no blob under the old content. (The same-tick rewrite is stood for by handing the
    compile the stat identities taken after it.)"""
    xml = modelgen.add_const(tmp_path / "m" / "1", addend=np.full((1, 10), 1.0, np.float32))
    weights = xml.with_suffix(".bin")
    cache = cache_rules.ModelCache(tmp_path / "cache")
    folder = cache.dir_for("m", [xml, weights], "CPU")
    assert [path for path, _ in folder.fresh] == [xml, weights]  # written a moment ago
    assert not (tmp_path / "cache" / ".fingerprints.json").exists()  # so not memoised
    weights.write_bytes(np.full((1, 10), 5.0, np.float32).tobytes())
    now = tuple((p, cache_manifest.stat_key(p.stat())) for p, _ in folder.sources)
    unseen = dataclasses.replace(folder, sources=now)
    compiled, _ = cache_rules.compile_model(ov.Core(), xml, "CPU", {}, unseen)
    np.testing.assert_allclose(compiled(X)[0], X + 5)
    assert not blobs(folder.path)


def test_a_manifest_left_half_written_is_cleared(tmp_path: Path, dummy: Path) -> None:
    """A server killed while writing a folder's manifest leaves its temp file: the next compile there (holding the
    folder's lock, so no writer is live) removes it."""
    cache = cache_rules.ModelCache(tmp_path / "cache")
    files = [dummy / "1" / "model.xml", dummy / "1" / "model.bin"]
    folder = cache.dir_for("dummy", files, "CPU")
    left = folder.path / f"{cache_manifest.MANIFEST}.4242.1"
    left.write_text('{"half')
    cache_rules.compile_model(ov.Core(), files[0], "CPU", {}, folder)
    assert not left.exists() and len(blobs(folder.path)) == 1


def test_a_blob_another_server_is_writing_is_waited_for_not_removed(tmp_path: Path, dummy: Path) -> None:
    """A second server sharing the dir, its load started while the test holds the folder's lock with the blob not
    yet recorded (as a server mid-compile has it): it waits, then imports the blob once it is recorded."""
    cache = tmp_path / "cache"
    run_once(tmp_path, cache, model_entry("dummy", dummy))
    (blob,) = blobs(cache)
    manifest = blob.parent / cache_manifest.MANIFEST
    recorded = manifest.read_bytes()
    config = tmp_path / "models.json"
    with open(blob.parent / cache_manifest.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest.unlink()  # the blob is written, not yet recorded
        server = ServerProcess(["--config_path", str(config), "--port", "0", "--cache_dir", str(cache)],
                               tmp_path / "waiting.log")  # fmt: skip
        try:
            server.wait_for("Loading model: dummy")
            manifest.write_bytes(recorded)
            fcntl.flock(lock, fcntl.LOCK_UN)
            server.wait_ready()
        finally:
            server.stop()
    assert "loaded from cache: True" in server.log and "Cache blob" not in server.log


def test_size_limit_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entries = []
    for i in range(3):
        modelgen.conv(tmp_path / f"c{i}" / "1", layers=3, seed=i)
    first = run_once(tmp_path, cache, model_entry("c0", tmp_path / "c0"))
    assert first
    one = sum(b.stat().st_size for b in blobs(cache))
    for i in range(3):
        entries.append(model_entry(f"c{i}", tmp_path / f"c{i}"))
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": entries}))
    limit = str(int(one * 2.5))
    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    server = ServerProcess(["--config_path", str(config), "--port", "0", "--cache_dir", str(cache),
                            "--cache_size_limit", limit], logs / "limit.log").wait_ready()  # fmt: skip
    server.stop()
    assert sum(b.stat().st_size for b in blobs(cache)) <= int(limit)
    assert "evicted" in server.log
    assert not (cache / "c0").exists() or not any((cache / "c0").rglob("*.blob"))


def test_eviction_skips_a_folder_another_compile_holds(tmp_path: Path) -> None:
    """Another server (or load thread) compiling in a folder holds its lock: evicting that folder then would drop
    the blob being written and the lock itself (a third compile could take a fresh one beside the first)."""
    cache = cache_rules.ModelCache(tmp_path / "cache", size_limit=1)
    folders = []
    for name in ("old", "new"):
        xml = modelgen.add_const(tmp_path / name / "1")
        folders.append(folder := cache.dir_for(name, [xml, xml.with_suffix(".bin")], "CPU"))
        cache_rules.compile_model(ov.Core(), xml, "CPU", {}, folder)
    old, new = (f.path for f in folders)
    with open(old / cache_manifest.LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a compile in that folder has it
        cache.enforce_limit(keep=new)
        assert blobs(old) and (old / cache_manifest.LOCK).exists()
    cache.enforce_limit(keep=new)
    assert not old.exists() and blobs(new)


def test_a_lock_replaced_while_waited_for_is_not_taken_for_the_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compile waits for a folder's lock; meanwhile the folder is evicted and made again, with a new lock file
    that another compile may hold. The old lock, once free, no longer guards the folder: compile without it."""
    xml = modelgen.add_const(tmp_path / "m" / "1")
    cache = cache_rules.ModelCache(tmp_path / "cache")
    folder = cache.dir_for("m", [xml, xml.with_suffix(".bin")], "CPU")
    path = folder.path / cache_manifest.LOCK
    result: list[tuple[ov.CompiledModel, bool]] = []
    with open(path, "a") as lock, caplog.at_level(logging.WARNING, "hotserve.modelmanager"):
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(cache_rules.compile_model(ov.Core(), xml, "CPU", {},
                                                                                         folder)))  # fmt: skip
        waiter.start()
        while sum(1 for fd in Path("/proc/self/fd").iterdir() if _points_at(fd, path)) < 2:  # waiter in _held
            waiter.join(0.01)
            assert waiter.is_alive()
        path.unlink()
        path.touch()  # the folder evicted and made again by another server
        fcntl.flock(lock, fcntl.LOCK_UN)
        waiter.join()
    ((compiled, from_cache),) = result
    assert not from_cache and not blobs(folder.path)
    assert "was evicted while this compile waited for its lock" in caplog.text
    np.testing.assert_allclose(compiled(X)[0], X + 1)


def _points_at(fd: Path, path: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.readlink(fd) in (str(path), f"{path} (deleted)")
    return False


def test_two_processes_share_one_cache_dir(tmp_path: Path) -> None:
    modelgen.conv(tmp_path / "conv" / "1", layers=6)
    cache = tmp_path / "cache"
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"model_config_list": [model_entry("conv", tmp_path / "conv")]}))
    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    logs.mkdir(exist_ok=True)
    args = ["--config_path", str(config), "--port", "0", "--cache_dir", str(cache)]
    servers = [ServerProcess(args, logs / f"{i}.log")
               for i in range(2)]  # fmt: skip
    x = np.ones((1, 3, 224, 224), np.float32)
    outputs = []
    try:
        for server in servers:
            server.wait_ready()
            client = grpcclient.InferenceServerClient(server.address)
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            outputs.append(client.infer("conv", [tensor]).as_numpy("output"))
    finally:
        for server in servers:
            server.stop()
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5)
    third = ServerProcess(["--config_path", str(config), "--port", "0", "--cache_dir", str(cache)], logs / "3.log")
    third.wait_ready()
    third.stop()
    assert "loaded from cache: True" in third.log
