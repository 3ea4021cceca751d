"""Loading never unpickles: weights come only from safetensors, configs only as JSON/YAML data.

Each refused file carries a pickle whose loading would create a marker file, so a test fails
both when the refusal is missing and when the payload ran before it.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_BERT, write_colour_dataset

import xmodal
from xmodal.config import ConfigError, load_yaml_or_json
from xmodal.models.model import CrossModalModel
from xmodal.models.towers import load_hf_backbone
from xmodal.train import TrainConfig, Trainer, load_train_config
from xmodal.train.config import DataSection, ModelSection, OptimSection


class _Payload:
    """Unpickling this creates ``marker`` (harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


def copy_model(source: str, directory: Path) -> Path:
    shutil.copytree(source, directory)
    return directory


@pytest.mark.parametrize(
    "payload", ["pytorch_model.bin", "weights.pt", "extra/state.pkl", "tokenizer/x.pth"]
)
def test_model_directory_with_a_pickle_is_refused(tiny_model_dir, tmp_path, payload) -> None:
    directory = copy_model(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "payload-ran"
    plant(directory / payload, marker)
    for load in (CrossModalModel.from_pretrained, xmodal.load_model):
        with pytest.raises(ValueError, match="pickle payload") as info:
            load(directory)
        assert payload in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists()


def test_pickle_weights_without_safetensors_are_refused(tiny_model_dir, tmp_path) -> None:
    directory = copy_model(tiny_model_dir, tmp_path / "model")
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    plant(directory / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle payload"):
        xmodal.load_model(directory)
    (directory / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="weights load only from safetensors"):
        CrossModalModel.from_pretrained(directory)
    assert not marker.exists()


def test_pretrained_tower_folders_load_only_safetensors(tmp_path) -> None:
    """A Hugging Face folder with only ``pytorch_model.bin`` is not a source of weights."""
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"}).save_pretrained(folder)
    marker = tmp_path / "payload-ran"
    plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(OSError, match="safetensors"):
        load_hf_backbone(str(folder), pretrained=True, hf_config=None)
    assert not marker.exists()


def test_training_resume_refuses_a_checkpoint_with_a_pickle(tiny_model_dir, tmp_path) -> None:
    data = write_colour_dataset(tmp_path / "data", n=8)
    config = TrainConfig(
        data=DataSection(train=data, num_workers=0),
        model=ModelSection(name=tiny_model_dir),
        optim=OptimSection(steps=2, batch_size=4, warmup_steps=1),
        out_dir=str(tmp_path / "run"),
        device="cpu",
        precision="fp32",
        eval_every=0,
        save_every=1,
    )
    Trainer(config).train(stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"
    assert (checkpoint / "train_state.safetensors").is_file()
    marker = tmp_path / "payload-ran"
    plant(checkpoint / "optimizer.pt", marker)
    with pytest.raises(ValueError, match="optimizer.pt is a pickle payload"):
        Trainer(config).train(resume=True)
    assert not marker.exists()
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:builtins.open ['{marker}', 'w']",
        "!!python/object/new:builtins.open ['{marker}', 'w']",
        "!!python/name:builtins.open",
    ],
)
def test_yaml_with_python_tags_is_refused(tmp_path, tag) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "run.yaml"
    text = yaml.safe_dump({"data": {"train": "x.jsonl"}}) + "seed: " + tag.format(marker=marker)
    path.write_text(text + "\n", encoding="utf-8")
    for load in (load_yaml_or_json, load_train_config):
        with pytest.raises(ConfigError, match="not valid YAML") as info:
            load(path)
        assert "python" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_model_configs_are_json_data(tiny_model_dir, tmp_path) -> None:
    """config.json and processor_config.json are parsed as JSON, never as YAML with tags."""
    directory = copy_model(tiny_model_dir, tmp_path / "model")
    marker = tmp_path / "payload-ran"
    for name in ("config.json", "processor_config.json"):
        original = (directory / name).read_text()
        (directory / name).write_text(f"!!python/object/apply:builtins.open ['{marker}', 'w']")
        with pytest.raises(ConfigError, match=f"{name}: the .* is not valid JSON"):
            xmodal.load_model(directory)
        (directory / name).write_text(json.dumps([original]))
        with pytest.raises(ConfigError, match="must be a JSON object"):
            xmodal.load_model(directory)
        (directory / name).write_text(original)
    assert not marker.exists()
    xmodal.load_model(directory)  # restored: loads
