"""Live reconciliation against a real server: edit models.json or the version folders while it serves (issue 3).

OVMS scenarios from research ovms.md §11 items 13–30, plus what OVMS gets wrong (§10).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import model_entry
from tritonclient.utils import InferenceServerException

X = np.zeros((1, 10), np.float32)


def wait_until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except InferenceServerException:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def states(client: grpcclient.InferenceServerClient, name: str) -> dict[int, str]:
    index = client.get_model_repository_index().models
    return {int(m.version): m.state for m in index if m.name == name and m.version}


def reasons(client: grpcclient.InferenceServerClient, name: str) -> dict[int, str]:
    index = client.get_model_repository_index().models
    return {int(m.version): m.reason for m in index if m.name == name and m.version}


def value(client: grpcclient.InferenceServerClient, name: str, version: str = "", x: np.ndarray = X) -> float:
    tensor = grpcclient.InferInput("b", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return float(client.infer(name, [tensor], model_version=version).as_numpy("a")[0, 0])


def write_config(path: Path, *entries: dict, atomic: bool = True) -> None:
    """Editor-style save: write a temp file, then rename it over the config."""
    text = json.dumps({"model_config_list": list(entries)}, indent=1)
    if atomic:
        tmp = path.with_name(f".{path.name}.swp")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:
        path.write_text(text)


def publish(folder: Path, delta: float, version: int) -> Path:
    """The safe way to publish a version: build it under a non-numeric name, then rename it to its number."""
    staging = folder / f"tmp-{version}"
    modelgen.add_const(staging, delta=delta)
    final = folder / str(version)
    os.rename(staging, final)
    return final


@pytest.fixture
def env(tmp_path: Path, serve):  # type: ignore[no-untyped-def]
    """A server on models.json with m1 (v1: +1) and the client; returns a small namespace."""
    models = tmp_path / "models"
    modelgen.add_const(models / "m1" / "1", delta=1.0)
    modelgen.add_const(models / "m2" / "1", delta=10.0)
    config = tmp_path / "models.json"
    write_config(config, model_entry("m1", models / "m1"))
    server = serve(config)
    client = grpcclient.InferenceServerClient(server.address)

    class Env:
        pass

    e = Env()
    e.models, e.config, e.server, e.client = models, config, server, client  # type: ignore[attr-defined]
    return e


def test_add_model_leaves_others_untouched(env) -> None:  # type: ignore[no-untyped-def]
    mark = len(env.server.log)
    write_config(env.config, model_entry("m1", env.models / "m1"), model_entry("m2", env.models / "m2"))
    wait_until(lambda: env.client.is_model_ready("m2"), what="m2 ready")
    assert value(env.client, "m2") == 10.0
    tail = env.server.log[mark:]
    assert "model: m1" not in tail.replace("model: m2", "")
    states_seen = [
        line.split('"state": "')[1].split('"')[0] for line in tail.splitlines() if "of model m2 status" in line
    ]
    assert states_seen == ["START", "LOADING", "AVAILABLE"]  # OVMS's order for a clean load


def test_remove_model_retires_and_reports_end(env) -> None:  # type: ignore[no-untyped-def]
    write_config(env.config, model_entry("m1", env.models / "m1"), model_entry("m2", env.models / "m2"))
    wait_until(lambda: env.client.is_model_ready("m2"))
    write_config(env.config, model_entry("m1", env.models / "m1"))
    wait_until(lambda: states(env.client, "m2") == {1: "END"}, what="m2 END")
    with pytest.raises(InferenceServerException, match="Model with requested version is not found"):
        value(env.client, "m2")
    with pytest.raises(InferenceServerException, match="Model with requested version is retired"):
        value(env.client, "m2", "1")
    log = env.server.log
    assert log.index('model m2 status change. New status: ( "state": "UNLOADING"') < log.index(
        'model m2 status change. New status: ( "state": "END"'
    )


@pytest.mark.parametrize(
    "change",
    [{"nireq": 2}, {"shape": "(1,10)"}, {"plugin_config": {"NUM_STREAMS": "2"}}, {"layout": "NC"}, {"batch_size": 1}],
)
def test_config_change_reloads_in_place(env, change: dict) -> None:  # type: ignore[no-untyped-def]
    mark = len(env.server.log)
    write_config(env.config, model_entry("m1", env.models / "m1", **change))
    env.server.wait_for(r"Will reload model: m1; version: 1", start=mark)
    env.server.wait_for(r"Loaded model m1; version: 1", start=mark)
    assert '"state": "END"' not in env.server.log[mark:]
    assert value(env.client, "m1") == 1.0


def test_policy_change_starts_versions_without_reloading(env) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(env.models / "m1" / "0", delta=0)  # ignored, with OVMS's warning
    publish(env.models / "m1", 2.0, 2)
    wait_until(lambda: states(env.client, "m1") == {1: "END", 2: "READY"}, what="v2 replaces v1")
    mark = len(env.server.log)
    write_config(env.config, model_entry("m1", env.models / "m1", model_version_policy={"all": {}}))
    wait_until(lambda: states(env.client, "m1") == {1: "READY", 2: "READY"}, what="v1 back")
    assert "Will reload model: m1; version: 2" not in env.server.log[mark:]
    assert "Expected version directory name to be a number greater than 0. Got: 0" in env.server.log


def test_identical_resave_does_nothing(env) -> None:  # type: ignore[no-untyped-def]
    time.sleep(0.5)
    mark = len(env.server.log)
    env.config.write_text(env.config.read_text())
    time.sleep(1.5)
    tail = env.server.log[mark:]
    assert "Will " not in tail and "STATUS CHANGE" not in tail


def test_invalid_json_and_schema_change_nothing_then_fix_applies(env) -> None:  # type: ignore[no-untyped-def]
    mark = len(env.server.log)
    env.config.write_text('{"model_config_list": [ {"config": ')
    env.server.wait_for(r"Configuration invalid, nothing applied", start=mark)
    assert value(env.client, "m1") == 1.0
    mark = len(env.server.log)
    write_config(env.config, model_entry("m1", env.models / "m1", nireq=-3))
    env.server.wait_for(r"/model_config_list/0/config/nireq", start=mark)
    assert value(env.client, "m1") == 1.0
    write_config(env.config, model_entry("m1", env.models / "m1"), model_entry("m2", env.models / "m2"))
    wait_until(lambda: env.client.is_model_ready("m2"), what="fixed config applied")


def test_invalid_entry_keeps_that_model_while_others_apply(env) -> None:  # type: ignore[no-untyped-def]
    mark = len(env.server.log)
    write_config(
        env.config,
        model_entry("m1", env.models / "m1", shape="(1,2,3.14)"),
        model_entry("m2", env.models / "m2"),
    )
    wait_until(lambda: env.client.is_model_ready("m2"), what="m2 applied")
    assert "Invalid entry left as it was" in env.server.log[mark:]
    assert value(env.client, "m1") == 1.0
    assert "Will reload model: m1" not in env.server.log[mark:]


def test_deleted_config_file_keeps_serving(env) -> None:  # type: ignore[no-untyped-def]
    mark = len(env.server.log)
    env.config.unlink()
    env.server.wait_for(r"nothing applied", start=mark)
    assert value(env.client, "m1") == 1.0


def test_new_version_folder_replaces_old_then_delete_and_restore(env) -> None:  # type: ignore[no-untyped-def]
    publish(env.models / "m1", 2.0, 2)
    wait_until(lambda: states(env.client, "m1") == {1: "END", 2: "READY"}, what="v2 serves, v1 ends")
    assert value(env.client, "m1") == 2.0
    write_config(env.config, model_entry("m1", env.models / "m1", model_version_policy={"all": {}}))
    wait_until(lambda: states(env.client, "m1") == {1: "READY", 2: "READY"})
    backup = env.models / "backup-2"
    shutil.move(env.models / "m1" / "2", backup)
    wait_until(lambda: states(env.client, "m1") == {1: "READY", 2: "END"}, what="v2 END")
    assert value(env.client, "m1") == 1.0
    shutil.move(backup, env.models / "m1" / "2")
    wait_until(lambda: states(env.client, "m1") == {1: "READY", 2: "READY"}, what="v2 resurrected")
    assert value(env.client, "m1") == 2.0


def test_corrupt_latest_falls_back_then_fix_loads(env) -> None:  # type: ignore[no-untyped-def]
    publish(env.models / "m1", 2.0, 2)
    wait_until(lambda: states(env.client, "m1").get(2) == "READY")
    staging = env.models / "m1" / "tmp3"
    staging.mkdir()
    (staging / "model.xml").write_text("<broken")
    (staging / "model.bin").write_bytes(b"\0")
    os.rename(staging, env.models / "m1" / "3")
    wait_until(lambda: states(env.client, "m1").get(3) == "LOADING", what="v3 failed")
    assert states(env.client, "m1")[2] == "READY"
    assert reasons(env.client, "m1")[3]
    assert value(env.client, "m1") == 2.0
    with pytest.raises(InferenceServerException, match="not loaded yet"):
        value(env.client, "m1", "3")
    shutil.rmtree(env.models / "m1" / "3")
    publish(env.models / "m1", 3.0, 3)
    wait_until(lambda: states(env.client, "m1") == {1: "END", 2: "END", 3: "READY"}, what="fixed v3 serves")
    assert value(env.client, "m1") == 3.0


def test_failed_version_is_not_retried_every_poll(env) -> None:  # type: ignore[no-untyped-def]
    bad = env.models / "m1" / "tmp2"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"not onnx")
    os.rename(bad, env.models / "m1" / "2")
    env.server.wait_for(r"Error occurred while loading model: m1; version: 2")
    time.sleep(3.0)
    attempts = env.server.log.count("Error occurred while loading model: m1; version: 2")
    assert attempts <= 2, attempts  # backoff: 2 s, then 4 s — not once per 1 s poll
    assert value(env.client, "m1") == 1.0


def test_half_copied_folder_waits_until_quiet(env) -> None:  # type: ignore[no-untyped-def]
    target = env.models / "m1" / "2"
    target.mkdir()
    source = modelgen.add_const(env.models / "src", delta=2.0)
    shutil.copy(source, target / "model.xml")  # the .bin is not there yet
    time.sleep(0.1)
    shutil.copy(source.with_suffix(".bin"), target / "model.bin")
    wait_until(lambda: states(env.client, "m1") == {1: "END", 2: "READY"}, what="v2 after copy")
    assert "Error occurred while loading model: m1; version: 2" not in env.server.log


def test_deleting_base_path_retires_versions(env) -> None:  # type: ignore[no-untyped-def]
    shutil.rmtree(env.models / "m1")
    wait_until(lambda: states(env.client, "m1") == {1: "END"}, what="m1 retired")
    assert "Directory does not exist" in env.server.log
    assert "retiring all versions of model m1" in env.server.log


def test_bad_target_device_change_keeps_serving(env) -> None:  # type: ignore[no-untyped-def]
    mark = len(env.server.log)
    write_config(env.config, model_entry("m1", env.models / "m1", target_device="NO_SUCH_DEVICE"))
    env.server.wait_for(r"Error occurred while loading model: m1; version: 1", start=mark)
    assert states(env.client, "m1") == {1: "READY"}
    assert value(env.client, "m1") == 1.0
    time.sleep(2.5)  # a failed reload is retried with backoff, not on every 1 s poll
    assert env.server.log[mark:].count("Error occurred while loading model: m1; version: 1") <= 2


def test_configmap_symlink_swap_triggers_one_reload(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    modelgen.add_const(models / "m1" / "1", delta=1.0)
    modelgen.add_const(models / "m2" / "1", delta=10.0)
    mount = tmp_path / "cm"
    first = mount / "..2026_01"
    first.mkdir(parents=True)
    write_config(first / "models.json", model_entry("m1", models / "m1"), atomic=False)
    (mount / "..data").symlink_to("..2026_01")
    (mount / "models.json").symlink_to("..data/models.json")
    server = serve(mount / "models.json")
    client = grpcclient.InferenceServerClient(server.address)
    second = mount / "..2026_02"
    second.mkdir()
    write_config(
        second / "models.json", model_entry("m1", models / "m1"), model_entry("m2", models / "m2"), atomic=False
    )
    (mount / "..data_tmp").symlink_to("..2026_02")
    os.replace(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(first)
    wait_until(lambda: client.is_model_ready("m2"), what="m2 via configmap swap")
    time.sleep(1.5)
    assert server.log.count("Will add model: m2") == 1


def test_watching_off_then_sighup_applies(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    modelgen.add_const(models / "m1" / "1", delta=1.0)
    config = tmp_path / "models.json"
    write_config(config, model_entry("m1", models / "m1"))
    server = serve(config, "--file_system_poll_wait_seconds", "0")
    client = grpcclient.InferenceServerClient(server.address)
    publish(models / "m1", 2.0, 2)
    time.sleep(1.5)
    assert value(client, "m1") == 1.0  # nothing watches
    server.signal(signal.SIGHUP)
    wait_until(lambda: value(client, "m1") == 2.0, what="SIGHUP reload")


def test_retire_waits_for_in_flight_request(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    modelgen.conv(models / "conv" / "1")
    config = tmp_path / "models.json"
    write_config(config, model_entry("conv", models / "conv", nireq=1))
    server = serve(config)
    client = grpcclient.InferenceServerClient(server.address)
    x = np.ones((1, 3, 224, 224), np.float32)
    results: list[object] = []

    def run() -> None:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        try:
            results.append(client.infer("conv", [tensor]).as_numpy("output"))
        except Exception as exc:  # asserted below
            results.append(exc)

    workers = [threading.Thread(target=run) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(0.15)
    write_config(config)
    for worker in workers:
        worker.join(30)
    assert all(isinstance(r, np.ndarray) for r in results), results
    wait_until(lambda: states(client, "conv") == {1: "END"}, what="conv END")


def test_twenty_edits_under_continuous_load_drop_nothing(env) -> None:  # type: ignore[no-untyped-def]
    """20 edits (models, nireq, shape, version folders) while a client infers: zero failures, right numbers."""
    failures: list[str] = []
    counts = {"m1": 0}
    stop = threading.Event()
    allowed = {"m1": {1.0, 2.0, 3.0}}

    def load() -> None:
        client = grpcclient.InferenceServerClient(env.server.address)
        while not stop.is_set():
            try:
                got = value(client, "m1")
                if got not in allowed["m1"]:
                    failures.append(f"m1 returned {got}")
                counts["m1"] += 1
            except Exception as exc:  # every failure is collected and reported
                failures.append(f"m1: {exc}")

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    m1, m2 = env.models / "m1", env.models / "m2"
    edits = [
        lambda: write_config(env.config, model_entry("m1", m1), model_entry("m2", m2)),
        lambda: write_config(env.config, model_entry("m1", m1, nireq=2), model_entry("m2", m2)),
        lambda: publish(m1, 2.0, 2),
        lambda: write_config(env.config, model_entry("m1", m1, nireq=3, shape="(1,10)"), model_entry("m2", m2)),
        lambda: write_config(env.config, model_entry("m1", m1, nireq=3)),
        lambda: publish(m1, 3.0, 3),
        lambda: write_config(env.config, model_entry("m1", m1, model_version_policy={"all": {}})),
        lambda: shutil.rmtree(m1 / "1"),
        lambda: write_config(env.config, model_entry("m1", m1, model_version_policy={"latest": {"num_versions": 2}})),
        lambda: write_config(env.config, model_entry("m1", m1, nireq=1), model_entry("m2", m2, nireq=2)),
        lambda: shutil.rmtree(m1 / "3"),
        lambda: write_config(env.config, model_entry("m1", m1, plugin_config={"NUM_STREAMS": "1"})),
        lambda: publish(m1, 3.0, 3),
        lambda: write_config(env.config, model_entry("m1", m1, shape="(1,10)"), model_entry("m2", m2)),
        lambda: write_config(env.config, model_entry("m1", m1, layout="NC")),
        lambda: write_config(env.config, model_entry("m1", m1), model_entry("m2", m2)),
        lambda: write_config(env.config, model_entry("m1", m1, nireq=4)),
        lambda: shutil.rmtree(m1 / "2"),
        lambda: write_config(env.config, model_entry("m1", m1, batch_size=1), model_entry("m2", m2)),
        lambda: write_config(env.config, model_entry("m1", m1)),
    ]
    for edit in edits:
        edit()
        time.sleep(0.4)
    wait_until(lambda: states(env.client, "m1").get(3) == "READY", what="final state")
    time.sleep(0.5)
    stop.set()
    for worker in workers:
        worker.join(10)
    assert counts["m1"] > 50
    assert not failures, failures[:5]
    assert value(env.client, "m1") == 3.0
