"""config.load beyond the schema: normalisation, the semantic checks that set one entry aside, error messages
(file + pointer + model), relative paths, warnings, single-model mode and the CLI parsing helpers."""

from __future__ import annotations

import hashlib
import json
import os
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


def load(tmp_path: Path, *models: dict, **top: object) -> C.Config:
    return C.load(write(tmp_path, {"model_config_list": list(models), **top}))


# ---- semantic checks: the entry is left out, the rest applies, the error points at the field ----
# (fields, pointer under the entry, text the message must contain)
# fmt: off
SEMANTIC = [
    ({"shape": "(1,2,3.14)"}, "/shape", 'invalid shape "(1,2,3.14)"'),
    ({"shape": "(auto,2)"}, "/shape", "invalid shape"),
    ({"shape": "[1,3]"}, "/shape", "invalid shape"),
    ({"shape": ""}, "/shape", "invalid shape"),
    ({"shape": "()"}, "/shape", "invalid shape"),
    ({"shape": "(1,-2)"}, "/shape", "invalid shape"),
    ({"shape": "(1,5:2)"}, "/shape", "range 5:2 has its minimum above its maximum"),
    ({"shape": {"in": "(1,x)"}}, "/shape/in", "input in: invalid shape"),
    ({"shape": {"": "(1,2)"}}, "/shape/", "tensor names must be non-empty"),
    ({"layout": "NHWC:NCH"}, "/layout", "both sides need the same number of dimensions"),
    ({"layout": "N C"}, "/layout", "invalid layout"),
    ({"layout": ""}, "/layout", "invalid layout"),
    ({"layout": "NC:"}, "/layout", "invalid layout"),
    ({"layout": "N:C:H"}, "/layout", "invalid layout"),
    ({"layout": "N...C..."}, "/layout", 'at most one "..."'),
    ({"layout": "NN"}, "/layout", "appears twice"),
    ({"layout": "[N,C]"}, "/layout", "invalid layout"),
    ({"layout": {"out": "N1"}}, "/layout/out", "tensor out: invalid layout"),
    ({"batch_size": "big"}, "/batch_size", 'invalid batch_size "big"'),
    ({"batch_size": "-2"}, "/batch_size", "invalid batch_size"),
    ({"batch_size": "1.5"}, "/batch_size", "invalid batch_size"),
    ({"batch_size": "8:2"}, "/batch_size", "minimum above its maximum"),
    ({"batch_size": ""}, "/batch_size", "invalid batch_size"),
    ({"base_path": "../outside"}, "/base_path", "Path ../outside escape with .. is forbidden"),
    ({"base_path": "/models/../etc"}, "/base_path", "escape with .. is forbidden"),
    ({"base_path": "s3://bucket/m"}, "/base_path", "s3://bucket/m: remote storage is not supported"),
    ({"base_path": "gs://bucket/m"}, "/base_path", "not supported"),
    ({"base_path": "azure://container/m"}, "/base_path", "not supported"),
    ({"plugin_config": {"CACHE_DIR": "/x"}}, "/plugin_config/CACHE_DIR", "the server's job; use --cache_dir"),
    ({"plugin_config": {"cache_dir": "/tmp/x"}}, "/plugin_config/cache_dir", "CACHE_DIR is not allowed"),
    ({"plugin_config": {"Cache_Dir": ""}}, "/plugin_config/Cache_Dir", "CACHE_DIR is not allowed"),
    ({"allow_cache": True, "custom_loader_options": {"loader_name": "l"}}, "/allow_cache",
     "allow_cache is set to true with custom loader usage"),
    ({"custom_loader_options": {"loader_name": "l", "n": 3}}, "/custom_loader_options/n", "must be strings, got 3"),
    ({"custom_loader_options": {"loader_name": "l", "o": {"a": 1}}}, "/custom_loader_options/o", "must be strings"),
    ({"version_labels": {"3": 3}}, "/version_labels/3", 'invalid version label "3": a version label is 1 to 64'),
    ({"version_labels": {"a b": 3}}, "/version_labels/a b", "starting with a letter or '_'"),
    ({"version_labels": {"-x": 3}}, "/version_labels/-x", "invalid version label"),
    ({"version_labels": {"x" * 65: 3}}, "/version_labels/" + "x" * 65, "1 to 64 characters"),
    ({"version_labels": {"a/b": 3}}, "/version_labels/a~1b", "invalid version label"),
    ({"traffic": {"canary": 10}}, "/traffic/canary",
     'unknown version label "canary": a traffic key is a version number or a label of version_labels (labels: none)'),
    ({"version_labels": {"stable": 1}, "traffic": {"stable": 5, "canary": 1}}, "/traffic/canary", "(labels: stable)"),
    ({"traffic": {"03": 10}}, "/traffic/03", 'traffic key "03" is neither a version number (1, 2, …) nor a label'),
    ({"traffic": {"0": 10}}, "/traffic/0", "neither a version number"),
    ({"traffic": {"-1": 10}}, "/traffic/-1", "neither a version number"),
    ({"traffic": {"99999999999999999999": 1}}, "/traffic/99999999999999999999", "neither a version number"),
    ({"traffic": {"1": 0, "2": 0}}, "/traffic", "every weight is 0: at least one version must get traffic"),
    # a label or weight on a version the specific policy retires would point at a retired version (or weigh nothing)
    ({"model_version_policy": {"specific": {"versions": [3]}}, "version_labels": {"stable": 4}},
     "/version_labels/stable", "version 4 is not in model_version_policy specific versions [3]"),
    ({"model_version_policy": {"specific": {"versions": [1, 3]}}, "traffic": {"1": 5, "2": 5}}, "/traffic/2",
     "version 2 is not in model_version_policy specific versions [1, 3]"),
]
# fmt: on


@pytest.mark.parametrize(("fields", "pointer", "needle"), SEMANTIC)
def test_semantic_error_sets_the_entry_aside(tmp_path: Path, fields: dict, pointer: str, needle: str) -> None:
    path = write(tmp_path, {"model_config_list": [model("m", **fields), model("ok")]})
    config = C.load(path)  # not ConfigInvalid: the rest of the file applies
    assert [m.name for m in config.models] == ["ok"]
    (error,) = config.model_errors["m"]
    assert error.pointer == M0 + pointer and error.model == "m" and error.file == str(path)
    assert needle in error.message, error.message
    assert str(error).startswith(f"{path}: {M0}{pointer} (model 'm'): ")
    assert C.validate_file(path) == [error] == config.errors  # `hotserve validate` fails on it


def test_three_independent_semantic_errors_are_three(tmp_path: Path) -> None:
    doc = {"model_config_list": [model("a", shape="(1,x)"), model("b", base_path="../b"), model("c", layout="NN")]}
    errors = C.validate_file(write(tmp_path, doc))
    assert [(e.model, e.pointer) for e in errors] == [
        ("a", "/model_config_list/0/config/shape"),
        ("b", "/model_config_list/1/config/base_path"),
        ("c", "/model_config_list/2/config/layout"),
    ]


def test_every_problem_of_one_entry_at_once(tmp_path: Path) -> None:
    fields = {
        "shape": {"a": "(1,x)", "b": "(1,2)", "c": "[3]"},
        "layout": "NC:N",
        "batch_size": "x",
        "plugin_config": {"CACHE_DIR": "/c"},
        "allow_cache": True,
        "custom_loader_options": {"loader_name": "l", "k": 1},
        "base_path": "../x",
    }
    config = load(tmp_path, model("m", **fields))
    assert config.models == ()
    assert sorted(e.pointer.removeprefix(M0) for e in config.model_errors["m"]) == [
        "/allow_cache", "/base_path", "/batch_size", "/custom_loader_options/k", "/layout", "/plugin_config/CACHE_DIR",
        "/shape/a", "/shape/c",
    ]  # fmt: skip


def test_custom_loader_options_without_allow_cache_are_fine(tmp_path: Path) -> None:
    (m,) = load(tmp_path, model("m", custom_loader_options={"loader_name": "nowhere", "f": "x"})).models
    assert m.custom_loader_options == {"loader_name": "nowhere", "f": "x"} and m.loader_name == "nowhere"
    assert m.allow_cache is False  # an unknown loader is a runtime error for this model, not a config error


def test_duplicate_model_names_keep_the_first(tmp_path: Path) -> None:
    path = write(tmp_path, {"model_config_list": [model("m", nireq=1), model("x"), model("m", nireq=2), model("m")]})
    config = C.load(path)
    assert [(m.name, m.nireq) for m in config.models] == [("m", 1), ("x", 0)]
    first, second = config.model_errors["m"]
    assert (first.pointer, second.pointer) == ("/model_config_list/2/config", "/model_config_list/3/config")
    assert first.model == "m" and "Duplicated model names: m" in first.message
    assert "/model_config_list/0/config" in first.message and "/model_config_list/2/config" in first.message
    assert len(C.validate_file(path)) == 2


def test_duplicate_of_an_invalid_first_definition(tmp_path: Path) -> None:
    config = load(tmp_path, model("m", shape="bad"), model("m"))
    assert config.models == ()  # the first definition is the one that counts, and it is invalid
    assert [e.pointer for e in config.model_errors["m"]] == [f"{M0}/shape", "/model_config_list/1/config"]


def test_loader_checks(tmp_path: Path) -> None:
    loaders = [
        {"config": {"loader_name": "a", "library_path": "liba.so"}},
        {"config": {"loader_name": "a", "library_path": "other.so"}},
        {"config": {"loader_name": "up", "library_path": "../libup.so"}},
        {"config": {"loader_name": "cloud", "library_path": "s3://b/lib.so"}},
    ]
    config = load(tmp_path, custom_loader_config_list=loaders)
    assert [(ld.name, ld.library_path) for ld in config.loaders] == [("a", tmp_path / "liba.so")]
    (dup,) = config.loader_errors["a"]
    assert dup.pointer == "/custom_loader_config_list/1/config" and dup.loader == "a" and dup.model is None
    assert "Duplicated loader names: a" in dup.message and "(loader 'a')" in str(dup)
    (up,) = config.loader_errors["up"]
    assert (
        up.pointer == "/custom_loader_config_list/2/config/library_path" and "escape with .. is forbidden" in up.message
    )
    assert "not supported" in config.loader_errors["cloud"][0].message
    assert len(config.errors) == 3


# ---- normalisation ----
@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("(1,3,224,224)", {None: ("1", "3", "224", "224")}),
        (" ( 1 , 3 , -1 , 10:20 ) ", {None: ("1", "3", "-1", "10:20")}),
        ("(01,3)", {None: ("1", "3")}),
        ("auto", {None: "auto"}),
        ("AUTO", {None: "auto"}),
        ("(5:5)", {None: ("5:5",)}),
        ({"in1": "(1,3,-1,-1)", "in2": "auto"}, {"in1": ("1", "3", "-1", "-1"), "in2": "auto"}),
    ],
)
def test_shapes(tmp_path: Path, shape: object, expected: dict) -> None:
    (m,) = load(tmp_path, model(shape=shape)).models
    assert m.shape == expected
    assert C.parse_shape(shape) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("NHWC", {None: "NHWC"}),
        ("nhwc:nchw", {None: "NHWC:NCHW"}),
        ("N...", {None: "N..."}),
        ("...", {None: "..."}),
        ("NC...:N...C", {None: "NC...:N...C"}),
        ("N?HW", {None: "N?HW"}),
        ("NHWC:N...", {None: "NHWC:N..."}),  # "..." on one side: the ranks need not match
        ({"in": "nchw", "out": "CN"}, {"in": "NCHW", "out": "CN"}),
    ],
)
def test_layouts(tmp_path: Path, layout: object, expected: dict) -> None:
    (m,) = load(tmp_path, model(layout=layout)).models
    assert m.layout == expected


@pytest.mark.parametrize(
    ("batch", "expected"),
    [(4, 4), (0, 0), ("8", 8), ("auto", "auto"), ("Auto", "auto"), ("-1", "-1"), ("1:8", "1:8"), (" 2:2 ", "2:2")],
)
def test_batch_sizes(tmp_path: Path, batch: object, expected: object) -> None:
    (m,) = load(tmp_path, model(batch_size=batch)).models
    assert m.batch_size == expected and type(m.batch_size) is type(expected)


def test_defaults_and_every_field(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {"config": {"name": "plain"}},
        model(
            "full", base_path="/models/full", batch_size="1:8", layout="NC", nireq=4, target_device="GPU",
            plugin_config={"NUM_STREAMS": 2, "PERFORMANCE_HINT": "THROUGHPUT", "X": True, "Y": 1.5},
            allow_cache=True, model_version_policy={"specific": {"versions": [3, 1, 3]}},
        ),
        model("l", custom_loader_options={"loader_name": "aes", "model_file": "m.xml.enc"}),
    )  # fmt: skip
    plain, full, loaded = config.models
    assert plain == C.ModelConfig(name="plain", base_path=tmp_path)
    assert (plain.batch_size, plain.shape, plain.layout, plain.nireq, plain.target_device) == (
        None,
        None,
        None,
        0,
        "CPU",
    )
    assert plain.version_policy == C.VersionPolicy("latest", 1) and plain.plugin_config == {}
    assert plain.allow_cache is False and plain.custom_loader_options is None and plain.loader_name is None
    assert full.base_path == Path("/models/full") and full.batch_size == "1:8" and full.layout == {None: "NC"}
    assert (full.nireq, full.target_device, full.allow_cache) == (4, "GPU", True)
    assert full.plugin_config == {"NUM_STREAMS": 2, "PERFORMANCE_HINT": "THROUGHPUT", "X": True, "Y": 1.5}
    assert full.version_policy == C.VersionPolicy("specific", versions=(1, 3))
    assert loaded.loader_name == "aes" and loaded.custom_loader_options == {
        "loader_name": "aes",
        "model_file": "m.xml.enc",
    }
    assert config.path == tmp_path / "models.json" and config.warnings == () and config.errors == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (None, C.VersionPolicy("latest", 1)),
        ({"all": {}}, C.VersionPolicy("all")),
        ({"latest": {"num_versions": 3}}, C.VersionPolicy("latest", 3)),
        ({"specific": {"versions": [5, 2]}}, C.VersionPolicy("specific", versions=(2, 5))),
    ],
)
def test_version_policy_from_the_file(tmp_path: Path, policy: dict | None, expected: C.VersionPolicy) -> None:
    fields = {} if policy is None else {"model_version_policy": policy}
    (m,) = load(tmp_path, model(**fields)).models
    assert m.version_policy == expected


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "hotserve"
    folder.mkdir(parents=True)
    doc = {
        "model_config_list": [
            {"config": {"name": "none"}},
            {"config": {"name": "rel", "base_path": "models/rel"}},
            {"config": {"name": "dot", "base_path": "./x"}},
            {"config": {"name": "abs", "base_path": "/srv/abs"}},
            {"config": {"name": "file", "base_path": "one/model.onnx"}},
        ],
        "custom_loader_config_list": [
            {"config": {"loader_name": "r", "library_path": "lib/l.so", "loader_config_file": "keys/k.json"}},
            {"config": {"loader_name": "a", "library_path": "/opt/l.so", "loader_config_file": "/etc/k.json"}},
            {"config": {"loader_name": "up", "library_path": "l.so", "loader_config_file": "../secrets/k.json"}},
        ],
    }
    write(folder, doc)
    monkeypatch.chdir(tmp_path)  # a relative config path is made absolute from the working directory
    config = C.load(Path("etc/hotserve/models.json"))
    assert config.path == folder / "models.json" and config.path.is_absolute()
    assert {m.name: m.base_path for m in config.models} == {
        "none": folder,
        "rel": folder / "models" / "rel",
        "dot": folder / "x",
        "abs": Path("/srv/abs"),
        "file": folder / "one" / "model.onnx",
    }  # none of them exists: existence is the reconciler's business
    assert [(ld.library_path, ld.config_file) for ld in config.loaders] == [
        (folder / "lib" / "l.so", folder / "keys" / "k.json"),
        (Path("/opt/l.so"), Path("/etc/k.json")),
        (folder / "l.so", folder / ".." / "secrets" / "k.json"),  # the loader's own file: `..` allowed
    ]


def test_warnings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        model("both", shape="(1,10)", batch_size=4),
        model("auto", shape={"x": "auto"}, batch_size="auto"),
        pipeline_config_list=[],
        mediapipe_config_list=[],
    )
    assert [m.batch_size for m in config.models] == [None, None]
    assert config.warnings == (
        "pipeline_config_list is not supported by hotserve and is ignored",
        "mediapipe_config_list is not supported by hotserve and is ignored",
        "model both: Both shape and batch size have been defined. Batch size parameter will be ignored.",
        "model auto: Both shape and batch size have been defined. Batch size parameter will be ignored.",
    )


def test_monitoring_is_kept(tmp_path: Path) -> None:
    monitoring = {"metrics": {"enable": True, "metrics_list": ["ovms_requests_success"]}}
    assert load(tmp_path, monitoring=monitoring).monitoring == monitoring
    assert load(tmp_path).monitoring is None


def test_digest_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    raw = '{"model_config_list": []}'
    path = write(tmp_path, raw)
    first = C.load(path)
    assert first.digest == hashlib.sha256(raw.encode()).hexdigest()
    path.write_text(raw + "\n")
    assert C.load(path).digest != first.digest


# ---- file-level problems ----
def test_unreadable_file(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.json", tmp_path):
        with pytest.raises(C.ConfigInvalid) as raised:
            C.load(path)
        (error,) = raised.value.errors
        assert error.file == str(path) and error.pointer == ""
        assert "Config file not found or cannot open" in error.message
        assert C.validate_file(path) == [error]


def test_json_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{"model_config_list": [\n  {"config": }\n]}')
    with pytest.raises(C.ConfigInvalid) as raised:
        C.load(path)
    (error,) = raised.value.errors
    assert "not valid JSON" in error.message and "line 2 column 14" in error.message
    assert str(error).startswith(f"{path}: /: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_bytes(b'{"model_config_list": [{"config": {"name": "\xff"}}]}')
    (error,) = C.validate_file(path)
    assert "not valid" in error.message


def test_schema_errors_are_not_mixed_with_semantic_ones(tmp_path: Path) -> None:
    # a schema error refuses the file, so entries are not normalised at all (and nothing is applied)
    path = write(tmp_path, {"model_config_list": [model("a", nireq=-1), model("b", shape="bad")]})
    assert [e.pointer for e in C.validate_file(path)] == ["/model_config_list/0/config/nireq"]


@pytest.mark.parametrize(
    ("fields", "pointer"),
    [
        ({"version_labels": {"stable": 0}}, "/version_labels/stable"),
        ({"version_labels": {"stable": "3"}}, "/version_labels/stable"),
        ({"version_labels": [3]}, "/version_labels"),
        ({"traffic": {"1": -1}}, "/traffic/1"),
        ({"traffic": {"1": 1.5}}, "/traffic/1"),
        ({"traffic": {"1": 1000001}}, "/traffic/1"),
        ({"traffic": {}}, "/traffic"),
    ],
)
def test_label_and_traffic_types_are_schema_errors(tmp_path: Path, fields: dict, pointer: str) -> None:
    (error,) = C.validate_file(write(tmp_path, {"model_config_list": [model("m", **fields)]}))
    assert (error.pointer, error.model) == (M0 + pointer, "m"), error


def test_labels_and_traffic_are_routing_not_a_reload(tmp_path: Path) -> None:
    doc = model("m", version_labels={"stable": 3, "canary": 4}, traffic={"stable": 90, "4": 10, "7": 0})
    (m,) = load(tmp_path, doc).models
    assert m.routing == C.Routing({"stable": 3, "canary": 4}, (("stable", 90), (4, 10), (7, 0)))
    (plain,) = load(tmp_path, model("m")).models
    assert not plain.routing and not plain.needs_reload(m), "editing labels or weights recompiles nothing"
    assert m.without_routing() == plain


# ---- ModelConfig behaviour ----
def test_needs_reload_covers_every_compiled_field_but_not_name_or_policy(tmp_path: Path) -> None:
    base = C.ModelConfig(name="m", base_path=tmp_path)
    assert not base.needs_reload(C.ModelConfig(name="m", base_path=tmp_path))
    assert not base.needs_reload(C.ModelConfig(name="other", base_path=tmp_path, version_policy=C.VersionPolicy("all")))
    changes: list[dict] = [
        {"base_path": tmp_path / "x"}, {"target_device": "GPU"}, {"shape": {None: "auto"}}, {"batch_size": 3},
        {"layout": {None: "NC"}}, {"nireq": 2}, {"plugin_config": {"A": "B"}}, {"allow_cache": True},
        {"custom_loader_options": {"loader_name": "l"}},
    ]  # fmt: skip
    for change in changes:
        assert base.needs_reload(C.ModelConfig(**{"name": "m", "base_path": tmp_path, **change})), change
    with_plugin = C.ModelConfig(name="m", base_path=tmp_path, plugin_config={"X": True})
    assert with_plugin.needs_reload(C.ModelConfig(name="m", base_path=tmp_path, plugin_config={"X": 1}))
    named = C.ModelConfig(name="m", base_path=tmp_path, shape={"in": ("1", "2")})
    assert named.needs_reload(
        C.ModelConfig(name="m", base_path=tmp_path, shape={None: ("1", "2")})
    )  # anonymous ≠ named
    assert not named.needs_reload(C.ModelConfig(name="m", base_path=tmp_path, shape={"in": ("1", "2")}))


def test_needs_reload_between_two_loads_of_a_file(tmp_path: Path) -> None:
    before = load(tmp_path, model("m", shape="auto", nireq=1), model("n", layout="NC")).models
    after = load(
        tmp_path,
        model("m", shape="AUTO", nireq=1, model_version_policy={"all": {}}),
        model("n", layout="nc:nc"),
    ).models
    assert not before[0].needs_reload(after[0])  # auto -> auto and only the policy changed
    assert before[1].needs_reload(after[1])


def test_has_auto(tmp_path: Path) -> None:
    def cfg(**fields: object) -> C.ModelConfig:
        return C.ModelConfig(name="m", base_path=tmp_path, **fields)  # type: ignore[arg-type]

    assert cfg(batch_size="auto").has_auto
    assert cfg(shape={"a": ("1",), "b": "auto"}).has_auto
    assert cfg(shape={None: "auto"}).has_auto
    assert not cfg().has_auto and not cfg(batch_size="-1").has_auto and not cfg(shape={None: ("-1", "2")}).has_auto


# ---- summary ----
def test_summary(tmp_path: Path) -> None:
    loaders = [{"config": {"loader_name": "l", "library_path": "l.so"}}]
    config = load(tmp_path, model("a"), model("b"), model("c"), custom_loader_config_list=loaders)
    assert C.summary(config) == "models.json: 3 models, 1 custom loader, 0 warnings"
    one = load(tmp_path, model("a", shape="(1)", batch_size=1), model("bad", shape="x"), pipeline_config_list=[])
    assert C.summary(one) == "models.json: 1 model, 0 custom loaders, 2 warnings, 1 invalid entry"


def test_default_config_of_the_repository_is_valid() -> None:
    path = Path(__file__).resolve().parent.parent / "configs" / "models.json"
    config = C.load(path)
    assert config.errors == [] and [m.name for m in config.models] == ["dummy", "dummy-encrypted"]
    assert all(m.base_path.is_dir() for m in config.models)
    assert os.fspath(config.loaders[0].library_path).startswith(os.fspath(path.parent))
