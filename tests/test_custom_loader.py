"""Custom loaders in a running server (issue 5): OVMS's scenarios (research ovms.md §5.5) with the real C loaders,
the forced cache bypass, and no plaintext on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ROOT
from test_reload import states, wait_until
from tritonclient.utils import InferenceServerException

from engine import encrypt

BUILD = ROOT / "build"
X = np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)


@pytest.fixture(scope="session", autouse=True)
def built() -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "loaders"), f"OUT={BUILD}"], check=True)


def value(client: grpcclient.InferenceServerClient, name: str, version: str = "") -> np.ndarray:
    tensor = grpcclient.InferInput("b", [1, 10], "FP32")
    tensor.set_data_from_numpy(X)
    return client.infer(name, [tensor], model_version=version).as_numpy("a")


def reason(client: grpcclient.InferenceServerClient, name: str) -> str:
    return " | ".join(m.reason for m in client.get_model_repository_index().models if m.name == name)


class Setup:
    """A config folder with the test loader, a plain dummy model (+1) under model1/1, and a call log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "models.json"
        self.calls = root / "calls.log"
        (root / "loader.cfg").write_text(f"CALL_LOG {self.calls}\n")
        modelgen.add_const(root / "model1" / "1", delta=1.0)
        self.loaders = [self.loader("test", BUILD / "libtestloader.so", "loader.cfg")]

    @staticmethod
    def loader(name: str, library: Path | str, config_file: str | None = None) -> dict:
        config = {"loader_name": name, "library_path": str(library)}
        if config_file:
            config["loader_config_file"] = config_file
        return {"config": config}

    @staticmethod
    def model(name: str = "dummy", base: str = "model1", loader: str | None = "test", **options: str) -> dict:
        config: dict = {"name": name, "base_path": base, "nireq": 1}
        if loader is not None:
            config["custom_loader_options"] = {"loader_name": loader, "model_file": "model.xml",
                                               "bin_file": "model.bin", **options}  # fmt: skip
        return {"config": config}

    def write(self, *models: dict, loaders: list[dict] | None = None) -> None:
        doc = {
            "model_config_list": list(models),
            "custom_loader_config_list": self.loaders if loaders is None else loaders,
        }
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.config)

    def call_log(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def start(setup: Setup, serve, *models: dict, args: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    setup.write(*models)
    server = serve(setup.config, *args)
    return server, grpcclient.InferenceServerClient(server.address)


def test_prediction_status_and_metadata_through_the_loader(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    _, client = start(setup, serve, Setup.model())
    np.testing.assert_allclose(value(client, "dummy"), X + 1)
    assert states(client, "dummy") == {1: "READY"}
    meta = client.get_model_metadata("dummy", as_json=True)
    assert meta["inputs"] == [{"name": "b", "datatype": "FP32", "shape": ["1", "10"]}]
    assert "load_model dummy 1" in setup.call_log()


def test_relative_library_path_resolves_against_the_config_folder(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(BUILD / "libtestloader.so", setup.root / "libtestloader.so")
    setup.loaders = [Setup.loader("test", "libtestloader.so", "loader.cfg")]
    _, client = start(setup, serve, Setup.model())
    np.testing.assert_allclose(value(client, "dummy"), X + 1)


def test_remove_model_retires_and_calls_the_loader(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    _, client = start(setup, serve, Setup.model())
    setup.write()
    wait_until(lambda: states(client, "dummy") == {1: "END"}, what="END")
    with pytest.raises(InferenceServerException, match="Model with requested version is not found"):
        value(client, "dummy")
    wait_until(lambda: "unload_model dummy 1" in setup.call_log(), what="unload_model call")
    assert "retire_model dummy -1" in setup.call_log() or any(
        c.startswith("retire_model dummy") for c in setup.call_log()
    )


def test_new_version_and_new_model_through_the_same_loader(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    _, client = start(setup, serve, Setup.model())
    staging = setup.root / "model1" / "stage"
    modelgen.add_const(staging, delta=2.0)
    staging.rename(setup.root / "model1" / "2")
    wait_until(lambda: states(client, "dummy") == {1: "END", 2: "READY"}, what="v2 via loader")
    np.testing.assert_allclose(value(client, "dummy"), X + 2)
    modelgen.add_const(setup.root / "model2" / "1", delta=5.0)
    setup.write(Setup.model(), Setup.model("dummy-new", "model2"))
    wait_until(lambda: client.is_model_ready("dummy-new"), what="second model")
    np.testing.assert_allclose(value(client, "dummy-new"), X + 5)


def test_switching_between_plain_and_loader_rereads_the_model(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    server, client = start(setup, serve, Setup.model(loader=None))
    assert "load_model dummy 1" not in setup.call_log()
    setup.write(Setup.model())
    wait_until(lambda: "load_model dummy 1" in setup.call_log(), what="re-read through the loader (OVMS Q6)")
    np.testing.assert_allclose(value(client, "dummy"), X + 1)
    mark = len(server.log)
    setup.write(Setup.model(loader=None))
    server.wait_for(r"Loaded model dummy; version: 1", start=mark)
    np.testing.assert_allclose(value(client, "dummy"), X + 1)
    assert states(client, "dummy") == {1: "READY"}


def test_unknown_loader_is_a_model_error_and_others_serve(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(setup.root / "plain" / "1", delta=3.0)
    _, client = start(setup, serve, Setup.model(loader="unknown"), Setup.model("plain", "plain", loader=None))
    np.testing.assert_allclose(value(client, "plain"), X + 3)
    with pytest.raises(InferenceServerException, match="Model with requested version is not found"):
        value(client, "dummy")
    assert "Specified custom loader unknown not found" in reason(client, "dummy")


def test_model_without_versions(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    (setup.root / "empty").mkdir()
    _, client = start(setup, serve, Setup.model(base="empty"))
    with pytest.raises(InferenceServerException, match="Model with requested version is not found"):
        value(client, "dummy")


def test_several_loader_names_on_one_library(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    setup.loaders = [Setup.loader(n, BUILD / "libtestloader.so") for n in ("la", "lb", "lc")]
    models = [Setup.model(f"dummy-{n}", "model1", loader=n) for n in ("la", "lb", "lc")]
    _, client = start(setup, serve, *models)
    for n in ("la", "lb", "lc"):
        np.testing.assert_allclose(value(client, f"dummy-{n}"), X + 1)


def test_blacklisting_retires_and_revoking_restores(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    status = setup.root / "model1" / "1" / "dummy.status"
    _, client = start(setup, serve, Setup.model(enable_file="dummy.status"))
    assert states(client, "dummy") == {1: "READY"}
    status.write_text("DISABLED\n")
    wait_until(lambda: states(client, "dummy") == {1: "END"}, what="blacklisted → END")
    status.unlink()
    wait_until(lambda: states(client, "dummy") == {1: "READY"}, what="revoked → AVAILABLE")
    np.testing.assert_allclose(value(client, "dummy"), X + 1)


def test_blacklisted_then_files_missing_then_restored(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    status = setup.root / "model1" / "1" / "dummy.status"
    _, client = start(setup, serve, Setup.model(enable_file="dummy.status"))
    status.write_text("DISABLED\n")
    wait_until(lambda: states(client, "dummy") == {1: "END"})
    weights = setup.root / "model1" / "1" / "model.bin"
    saved = weights.read_bytes()
    weights.unlink()
    status.unlink()
    wait_until(lambda: states(client, "dummy") == {1: "LOADING"}, what="reload fails without the weights")
    assert "File not found or cannot open" in reason(client, "dummy")
    weights.write_bytes(saved)
    wait_until(lambda: states(client, "dummy") == {1: "READY"}, timeout=30, what="restored files load")


def test_blacklisted_at_first_load_fails_clearly(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    (setup.root / "model1" / "1" / "dummy.status").write_text("DISABLED\n")
    _, client = start(setup, serve, Setup.model(enable_file="dummy.status"))
    assert states(client, "dummy") == {1: "LOADING"}
    assert "blacklist" in reason(client, "dummy").lower()
    setup.write(Setup.model())
    wait_until(lambda: states(client, "dummy") == {1: "READY"}, what="enable_file removed from options")


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("load_error", "File not found or cannot open"),
        ("internal_error", "Internal server error"),
        ("null_buffer", "test"),
        ("oversize", "test"),
        ("bad_status", "test"),
    ],
)
def test_loader_failures_become_version_errors(setup: Setup, serve, mode: str, message: str) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(setup.root / "plain" / "1", delta=3.0)
    server, client = start(setup, serve, Setup.model(mode=mode), Setup.model("plain", "plain", loader=None))
    assert states(client, "dummy") == {1: "LOADING"}
    assert message in reason(client, "dummy")
    np.testing.assert_allclose(value(client, "plain"), X + 3)
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    ("library", "why"),
    [
        ("missing.so", "not found|No such file"),
        ("not-a-library.so", "not a shared object|invalid ELF|too short|file too short"),
        (BUILD / "libmissing.so", "missing"),
        (BUILD / "libbadabi.so", "ABI"),
    ],
)
def test_bad_libraries_never_take_the_server_down(setup: Setup, serve, library: object, why: str) -> None:  # type: ignore[no-untyped-def]
    (setup.root / "not-a-library.so").write_text("hello")
    setup.loaders = [Setup.loader("bad", library if isinstance(library, Path) else setup.root / str(library))]
    modelgen.add_const(setup.root / "plain" / "1", delta=3.0)
    _, client = start(setup, serve, Setup.model(loader="bad"), Setup.model("plain", "plain", loader=None))
    np.testing.assert_allclose(value(client, "plain"), X + 3)
    text = reason(client, "dummy")
    assert "bad" in text and str(setup.loaders[0]["config"]["library_path"]) in text
    import re

    assert re.search(why, text, re.I), text


def test_init_failure_is_reported(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    (setup.root / "fail.cfg").write_text("FAIL_INIT\n")
    setup.loaders = [Setup.loader("test", BUILD / "libtestloader.so", "fail.cfg")]
    _, client = start(setup, serve, Setup.model())
    assert "FAIL_INIT" in reason(client, "dummy")


def test_removed_loader_deinits_and_its_models_end(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    _, client = start(setup, serve, Setup.model())
    setup.write(Setup.model(), loaders=[])
    wait_until(lambda: states(client, "dummy") == {1: "END"}, what="END after loader removal")
    wait_until(lambda: any(c.startswith("deinit") for c in setup.call_log()), what="deinit")


def test_changed_loader_config_reinitialises_and_reloads_without_downtime(setup: Setup, serve) -> None:  # type: ignore[no-untyped-def]
    _, client = start(setup, serve, Setup.model())
    calls2 = setup.root / "calls2.log"
    (setup.root / "loader2.cfg").write_text(f"CALL_LOG {calls2}\n")
    setup.loaders = [Setup.loader("test", BUILD / "libtestloader.so", "loader2.cfg")]
    setup.write(Setup.model())
    wait_until(lambda: calls2.exists() and "load_model dummy 1" in calls2.read_text(), what="reload through new loader")
    assert states(client, "dummy") == {1: "READY"}
    np.testing.assert_allclose(value(client, "dummy"), X + 1)


# ---- the sample AES-256-GCM loader, the cache bypass, and no plaintext on disk ----
ADDEND = np.random.default_rng(7).standard_normal((1, 10)).astype(np.float32)  # weights no other test has


@pytest.fixture
def encrypted(tmp_path: Path) -> dict:
    plain = tmp_path / "plain"
    modelgen.add_const(plain / "1", addend=ADDEND)
    key = tmp_path / "keys" / "model.key"
    key.parent.mkdir()
    encrypt.keygen(key)
    encrypt.encrypt_dir(key, plain / "1", tmp_path / "enc" / "1")
    (key.parent / "loader.json").write_text(json.dumps({"key_file": "model.key"}))
    return {"plain": plain, "key": key}


def aes_config(tmp_path: Path, cached_plain: bool = True, **extra: object) -> dict:
    return {
        "custom_loader_config_list": [
            {"config": {"loader_name": "aes", "library_path": str(BUILD / "libaesgcm.so"),
                        "loader_config_file": "keys/loader.json"}}
        ],
        "model_config_list": [
            {"config": {"name": "secret", "base_path": "enc", "custom_loader_options": {
                "loader_name": "aes", "model_file": "model.xml.enc", "bin_file": "model.bin.enc"}, **extra}},
            {"config": {"name": "open", "base_path": "plain"}},
        ],
    }  # fmt: skip


def test_encrypted_model_serves_and_never_touches_the_cache(tmp_path: Path, serve, encrypted: dict) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    config = tmp_path / "models.json"
    config.write_text(json.dumps(aes_config(tmp_path)))
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    server = serve(config, "--cache_dir", str(cache), env={"TMPDIR": str(tmpdir)})
    client = grpcclient.InferenceServerClient(server.address)
    np.testing.assert_allclose(value(client, "secret"), X + ADDEND, rtol=1e-6)
    np.testing.assert_allclose(value(client, "open"), X + ADDEND, rtol=1e-6)
    blobs = [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".blob"]
    assert blobs, "the plain model is cached at the same time"
    assert not (cache / "secret").exists(), "a custom-loader model never creates a cache entry"
    assert "custom loader: never cached" in server.log
    # no plaintext of the decrypted model anywhere on disk: cache, temp dir, model folders
    weights = ADDEND.tobytes()
    scanned = 0
    assert weights in (encrypted["plain"] / "1" / "model.bin").read_bytes()  # the scan can find it where it is
    for folder in (cache, tmp_path / "enc", tmpdir):
        for path in folder.rglob("*"):
            if not path.is_file() or path.is_symlink() or (path.suffix == ".blob" and "open" in path.parts):
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            scanned += 1
            assert weights not in data, path
    assert scanned > 0


def test_allow_cache_with_a_loader_is_a_config_error(tmp_path: Path, encrypted: dict) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps(aes_config(tmp_path, allow_cache=True)))
    from test_kserve import run_cli

    result = run_cli("validate", str(config))
    assert result.returncode == 1
    assert "allow_cache is set to true with custom loader usage" in result.stdout
    assert "/model_config_list/0/config" in result.stdout


def test_wrong_key_and_tampered_file(tmp_path: Path, serve, encrypted: dict) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "models.json"
    config.write_text(json.dumps(aes_config(tmp_path)))
    enc = tmp_path / "enc" / "1" / "model.bin.enc"
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0x01
    enc.write_bytes(bytes(data))
    server = serve(config)
    client = grpcclient.InferenceServerClient(server.address)
    assert "authentication failed" in reason(client, "secret")
    assert encrypted["key"].read_text().strip() not in server.log
