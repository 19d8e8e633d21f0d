"""models.json: OVMS's schema test cases (research ovms.md §1.5, §11 items 1–8, §5.5 items 1–7), the semantic
checks beyond the schema, error messages, and the version policy table (§2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import config as C
from engine import versions


def write(tmp_path: Path, doc: object, raw: str | None = None) -> Path:
    path = tmp_path / "models.json"
    path.write_text(raw if raw is not None else json.dumps(doc))
    return path


def model(**fields: object) -> dict:
    return {"config": {"name": "m", "base_path": "m", **fields}}


def errors(tmp_path: Path, doc: object = None, raw: str | None = None) -> list[C.ConfigError]:
    return C.validate_file(write(tmp_path, doc, raw))


# ---- OVMS schema_test.cpp and custom_loader_test.cpp cases ----
VALID = [
    {"model_config_list": []},
    {"model_config_list": [{"config": {"name": "m"}}]},  # base_path is optional
    {"model_config_list": [model(model_version_policy={"all": {}})]},
    {"model_config_list": [model(model_version_policy={"latest": {"num_versions": 2}})]},
    {"model_config_list": [model(model_version_policy={"specific": {"versions": [1, 2]}})]},
    {"model_config_list": [model(plugin_config={"A": "B", "C": 2, "D": 2.5, "E": True, "F": False})]},
    {"model_config_list": [model(shape={"in1": "(1,3,-1,-1)", "in2": "auto"}, layout={"in1": "NHWC:NCHW"})]},
    {
        "model_config_list": [model(custom_loader_options={"loader_name": "l"})],
        "custom_loader_config_list": [
            {"config": {"loader_name": "l", "library_path": "l.so", "loader_config_file": "c"}}
        ],
    },
    {
        "model_config_list": [],
        "custom_loader_config_list": [{"config": {"loader_name": "l", "library_path": "l.so"}}],  # no config file
    },
    {
        "model_config_list": [
            model(
                custom_loader_options={"loader_name": "l", "a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"}
            )
        ]
    },
    {"model_config_list": [], "monitoring": {"metrics": {"enable": True, "metrics_list": ["x"]}}},
]

INVALID = [
    ({}, ""),
    ({"model_config_list": [{"config": {"base_path": "m"}}]}, "/model_config_list/0/config"),
    ({"model_config_list": [model(nireq=-1)]}, "/model_config_list/0/config/nireq"),
    (
        {"model_config_list": [model(model_version_policy={"all": 3})]},
        "/model_config_list/0/config/model_version_policy",
    ),
    ({"model_config_list": [model(model_version_policy={"all": {"a": 3}})]}, "model_version_policy"),
    ({"model_config_list": [model(model_version_policy={"latest": {"num_versions": [2]}})]}, "num_versions"),
    ({"model_config_list": [model(model_version_policy={"specific": {"versions": 3}})]}, "versions"),
    ({"model_config_list": [model(model_version_policy={"specific": {"versions": [1, "2"]}})]}, "versions/1"),
    ({"model_config_list": [model(plugin_config={"A": [1]})]}, "/model_config_list/0/config/plugin_config/A"),
    ({"model_config_list": [model(plugin_config={"A": {"x": 1}})]}, "plugin_config/A"),
    ({"model_config_list": [model(shape={"in": {}})]}, "shape"),
    ({"model_config_list": [model(shape={"in": [1, 3]})]}, "shape"),
    ({"model_config_list": [model(shape=[1, 3])]}, "shape"),
    ({"model_config_list": [model(layout={"in": ["N"]})]}, "layout"),
    ({"model_config_list": [model(stateful=True)]}, "/model_config_list/0/config"),
    ({"model_config_list": [model(max_sequence_number=3)]}, "/model_config_list/0/config"),
    ({"model_config_list": [model(sequence_timeout_seconds=3)]}, "/model_config_list/0/config"),
    ({"model_config_list": [], "custom_loader_config_list": [{"config": {"library_path": "l.so"}}]}, "loader"),
    ({"model_config_list": [], "custom_loader_config_list": [{"config": {"loader_name": "l"}}]}, "loader"),
    ({"model_config_list": [model(custom_loader_options_invalid={"loader_name": "l"})]}, "/model_config_list/0/config"),
    ({"model_config_list": [model(custom_loader_options={"a": "SS"})]}, "custom_loader_options"),
    ({"model_config_list": [], "unknown": 1}, "/"),
]


@pytest.mark.parametrize("doc", VALID)
def test_valid_documents(tmp_path: Path, doc: dict) -> None:
    assert errors(tmp_path, doc) == []


@pytest.mark.parametrize(("doc", "where"), INVALID)
def test_invalid_documents_name_the_place(tmp_path: Path, doc: dict, where: str) -> None:
    found = errors(tmp_path, doc)
    assert found, "expected an error"
    text = "\n".join(str(e) for e in found)
    assert str(tmp_path / "models.json") in text
    assert where in text or where in {"", "loader"}, text
    with pytest.raises(C.ConfigInvalid):
        C.load(tmp_path / "models.json")


@pytest.mark.parametrize(
    "raw",
    [
        '{"model_config_list": [{"config": {"name": "a"}, "config": {"name": "b"}}]}',
        '{"model_config_list": [{"config": {"name": "a", "model_version_policy": {"all": {}, "all": {}}}}]}',
        '{"model_config_list": [], "monitoring": {"metrics": {"enable": true}, "metrics": {"enable": false}}}',
    ],
)
def test_duplicated_keys_are_invalid(tmp_path: Path, raw: str) -> None:
    found = errors(tmp_path, raw=raw)
    assert any("duplicate key" in e.message for e in found), found


def test_not_json_names_line_and_column(tmp_path: Path) -> None:
    (error,) = errors(tmp_path, raw='{"model_config_list": [\n  {"config": }\n]}')
    assert "not valid JSON" in error.message and "line 2" in error.message


def test_every_error_is_reported_at_once_with_the_model_name(tmp_path: Path) -> None:
    doc = {
        "model_config_list": [model(nireq=-1), {"config": {"name": "x", "target_device": 3}}, model(allow_cache="y")]
    }
    found = errors(tmp_path, doc)
    assert len(found) == 3
    assert {e.pointer for e in found} == {
        "/model_config_list/0/config/nireq",
        "/model_config_list/1/config/target_device",
        "/model_config_list/2/config/allow_cache",
    }
    assert found[0].model == "m" and "(model 'm')" in str(found[0])


# ---- semantic checks beyond the schema ----
@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"shape": "(1,2,3.14)"}, "invalid shape"),
        ({"shape": "(auto,2)"}, "invalid shape"),
        ({"shape": "[1,3]"}, "invalid shape"),
        ({"shape": "(1,5:2)"}, "minimum above its maximum"),
        ({"layout": "NHWC:NCH"}, "same number of dimensions"),
        ({"layout": "N C"}, "invalid layout"),
        ({"batch_size": "big"}, "invalid batch_size"),
        ({"base_path": "../outside"}, "escape with .. is forbidden"),
        ({"base_path": "s3://bucket/m"}, "remote storage is not supported"),
        ({"plugin_config": {"cache_dir": "/tmp/x"}}, "CACHE_DIR is not allowed"),
        (
            {"allow_cache": True, "custom_loader_options": {"loader_name": "l"}},
            "allow_cache is set to true with custom loader usage",
        ),
    ],
)
def test_semantic_errors_leave_that_model_out(tmp_path: Path, fields: dict, needle: str) -> None:
    doc = {"model_config_list": [model(**fields), {"config": {"name": "ok", "base_path": "ok"}}]}
    config = C.load(write(tmp_path, doc))
    assert [m.name for m in config.models] == ["ok"]
    (error,) = config.model_errors["m"]
    assert needle in error.message and error.pointer.startswith("/model_config_list/0/config")
    assert errors(tmp_path, doc)  # `hotserve validate` fails on them


def test_duplicate_names_and_loader_names(tmp_path: Path) -> None:
    doc = {
        "model_config_list": [model(), model(), {"config": {"name": "other"}}],
        "custom_loader_config_list": [{"config": {"loader_name": "l", "library_path": "a.so"}}] * 2,
    }
    config = C.load(write(tmp_path, doc))
    assert "Duplicated model names: m" in config.model_errors["m"][0].message
    assert [m.name for m in config.models] == ["other"]
    assert [loader.name for loader in config.loaders] == ["l"] and config.loader_errors["l"]


def test_normalisation(tmp_path: Path) -> None:
    doc = {
        "model_config_list": [
            {"config": {"name": "a"}},
            model(shape="(1,3,224,224)", batch_size=4, layout="nhwc:nchw", nireq=2, plugin_config={"NUM_STREAMS": 2}),
            {"config": {"name": "abs", "base_path": "/models/abs", "batch_size": "1:8"}},
        ],
        "custom_loader_config_list": [
            {"config": {"loader_name": "l", "library_path": "lib/l.so", "loader_config_file": "k.json"}}
        ],
        "pipeline_config_list": [],
    }
    config = C.load(write(tmp_path, doc))
    a, m, absolute = config.models
    assert a.base_path == tmp_path and a.version_policy == C.VersionPolicy() and a.target_device == "CPU"
    assert m.base_path == tmp_path / "m"
    assert m.shape == {None: ("1", "3", "224", "224")} and m.batch_size is None  # shape wins, with a warning
    assert m.layout == {None: "NHWC:NCHW"}
    assert absolute.base_path == Path("/models/abs") and absolute.batch_size == "1:8"
    assert config.loaders[0].library_path == tmp_path / "lib" / "l.so"
    assert config.loaders[0].config_file == tmp_path / "k.json"
    assert any("Batch size parameter will be ignored" in w for w in config.warnings)
    assert any("pipeline_config_list is not supported" in w for w in config.warnings)
    assert C.summary(config).endswith("3 model(s), 1 custom loader(s), 2 warning(s)")


def test_needs_reload_covers_every_compiled_field_but_not_the_policy(tmp_path: Path) -> None:
    base = C.ModelConfig(name="m", base_path=tmp_path)
    same = C.ModelConfig(name="m", base_path=tmp_path, version_policy=C.VersionPolicy("all"))
    assert not base.needs_reload(same)
    for change in [
        {"base_path": tmp_path / "x"}, {"target_device": "GPU"}, {"shape": {None: "auto"}}, {"batch_size": 3},
        {"layout": {None: "NC"}}, {"nireq": 2}, {"plugin_config": {"A": "B"}}, {"allow_cache": True},
        {"custom_loader_options": {"loader_name": "l"}},
    ]:  # fmt: skip
        assert base.needs_reload(C.ModelConfig(**{"name": "m", "base_path": tmp_path, **change}))


# ---- version policy (research §2 table) ----
AVAILABLE = [3, 4, 5, 18, 25, 100]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (C.VersionPolicy(), (100,)),
        (C.VersionPolicy("latest", 1), (100,)),
        (C.VersionPolicy("latest", 2), (25, 100)),
        (C.VersionPolicy("latest", 6), tuple(AVAILABLE)),
        (C.VersionPolicy("latest", 10), tuple(AVAILABLE)),
        (C.VersionPolicy("all"), tuple(AVAILABLE)),
        (C.VersionPolicy("specific", versions=(4, 25)), (4, 25)),
        (C.VersionPolicy("specific", versions=(1, 8, 28)), ()),
        (C.VersionPolicy("specific", versions=(4, 5, 6, 7)), (4, 5)),
    ],
)
def test_version_policy_table(policy: C.VersionPolicy, expected: tuple[int, ...]) -> None:
    assert policy.select(AVAILABLE) == expected


def test_version_folders(tmp_path: Path) -> None:
    for name in ("1", "foo", "0", ".hidden", "12", "1abc"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a folder")
    scan = versions.scan(tmp_path)
    assert scan.exists and sorted(scan.versions) == [1, 12]
    assert "Expected version directory name to be in number format. Got: foo" in scan.warnings
    assert "Expected version directory name to be in number format. Got: 1abc" in scan.warnings
    assert "Expected version directory name to be a number greater than 0. Got: 0" in scan.warnings
    assert not versions.scan(tmp_path / "missing").exists


def test_model_files(tmp_path: Path) -> None:
    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "net.xml").write_text("<net/>")
    with pytest.raises(versions.ModelFilesError, match=r"no weights file net\.bin"):
        versions.model_files(tmp_path / "ir")
    (tmp_path / "ir" / "net.bin").write_bytes(b"")
    assert versions.model_files(tmp_path / "ir").kind == "IR"
    (tmp_path / "ir" / "other.onnx").write_bytes(b"")
    with pytest.raises(versions.ModelFilesError, match="Several model files"):
        versions.model_files(tmp_path / "ir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(versions.ModelFilesError, match="No model file"):
        versions.model_files(tmp_path / "empty")
