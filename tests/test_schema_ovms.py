"""OVMS's config schema cases, ported: src/test/schema_test.cpp (research ovms.md §1.5), the "Schema & parsing"
acceptance scenarios (§11 items 1–8) and custom_loader_test.cpp (§5.5 items 1–7). Each invalid file must be refused
as a whole (ConfigInvalid: nothing applied), with an error that names the file, the JSON pointer and the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import config as C

LOADER = {"config": {"loader_name": "l", "library_path": "libl.so", "loader_config_file": "l.json"}}


def model(**fields: object) -> dict:
    return {"config": {"name": "m", "base_path": "m", **fields}}


def doc(*models: dict, **top: object) -> dict:
    return {"model_config_list": list(models), **top}


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "models.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# (case id, document)
# fmt: off
VALID = [
    ("empty model list", doc()),
    ("no base_path", {"model_config_list": [{"config": {"name": "m"}}]}),
    ("policy all", doc(model(model_version_policy={"all": {}}))),
    ("policy latest", doc(model(model_version_policy={"latest": {"num_versions": 2}}))),
    ("policy specific", doc(model(model_version_policy={"specific": {"versions": [1, 2]}}))),
    ("plugin_config scalars", doc(model(plugin_config={"A": "B", "C": 2, "D": 2.5, "E": True, "F": False}))),
    ("shape string", doc(model(shape="(1,3,224,224)"))),
    ("shape object", doc(model(shape={"in1": "(1,3,-1,-1)", "in2": "auto"}))),
    ("layout string and object", doc(model(layout="NHWC:NCHW"), {"config": {"name": "n", "layout": {"a": "NC"}}})),
    ("batch int and strings", doc(model(batch_size=4), *({"config": {"name": f"b{v}", "batch_size": v}}
                                                           for v in ("auto", "8", "-1", "1:8")))),
    ("nireq bounds", doc(model(nireq=0), {"config": {"name": "n", "nireq": 100000}})),
    ("every model field", doc(model(batch_size=1, model_version_policy={"all": {}}, nireq=2, target_device="CPU",
                                    plugin_config={"NUM_STREAMS": 1}, allow_cache=True))),
    # custom_loader_test.cpp
    ("CustomLoaderConfigMatchingSchema", doc(model(custom_loader_options={"loader_name": "l"}),
                                             custom_loader_config_list=[LOADER])),
    ("MissingLoaderConfig", doc(custom_loader_config_list=[{"config": {"loader_name": "l", "library_path": "l.so"}}])),
    ("MultiplePropertiesInCustomLoaderOptions", doc(model(custom_loader_options={
        "loader_name": "l", "a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"}))),
    ("monitoring", doc(monitoring={"metrics": {"enable": True, "metrics_list": ["ovms_requests_success"]}})),
    ("monitoring without list", doc(monitoring={"metrics": {"enable": False}})),
    ("OVMS lists accepted", doc(pipeline_config_list=[{"name": "p", "nodes": []}], mediapipe_config_list=[],
                                custom_node_library_config_list=[{"name": "n", "base_path": "/x"}])),
]
# fmt: on


@pytest.mark.parametrize("case", [c for _, c in VALID], ids=[i for i, _ in VALID])
def test_valid(tmp_path: Path, case: dict) -> None:
    path = write(tmp_path, case)
    assert C.validate_file(path) == []
    config = C.load(path)
    assert [m.name for m in config.models] == [e["config"]["name"] for e in case["model_config_list"]]


# (case id, document, the pointer an error must carry, the model it must name)
M = "/model_config_list/0/config"
# fmt: off
INVALID = [
    ("empty object (§11.1)", {}, "", None),
    ("not an object", [], "", None),
    ("model_config_list not an array", {"model_config_list": {}}, "/model_config_list", None),
    ("entry without config", {"model_config_list": [{"cfg": {"name": "m"}}]}, "/model_config_list/0", None),
    ("entry with an extra key", {"model_config_list": [{**model(), "x": 1}]}, "/model_config_list/0/x", "m"),
    ("no name (§11.2)", {"model_config_list": [{"config": {"base_path": "m"}}]}, M, None),
    ("empty name", {"model_config_list": [{"config": {"name": ""}}]}, f"{M}/name", None),
    ("name not a string", {"model_config_list": [{"config": {"name": 3}}]}, f"{M}/name", None),
    ("empty base_path", doc(model(base_path="")), f"{M}/base_path", "m"),
    ("nireq -1", doc(model(nireq=-1)), f"{M}/nireq", "m"),
    ("nireq too high", doc(model(nireq=100001)), f"{M}/nireq", "m"),
    ("nireq a string", doc(model(nireq="2")), f"{M}/nireq", "m"),
    ("policy all 3", doc(model(model_version_policy={"all": 3})), f"{M}/model_version_policy/all", "m"),
    ("policy all with a key", doc(model(model_version_policy={"all": {"a": 3}})), f"{M}/model_version_policy/all/a",
     "m"),
    ("policy latest array", doc(model(model_version_policy={"latest": {"num_versions": [2, 3]}})),
     f"{M}/model_version_policy/latest/num_versions", "m"),
    ("policy latest 0", doc(model(model_version_policy={"latest": {"num_versions": 0}})),
     f"{M}/model_version_policy/latest/num_versions", "m"),
    ("policy latest empty", doc(model(model_version_policy={"latest": {}})), f"{M}/model_version_policy/latest", "m"),
    ("policy specific 3", doc(model(model_version_policy={"specific": {"versions": 3}})),
     f"{M}/model_version_policy/specific/versions", "m"),
    ("policy specific string", doc(model(model_version_policy={"specific": {"versions": [1, "2"]}})),
     f"{M}/model_version_policy/specific/versions/1", "m"),
    ("policy specific 0", doc(model(model_version_policy={"specific": {"versions": [0]}})),
     f"{M}/model_version_policy/specific/versions/0", "m"),
    ("policy two kinds", doc(model(model_version_policy={"all": {}, "latest": {"num_versions": 1}})),
     f"{M}/model_version_policy", "m"),
    ("policy unknown kind", doc(model(model_version_policy={"newest": {}})), f"{M}/model_version_policy/newest", "m"),
    ("policy empty", doc(model(model_version_policy={})), f"{M}/model_version_policy", "m"),
    ("plugin_config array value", doc(model(plugin_config={"A": [1]})), f"{M}/plugin_config/A", "m"),
    ("plugin_config object value", doc(model(plugin_config={"A": {"x": 1}})), f"{M}/plugin_config/A", "m"),
    ("plugin_config null value", doc(model(plugin_config={"A": None})), f"{M}/plugin_config/A", "m"),
    ("plugin_config not an object", doc(model(plugin_config="A=B")), f"{M}/plugin_config", "m"),
    ("shape object with {}", doc(model(shape={"in": {}})), f"{M}/shape", "m"),
    ("shape object with array", doc(model(shape={"in": [1, 3]})), f"{M}/shape", "m"),
    ("shape array", doc(model(shape=[1, 3])), f"{M}/shape", "m"),
    ("shape number", doc(model(shape=3)), f"{M}/shape", "m"),
    ("layout object with array", doc(model(layout={"in": ["N"]})), f"{M}/layout", "m"),
    ("batch_size -1 integer", doc(model(batch_size=-1)), f"{M}/batch_size", "m"),
    ("batch_size float", doc(model(batch_size=1.5)), f"{M}/batch_size", "m"),
    ("batch_size bool", doc(model(batch_size=True)), f"{M}/batch_size", "m"),
    ("allow_cache a string", doc(model(allow_cache="yes")), f"{M}/allow_cache", "m"),
    ("target_device a number", doc(model(target_device=3)), f"{M}/target_device", "m"),
    ("stateful (§11.5)", doc(model(stateful=True)), f"{M}/stateful", "m"),
    ("max_sequence_number", doc(model(max_sequence_number=3)), f"{M}/max_sequence_number", "m"),
    ("sequence_timeout_seconds", doc(model(sequence_timeout_seconds=3)), f"{M}/sequence_timeout_seconds", "m"),
    ("low_latency_transformation", doc(model(low_latency_transformation=True)), f"{M}/low_latency_transformation",
     "m"),
    ("mean (CLI only)", doc(model(mean="[0,0,0]")), f"{M}/mean", "m"),
    # custom_loader_test.cpp and §11.6
    ("MissingLoaderName", doc(custom_loader_config_list=[{"config": {"library_path": "l.so"}}]),
     "/custom_loader_config_list/0/config", None),
    ("MissingLibraryPath", doc(custom_loader_config_list=[{"config": {"loader_name": "l"}}]),
     "/custom_loader_config_list/0/config", None),
    ("InvalidCustomLoaderConfig", doc(model(custom_loader_options_invalid={"loader_name": "l"})),
     f"{M}/custom_loader_options_invalid", "m"),
    ("MissingLoaderNameInCustomLoaderOptions", doc(model(custom_loader_options={"a": "SS"})),
     f"{M}/custom_loader_options", "m"),
    ("loader_name not a string", doc(model(custom_loader_options={"loader_name": 3})),
     f"{M}/custom_loader_options/loader_name", "m"),
    ("loader entry extra key", doc(custom_loader_config_list=[{"config": {**LOADER["config"], "x": "y"}}]),
     "/custom_loader_config_list/0/config/x", None),
    # monitoring (§1.3)
    ("monitoring empty", doc(monitoring={}), "/monitoring", None),
    ("metrics without enable", doc(monitoring={"metrics": {}}), "/monitoring/metrics", None),
    ("metrics extra key", doc(monitoring={"metrics": {"enable": True, "port": 1}}), "/monitoring/metrics/port", None),
    ("monitoring extra key", doc(monitoring={"metrics": {"enable": True}, "x": 1}), "/monitoring/x", None),
    # top level
    ("unknown top-level key", doc(unknown=1), "/unknown", None),
    ("pipeline_config_list not an array", doc(pipeline_config_list={}), "/pipeline_config_list", None),
]
# fmt: on


@pytest.mark.parametrize(("case", "pointer", "model_name"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_is_refused_whole(tmp_path: Path, case: object, pointer: str, model_name: str | None) -> None:
    if isinstance(case, dict) and isinstance(case.get("model_config_list"), list):
        case["model_config_list"].append({"config": {"name": "fine", "base_path": "fine"}})  # not applied either
    path = write(tmp_path, case)
    with pytest.raises(C.ConfigInvalid) as raised:
        C.load(path)
    errors = raised.value.errors
    assert C.validate_file(path) == errors
    matching = [e for e in errors if e.pointer == pointer]
    assert matching, f"no error at {pointer!r}: {errors}"
    error = matching[0]
    assert error.file == str(path) and error.model == model_name
    text = str(error)
    assert text.startswith(f"{path}: {pointer or '/'}")
    if model_name is not None:
        assert f"(model {model_name!r})" in text
    assert "expected" in error.message or "required" in error.message, error.message  # says what was wanted
    assert str(path) in str(raised.value)


def test_loader_errors_name_the_loader(tmp_path: Path) -> None:
    path = write(tmp_path, doc(custom_loader_config_list=[{"config": {"loader_name": "aes", "library_path": 5}}]))
    (error,) = C.validate_file(path)
    assert error.pointer == "/custom_loader_config_list/0/config/library_path" and error.loader == "aes"
    assert "(loader 'aes')" in str(error) and error.model is None


# schema_test.cpp: a duplicated "config", version-policy key and "metrics" are all invalid (§11.3)
# fmt: off
DUPLICATES = [
    ('{"model_config_list": [{"config": {"name": "a"}, "config": {"name": "b"}}]}', "/model_config_list/0/config",
     "b"),
    ('{"model_config_list": [{"config": {"name": "a", "model_version_policy": {"all": {}, "all": {}}}}]}',
     "/model_config_list/0/config/model_version_policy/all", "a"),
    ('{"model_config_list": [], "monitoring": {"metrics": {"enable": true}, "metrics": {"enable": false}}}',
     "/monitoring/metrics", None),
    ('{"model_config_list": [], "model_config_list": []}', "/model_config_list", None),
    ('{"model_config_list": [{"config": {"name": "a", "nireq": 1, "nireq": 2}}]}',
     "/model_config_list/0/config/nireq", "a"),
]
# fmt: on


@pytest.mark.parametrize(("raw", "pointer", "model_name"), DUPLICATES)
def test_duplicated_keys_are_invalid(tmp_path: Path, raw: str, pointer: str, model_name: str | None) -> None:
    path = write(tmp_path, raw)
    with pytest.raises(C.ConfigInvalid) as raised:
        C.load(path)
    (error,) = raised.value.errors
    assert error.pointer == pointer and error.model == model_name
    assert "duplicate key" in error.message


def test_duplicate_keys_and_schema_errors_are_reported_together(tmp_path: Path) -> None:
    raw = '{"model_config_list": [{"config": {"name": "a", "nireq": -1}, "config": {"name": "a", "nireq": -1}}]}'
    pointers = [e.pointer for e in C.validate_file(write(tmp_path, raw))]
    assert pointers == ["/model_config_list/0/config", "/model_config_list/0/config/nireq"]


@pytest.mark.parametrize(
    "raw",
    [
        '{"model_config_list": [{"config": {"name": "m", "model_version_policy": {"latest": {"num_versions": {2}}}}}]}',
        '{"model_config_list": [ {"config": }\n]}',
        "",
        '{"model_config_list": [{"config": {"name": "m", "plugin_config": {"A": NaN}}}]}',
    ],
    ids=["{2}", "truncated", "empty file", "NaN"],
)
def test_not_json(tmp_path: Path, raw: str) -> None:
    path = write(tmp_path, raw)
    (error,) = C.validate_file(path)
    assert error.pointer == "" and "not valid JSON" in error.message
    with pytest.raises(C.ConfigInvalid):
        C.load(path)


def test_batch_size_and_shape_warn_and_drop_the_batch(tmp_path: Path) -> None:  # §11.7
    config = C.load(write(tmp_path, doc(model(batch_size="auto", shape="(1,10)"))))
    (m,) = config.models
    assert m.batch_size is None and m.shape == {None: ("1", "10")}
    assert config.warnings == (
        "model m: Both shape and batch size have been defined. Batch size parameter will be ignored.",
    )


@pytest.mark.parametrize("shape", ["(1,2,3.14)", "(auto,2)", "[1,3]"])
def test_bad_shape_strings(tmp_path: Path, shape: str) -> None:  # §11.8: SHAPE_WRONG_FORMAT in the CLI too
    with pytest.raises(ValueError, match="invalid shape"):
        C.parse_shape(shape)
    config = C.load(write(tmp_path, doc(model(shape=shape), {"config": {"name": "other"}})))
    assert [m.name for m in config.models] == ["other"]  # hotserve refuses the entry rather than dropping the shape
    (error,) = config.model_errors["m"]
    assert error.pointer == f"{M}/shape" and shape in error.message


def test_unsupported_lists_warn(tmp_path: Path) -> None:
    config = C.load(write(tmp_path, doc(pipeline_config_list=[], custom_node_library_config_list=[])))
    assert config.warnings == (
        "pipeline_config_list is not supported by hotserve and is ignored",
        "custom_node_library_config_list is not supported by hotserve and is ignored",
    )


def test_every_schema_error_at_once(tmp_path: Path) -> None:
    case = doc(
        model(nireq=-1),
        {"config": {"name": "x", "target_device": 3}},
        {"config": {"name": "y", "allow_cache": "y"}},
        stateful=True,
    )
    errors = C.validate_file(write(tmp_path, case))
    assert [(e.pointer, e.model) for e in errors] == [
        ("/model_config_list/0/config/nireq", "m"),
        ("/model_config_list/1/config/target_device", "x"),
        ("/model_config_list/2/config/allow_cache", "y"),
        ("/stateful", None),
    ]
    assert "-1 is less than the minimum of 0" in errors[0].message and "100000" in errors[0].message
