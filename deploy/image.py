"""`make image` and `make image-test`: build hotserve's image with podman or docker, then run it and check it.

build: wheels on the host (dependencies included, so the image installs offline), then the Containerfile. The base
  is BASE (default python:3.11-slim-bookworm); when it is neither present nor pullable, a base is built from Debian
  packages with debootstrap (root) and imported as localhost/hotserve-base:bookworm.
test: the image on the host network against the default config (its samples, with the demo key mounted as a Secret
  would be), read-only root FS, a cache folder mounted at /opt/cache; tritonclient checks that both sample models
  answer, the log must say `Model cache is enabled: /opt/cache`, the image must hold no compiler and no key, and
  SIGTERM must drain and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
IMAGE = os.environ.get("IMAGE", "localhost/hotserve:latest")
BASE = os.environ.get("BASE", "python:3.11-slim-bookworm")
LOCAL_BASE = "localhost/hotserve-base:bookworm"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
COMPAT_CONF = ROOT / "deploy" / "podman-cgroupv1.conf"


def engine() -> list[str]:
    """podman or docker, whichever runs; podman on a cgroup v1/hybrid host gets runc and cgroupfs (crun refuses)."""
    chosen = os.environ.get("ENGINE")
    if chosen is None:
        if shutil.which("podman"):
            chosen = "podman"
        elif shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
            chosen = "docker"
        else:
            raise SystemExit("make image needs podman or docker (Debian: apt-get install podman runc)")
    command = [chosen]
    if Path(chosen).name == "podman" and not _cgroup2() and shutil.which("runc"):
        os.environ.setdefault("CONTAINERS_CONF", str(COMPAT_CONF))
        command += ["--runtime", shutil.which("runc") or "runc"]
    return command


def _cgroup2() -> bool:
    return Path("/sys/fs/cgroup/cgroup.controllers").exists()  # the unified hierarchy is mounted at the top


def run(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(args), flush=True)
    return subprocess.run(args, check=check, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def have_image(cli: list[str], name: str) -> bool:
    return subprocess.run([*cli, "image", "inspect", name], capture_output=True).returncode == 0


def base_image(cli: list[str]) -> str:
    if have_image(cli, BASE):
        return BASE
    try:
        if run(*cli, "pull", BASE, check=False, timeout=120).returncode == 0:
            return BASE
    except subprocess.TimeoutExpired:
        pass
    if have_image(cli, LOCAL_BASE):
        print(f"{BASE} is not reachable: using {LOCAL_BASE} (built earlier from Debian packages)")
        return LOCAL_BASE
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        raise SystemExit(f"{BASE} is not reachable; building a base needs root and debootstrap (apt-get install it)")
    print(f"{BASE} is not reachable: building {LOCAL_BASE} from Debian packages (debootstrap)")
    with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
        rootfs = Path(tmp) / "rootfs"
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,libssl3", "bookworm", str(rootfs),
            DEBIAN_MIRROR)  # fmt: skip
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(*cli, "import", "-", LOCAL_BASE, stdin=tar.stdout)
        if tar.wait() != 0:
            raise SystemExit("tar of the debootstrap root failed")
    return LOCAL_BASE


BASE_PYTHON = (3, 11)  # the Python of the default base image (python:3.11-slim-bookworm, or Debian bookworm's)


def build() -> None:
    cli = engine()
    wheels = BUILD / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    started = time.monotonic()
    wheels.mkdir(parents=True)
    if sys.version_info[:2] == BASE_PYTHON:  # wheels built here only fit a base image with the same Python
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT))
    else:  # the Containerfile's first stage installs from the package index instead
        print(f"host Python {sys.version_info[0]}.{sys.version_info[1]} is not the image's "
              f"{BASE_PYTHON[0]}.{BASE_PYTHON[1]}: the image installs from the package index")  # fmt: skip
    base = base_image(cli)
    run(*cli, "build", "--network", "host", "--build-arg", f"BASE={base}", "-t", IMAGE, "-f",
        str(ROOT / "Containerfile"), str(ROOT))  # fmt: skip
    print(f"built {IMAGE} on {base} in {time.monotonic() - started:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test() -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    cli = engine()
    if not have_image(cli, IMAGE):
        raise SystemExit(f"no image {IMAGE}: run `make image` first")
    started = time.monotonic()
    inside = run(*cli, "run", "--rm", "--network", "host", "--entrypoint", "sh", IMAGE, "-c",
                 "id -u; command -v gcc cc c99 tcc clang || true; find / -xdev -name '*.key' 2>/dev/null || true",
                 capture_output=True)  # fmt: skip
    lines = inside.stdout.split()
    assert lines[0] == "5000", f"runs as uid {lines[0]}, not 5000"
    assert lines[1:] == [], f"compiler or key in the final image: {lines[1:]}"
    grpc_port, rest_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        if os.geteuid() == 0:
            os.chown(cache, 5000, 5000)  # a bind mount keeps the host's owner: the image's uid must own it
        else:
            cache.chmod(0o777)
        name = f"hotserve-image-test-{os.getpid()}"
        run(*cli, "run", "-d", "--name", name, "--network", "host", "--read-only",
            "-v", f"{cache}:/opt/cache",
            "-v", f"{ROOT / 'configs/keys/demo.key'}:/opt/hotserve/samples/keys/demo.key:ro",
            IMAGE, "--config_path", "/opt/hotserve/samples/models.json", "--grpc_bind_address", "127.0.0.1",
            "--port", str(grpc_port), "--rest_port", str(rest_port), "--drain_seconds", "1")  # fmt: skip
        try:
            log = _wait_for_log(cli, name, "Server ready", 120)
            assert "Model cache is enabled: /opt/cache" in log, log
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            x = grpcclient.InferInput("b", [1, 10], "FP32")
            x.set_data_from_numpy(np.zeros((1, 10), np.float32))
            for model, expected in (("dummy", 1.0), ("dummy-encrypted", 2.0)):
                got = client.infer(model, [x]).as_numpy("a")
                assert got.tolist() == [[expected] * 10], (model, got)
                print(f"{model} answers {got[0][0]}")
            # past 16 KiB (here by JSON whitespace): spooled into a memfd, parsed by the decoder via /proc/<pid>/fd
            body = json.dumps({"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 10], "data": [0] * 10}]})
            request = urllib.request.Request(f"http://127.0.0.1:{rest_port}/v2/models/dummy/infer", method="POST",
                                             data=(body + " " * 20_000).encode())  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert json.loads(answer.read())["outputs"][0]["data"] == [1.0] * 10
            print("a 20 KB REST body is answered through the decoder process")
            stopped = run(*cli, "stop", "-t", "40", name, capture_output=True)
            assert stopped.returncode == 0
            code = run(*cli, "inspect", "--format", "{{.State.ExitCode}}", name, capture_output=True).stdout.strip()
            logs = run(*cli, "logs", name, capture_output=True)
            log = logs.stdout + logs.stderr  # the server logs to stderr
            assert code == "0", f"exit code {code}:\n{log}"
            assert "Shutdown complete" in log, log
            assert any(cache.iterdir()), "nothing was written to the mounted cache"
            print("".join(f"  | {line}\n" for line in log.splitlines()[-8:]), end="")
        finally:
            run(*cli, "rm", "-f", name, check=False, capture_output=True)
    print(f"image test passed in {time.monotonic() - started:.0f} s")


def _wait_for_log(cli: list[str], name: str, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([*cli, "logs", name], capture_output=True, text=True)
        log = done.stdout + done.stderr
        if needle in log:
            return log
        inspect = [*cli, "inspect", "--format", "{{.State.Running}}", name]
        state = subprocess.run(inspect, capture_output=True, text=True)
        if state.stdout.strip() == "false" or time.monotonic() > deadline:
            raise AssertionError(f"no {needle!r} in the container's log:\n{log}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "test"])
    {"build": build, "test": test}[parser.parse_args().command]()


if __name__ == "__main__":
    main()
