"""models.json → frozen dataclasses. Schema errors and semantic errors carry file, JSON pointer and model name.

INTERFACE STUB — the implementation is being written; the public names below are the contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
        raise NotImplementedError


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
        raise NotImplementedError

    def needs_reload(self, other: ModelConfig) -> bool:
        """True when a served version must be recompiled to go from `self` to `other` (all fields but name/policy)."""
        raise NotImplementedError


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


def load(path: Path | str) -> Config:
    """Read, schema-validate and normalise `path`. Raises ConfigInvalid for file-level problems."""
    raise NotImplementedError


def single_model(name: str, model_path: Path | str, **overrides: object) -> Config:
    """The Config of single-model mode (`--model_name` + `--model_path`)."""
    raise NotImplementedError
