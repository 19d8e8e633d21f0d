"""Version folders on disk: which numbered folders a base_path holds, and which model files a version folder holds."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MODEL_SUFFIXES = (".xml", ".onnx")
MAX_VERSION = 2**63 - 1  # versions travel as int64 on the wire
_NUMBER = re.compile(r"-?[0-9]+")  # the whole name, ASCII digits only: "1abc" and "٣" are not versions


class ModelFilesError(ValueError):
    """A version folder without exactly one loadable model; the message names the folder."""


@dataclass(frozen=True)
class VersionScan:
    base_path: Path
    exists: bool
    versions: dict[int, Path] = field(default_factory=dict)  # version number → its folder (or the single model file)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelFiles:
    kind: Literal["IR", "ONNX"]
    model: Path
    weights: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.model,) if self.weights is None else (self.model, self.weights)


def scan(base_path: Path | str) -> VersionScan:
    """Numeric sub-folders > 0 are versions; a single .xml/.onnx file, or a folder of model files with no numeric
    sub-folder, is served as version 1."""
    base_path = Path(base_path)
    if base_path.is_file():
        if base_path.suffix in MODEL_SUFFIXES:
            return VersionScan(base_path, True, {1: base_path})
        return VersionScan(base_path, False, warnings=(f"Not a model file (.xml or .onnx) nor a folder: {base_path}",))
    try:
        entries = sorted(os.scandir(base_path), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return VersionScan(base_path, False)
    except OSError as exc:
        return VersionScan(base_path, False, warnings=(f"Cannot read {base_path}: {exc.strerror}",))
    found: dict[int, Path] = {}
    warnings = []
    for entry in entries:
        if entry.name.startswith("."):
            continue  # editors' and copy tools' temporaries, .git…
        try:
            if not entry.is_dir():  # follows symlinks: a linked version folder counts
                continue
        except OSError:
            continue
        if not _NUMBER.fullmatch(entry.name):
            warnings.append(f"Expected version directory name to be in number format. Got: {entry.name}")
            continue
        number = int(entry.name)
        if number <= 0:
            warnings.append(f"Expected version directory name to be a number greater than 0. Got: {entry.name}")
            continue
        if number > MAX_VERSION:
            warnings.append(f"Directory name is out of range for a version number. Got: {entry.name}")
            continue
        if number in found:  # "01" and "1": keep the plain spelling
            keep = entry.name if entry.name == str(number) else found[number].name
            warnings.append(
                f"Version directories {found[number].name} and {entry.name} are both version {number}; using {keep}"
            )
            if keep != entry.name:
                continue
        found[number] = Path(entry.path)
    if not found and any(_is_model_file(e) for e in entries):
        # KServe's storage initializer may put the model files straight into /mnt/models, with no version folder
        warnings.append(f"No version folder in {base_path}: serving the model files in it as version 1")
        found[1] = base_path
    return VersionScan(base_path, True, dict(sorted(found.items())), tuple(warnings))


def _is_model_file(entry: os.DirEntry[str]) -> bool:
    try:
        return not entry.name.startswith(".") and Path(entry.name).suffix in MODEL_SUFFIXES and entry.is_file()
    except OSError:
        return False


def model_files(version_dir: Path | str) -> ModelFiles:
    """The one IR (.xml with its .bin) or ONNX file of a version folder (or a single model file)."""
    version_dir = Path(version_dir)
    if version_dir.is_file():
        candidates = [version_dir]
    else:
        try:
            listed = [p for p in version_dir.iterdir() if p.suffix in MODEL_SUFFIXES and not p.name.startswith(".")]
            candidates = sorted(p for p in listed if p.is_file())
        except OSError as exc:
            raise ModelFilesError(f"Cannot read version folder {version_dir}: {exc.strerror}") from None
    if not candidates:
        raise ModelFilesError(f"No model file (.xml + .bin or .onnx) in {version_dir}")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ModelFilesError(f"Several model files in {version_dir} ({names}); keep exactly one")
    model = candidates[0]
    if model.suffix == ".onnx":
        return ModelFiles("ONNX", model)
    weights = model.with_suffix(".bin")
    if not weights.is_file():
        raise ModelFilesError(f"{model.name} has no weights file {weights.name} in {model.parent}")
    return ModelFiles("IR", model, weights)


def quiet_since(path: Path | str) -> float:
    """The newest modification time (seconds) of a folder and everything in it: when it was last written."""
    newest = 0
    try:
        newest = os.stat(path).st_mtime_ns
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    try:
                        newest = max(newest, os.stat(os.path.join(root, name), follow_symlinks=False).st_mtime_ns)
                    except OSError:
                        continue  # deleted while walking
    except OSError:
        pass
    return newest / 1e9
