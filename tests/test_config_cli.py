"""Single-model mode (`--model_name` + `--model_path`) and the parsing helpers the CLI shares with the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import config as C

M0 = "/model_config_list/0/config"


def write(tmp_path: Path, doc: object, name: str = "models.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def model(name: str = "m", **fields: object) -> dict:
    return {"config": {"name": name, "base_path": name, **fields}}


# ---- single-model mode and the CLI parsing helpers ----
def test_single_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = C.single_model("resnet", "models/../models/resnet")
    (m,) = config.models
    assert m == C.ModelConfig(name="resnet", base_path=tmp_path / "models" / "resnet")
    assert config.path == m.base_path and config.digest == "" and config.loaders == () and config.errors == []


def test_single_model_with_cli_overrides(tmp_path: Path) -> None:
    config = C.single_model(
        "m",
        tmp_path,
        shape=C.parse_shape("(1,3,-1,-1)"),
        batch_size=C.parse_batch_size("4"),
        layout=C.parse_layout("nhwc:nchw"),
        nireq=2,
        target_device="CPU",
        plugin_config=json.loads('{"NUM_STREAMS": 1}'),
        model_version_policy=json.loads('{"latest": {"num_versions": 2}}'),
    )
    (m,) = config.models
    assert m.shape == {None: ("1", "3", "-1", "-1")} and m.batch_size is None and m.layout == {None: "NHWC:NCHW"}
    assert (m.nireq, m.target_device, m.plugin_config) == (2, "CPU", {"NUM_STREAMS": 1})
    assert m.version_policy == C.VersionPolicy("latest", 2)
    assert config.warnings == (
        "model m: Both shape and batch size have been defined. Batch size parameter will be ignored.",
    )
    assert C.single_model("m", tmp_path, batch_size="auto", model_version_policy=C.VersionPolicy("all")).models[0] == (
        C.ModelConfig(name="m", base_path=tmp_path, batch_size="auto", version_policy=C.VersionPolicy("all"))
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model_version_policy": {"latest": {}}}, "invalid model_version_policy"),
        ({"model_version_policy": {"newest": {}}}, "invalid model_version_policy"),
        ({"plugin_config": {"A": [1]}}, "invalid plugin_config"),
        ({"plugin_config": {"cache_dir": "/x"}}, "CACHE_DIR is not allowed"),
        ({"nireq": -1}, "invalid nireq"),
        ({"nireq": 100001}, "invalid nireq"),
        ({"target_device": ""}, "invalid target_device"),
        ({"shape": "(1,2,3.14)"}, "invalid shape"),
        ({"layout": "NC:N"}, "invalid layout"),
        ({"batch_size": "x"}, "invalid batch_size"),
        ({"mean": "[0]"}, "unknown model parameter(s): mean"),
    ],
)
def test_single_model_refuses_bad_overrides(tmp_path: Path, overrides: dict, needle: str) -> None:
    with pytest.raises(ValueError) as raised:
        C.single_model("m", tmp_path, **overrides)
    assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_single_model_refuses_remote_storage() -> None:
    with pytest.raises(ValueError, match="remote storage is not supported"):
        C.single_model("m", "s3://bucket/model")


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (C.parse_shape, "(1,2,3.14)"),
        (C.parse_shape, "(auto,2)"),
        (C.parse_shape, "[1,3]"),
        (C.parse_shape, ""),
        (C.parse_shape, "(1,-5)"),
        (C.parse_shape, "(3:1)"),
        (C.parse_layout, "N-C"),
        (C.parse_layout, "NCHW:NC"),
        (C.parse_batch_size, "many"),
        (C.parse_batch_size, "-3"),
    ],
)
def test_parse_helpers_raise_one_line_value_errors(parse: object, text: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse(text)  # type: ignore[operator]
    message = str(raised.value)
    assert "\n" not in message and f'"{text}"' in message  # one line, quoting what was given
