"""A new model from towers named in the training config (folders or hub ids), without Python."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BERT, TINY_RESNET, write_colour_dataset
from PIL import Image

from xmodal.cli import main as cli_main
from xmodal.config import ConfigError
from xmodal.models.text import pool_tokens
from xmodal.presets import assemble, image_processor_options, load_model
from xmodal.train import Trainer, load_train_config

TINY_VIT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory, minilm_tokenizer) -> dict[str, Path]:
    """Tiny random HF towers saved as a user would: ViT (with its image processor config),
    ResNet (no preprocessor config) and BERT with the bert-base-uncased tokenizer."""
    from transformers import (
        BertConfig,
        BertModel,
        ResNetConfig,
        ResNetModel,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**TINY_VIT))
    vit.save_pretrained(root / "vit")
    ViTImageProcessorPil(
        size={"height": 32, "width": 32},
        resample=3,
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(root / "vit")
    resnet = {k: v for k, v in TINY_RESNET.items() if k != "model_type"}
    ResNetModel(ResNetConfig(**resnet)).save_pretrained(root / "resnet")
    bert = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    BertModel(BertConfig(**bert)).save_pretrained(root / "bert")
    minilm_tokenizer.save_pretrained(root / "bert")
    BertModel(BertConfig(**bert)).save_pretrained(root / "bert-no-tokenizer")
    return {p.name: p for p in root.iterdir()}


def photos() -> list[np.ndarray]:
    from skimage import data as skdata

    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]


def test_assemble_keeps_tower_weights_and_follows_their_preprocessing(towers) -> None:
    from transformers import BertModel, ViTImageProcessorPil, ViTModel

    model, processor = assemble(
        towers["vit"], towers["bert"], text_pooling="eos", embed_dim=32, fusion="pooled"
    )
    source_image = ViTModel.from_pretrained(towers["vit"]).state_dict()
    for key, value in model.image_tower.model.state_dict().items():
        assert torch.equal(value, source_image[key]), key
    source_text = BertModel.from_pretrained(towers["bert"]).state_dict()
    for key, value in model.text_tower.model.state_dict().items():
        assert torch.equal(value, source_text[key]), key
    cfg = processor.config
    assert (cfg.image_size, cfg.resize, cfg.interpolation) == (32, "squash", "bicubic")
    assert cfg.mean == pytest.approx((0.4, 0.5, 0.6)) and cfg.std == pytest.approx((0.2, 0.25, 0.3))
    assert model.config.fusion.kind == "pooled" and model.config.embed_dim == 32
    assert model.text_tower.pooling == "eos"
    # The checkpoint's own image processor gives the same pixels on real photos.
    ours = processor.process_images(photos())
    theirs = ViTImageProcessorPil.from_pretrained(towers["vit"])(photos(), return_tensors="pt")
    assert ours.shape == theirs["pixel_values"].shape == (3, 3, 32, 32)
    assert (ours - theirs["pixel_values"]).abs().mean() < 0.02
    batch = processor(images=photos()[:2], text=["an astronaut", "a cat lying on a rug"])
    with torch.no_grad():
        image = model.encode_image(batch["pixel_values"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert image.shape == text.shape == (2, 32)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_assemble_builds_fp16_saved_towers_in_float32(towers, tmp_path) -> None:
    from transformers import ViTModel

    half = tmp_path / "vit-fp16"
    ViTModel.from_pretrained(towers["vit"]).half().save_pretrained(half)
    shutil.copy(towers["vit"] / "preprocessor_config.json", half)
    model, processor = assemble(half, towers["bert"], embed_dim=32, fusion="none")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        image = model.encode_image(processor.process_images(photos()))
    assert image.dtype == torch.float32 and image.shape == (3, 32)


def test_resnet_without_preprocessor_config_gets_defaults(towers) -> None:
    model, processor = assemble(towers["resnet"], towers["bert"], embed_dim=32, fusion="cross")
    cfg = processor.config
    assert (cfg.image_size, cfg.resize, cfg.resize_size) == (224, "shorter", 256)
    assert cfg.max_length == 128 and cfg.tokenizer == str(towers["bert"].resolve())
    assert model.image_tower.output_dim == TINY_RESNET["hidden_sizes"][-1]
    assert model.config.fusion.layers == 2


def test_image_processor_options_of_common_checkpoints() -> None:
    clip = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    clip |= {"do_center_crop": True, "resample": 3, "image_mean": [0.48, 0.46, 0.41]}
    options = image_processor_options(clip)
    assert (options["resize"], options["resize_size"], options["image_size"]) == (
        "shorter",
        224,
        224,
    )
    assert options["interpolation"] == "bicubic" and options["mean"] == (0.48, 0.46, 0.41)
    convnext = {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 2}
    options = image_processor_options(convnext)
    assert (options["resize_size"], options["image_size"]) == (256, 224)
    assert options["interpolation"] == "bilinear"
    # google/efficientnet-b0 resizes with NEAREST (0), not bilinear
    efficientnet = {"size": {"height": 224, "width": 224}, "resample": 0}
    assert image_processor_options(efficientnet)["interpolation"] == "nearest"
    assert image_processor_options({"size": 64, "resample": 1})["interpolation"] == "lanczos"
    unnormalised = image_processor_options({"size": 64, "do_normalize": False})
    assert unnormalised["mean"] == (0, 0, 0) and unnormalised["std"] == (1, 1, 1)
    with pytest.raises(ConfigError, match="model.image .*only square"):
        image_processor_options({"size": {"height": 224, "width": 160}}, "model.image")


def test_eos_pooling_takes_the_last_real_token_with_either_padding_side() -> None:
    hidden = torch.randn(3, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected_right = torch.stack([hidden[0, 2], hidden[1, 4], hidden[2, 0]])
    assert torch.equal(pool_tokens(hidden, right, "eos"), expected_right)
    assert torch.equal(pool_tokens(hidden, left, "eos"), hidden[:, 4])


def write_yaml(tmp_path: Path, model: str, steps: int = 3) -> Path:
    data = write_colour_dataset(tmp_path / "data", n=12)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"data: {{train: {data}, val: {data}, num_workers: 0}}\n"
        f"model: {model}\n"
        f"optim: {{steps: {steps}, batch_size: 4, warmup_steps: 1}}\n"
        f"out_dir: {tmp_path / 'out'}\nprecision: fp32\ndevice: cpu\n"
        "eval_every: 0\nsave_every: 0\nlog_every: 1\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("fusion", ["cross", "pooled"])
def test_yaml_naming_towers_trains_saves_and_reloads_without_them(tmp_path, towers, fusion):
    local = tmp_path / "local"
    shutil.copytree(towers["vit"], local / "vit")
    shutil.copytree(towers["bert"], local / "bert")
    path = write_yaml(
        tmp_path,
        f"{{image: local/vit, text: local/bert, text_pooling: cls, overrides: {{embed_dim: 32}}, "
        f"fusion: {fusion}}}",
    )
    config = load_train_config(path)
    assert config.model.image == str(local / "vit")  # relative to the config file
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train()
    assert result.progress.step == 3
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("image_tower.") for k in changed)
    assert any(k.startswith(("fusion.", "itm_head.")) for k in changed)
    shutil.rmtree(local)  # a saved model never needs the tower folders again
    model, processor = load_model(result.model_dir)
    assert model.config.fusion.kind == fusion and model.config.text.pooling == "cls"
    assert processor.config.image_size == 32 and processor.config.interpolation == "bicubic"
    batch = processor(images=photos(), text=["an astronaut", "a cat", "a cup of coffee"])
    trainer.model.eval()
    model.eval()
    with torch.no_grad():
        for a, b in (
            (
                model.encode_image(batch["pixel_values"]),
                trainer.model.encode_image(batch["pixel_values"]),
            ),  # fmt: skip
            (
                model.encode_text(batch["input_ids"], batch["attention_mask"]),
                trainer.model.encode_text(batch["input_ids"], batch["attention_mask"]),
            ),
        ):
            torch.testing.assert_close(a, b)


def test_fusion_key_is_validated_and_reaches_a_named_model(tmp_path, tiny_model_dir) -> None:
    path = write_yaml(tmp_path, "{fusion: mixed}")
    with pytest.raises(ConfigError, match="model.fusion must be one of"):
        load_train_config(path)
    path = write_yaml(tmp_path, f"{{name: {tiny_model_dir}, fusion: pooled}}")
    trainer = Trainer(load_train_config(path))
    assert trainer.model.config.fusion.kind == "pooled"
    assert type(trainer.model.fusion).__name__ == "PooledFusion"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "{image: ./missing/vit, text: bert}",
            r"model.image: folder '/.*/missing/vit' not found",
        ),
        ("{image: vit, text: vit}", r"model.text: .*'vit' model, not a text model"),
        ("{image: bert, text: bert}", r"model.image: .*'bert' model, not a vision model"),
        ("{image: nobody/no-such-model, text: bert}", r"model.image: cannot load .*from the hub"),
        ("{image: vit, text: bert-no-tokenizer}", r"model.text: no tokenizer could be loaded"),
        ("{image: empty, text: bert}", r"model.image: cannot load a transformers config"),
        ("{image: config-only, text: bert}", r"model.image: .*no safetensors weights"),
        ("{name: seed, image: vit, text: bert}", r"model.name and model.image/model.text"),
        ("{image: vit}", r"model.text is required with model.image"),
        ("{name: seed, text_pooling: eos}", r"model.text_pooling applies to a model assembled"),
        ("{image: vit, text: bert, text_pooling: last}", r"model.text_pooling must be one of"),
        (
            "{image: vit, text: bert, overrides: {embed_dim: 20}}",
            r"model: embed_dim \(20\) must be divisible by fusion.heads \(8\)",
        ),
    ],
)
def test_bad_tower_names_are_refused_naming_the_key(tmp_path, towers, model, message, capsys):
    for name in ("vit", "bert", "bert-no-tokenizer"):
        shutil.copytree(towers[name], tmp_path / name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    shutil.copy(towers["vit"] / "config.json", tmp_path / "config-only")
    path = write_yaml(tmp_path, model)
    with pytest.raises(ConfigError, match=message):
        Trainer(load_train_config(path))
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xmodal train: error: model")
    assert not (tmp_path / "out").exists()


def test_fusion_none_is_accepted_by_the_config(tmp_path, towers) -> None:
    """``fusion: none`` (a dual encoder) is a valid key; a model without that fusion refuses it
    at build time with a ConfigError naming the fusion, never a traceback."""
    path = write_yaml(tmp_path, f"{{image: {towers['vit']}, text: {towers['bert']}, fusion: none}}")
    config = load_train_config(path)
    assert config.model.fusion == "none"
    try:
        trainer = Trainer(config)
    except ConfigError as err:
        assert "fusion" in str(err)
    else:
        assert trainer.model.config.fusion.kind == "none"


def test_processor_built_on_an_image_matches_between_assemble_and_saved_model(towers, tmp_path):
    model, processor = assemble(towers["vit"], towers["bert"], embed_dim=32)
    model.save_pretrained(tmp_path / "saved", processor)
    _, reloaded = load_model(tmp_path / "saved")
    image = Image.fromarray(photos()[1])
    assert torch.equal(processor.process_image(image), reloaded.process_image(image))
    assert reloaded.config_hash == processor.config_hash
