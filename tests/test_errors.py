"""One error family: the CLI prints an XmodalError as one line (exit 2) and lets a bug's
traceback through; library raise sites use the family's kinds."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import xmodal.errors as errors
import xmodal.index
from xmodal.atomic import atomic_dir, atomic_write_text, make_dir
from xmodal.cli import main
from xmodal.config import load_yaml_or_json
from xmodal.data import load_dataset
from xmodal.errors import (
    ConfigError,
    MissingFileError,
    ModelLoadError,
    OutputError,
    XmodalError,
)
from xmodal.presets import load_model

KINDS = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, XmodalError) and cls.__module__ == errors.__name__
]


def _instance(kind: type[XmodalError]) -> XmodalError:
    if kind is errors.ImageLoadError:
        return kind("photo.jpg", "empty file (0 bytes)")
    return kind(f"the {kind.__name__} message")


def test_the_family_has_one_base_and_keeps_the_builtin_bases():
    assert len(KINDS) >= 12
    assert all(issubclass(kind, XmodalError) for kind in KINDS)
    assert issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(OutputError, OSError)
    assert issubclass(errors.MissingDependencyError, ImportError)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_every_kind_is_one_line_and_exit_2(kind, tmp_path, monkeypatch, capsys):
    error = _instance(kind)

    def failing_build_index(*args, **kwargs):
        raise error

    monkeypatch.setattr(xmodal.index, "build_index", failing_build_index)
    code = main(["index", "--shards", str(tmp_path), "--out", str(tmp_path / "idx")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"xmodal index: error: {error}\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    "bug",
    [ValueError("a bug"), OSError("a bug"), KeyError("a bug"), FileNotFoundError("a bug")],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_keeps_its_traceback(bug, tmp_path, monkeypatch):
    """Exceptions outside the family are not user errors: they propagate (no exit code 2)."""

    def buggy_build_index(*args, **kwargs):
        raise bug

    monkeypatch.setattr(xmodal.index, "build_index", buggy_build_index)
    with pytest.raises(type(bug)) as info:
        main(["index", "--shards", str(tmp_path), "--out", str(tmp_path / "idx")])
    assert info.value is bug
    assert info.traceback[-1].name == "buggy_build_index"  # the frame that raised it


def test_missing_inputs_raise_missing_file_error(tmp_path, capsys):
    with pytest.raises(MissingFileError, match="absent.jsonl"):
        load_dataset(tmp_path / "absent.jsonl")
    with pytest.raises(MissingFileError, match="absent.yaml"):
        load_yaml_or_json(tmp_path / "absent.yaml")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(MissingFileError, match="not a model directory"):
        load_model(tmp_path / "not-a-model")
    with pytest.raises(ModelLoadError, match="unknown preset"):
        load_model("no-such-preset")
    code = main(
        ["extract", "--model", "offline-default", "--data", str(tmp_path / "absent.jsonl"), "--out"]
        + [str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]  # (model loading may print a progress bar first)
    assert last == f"xmodal extract: error: dataset not found: {tmp_path / 'absent.jsonl'}"
    assert "Traceback" not in err


def test_yaml_syntax_error_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("data: {train: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_or_json(bad)
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xmodal train: error: ") and err.count("\n") == 1 and "run.yaml" in err


def test_unwritable_output_is_an_output_error_naming_the_path(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match=r"cannot create output folder .*blocker"):
        make_dir(blocker / "out")
    with pytest.raises(OutputError, match=r"blocker"):
        atomic_write_text(blocker / "out" / "report.json", "{}")
    with pytest.raises(OutputError, match=r"blocker"), atomic_dir(blocker / "ckpt"):
        pass
    assert blocker.read_text() == "a file where a folder should be"


def test_unwritable_output_through_the_cli(tmp_path, capsys):
    """`xmodal data emoji --out` under a file: one line naming the folder, nothing written."""
    from test_builders import _fake_tarball

    tarball = _fake_tarball(tmp_path / "emoji.tgz")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code = main(["data", "emoji", "--from", str(tarball), "--out", str(blocker / "emoji")])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("xmodal data: error: cannot create output folder ")
    assert str(blocker / "emoji") in last and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "emoji.tgz"]


def test_a_callers_own_error_inside_atomic_blocks_passes_through(tmp_path):
    """Only the helpers' own file-system failures become OutputError, not the caller's code."""
    with pytest.raises(FileNotFoundError) as info, atomic_dir(tmp_path / "d"):
        raise FileNotFoundError("the caller's bug")
    assert not isinstance(info.value, XmodalError)
    assert not (tmp_path / "d").exists()
    assert list(Path(tmp_path).iterdir()) == []
