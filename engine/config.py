"""models.json → frozen dataclasses. Schema errors and semantic errors carry file, JSON pointer and model name.

File-level problems (unreadable, not JSON, schema) raise ConfigInvalid: nothing may be applied. Problems inside one
entry (shape syntax, `..` escapes, CACHE_DIR, duplicates…) go to `model_errors` / `loader_errors`: that entry is left
out and the rest of the file applies.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "models.schema.json"
IGNORED_LISTS = ("pipeline_config_list", "mediapipe_config_list", "custom_node_library_config_list")

AUTO: Literal["auto"] = "auto"

# One dimension as the config wrote it, normalised: "1", "-1" (any) or "1:10" (range).
Dims = tuple[str, ...]
ShapeValue = Dims | Literal["auto"]


@dataclass(frozen=True)
class ConfigError:
    file: str  # the config file's path as given
    pointer: str  # JSON pointer, e.g. "/model_config_list/2/config/nireq" ("" for the whole document)
    message: str  # what was expected / what is wrong
    model: str | None = None  # the model's name when the error is inside a model entry

    def __str__(self) -> str:
        where = f"{self.file}: {self.pointer or '/'}"
        if self.model is not None:
            where += f" (model {self.model!r})"
        return f"{where}: {self.message}"


class ConfigInvalid(Exception):
    """The file cannot be applied at all: unreadable, not JSON, or it fails the schema."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


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
        m.base_path, m.target_device, _frozen(m.shape), m.batch_size, _frozen(m.layout), m.nireq,
        _frozen(m.plugin_config), m.allow_cache, _frozen(m.custom_loader_options),
    )  # fmt: skip


def _frozen(value: Mapping[Any, Any] | None) -> object:
    return None if value is None else tuple(sorted(value.items(), key=lambda kv: str(kv[0])))


# ---- parsing of the string forms (shared with the CLI's single-model flags) ----
_DIM = r"(?:-1|\d+|\d+:\d+)"
_SHAPE = re.compile(rf"^\(\s*{_DIM}(?:\s*,\s*{_DIM})*\s*\)$")
_LAYOUT_SIDE = re.compile(r"^(?:\.\.\.)?[A-Z?]*(?:\.\.\.)?[A-Z?]*$")


def parse_dims(text: str) -> Dims:
    """ "(1,3,-1,10:20)" → ("1", "3", "-1", "10:20"). ValueError with the reason otherwise."""
    if not _SHAPE.match(text.strip()):
        raise ValueError(f'invalid shape "{text}": expected "auto" or dims like "(1,3,224,224)", with -1 or a:b')
    dims = tuple(d.strip() for d in text.strip()[1:-1].split(","))
    for d in dims:
        if ":" in d:
            lo, hi = (int(x) for x in d.split(":"))
            if lo > hi:
                raise ValueError(f'invalid shape "{text}": range {d} has its minimum above its maximum')
    return dims


def parse_shape(value: str | Mapping[str, str]) -> dict[str | None, ShapeValue]:
    """A `shape` value → {input name or None (anonymous): dims or "auto"}."""
    items: list[tuple[str | None, str]] = [(None, value)] if isinstance(value, str) else list(value.items())
    out: dict[str | None, ShapeValue] = {}
    for key, text in items:
        out[key] = AUTO if text.strip().lower() == AUTO else parse_dims(text)
    return out


def parse_layout(value: str | Mapping[str, str]) -> dict[str | None, str]:
    """A `layout` value → {tensor name or None: "NHWC:NCHW" upper-cased}."""
    items: list[tuple[str | None, str]] = [(None, value)] if isinstance(value, str) else list(value.items())
    out: dict[str | None, str] = {}
    for key, text in items:
        layout = text.strip().upper()
        sides = layout.split(":")
        if len(sides) > 2 or not all(sides) or not all(_LAYOUT_SIDE.match(side) for side in sides):
            raise ValueError(f'invalid layout "{text}": expected letters such as "NCHW" or "NHWC:NCHW" ("..." allowed)')
        if len(sides) == 2 and "..." not in layout and len(sides[0]) != len(sides[1]):
            raise ValueError(f'invalid layout "{text}": both sides need the same number of dimensions')
        out[key] = layout
    return out


def parse_batch_size(value: int | str) -> int | str:
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    if text == AUTO or text == "-1":
        return text
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.fullmatch(r"\d+:\d+", text):
        lo, hi = (int(x) for x in text.split(":"))
        if lo <= hi:
            return text
    raise ValueError(f'invalid batch_size "{value}": expected an integer, "auto", "-1" or "a:b"')


# ---- reading ----
class _Obj(dict):  # type: ignore[type-arg]
    """A JSON object that remembers keys that appeared more than once."""

    duplicates: list[str]


def _pairs(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _duplicate_errors(node: Any, pointer: str, file: str) -> list[ConfigError]:
    errors = []
    if isinstance(node, _Obj):
        errors += [ConfigError(file, pointer, f"duplicate key {k!r}") for k in node.duplicates]
        for key, value in node.items():
            errors += _duplicate_errors(value, f"{pointer}/{_escape(key)}", file)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            errors += _duplicate_errors(value, f"{pointer}/{i}", file)
    return errors


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator(schema)


def _entry_name(doc: Any, path: list[Any]) -> str | None:
    """The model (or loader) name of the entry a schema error points into, when it can be read."""
    if len(path) >= 2 and path[0] in ("model_config_list", "custom_loader_config_list") and isinstance(path[1], int):
        try:
            config = doc[path[0]][path[1]]["config"]
            name = config.get("name" if path[0] == "model_config_list" else "loader_name")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    return None


def _schema_errors(doc: Any, file: str) -> list[ConfigError]:
    errors = []
    for error in sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        path = list(error.absolute_path)
        pointer = "".join(f"/{_escape(str(p))}" for p in path)
        expected = error.schema.get("description") if isinstance(error.schema, dict) else None
        message = error.message
        if expected and error.validator in ("oneOf", "type", "maxProperties", "minProperties", "required"):
            message += f" (expected {expected})"
        errors.append(ConfigError(file, pointer, message, _entry_name(doc, path)))
    return errors


def read(path: Path | str) -> tuple[Any, str]:
    """Parse and schema-check the file; returns (document, sha256). Raises ConfigInvalid."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigInvalid([ConfigError(file, "", f"Config file not found or cannot open: {exc.strerror}")]) from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        doc = json.loads(raw, object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        raise ConfigInvalid(
            [ConfigError(file, "", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigInvalid([ConfigError(file, "", f"not valid UTF-8 JSON: {exc.reason}")]) from None
    errors = _duplicate_errors(doc, "", file) + _schema_errors(doc, file)
    if errors:
        raise ConfigInvalid(errors)
    return doc, digest


def _local_path(text: str, root: Path, what: str) -> Path:
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise ValueError(f"{what} {text}: remote storage is not supported; mount it and use a local path")
    if ".." in Path(text).parts:
        raise ValueError(f"Path {text} escape with .. is forbidden")
    path = Path(text)
    return path if path.is_absolute() else root / path


def _model(raw: Mapping[str, Any], root: Path, warnings: list[str]) -> ModelConfig:
    """One schema-valid model entry → ModelConfig. ValueError (with the field name) for semantic problems."""
    name = raw["name"]

    def field_error(key: str, exc: ValueError) -> ValueError:
        return ValueError(f"{key}: {exc}")

    try:
        base = _local_path(raw.get("base_path", "."), root, "base_path")
    except ValueError as exc:
        raise field_error("base_path", exc) from None
    shape = layout = None
    batch: int | str | None = None
    try:
        if "shape" in raw:
            shape = parse_shape(raw["shape"])
    except ValueError as exc:
        raise field_error("shape", exc) from None
    try:
        if "layout" in raw:
            layout = parse_layout(raw["layout"])
    except ValueError as exc:
        raise field_error("layout", exc) from None
    try:
        if "batch_size" in raw:
            batch = parse_batch_size(raw["batch_size"])
    except ValueError as exc:
        raise field_error("batch_size", exc) from None
    if shape is not None and batch is not None:
        warnings.append(
            f"model {name}: Both shape and batch size have been defined. Batch size parameter will be ignored."
        )
        batch = None
    plugin = dict(raw.get("plugin_config", {}))
    if any(k.upper() == "CACHE_DIR" for k in plugin):
        raise ValueError("plugin_config: CACHE_DIR is not allowed: the cache is the server's job; use --cache_dir")
    options = raw.get("custom_loader_options")
    if options is not None and raw.get("allow_cache"):
        raise ValueError("allow_cache: allow_cache is set to true with custom loader usage (a compiled blob of a "
                         "decrypted model would be written to disk)")  # fmt: skip
    return ModelConfig(
        name=name,
        base_path=base,
        batch_size=batch,
        shape=shape,
        layout=layout,
        version_policy=VersionPolicy.from_json(raw.get("model_version_policy")),
        nireq=raw.get("nireq", 0),
        target_device=raw.get("target_device", "CPU"),
        plugin_config=plugin,
        allow_cache=bool(raw.get("allow_cache", False)),
        custom_loader_options=dict(options) if options is not None else None,
    )


def _pointer_of(message: str) -> str:
    key = message.split(":", 1)[0]
    return f"/{key}" if re.fullmatch(r"[a-z_]+", key) else ""


def build(doc: Mapping[str, Any], path: Path, digest: str) -> Config:
    """A schema-valid document → Config, with per-entry semantic errors set aside."""
    file, root = str(path), path.parent
    warnings = [f"{key} is not supported by hotserve and is ignored" for key in IGNORED_LISTS if key in doc]
    models: dict[str, ModelConfig] = {}
    model_errors: dict[str, list[ConfigError]] = {}
    first_at: dict[str, str] = {}
    for i, entry in enumerate(doc["model_config_list"]):
        raw, pointer = entry["config"], f"/model_config_list/{i}/config"
        name = raw["name"]
        if name in first_at:
            message = f"Duplicated model names: {name} is already defined at {first_at[name]}"
            model_errors.setdefault(name, []).append(ConfigError(file, pointer, message, name))
            continue
        first_at[name] = pointer
        try:
            models[name] = _model(raw, root, warnings)
        except ValueError as exc:
            model_errors.setdefault(name, []).append(ConfigError(file, pointer + _pointer_of(str(exc)), str(exc), name))
    loaders: dict[str, LoaderConfig] = {}
    loader_errors: dict[str, list[ConfigError]] = {}
    for i, entry in enumerate(doc.get("custom_loader_config_list", [])):
        raw, pointer = entry["config"], f"/custom_loader_config_list/{i}/config"
        name = raw["loader_name"]
        if name in loaders:
            loader_errors.setdefault(name, []).append(ConfigError(file, pointer, f"duplicate loader name {name}", name))
            continue
        try:
            library = _local_path(raw["library_path"], root, "library_path")
            config_file = raw.get("loader_config_file")
            loaders[name] = LoaderConfig(name, library, _local_path(config_file, root, "loader_config_file")
                                         if config_file else None)  # fmt: skip
        except ValueError as exc:
            loader_errors.setdefault(name, []).append(ConfigError(file, pointer, str(exc), name))
    return Config(
        path=path,
        digest=digest,
        models=tuple(m for n, m in models.items() if n not in model_errors),
        loaders=tuple(loaders.values()),
        model_errors={k: tuple(v) for k, v in model_errors.items()},
        loader_errors={k: tuple(v) for k, v in loader_errors.items()},
        warnings=tuple(warnings),
        monitoring=doc.get("monitoring"),
    )


def load(path: Path | str) -> Config:
    """Read, schema-validate and normalise `path`. Raises ConfigInvalid for file-level problems."""
    path = Path(path).absolute()
    doc, digest = read(path)
    return build(doc, path, digest)


def validate_file(path: Path | str) -> list[ConfigError]:
    """Every error of a file, schema and semantic together (for `hotserve validate`)."""
    try:
        return load(path).errors
    except ConfigInvalid as exc:
        return exc.errors


def summary(config: Config) -> str:
    loaders = len(config.loaders)
    return (f"{config.path}: valid; {len(config.models)} model(s), {loaders} custom loader(s), "
            f"{len(config.warnings)} warning(s)")  # fmt: skip


def single_model(name: str, model_path: Path | str, **overrides: object) -> Config:
    """The Config of single-model mode (`--model_name` + `--model_path`)."""
    policy = overrides.pop("model_version_policy", None)
    model = ModelConfig(
        name=name,
        base_path=Path(model_path).absolute(),
        version_policy=VersionPolicy.from_json(policy),  # type: ignore[arg-type]
        **overrides,  # type: ignore[arg-type]
    )
    return Config(Path(model_path).absolute(), "", (model,), (), {}, {})
