"""Load-time benchmarks: the compiled-model cache, the engine's own overhead, and decryption through the loader.

Per model (conv IR, the same conv as ONNX, a ~100 MB MLP as ONNX): load time with no cache, the first load with the
cache, and a warm cache — the median over fresh server processes, read from the server's own log timestamps
("Loading model" → "Loaded model"), next to OpenVINO's bare compile_model in a fresh process (the engine overhead).
Then start-to-ready for 20 models without vs with a warm cache, and a ~100 MB encrypted model vs its plaintext.

Prints a table and writes benchmarks/results/load.json.   .venv/bin/python benchmarks/load.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import modelgen  # noqa: E402
from harness import ServerProcess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]"

BARE = """
import sys, time, openvino as ov
path, cache = sys.argv[1], sys.argv[2]
config = {"PERFORMANCE_HINT": "LATENCY", **({"CACHE_DIR": cache} if cache else {})}
core = ov.Core()
t0 = time.perf_counter()
core.compile_model(path, "CPU", config)
print(time.perf_counter() - t0)
"""


def _when(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def served_load(root: Path, name: str, base: Path, cache: Path | None, extra: dict | None = None,
                loaders: list | None = None) -> float:  # fmt: skip
    """Seconds between the server's 'Loading model' and 'Loaded model' lines for one model, in a fresh process."""
    config = root / f"{name}.json"
    doc: dict = {"model_config_list": [{"config": {"name": name, "base_path": str(base), **(extra or {})}}]}
    if loaders:
        doc["custom_loader_config_list"] = loaders
    config.write_text(json.dumps(doc))
    args = ["--config_path", str(config), "--port", "0"] + (["--cache_dir", str(cache)] if cache else [])
    server = ServerProcess(args, root / f"{name}.log")
    try:
        server.wait_ready()
        log = server.log
    finally:
        server.stop()
    start = re.search(STAMP + r".*Loading model: " + re.escape(name), log)
    end = re.search(STAMP + r".*Loaded model " + re.escape(name), log)
    if not (start and end):
        raise RuntimeError(f"{name} did not load:\n{log[-2000:]}")
    return _when(end.group(1)) - _when(start.group(1))


def bare_compile(path: Path, cache: Path | None) -> float:
    out = subprocess.run([sys.executable, "-c", BARE, str(path), str(cache or "")], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return float(out.stdout.strip())


def median_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(fn() for _ in range(repeat))


def model_rows(root: Path, repeat: int) -> list[dict[str, object]]:
    conv_xml = modelgen.conv(root / "conv_ir" / "1")
    conv_onnx = modelgen.onnx_conv(root / "conv_onnx" / "1")
    mlp_onnx = modelgen.onnx_mlp(root / "mlp_onnx" / "1")
    rows = []
    for name, base, path in [("conv_ir", root / "conv_ir", conv_xml), ("conv_onnx", root / "conv_onnx", conv_onnx),
                             ("mlp_onnx", root / "mlp_onnx", mlp_onnx)]:  # fmt: skip
        cache = root / f"cache-{name}"
        no_cache = median_of(lambda: served_load(root, name, base, None), repeat)  # noqa: B023
        firsts = []
        for _ in range(repeat):
            shutil.rmtree(cache, ignore_errors=True)
            firsts.append(served_load(root, name, base, cache))
        warm = median_of(lambda: served_load(root, name, base, cache), repeat)  # noqa: B023
        bare_cache = root / f"bare-{name}"
        bare_compile(path, bare_cache)
        bare_nocache = median_of(lambda: bare_compile(path, None), repeat)  # noqa: B023
        bare_warm = median_of(lambda: bare_compile(path, bare_cache), repeat)  # noqa: B023
        rows.append({
            "model": name, "no_cache_s": no_cache, "first_with_cache_s": statistics.median(firsts),
            "warm_cache_s": warm,
            "warm_over_no_cache": warm / no_cache, "bare_no_cache_s": bare_nocache, "bare_warm_s": bare_warm,
            "engine_overhead_no_cache": no_cache / bare_nocache - 1, "engine_overhead_warm": warm / bare_warm - 1,
        })  # fmt: skip
    return rows


def startup_rows(root: Path, repeat: int, count: int = 20) -> dict[str, float]:
    bases = [root / "many" / f"m{i}" for i in range(count)]
    for i, base in enumerate(bases):
        modelgen.conv(base / "1", layers=8, seed=i)
    config = root / "many.json"
    config.write_text(json.dumps({"model_config_list": [{"config": {"name": f"m{i}", "base_path": str(b)}}
                                                        for i, b in enumerate(bases)]}))  # fmt: skip
    cache = root / "many-cache"

    def ready(with_cache: bool) -> tuple[float, float]:
        """(process start → ready, first 'Loading model' → 'Server ready' on the server's clock)."""
        args = ["--config_path", str(config), "--port", "0"] + (["--cache_dir", str(cache)] if with_cache else [])
        t0 = time.perf_counter()
        server = ServerProcess(args, root / "many.log")
        server.wait_ready()
        elapsed = time.perf_counter() - t0
        server.stop()
        first = re.search(STAMP + r".*Loading model: ", server.log)
        done = re.search(STAMP + r".*Server ready", server.log)
        assert first and done
        return elapsed, _when(done.group(1)) - _when(first.group(1))

    cold = [ready(False) for _ in range(repeat)]
    ready(True)
    warm = [ready(True) for _ in range(repeat)]
    no_cache, warm_s = statistics.median(c[0] for c in cold), statistics.median(w[0] for w in warm)
    load_cold, load_warm = statistics.median(c[1] for c in cold), statistics.median(w[1] for w in warm)
    return {"models": count, "no_cache_s": no_cache, "warm_cache_s": warm_s, "warm_over_no_cache": warm_s / no_cache,
            "loading_no_cache_s": load_cold, "loading_warm_s": load_warm,
            "loading_warm_over_no_cache": load_warm / load_cold}  # fmt: skip


def encrypted_rows(root: Path, repeat: int) -> dict[str, float]:
    from engine import encrypt

    plain = root / "mlp_plain"
    modelgen.mlp(plain / "1")
    key = root / "key.hex"
    encrypt.keygen(key)
    encrypt.encrypt_dir(key, plain / "1", root / "mlp_enc" / "1")
    loader_json = root / "loader.json"
    loader_json.write_text(json.dumps({"key_file": str(key)}))
    loaders = [{"config": {"loader_name": "aes", "library_path": str(ROOT / "build" / "libaesgcm.so"),
                           "loader_config_file": str(loader_json)}}]  # fmt: skip
    options = {"loader_name": "aes", "model_file": "model.xml.enc", "bin_file": "model.bin.enc"}
    plain_s = median_of(lambda: served_load(root, "mlp_plain", plain, None), repeat)
    enc_s = median_of(
        lambda: served_load(root, "mlp_enc", root / "mlp_enc", None, {"custom_loader_options": options}, loaders),
        repeat,
    )
    return {"plaintext_s": plain_s, "encrypted_s": enc_s, "encrypted_over_plaintext": enc_s / plain_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result = {"models": model_rows(root, args.repeat), "startup_20": startup_rows(root, args.repeat),
                  "encrypted": encrypted_rows(root, args.repeat)}  # fmt: skip
    print(f"{'model':10} {'no cache':>9} {'first':>9} {'warm':>9} {'warm/no':>8} {'OV bare':>9} {'OV warm':>9} "
          f"{'ovh cold':>9} {'ovh warm':>9}")  # fmt: skip
    for r in result["models"]:
        print(
            f"{r['model']:10} {r['no_cache_s']:>8.3f}s {r['first_with_cache_s']:>8.3f}s {r['warm_cache_s']:>8.3f}s "
            f"{r['warm_over_no_cache']:>8.2f} {r['bare_no_cache_s']:>8.3f}s {r['bare_warm_s']:>8.3f}s "
            f"{r['engine_overhead_no_cache']:>+8.0%} {r['engine_overhead_warm']:>+8.0%}"
        )
    s = result["startup_20"]
    print(
        f"start-to-ready, {s['models']} models: no cache {s['no_cache_s']:.2f}s, warm {s['warm_cache_s']:.2f}s, "
        f"ratio {s['warm_over_no_cache']:.2f}; loading phase {s['loading_no_cache_s']:.3f}s -> "
        f"{s['loading_warm_s']:.3f}s, ratio {s['loading_warm_over_no_cache']:.2f}"
    )
    e = result["encrypted"]
    print(
        f"100 MB MLP: plaintext {e['plaintext_s']:.3f}s, encrypted {e['encrypted_s']:.3f}s, "
        f"ratio {e['encrypted_over_plaintext']:.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'load.json'}")


if __name__ == "__main__":
    main()
