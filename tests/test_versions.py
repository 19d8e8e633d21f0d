"""Version policy (research ovms.md §2 table), version folders on disk (§3.4, §11.12), model files of a version."""

from __future__ import annotations

import os
from pathlib import Path

import openvino as ov
import pytest
from modelgen import add_const, onnx_add_const

from engine import versions
from engine.config import VersionPolicy

AVAILABLE = [3, 4, 5, 18, 25, 100]
ALL = tuple(AVAILABLE)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (VersionPolicy(), (100,)),  # the default: latest 1
        (VersionPolicy("latest", 1), (100,)),
        (VersionPolicy("latest", 2), (25, 100)),
        (VersionPolicy("latest", 6), ALL),
        (VersionPolicy("latest", 10), ALL),
        (VersionPolicy("all"), ALL),
        (VersionPolicy("specific", versions=(4, 25)), (4, 25)),
        (VersionPolicy("specific", versions=(1, 8, 28)), ()),
        (VersionPolicy("specific", versions=(4, 5, 6, 7)), (4, 5)),
    ],
    ids=[
        "default",
        "latest1",
        "latest2",
        "latest6",
        "latest10",
        "all",
        "specific4,25",
        "specific1,8,28",
        "specific4-7",
    ],
)
def test_version_policy_table(policy: VersionPolicy, expected: tuple[int, ...]) -> None:
    assert policy.select(AVAILABLE) == expected
    assert policy.select(set(reversed(AVAILABLE))) == expected  # any order in, ascending out


def test_version_policy_on_nothing() -> None:
    for policy in (VersionPolicy(), VersionPolicy("all"), VersionPolicy("specific", versions=(1,))):
        assert policy.select([]) == ()


def test_version_policy_from_json() -> None:
    assert VersionPolicy.from_json(None) == VersionPolicy.from_json({}) == VersionPolicy("latest", 1)
    assert VersionPolicy.from_json({"all": {}}) == VersionPolicy("all")
    assert VersionPolicy.from_json({"latest": {"num_versions": 2}}).select(AVAILABLE) == (25, 100)
    assert VersionPolicy.from_json({"specific": {"versions": [25, 4, 4]}}) == VersionPolicy(
        "specific", versions=(4, 25)
    )


# ---- scan ----
def test_scan_reads_numbered_folders_and_warns_like_ovms(tmp_path: Path) -> None:
    for name in ("1", "foo", "0", ".hidden", "12", "1abc", "-3", "100"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a folder")
    (tmp_path / ".5").mkdir()  # hidden, even though numeric
    scan = versions.scan(tmp_path)
    assert scan.exists and scan.base_path == tmp_path
    assert scan.versions == {1: tmp_path / "1", 12: tmp_path / "12", 100: tmp_path / "100"}
    assert list(scan.versions) == [1, 12, 100]
    assert sorted(scan.warnings) == [
        "Expected version directory name to be a number greater than 0. Got: -3",
        "Expected version directory name to be a number greater than 0. Got: 0",
        "Expected version directory name to be in number format. Got: 1abc",
        "Expected version directory name to be in number format. Got: foo",
    ]


def test_scan_whole_names_only(tmp_path: Path) -> None:
    for name in ("+2", " 3", "4 ", "1_0", "٣", "2e1", "99999999999999999999"):
        (tmp_path / name).mkdir()
    scan = versions.scan(tmp_path)
    assert scan.versions == {}
    assert len(scan.warnings) == 7
    assert "Directory name is out of range for a version number. Got: 99999999999999999999" in scan.warnings


def test_scan_two_spellings_of_one_number(tmp_path: Path) -> None:
    for name in ("01", "1", "002"):
        (tmp_path / name).mkdir()
    scan = versions.scan(tmp_path)
    assert scan.versions == {1: tmp_path / "1", 2: tmp_path / "002"}
    assert scan.warnings == ("Version directories 01 and 1 are both version 1; using 1",)


def test_scan_follows_symlinked_version_folders(tmp_path: Path) -> None:
    (tmp_path / "store" / "v3").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    os.symlink(tmp_path / "store" / "v3", tmp_path / "base" / "3")
    os.symlink(tmp_path / "nowhere", tmp_path / "base" / "4")  # dangling: ignored
    assert versions.scan(tmp_path / "base").versions == {3: tmp_path / "base" / "3"}


def test_scan_missing_and_empty(tmp_path: Path) -> None:
    missing = versions.scan(tmp_path / "missing")
    assert not missing.exists and missing.versions == {} and missing.warnings == ()
    (tmp_path / "empty").mkdir()
    empty = versions.scan(tmp_path / "empty")
    assert empty.exists and empty.versions == {}


@pytest.mark.parametrize("kind", ["IR", "ONNX"])
def test_single_model_file_is_version_1(tmp_path: Path, kind: str) -> None:
    path = add_const(tmp_path) if kind == "IR" else onnx_add_const(tmp_path)
    scan = versions.scan(path)
    assert scan.exists and scan.versions == {1: path}
    files = versions.model_files(scan.versions[1])
    assert files.kind == kind and files.model == path


@pytest.mark.parametrize("kind", ["IR", "ONNX"])
def test_folder_of_bare_model_files_is_version_1(tmp_path: Path, kind: str) -> None:
    """KServe's storage initializer may leave /mnt/models/model.xml + model.bin (or model.onnx), no version folder."""
    base = tmp_path / "mnt-models"
    path = add_const(base) if kind == "IR" else onnx_add_const(base)
    (base / "notes").mkdir()  # a non-numeric folder does not hide the files
    scan = versions.scan(base)
    assert scan.versions == {1: base}
    assert f"No version folder in {base}: serving the model files in it as version 1" in scan.warnings
    files = versions.model_files(scan.versions[1])
    assert files.kind == kind and files.model == path


def test_version_folders_win_over_bare_model_files(tmp_path: Path) -> None:
    add_const(tmp_path / "base")
    add_const(tmp_path / "base" / "2")
    assert versions.scan(tmp_path / "base").versions == {2: tmp_path / "base" / "2"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.txt").write_text("no model here")
    assert versions.scan(tmp_path / "other").versions == {}


def test_other_single_file_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    scan = versions.scan(tmp_path / "notes.txt")
    assert not scan.exists and scan.versions == {}
    assert scan.warnings == (f"Not a model file (.xml or .onnx) nor a folder: {tmp_path / 'notes.txt'}",)


# ---- model_files ----
def test_ir_version_folder(tmp_path: Path) -> None:
    xml = add_const(tmp_path / "1")
    (tmp_path / "1" / "README").write_text("other files are fine")
    (tmp_path / "1" / ".model.xml.swp").write_text("editor leftovers are ignored")
    files = versions.model_files(tmp_path / "1")
    assert files == versions.ModelFiles("IR", xml, tmp_path / "1" / "model.bin")
    assert files.paths == (xml, tmp_path / "1" / "model.bin")
    compiled = ov.Core().compile_model(ov.Core().read_model(files.model, files.weights), "CPU")  # they are the model
    assert compiled.input(0).any_name == "b"


def test_onnx_version_folder(tmp_path: Path) -> None:
    onnx = onnx_add_const(tmp_path / "2")
    files = versions.model_files(str(tmp_path / "2"))
    assert files == versions.ModelFiles("ONNX", onnx) and files.weights is None and files.paths == (onnx,)
    assert ov.Core().read_model(files.model).input(0).any_name == "b"


def test_model_files_errors_name_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "1"
    folder.mkdir()
    with pytest.raises(versions.ModelFilesError, match=rf"No model file .* in {folder}$"):
        versions.model_files(folder)
    (folder / "net.xml").write_text("<net/>")
    with pytest.raises(versions.ModelFilesError) as raised:
        versions.model_files(folder)
    assert str(raised.value) == f"net.xml has no weights file net.bin in {folder}"
    (folder / "model.bin").write_bytes(b"")  # a .bin of another stem does not count
    with pytest.raises(versions.ModelFilesError, match=r"no weights file net\.bin"):
        versions.model_files(folder)
    (folder / "net.bin").write_bytes(b"")
    assert versions.model_files(folder).kind == "IR"
    (folder / "other.onnx").write_bytes(b"")
    with pytest.raises(versions.ModelFilesError) as raised:
        versions.model_files(folder)
    assert str(raised.value) == f"Several model files in {folder} (net.xml, other.onnx); keep exactly one"
    assert isinstance(raised.value, ValueError)
    with pytest.raises(versions.ModelFilesError, match="Cannot read version folder"):
        versions.model_files(tmp_path / "missing")


# ---- quiet_since ----
def test_quiet_since_is_the_newest_mtime_inside(tmp_path: Path) -> None:
    folder = tmp_path / "1"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "weights.bin").write_bytes(b"x")
    (folder / "model.xml").write_text("<net/>")
    stamps = {folder: 1_000, folder / "sub": 2_000, folder / "model.xml": 3_000, folder / "sub" / "weights.bin": 4_000}
    for path, seconds in stamps.items():
        os.utime(path, ns=(seconds * 10**9 + 5, seconds * 10**9 + 5))
    assert versions.quiet_since(folder) == 4_000.000000005
    os.utime(folder / "sub" / "weights.bin", ns=(500 * 10**9, 500 * 10**9))
    assert versions.quiet_since(folder) == 3_000.000000005  # deep and shallow entries both count
    os.utime(folder, ns=(9_000 * 10**9, 9_000 * 10**9))
    assert versions.quiet_since(folder) == 9_000.0  # the folder itself (an entry was added or removed)
    assert versions.quiet_since(folder / "model.xml") == 3_000.000000005  # a single-file model
    assert versions.quiet_since(tmp_path / "missing") == 0.0
