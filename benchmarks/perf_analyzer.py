"""perf_analyzer (the C++ load generator in tritonclient's wheel): its set-up, a run, and its CSV as numbers.

It links libb64 (Debian's libb64-0d) and libcudart.so.12 (the `bench` extra) even on CPU; `ensure()` installs
what is missing, so `make bench` needs nothing done by hand.
"""

from __future__ import annotations

import csv
import ctypes.util
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY = Path(sys.executable).parent / "perf_analyzer"


def _cudart() -> Path | None:
    try:
        import nvidia.cuda_runtime  # type: ignore[import-not-found]
    except ImportError:
        return None
    folder = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
    return folder if any(folder.glob("libcudart.so.12*")) else None


def ensure() -> dict[str, str]:
    """Install perf_analyzer's libraries if missing; the environment to run it with."""
    if ctypes.util.find_library("b64") is None and not Path("/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists():
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "libb64-0d"], check=True)
    if _cudart() is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test,bench]"], check=True)
    lib = _cudart()
    assert lib is not None, "nvidia-cuda-runtime-cu12 installed but libcudart.so.12 not found"
    return {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def run(
    env: dict[str, str],
    address: str,
    model: str,
    concurrency: int,
    shape: str,
    seconds: float = 4.0,
    streaming: bool = False,
    input_data: Path | None = None,
) -> dict[str, float]:
    """One closed-loop measurement at `concurrency`: throughput (infer/s), p50/p99 latency (ms); windows of at least
    3 s (a slow model under a busy machine may not answer in a shorter one)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        args = [
            str(BINARY), "-m", model, "-u", address, "-i", "grpc", "--concurrency-range", str(concurrency),
            "--measurement-interval", str(int(max(seconds, 3.0) * 1000)), "--shape", shape, "-f", str(report),
            "--stability-percentage", "999", "--max-trials", "10",  # stable on the mean; a busy box never is on p99
        ]  # fmt: skip
        if streaming:
            args.append("--streaming")
        if input_data is not None:
            args += ["--input-data", str(input_data)]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not report.exists():
            output = f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{output}")
        (row,) = list(csv.DictReader(io.StringIO(report.read_text())))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
    }
