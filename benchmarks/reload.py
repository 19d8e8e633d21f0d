"""Reload benchmarks: how fast edits take effect, how a 500-model config scales, and what a reload costs others.

1. Reload latency: writing the config (a new model) or renaming a version folder into place → the new model or
   version answering requests, minus that model's own compile time measured in-process.
2. Scale: 500 tiny models — start-up to ready; one entry changed → time to plan and apply, and how many other
   models were touched (must be 0).
3. Under load: p99 latency of an untouched model while another model reloads over and over, vs. without reloads.

Prints a table and writes benchmarks/results/reload.json.   .venv/bin/python benchmarks/reload.py [--models 500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import modelgen
from harness import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"
STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]"


def _when(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def entry(name: str, base: Path, **extra: object) -> dict:
    return {"config": {"name": name, "base_path": str(base), **extra}}


def write(path: Path, entries: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_config_list": entries}))
    os.replace(tmp, path)


def compile_seconds(xml: Path, repeat: int = 5) -> float:
    core = ov.Core()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        core.compile_model(xml, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def client(address: str):  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(address)


def answer(c, model: str, version: str = "") -> float | None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    tensor = grpcclient.InferInput("b", [1, 10], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 10), np.float32))
    try:
        return float(c.infer(model, [tensor], model_version=version).as_numpy("a")[0, 0])
    except InferenceServerException:
        return None


def until(check, timeout: float = 30.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.002)
    return time.perf_counter() - t0


def reload_latency(root: Path, rounds: int) -> dict[str, object]:
    xml = modelgen.conv(root / "conv" / "1", layers=6)
    load = compile_seconds(xml)
    modelgen.add_const(root / "base" / "1")
    config = root / "models.json"
    write(config, [entry("base", root / "base")])
    server = ServerProcess(["--config_path", str(config), "--port", "0"], root / "r.log")
    server.wait_ready()
    c = client(server.address)
    config_times, folder_times = [], []
    try:
        for i in range(rounds):
            name = f"new{i}"
            modelgen.add_const(root / name / "1", delta=float(i))
            time.sleep(0.5)  # the folder is quiet before the config names it
            t0 = time.perf_counter()
            write(config, [entry("base", root / "base"), entry(name, root / name)])
            until(lambda n=name, d=float(i): answer(c, n) == d + 0)
            config_times.append(time.perf_counter() - t0)
            staging = root / "base" / f"stage{i + 2}"
            modelgen.add_const(staging, delta=100.0 + i)
            time.sleep(0.5)
            t0 = time.perf_counter()
            os.rename(staging, root / "base" / str(i + 2))
            until(lambda v=100.0 + i: answer(c, "base") == v)
            folder_times.append(time.perf_counter() - t0)
    finally:
        server.stop()
    tiny_load = compile_seconds(root / "base" / "1" / "model.xml")
    return {
        "tiny_model_compile_s": tiny_load,
        "conv6_compile_s": load,
        "config_edit_to_answer_s": statistics.median(config_times),
        "folder_rename_to_answer_s": statistics.median(folder_times),
        "config_overhead_s": statistics.median(config_times) - tiny_load,
        "folder_overhead_s": statistics.median(folder_times) - tiny_load,
    }


def scale(root: Path, count: int) -> dict[str, object]:
    modelgen.add_const(root / "tiny" / "1")
    config = root / "many.json"
    entries = [entry(f"m{i:03d}", root / "tiny") for i in range(count)]
    write(config, entries)
    t0 = time.perf_counter()
    server = ServerProcess(["--config_path", str(config), "--port", "0"], root / "scale.log")
    server.wait_ready()
    startup = time.perf_counter() - t0
    try:
        mark = len(server.log)
        entries[17] = entry("m017", root / "tiny", nireq=2)
        written = time.time()
        write(config, entries)
        line = server.wait_for(STAMP + r".*Loaded model m017; version: 1", timeout=60, start=mark)
        applied = _when(line.group(1)) - written  # the server's own clock, not this script's polling
        time.sleep(1.5)
        tail = server.log[mark:]
        reloads = [text for text in tail.splitlines() if "Will reload model: " in text]
        touched = {text.split("model: ")[1].split(";")[0] for text in reloads}
    finally:
        server.stop()
    load = compile_seconds(root / "tiny" / "1" / "model.xml")
    return {"models": count, "startup_to_ready_s": startup, "one_edit_applied_s": applied,
            "one_edit_overhead_s": applied - load, "models_reloaded": sorted(touched)}  # fmt: skip


def under_load(root: Path, seconds: float) -> dict[str, object]:
    modelgen.add_const(root / "steady" / "1")
    modelgen.conv(root / "busy" / "1", layers=8)
    config = root / "load.json"
    write(config, [entry("steady", root / "steady"), entry("busy", root / "busy")])
    server = ServerProcess(["--config_path", str(config), "--port", "0"], root / "l.log")
    server.wait_ready()

    def measure(reloading: bool) -> list[float]:
        stop = threading.Event()
        edits = 0

        def editor() -> None:
            nonlocal edits
            while not stop.is_set():
                edits += 1
                write(config, [entry("steady", root / "steady"), entry("busy", root / "busy", nireq=1 + edits % 3)])
                time.sleep(0.3)

        thread = threading.Thread(target=editor) if reloading else None
        if thread:
            thread.start()
        c = client(server.address)
        latencies, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            assert answer(c, "steady") == 1.0
            latencies.append((time.perf_counter() - t0) * 1000)
        stop.set()
        if thread:
            thread.join()
        return latencies

    try:
        quiet = measure(False)
        busy = measure(True)
    finally:
        server.stop()
    return {
        "p50_ms_quiet": float(np.percentile(quiet, 50)), "p99_ms_quiet": float(np.percentile(quiet, 99)),
        "p50_ms_reloading": float(np.percentile(busy, 50)), "p99_ms_reloading": float(np.percentile(busy, 99)),
        "p99_ratio": float(np.percentile(busy, 99) / np.percentile(quiet, 99)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result = {
            "reload_latency": reload_latency(root / "a", args.rounds),
            "scale": scale(root / "b", args.models),
            "under_load": under_load(root / "c", args.seconds),
        }
    for section, values in result.items():
        print(f"[{section}]")
        for key, val in values.items():
            print(f"  {key:28} {val:.3f}" if isinstance(val, float) else f"  {key:28} {val}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reload.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'reload.json'}")


if __name__ == "__main__":
    main()
