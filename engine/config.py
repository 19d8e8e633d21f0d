"""models.json → frozen dataclasses. Schema errors and semantic errors carry file, JSON pointer and model name.

File-level problems (unreadable, not JSON, duplicate keys, schema) raise ConfigInvalid: nothing may be applied.
Problems inside one entry (shape syntax, `..` escapes, CACHE_DIR, duplicate names…) go to `model_errors` /
`loader_errors`: that entry is left out and the rest of the file applies.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from . import config_traffic as traffic_rules
from .config_traffic import DynamicBatching, Routing
from .schema import ConfigError, ConfigInvalid, pointer_of, read, schema_doc, short, validator
from .shapes import AUTO, Dims, ShapeValue, parse_batch_size, parse_dims, parse_layout, parse_shape

# Re-exported: callers use the config API from one module.
__all__ = ["AUTO", "ConfigError", "ConfigInvalid", "Dims", "ShapeValue", "parse_batch_size", "parse_dims",
           "parse_layout", "parse_shape", "read"]  # fmt: skip

IGNORED_LISTS = ("pipeline_config_list", "mediapipe_config_list", "custom_node_library_config_list")

ALLOW_CACHE_WITH_LOADER = (
    "allow_cache is set to true with custom loader usage: a custom-loader model never uses the cache "
    "(a compiled blob of the decrypted model would be written to disk)"
)
CACHE_DIR_FORBIDDEN = (
    "CACHE_DIR is not allowed in plugin_config: the cache is the server's job; use --cache_dir "
    "(a custom-loader model must never get a compiled blob on disk)"
)
BOTH_SHAPE_AND_BATCH = "Both shape and batch size have been defined. Batch size parameter will be ignored."


@dataclass(frozen=True)
class VersionPolicy:
    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int] | tuple[int, ...] | set[int]) -> tuple[int, ...]:
        """The versions to serve out of `available`, ascending."""
        ordered = sorted(set(available))
        if self.kind == "all":
            return tuple(ordered)
        if self.kind == "specific":
            return tuple(v for v in ordered if v in self.versions)
        return tuple(ordered[-self.num_versions :]) if self.num_versions > 0 else ()

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> VersionPolicy:
        """A schema-valid `model_version_policy` value (None or {} = latest 1)."""
        if not value:
            return cls()
        if "all" in value:
            return cls("all")
        if "specific" in value:
            return cls("specific", versions=tuple(sorted(set(value["specific"]["versions"]))))
        return cls("latest", num_versions=int(value["latest"]["num_versions"]))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: Path  # absolute
    batch_size: int | str | None = None  # None: model's own; int: fixed; "auto"; "-1" or "a:b" strings
    shape: Mapping[str | None, ShapeValue] | None = None  # key None = anonymous (single-input model)
    layout: Mapping[str | None, str] | None = None  # upper-cased, e.g. {None: "NHWC:NCHW"} or {"in": "NCHW"}
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    nireq: int = 0  # 0 = OpenVINO's optimal number of infer requests
    target_device: str = "CPU"
    plugin_config: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    allow_cache: bool = False
    custom_loader_options: Mapping[str, str] | None = None
    routing: Routing = field(default_factory=Routing)  # applied live: never part of a reload
    dynamic_batching: DynamicBatching | None = None

    @property
    def loader_name(self) -> str | None:
        return None if self.custom_loader_options is None else self.custom_loader_options.get("loader_name")

    @property
    def has_auto(self) -> bool:
        """Any `auto` shape or batch: such models skip the cache unless allow_cache."""
        return self.batch_size == AUTO or any(v == AUTO for v in (self.shape or {}).values())

    def needs_reload(self, other: ModelConfig) -> bool:
        """True when a served version must be recompiled to go from `self` to `other` (all fields but name/policy)."""
        return _compiled_fields(self) != _compiled_fields(other)

    def without_routing(self) -> ModelConfig:
        """This config as far as loading is concerned (a label or weight edit is not a reason to retry a load)."""
        return replace(self, routing=Routing()) if self.routing else self


@dataclass(frozen=True)
class LoaderConfig:
    name: str
    library_path: Path  # absolute
    config_file: Path | None = None  # loader_config_file, absolute (resolved against the config folder)


@dataclass(frozen=True)
class Config:
    path: Path  # absolute path of models.json
    digest: str  # sha256 of the bytes that were parsed
    models: tuple[ModelConfig, ...]  # valid entries only, first definition of each name
    loaders: tuple[LoaderConfig, ...]
    model_errors: Mapping[str, tuple[ConfigError, ...]]  # entries that failed semantic checks, by model name
    loader_errors: Mapping[str, tuple[ConfigError, ...]]
    warnings: tuple[str, ...] = ()
    monitoring: Mapping[str, object] | None = None

    @property
    def errors(self) -> list[ConfigError]:
        return [e for errs in (*self.model_errors.values(), *self.loader_errors.values()) for e in errs]


def _compiled_fields(m: ModelConfig) -> tuple[object, ...]:
    return (
        m.base_path, m.target_device, _frozen(m.shape), _typed(m.batch_size), _frozen(m.layout), m.nireq,
        _frozen(m.plugin_config), m.allow_cache, _frozen(m.custom_loader_options), m.dynamic_batching,
    )  # fmt: skip


def _typed(value: object) -> tuple[str, object]:
    return type(value).__name__, value  # True == 1 == 1.0 in Python, but not to OpenVINO


def _frozen(value: Mapping[Any, Any] | None) -> object:
    if value is None:
        return None
    return tuple(sorted(((str(k), k, _typed(v)) for k, v in value.items()), key=lambda kv: (kv[1] is None, kv[0])))


# ---- semantic checks and normalisation ----
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,254}")
MODEL_NAME_RULE = (
    "a model name is 1 to 255 characters: letters A-Z a-z, digits, '_', '.', ':' and '-', not starting with "
    "'.', ':' or '-', without '..' (it names a cache folder, a URL path segment and a metrics label)"
)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a model's name, or None: names become paths, URLs and log text."""
    if MODEL_NAME.fullmatch(name) and ".." not in name:
        return None
    return f"invalid model name {json.dumps(name)}: {MODEL_NAME_RULE}"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _local_path(text: str, root: Path, forbid_escape: bool = True) -> Path:
    """A local path from the config, relative to `root`. ValueError for URLs and (OVMS) `..` escapes."""
    if _SCHEME.match(text):
        raise ValueError(f"{text}: remote storage is not supported (s3://, gs://, azure://…); mount it locally")
    if forbid_escape and ".." in Path(text).parts:
        raise ValueError(f"Path {text} escape with .. is forbidden.")
    path = Path(text)
    return path if path.is_absolute() else root / path


class _Entry:
    """Collects the semantic errors of one entry, each pointing at its field."""

    def __init__(self, file: str, pointer: str, **owner: str) -> None:
        self.file, self.pointer, self.owner = file, pointer, owner
        self.errors: list[ConfigError] = []

    def error(self, key: str | list[object], message: str) -> None:
        path = [key] if isinstance(key, str) else key
        self.errors.append(ConfigError(self.file, self.pointer + pointer_of(path), message, **self.owner))  # type: ignore[arg-type]

    def parse(self, key: str, raw: Mapping[str, Any], parser: Any) -> Any:
        """parser(raw[key]), or None with an error when it raises ValueError."""
        if key not in raw:
            return None
        try:
            return parser(raw[key])
        except ValueError as exc:
            self.error(key, str(exc))
            return None


def _shape_entries(entry: _Entry, value: Any) -> dict[str | None, ShapeValue] | None:
    """Like parse_shape, but one error per bad input, each with its own pointer."""
    if isinstance(value, str):
        return entry.parse("shape", {"shape": value}, parse_shape)
    out: dict[str | None, ShapeValue] = {}
    for key, text in value.items():
        try:
            out.update(parse_shape({key: text}))
        except ValueError as exc:
            entry.error(["shape", key], str(exc))
    return out or None


def _layout_entries(entry: _Entry, value: Any) -> dict[str | None, str] | None:
    if isinstance(value, str):
        return entry.parse("layout", {"layout": value}, parse_layout)
    out: dict[str | None, str] = {}
    for key, text in value.items():
        try:
            out.update(parse_layout({key: text}))
        except ValueError as exc:
            entry.error(["layout", key], str(exc))
    return out or None


def _cache_dir_keys(plugin: Mapping[str, Any]) -> list[str]:
    return [key for key in plugin if key.upper() == "CACHE_DIR"]


def _model(raw: Mapping[str, Any], root: Path, entry: _Entry, warnings: list[str]) -> ModelConfig | None:
    """One schema-valid model entry → ModelConfig, or None with the problems in entry.errors."""
    name = raw["name"]
    base = entry.parse("base_path", {"base_path": raw.get("base_path", ".")}, lambda t: _local_path(t, root))
    shape = _shape_entries(entry, raw["shape"]) if "shape" in raw else None
    layout = _layout_entries(entry, raw["layout"]) if "layout" in raw else None
    batch = entry.parse("batch_size", raw, parse_batch_size)
    if "shape" in raw and "batch_size" in raw:
        warnings.append(f"model {name}: {BOTH_SHAPE_AND_BATCH}")
        batch = None
    plugin = dict(raw.get("plugin_config", {}))
    for key in _cache_dir_keys(plugin):
        entry.error(["plugin_config", key], CACHE_DIR_FORBIDDEN)
    options = raw.get("custom_loader_options")
    if options is not None:
        for key, value in options.items():
            if not isinstance(value, str):
                entry.error(
                    ["custom_loader_options", key],
                    f"custom loader option values must be strings, got {json.dumps(value)}",
                )
        if raw.get("allow_cache"):
            entry.error("allow_cache", ALLOW_CACHE_WITH_LOADER)
    labels = traffic_rules.labels(entry, raw.get("version_labels", {}))
    traffic = traffic_rules.traffic(entry, raw.get("traffic", {}), labels)
    batching = traffic_rules.batching(entry, raw, batch, shape)
    policy = VersionPolicy.from_json(raw.get("model_version_policy"))
    traffic_rules.within_policy(entry, policy, labels, traffic)
    if entry.errors:
        return None
    return ModelConfig(
        name=name,
        base_path=base,
        batch_size=batch,
        shape=shape,
        layout=layout,
        version_policy=policy,
        nireq=raw.get("nireq", 0),
        target_device=raw.get("target_device", "CPU"),
        plugin_config=plugin,
        allow_cache=bool(raw.get("allow_cache", False)),
        custom_loader_options=dict(options) if options is not None else None,
        routing=Routing(labels, traffic),
        dynamic_batching=batching,
    )


def _loader(raw: Mapping[str, Any], root: Path, entry: _Entry) -> LoaderConfig | None:
    library = entry.parse("library_path", raw, lambda t: _local_path(t, root))
    config_file = entry.parse("loader_config_file", raw, lambda t: _local_path(t, root, forbid_escape=False))
    return None if entry.errors else LoaderConfig(raw["loader_name"], library, config_file)


def build(doc: Mapping[str, Any], path: Path, digest: str, file: str | None = None) -> Config:
    """A schema-valid document → Config, with per-entry semantic errors set aside."""
    file, root = file or str(path), path.parent
    warnings = [f"{key} is not supported by hotserve and is ignored" for key in IGNORED_LISTS if key in doc]
    models: dict[str, ModelConfig] = {}
    model_errors: dict[str, list[ConfigError]] = {}
    first_at: dict[str, str] = {}
    for i, item in enumerate(doc["model_config_list"]):
        raw, pointer = item["config"], f"/model_config_list/{i}/config"
        name = raw["name"]
        bad_name = name_problem(name)
        if bad_name:
            entry = _Entry(file, pointer, model=name)
            entry.error("name", bad_name)
            model_errors.setdefault(name, []).extend(entry.errors)
            continue
        if name in first_at:
            message = (
                f"Duplicated model names: {name} is defined at {first_at[name]} and again at {pointer}. "
                "Only the first definition is used."
            )
            model_errors.setdefault(name, []).append(ConfigError(file, pointer, message, model=name))
            continue
        first_at[name] = pointer
        entry = _Entry(file, pointer, model=name)
        model = _model(raw, root, entry, warnings)
        if model is None:
            model_errors.setdefault(name, []).extend(entry.errors)
        else:
            models[name] = model
    loaders: dict[str, LoaderConfig] = {}
    loader_errors: dict[str, list[ConfigError]] = {}
    loader_at: dict[str, str] = {}
    for i, item in enumerate(doc.get("custom_loader_config_list", [])):
        raw, pointer = item["config"], f"/custom_loader_config_list/{i}/config"
        name = raw["loader_name"]
        if name in loader_at:
            message = (
                f"Duplicated loader names: {name} is defined at {loader_at[name]} and again at {pointer}. "
                "Only the first definition is used."
            )
            loader_errors.setdefault(name, []).append(ConfigError(file, pointer, message, loader=name))
            continue
        loader_at[name] = pointer
        entry = _Entry(file, pointer, loader=name)
        loader = _loader(raw, root, entry)
        if loader is None:
            loader_errors.setdefault(name, []).extend(entry.errors)
        else:
            loaders[name] = loader
    return Config(
        path=path,
        digest=digest,
        models=tuple(models.values()),
        loaders=tuple(loaders.values()),
        model_errors={k: tuple(v) for k, v in model_errors.items()},
        loader_errors={k: tuple(v) for k, v in loader_errors.items()},
        warnings=tuple(warnings),
        monitoring=doc.get("monitoring"),
    )


def load(path: Path | str) -> Config:
    """Read, schema-validate and normalise `path`. Raises ConfigInvalid for file-level problems."""
    doc, digest = read(path)
    return build(doc, Path(path).absolute(), digest, str(path))


def validate_file(path: Path | str) -> list[ConfigError]:
    """Every error of a file, schema and semantic together (for `hotserve validate`)."""
    try:
        return load(path).errors
    except ConfigInvalid as exc:
        return exc.errors


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(config: Config) -> str:
    """One line, e.g. "models.json: 3 models, 1 custom loader, 0 warnings"."""
    line = (
        f"{config.path.name}: {_plural(len(config.models), 'model')}, "
        f"{_plural(len(config.loaders), 'custom loader')}, {_plural(len(config.warnings), 'warning')}"
    )
    invalid = len(config.model_errors) + len(config.loader_errors)
    return line + (f", {invalid} invalid {'entry' if invalid == 1 else 'entries'}" if invalid else "")


_SINGLE_MODEL_FIELDS = frozenset(
    {"batch_size", "shape", "layout", "nireq", "target_device", "plugin_config", "model_version_policy", "allow_cache"}
)


def _policy(value: object) -> VersionPolicy:
    if value is None or isinstance(value, VersionPolicy):
        return value or VersionPolicy()
    problems = [e.message for e in validator("version_policy").iter_errors(value)]
    if problems:
        raise ValueError(
            f"invalid model_version_policy {short(value)}: {problems[0]}; expected "
            f"{schema_doc()['$defs']['version_policy']['description']}"
        )
    return VersionPolicy.from_json(value)  # type: ignore[arg-type]


def single_model(name: str, model_path: Path | str, **overrides: object) -> Config:
    """The Config of single-model mode (`--model_name` + `--model_path`). ValueError with a one-line reason."""
    unknown = sorted(set(overrides) - _SINGLE_MODEL_FIELDS)
    if unknown:
        raise ValueError(f"unknown model parameter(s): {', '.join(unknown)}")
    if not name:
        raise ValueError("model_name must not be empty")
    if name_problem(name):
        raise ValueError(name_problem(name))
    text = os.fspath(model_path)
    if _SCHEME.match(text):
        raise ValueError(f"model_path {text}: remote storage is not supported (s3://, gs://, azure://…)")
    base = Path(os.path.normpath(Path(text).absolute()))  # the operator's own path: `..` is resolved, not refused
    fields: dict[str, Any] = {}
    warnings: list[str] = []
    if overrides.get("shape") is not None:
        fields["shape"] = parse_shape(overrides["shape"])  # type: ignore[arg-type]
    if overrides.get("layout") is not None:
        fields["layout"] = parse_layout(overrides["layout"])  # type: ignore[arg-type]
    if overrides.get("batch_size") is not None:
        batch = parse_batch_size(overrides["batch_size"])  # type: ignore[arg-type]
        if "shape" in fields:
            warnings.append(f"model {name}: {BOTH_SHAPE_AND_BATCH}")
        else:
            fields["batch_size"] = batch
    if overrides.get("nireq") is not None:
        nireq = overrides["nireq"]
        if isinstance(nireq, bool) or not isinstance(nireq, int) or not 0 <= nireq <= 100000:
            raise ValueError(f"invalid nireq {nireq!r}: expected an integer from 0 to 100000")
        fields["nireq"] = nireq
    if overrides.get("target_device") is not None:
        if not isinstance(overrides["target_device"], str) or not overrides["target_device"]:
            raise ValueError(f"invalid target_device {overrides['target_device']!r}: expected a device such as CPU")
        fields["target_device"] = overrides["target_device"]
    if overrides.get("plugin_config") is not None:
        plugin = overrides["plugin_config"]
        problems = [e.message for e in validator("model_config").iter_errors({"name": name, "plugin_config": plugin})]
        if problems:
            raise ValueError(
                f"invalid plugin_config: {problems[0]}; expected an object of string, number or boolean values"
            )
        if _cache_dir_keys(plugin):  # type: ignore[arg-type]
            raise ValueError(CACHE_DIR_FORBIDDEN)
        fields["plugin_config"] = dict(plugin)  # type: ignore[call-overload]
    if overrides.get("allow_cache") is not None:
        fields["allow_cache"] = bool(overrides["allow_cache"])
    model = ModelConfig(
        name=name, base_path=base, version_policy=_policy(overrides.get("model_version_policy")), **fields
    )
    return Config(base, "", (model,), (), {}, {}, tuple(warnings))
