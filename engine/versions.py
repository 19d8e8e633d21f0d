"""Version folders on disk: which numbered folders a base_path holds, and which model files a version folder holds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MODEL_SUFFIXES = (".xml", ".onnx")


class ModelFilesError(ValueError):
    """A version folder without exactly one loadable model; the message names the folder."""


@dataclass(frozen=True)
class VersionScan:
    base_path: Path
    exists: bool
    versions: dict[int, Path] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelFiles:
    kind: Literal["IR", "ONNX"]
    model: Path
    weights: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.model,) if self.weights is None else (self.model, self.weights)


def scan(base_path: Path) -> VersionScan:
    """Numeric sub-folders > 0 are versions; a single .xml/.onnx file is served as version 1."""
    if base_path.is_file():
        if base_path.suffix in MODEL_SUFFIXES:
            return VersionScan(base_path, True, {1: base_path})
        return VersionScan(base_path, False, warnings=(f"Not a model file or folder: {base_path}",))
    try:
        entries = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError):
        return VersionScan(base_path, False)
    except PermissionError as exc:
        return VersionScan(base_path, False, warnings=(f"Cannot read {base_path}: {exc.strerror}",))
    found: dict[int, Path] = {}
    warnings = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            number = int(entry.name)
        except ValueError:
            warnings.append(f"Expected version directory name to be in number format. Got: {entry.name}")
            continue
        if number <= 0 or not entry.name.isdigit():
            warnings.append(f"Expected version directory name to be a number greater than 0. Got: {entry.name}")
            continue
        found[number] = Path(entry.path)
    return VersionScan(base_path, True, found, tuple(sorted(warnings)))


def model_files(version_dir: Path) -> ModelFiles:
    """The one IR (.xml with its .bin) or ONNX file of a version folder (or a single model file)."""
    if version_dir.is_file():
        candidates = [version_dir]
    else:
        try:
            candidates = sorted(p for p in version_dir.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file())
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


def quiet_since(path: Path) -> float:
    """The newest modification time (seconds) of a folder and everything in it: when it was last written."""
    newest = 0.0
    try:
        newest = path.stat().st_mtime
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    try:
                        newest = max(newest, os.stat(os.path.join(root, name), follow_symlinks=False).st_mtime)
                    except FileNotFoundError:
                        continue
    except FileNotFoundError:
        pass
    return newest
