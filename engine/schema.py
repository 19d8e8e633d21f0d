"""Reading models.json: bytes → JSON (duplicate keys caught) → JSON Schema 2020-12 check, every error at once.

Any problem here is file-level (ConfigInvalid): nothing of the file may be applied.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from . import safe_json
from .safe_text import safe

SCHEMA_PATH = Path(__file__).resolve().parent / "models.schema.json"  # a link to schemas/, a copy in the wheel
MAX_DEPTH = 32  # a models.json nests about 6 deep; anything near Python's recursion limit is refused first
MAX_BYTES = 64 << 20  # a config of thousands of models is well under a megabyte


@dataclass(frozen=True)
class ConfigError:
    file: str  # the config file's path as given
    pointer: str  # JSON pointer, e.g. "/model_config_list/2/config/nireq" ("" for the whole document)
    message: str  # what was expected / what is wrong
    model: str | None = None  # the model's name when the error is inside a model entry
    loader: str | None = None  # the loader's name when the error is inside a custom_loader_config_list entry

    def __str__(self) -> str:
        where = f"{self.file}: {self.pointer or '/'}"
        if self.model is not None:
            where += f" (model {self.model!r})"
        if self.loader is not None:
            where += f" (loader {self.loader!r})"
        return safe(f"{where}: {self.message}", limit=None)  # one printable line, whatever the file held


class ConfigInvalid(Exception):
    """The file cannot be applied at all: unreadable, not JSON, or it fails the schema."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


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


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")  # Python accepts NaN/Infinity; OVMS (and JSON) do not


def _escape(key: object) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def pointer_of(path: list[Any]) -> str:
    return "".join(f"/{_escape(p)}" for p in path)


def _owner(doc: Any, path: list[Any]) -> dict[str, str | None]:
    """model=/loader= of the entry a document path points into, when its name can be read."""
    if len(path) >= 2 and path[0] in ("model_config_list", "custom_loader_config_list") and isinstance(path[1], int):
        try:
            entry = doc[path[0]][path[1]]["config"]
            name = entry.get("name" if path[0] == "model_config_list" else "loader_name")
        except (KeyError, IndexError, TypeError, AttributeError):
            return {}
        if isinstance(name, str) and name:
            return {"model": name} if path[0] == "model_config_list" else {"loader": name}
    return {}


def _duplicate_errors(doc: Any, node: Any, path: list[Any], file: str) -> Iterator[ConfigError]:
    if isinstance(node, _Obj):
        for key in dict.fromkeys(node.duplicates):
            yield ConfigError(
                file,
                pointer_of([*path, key]),
                f"duplicate key {key!r}: each key may appear only once in an object (the last one would silently win)",
                **_owner(doc, path),
            )
        for key, value in node.items():
            yield from _duplicate_errors(doc, value, [*path, key], file)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _duplicate_errors(doc, value, [*path, i], file)


@cache
def schema_doc() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@cache
def validator(definition: str | None = None) -> jsonschema.protocols.Validator:
    schema = schema_doc()
    if definition is not None:  # one $defs entry on its own, e.g. for the CLI's --model_version_policy
        schema = {"$ref": f"#/$defs/{definition}", "$defs": schema["$defs"]}
    return jsonschema.Draft202012Validator(schema)


def short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else f"{text[:100]}…"


def _schema_message(error: jsonschema.ValidationError) -> str:
    schema = error.schema if isinstance(error.schema, dict) else {}
    expected = schema.get("description")
    if error.validator in ("oneOf", "anyOf"):
        message = f"{short(error.instance)} is not valid here"
    else:
        message = error.message.replace(repr(error.instance), short(error.instance))  # JSON, not Python, spelling
    return f"{message}; expected {expected}" if expected else message


def _schema_errors(doc: Any, file: str) -> list[ConfigError]:
    errors = []
    for error in validator().iter_errors(doc):
        path = list(error.absolute_path)
        schema = error.schema if isinstance(error.schema, dict) else {}
        if error.validator == "additionalProperties" and error.validator_value is False:
            allowed = ", ".join(schema.get("properties", {}))  # one error per unknown key, pointing at it
            for key in (k for k in error.instance if k not in schema.get("properties", {})):
                message = f"unknown key {key!r}; expected only: {allowed}"
                errors.append(ConfigError(file, pointer_of([*path, key]), message, **_owner(doc, path)))
            continue
        errors.append(ConfigError(file, pointer_of(path), _schema_message(error), **_owner(doc, path)))
    return sorted(errors, key=lambda e: _sort_key(e.pointer))


def _sort_key(pointer: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isascii() and p.isdigit() else (1, p) for p in pointer.split("/")[1:]]  # not "²"


def read_regular(path: Path) -> bytes:
    """A regular file's bytes; a FIFO or device would block or never end, so it is refused before reading."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if os.fstat(fd).st_size > MAX_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_BYTES >> 20} MiB")
        return f.read(MAX_BYTES + 1)


def read(path: Path | str) -> tuple[Any, str]:
    """Parse and schema-check the file; returns (document, sha256). Raises ConfigInvalid listing every error."""
    file = str(path)
    try:
        raw = read_regular(Path(path))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigInvalid([ConfigError(file, "", f"Config file not found or cannot open: {reason}")]) from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        doc = safe_json.loads(raw, MAX_DEPTH, object_pairs_hook=_pairs, parse_constant=_no_constants)
    except safe_json.TooDeep as exc:
        raise ConfigInvalid([ConfigError(file, "", f"not a models.json: {exc}")]) from None
    except json.JSONDecodeError as exc:
        message = f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ConfigInvalid([ConfigError(file, "", message)]) from None
    except UnicodeDecodeError as exc:
        raise ConfigInvalid([ConfigError(file, "", f"not valid UTF-8 JSON: {exc.reason}")]) from None
    except ValueError as exc:
        raise ConfigInvalid([ConfigError(file, "", f"not valid JSON: {exc}")]) from None
    errors = [*_duplicate_errors(doc, doc, [], file), *_schema_errors(doc, file)]
    if errors:
        raise ConfigInvalid(errors)
    return doc, digest
