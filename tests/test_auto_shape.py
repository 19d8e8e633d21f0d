"""shape "auto" and batch_size "auto" (OVMS §6): a request of another shape reshapes that version in place (issue 4)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import modelgen
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import model_entry
from test_reload import wait_until
from tritonclient.utils import InferenceServerException


def run(client: grpcclient.InferenceServerClient, model: str, shape: tuple[int, ...]) -> np.ndarray:
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    tensor = grpcclient.InferInput("b", list(shape), "FP32")
    tensor.set_data_from_numpy(x)
    out = client.infer(model, [tensor]).as_numpy("a")
    np.testing.assert_allclose(out, x + 1)
    return out


def write(path: Path, *entries: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_config_list": list(entries)}))
    os.replace(tmp, path)


def test_shape_auto_reshapes_then_config_change_makes_it_strict(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1")
    config = tmp_path / "models.json"
    write(config, model_entry("dummy", tmp_path / "dummy", shape="auto"))
    server = serve(config)
    client = grpcclient.InferenceServerClient(server.address)
    assert run(client, "dummy", (1, 12)).shape == (1, 12)
    assert run(client, "dummy", (1, 5)).shape == (1, 5)
    assert run(client, "dummy", (3, 7)).shape == (3, 7)
    assert "Will reload model: dummy version: 1" in server.log
    assert client.get_model_metadata("dummy", as_json=True)["inputs"][0]["shape"] == ["3", "7"]

    write(config, model_entry("dummy", tmp_path / "dummy", shape="(1,11)"))
    wait_until(lambda: client.get_model_metadata("dummy", as_json=True)["inputs"][0]["shape"] == ["1", "11"])
    with pytest.raises(InferenceServerException, match=r"Invalid input shape - Expected: \(1,11\); Actual: \(1,12\)"):
        run(client, "dummy", (1, 12))
    run(client, "dummy", (1, 11))

    write(config, model_entry("dummy", tmp_path / "dummy", shape="auto"))
    wait_until(lambda: client.get_model_metadata("dummy", as_json=True)["inputs"][0]["shape"] == ["1", "10"])
    run(client, "dummy", (1, 12))


def test_batch_auto_then_fixed_then_auto(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1")
    config = tmp_path / "models.json"
    write(config, model_entry("dummy", tmp_path / "dummy", batch_size="auto"))
    server = serve(config)
    client = grpcclient.InferenceServerClient(server.address)
    assert run(client, "dummy", (3, 10)).shape == (3, 10)
    assert run(client, "dummy", (4, 10)).shape == (4, 10)
    with pytest.raises(InferenceServerException, match="Invalid input shape"):
        run(client, "dummy", (4, 11))  # auto batch does not reshape other dims
    mark = len(server.log)
    write(config, model_entry("dummy", tmp_path / "dummy", batch_size=4))
    server.wait_for(r"Will reload model: dummy; version: 1 \.\.\.", start=mark)
    server.wait_for(r"Loaded model dummy; version: 1; batch size: 4", start=mark)
    with pytest.raises(InferenceServerException, match="Invalid input batch size - Expected: 4; Actual: 3"):
        run(client, "dummy", (3, 10))
    run(client, "dummy", (4, 10))


def test_concurrent_requests_of_several_shapes_all_succeed(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.add_const(tmp_path / "dummy" / "1")
    server = serve({"model_config_list": [model_entry("dummy", tmp_path / "dummy", shape="auto")]})
    failures: list[BaseException] = []

    def worker(shape: tuple[int, ...]) -> None:
        client = grpcclient.InferenceServerClient(server.address)
        for _ in range(15):
            try:
                run(client, "dummy", shape)
            except BaseException as exc:  # asserted below
                failures.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in [(1, 10), (1, 10), (2, 10), (1, 20)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]


def test_failed_reshape_keeps_previous_shape(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    modelgen.conv(tmp_path / "conv" / "1", layers=2)
    server = serve({"model_config_list": [model_entry("conv", tmp_path / "conv", shape="auto")]})
    client = grpcclient.InferenceServerClient(server.address)
    x = np.ones((1, 5, 224, 224), np.float32)  # 5 channels cannot feed a 3-channel convolution
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("conv", [tensor])
    assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "Model could not be reshaped with requested shape" in caught.value.message()
    assert client.get_model_metadata("conv", as_json=True)["inputs"][0]["shape"] == ["1", "3", "224", "224"]
    good = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
    good.set_data_from_numpy(np.ones((1, 3, 224, 224), np.float32))
    assert client.infer("conv", [good]).as_numpy("output").shape == (1, 64)
