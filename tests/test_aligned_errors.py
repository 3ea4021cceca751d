"""Names that are not loadable models: one line naming the input and what to do, exit code 2,
nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from aligned_fixtures import save_clip
from conftest import write_colour_dataset

import xmodal
from xmodal.cli import main
from xmodal.errors import ModelLoadError


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_clip(tmp_path_factory.mktemp("clip") / "clip")


def run_cli(tmp_path: Path, model: str, capsys) -> str:
    """``xmodal eval`` and ``xmodal extract`` with ``model``: both exit 2 and write nothing;
    returns the one error line of the first."""
    data = write_colour_dataset(tmp_path / "data", n=4)
    report, shards = tmp_path / "report.json", tmp_path / "shards"
    capsys.readouterr()
    assert main(["eval", "--model", model, "--data", data, "--out", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert main(["extract", "--model", model, "--data", data, "--out", str(shards)]) == 2
    assert not report.exists() and not shards.exists()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("xmodal eval: error: ")
    return err


def test_unknown_name(tmp_path, capsys) -> None:
    err = run_cli(tmp_path, "no-such-model", capsys)
    assert "'no-such-model'" in err and "unknown preset" in err and "hf:<hub id>" in err


def test_unreachable_hub_id(tmp_path, capsys) -> None:
    # conftest sets HF_HUB_OFFLINE: the hub answers at once that it cannot be reached.
    err = run_cli(tmp_path, "someone/no-such-clip", capsys)
    assert "'someone/no-such-clip'" in err and "reachable hub id" in err


def test_folder_that_is_not_a_dual_encoder(tmp_path, minilm_path, capsys) -> None:
    from transformers import AutoConfig

    folder = tmp_path / "bert"
    AutoConfig.from_pretrained(minilm_path).save_pretrained(str(folder))
    err = run_cli(tmp_path, str(folder), capsys)
    assert str(folder) in err and "'bert' is not a supported image-text dual encoder" in err


def test_pickle_only_checkpoint_refused_with_conversion_hint(clip_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for file in clip_dir.iterdir():
        if file.suffix != ".safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    marker = tmp_path / "payload-ran"
    # A real pickle that would create a file if it were ever unpickled.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (folder / "pytorch_model.bin").write_bytes(payload)
    err = run_cli(tmp_path, str(folder), capsys)
    assert "pytorch_model.bin is a pickle payload" in err and "safetensors" in err
    assert "Convert it" in err
    assert not marker.exists()
    with pytest.raises(ModelLoadError):
        xmodal.load_model(folder)


def test_open_clip_name_without_open_clip(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    err = run_cli(tmp_path, "open_clip:ViT-B-32/laion2b_s34b_b79k", capsys)
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in err and "pip install" in err


def test_siglip2_folder_is_refused_with_the_reason(tmp_path, capsys) -> None:
    folder = tmp_path / "siglip2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    err = run_cli(tmp_path, str(folder), capsys)
    assert "'siglip2'" in err and "not supported yet" in err


def test_folder_with_bad_config_json(tmp_path, capsys) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    err = run_cli(tmp_path, str(folder), capsys)
    assert "config.json" in err and "JSON" in err


def test_xmodal_folder_still_loads(clip_dir, tmp_path) -> None:
    model, processor = xmodal.load_model(clip_dir, fusion="none")
    model.save_pretrained(tmp_path / "saved", processor)
    data = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert data["library"] == "xmodal" and "model_type" not in data
    assert xmodal.load_model(tmp_path / "saved")[0].fusion is None
