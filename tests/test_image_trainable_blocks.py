"""Training the last blocks of the EfficientNet-Lite tower on a cached prefix
(``model.image_trainable_blocks``): the split equals the whole tower, only the last blocks
change, a resumed run is exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config, write_colour_dataset
from safetensors.torch import load_file
from test_augmented_views import views_config

from xmodal.config import ConfigError, ImageTowerConfig
from xmodal.evaluate.runner import image_tower_outputs
from xmodal.models.image import EfficientNetLiteTower
from xmodal.models.model import CrossModalModel
from xmodal.presets import load_model
from xmodal.train import Trainer
from xmodal.train.config import DataSection, ExperimentalSection, TrainConfig

pytest.importorskip("efficientnet_lite_pytorch")


@pytest.mark.parametrize("levels", [1, 7])
def test_prefix_then_suffix_is_the_whole_tower(levels) -> None:
    torch.manual_seed(0)
    config = ImageTowerConfig(name="efficientnet-lite0", pretrained=False, pool_levels=levels)
    tower = EfficientNetLiteTower(config).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = tower(pixels)
        for start in (0, 5, 11, 15, 16):
            hidden, pooled = tower.prefix(pixels, start)
            split = tower.suffix(hidden, pooled, start)
            torch.testing.assert_close(split.pooled, whole.pooled, rtol=0, atol=0)
            torch.testing.assert_close(split.tokens, whole.tokens, rtol=0, atol=0)
    assert tower.block_count == 16


def efficientnet_model_dir(tmp_path: Path, make_processor) -> str:
    """A saved model: random EfficientNet-Lite0 (7 pool levels) + the tiny text tower."""
    config = tiny_model_config()
    config = dataclasses.replace(
        config,
        image=ImageTowerConfig(name="efficientnet-lite0", pretrained=False, pool_levels=7),
    )
    torch.manual_seed(0)
    directory = tmp_path / "lite0-model"
    CrossModalModel(config).save_pretrained(directory, make_processor())
    return str(directory)


def partial_config(tmp_path: Path, model_dir: str, out: str, blocks: int = 1, **optim):
    config = views_config(tmp_path, model_dir, out, views=2, **optim)
    config.model.lock_image = False
    config.experimental.image_trainable_blocks = blocks
    return config


def test_cached_prefix_matches_the_inference_copy(tmp_path, make_processor) -> None:
    model, processor = load_model(efficientnet_model_dir(tmp_path, make_processor))
    model.eval()
    write_colour_dataset(tmp_path / "data", n=6)
    images = sorted(str(p) for p in (tmp_path / "data" / "images").glob("*.png"))
    whole = image_tower_outputs(model, processor, images)
    prefix = image_tower_outputs(model, processor, images, keep_tokens=False, prefix_blocks=14)
    assert prefix.tokens is not None and prefix.tokens.dim() == 4  # the map, kept
    with torch.no_grad():
        out = model.image_tower.suffix(prefix.tokens.float(), prefix.pooled, 14)
    cosine = torch.nn.functional.cosine_similarity(out.pooled, whole.pooled)
    assert (cosine > 0.9999).all()


def test_only_the_last_blocks_train_and_resume_is_exact(tmp_path, make_processor) -> None:
    model_dir = efficientnet_model_dir(tmp_path, make_processor)
    straight = partial_config(tmp_path, model_dir, "straight", blocks=1, steps=6)
    straight.save_every = 3
    trainer = Trainer(straight)
    assert trainer.image_start == 15
    before = {k: v.clone() for k, v in trainer.model.image_tower.state_dict().items()}
    trainer.train()
    after = trainer.model.image_tower.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("net._blocks.15.") for k in changed)
    assert any(k.startswith("net._conv_head.") for k in changed)
    assert all(k.startswith(("net._blocks.15.", "net._conv_head.", "net._bn1.")) for k in changed)
    # batch-norm statistics of the trained part keep their values (eval mode)
    assert not any("running" in k for k in changed)
    # the cache holds the map entering block 15 for both views
    assert trainer.images.base.tokens.shape[1:] == (192, 2, 2)
    assert trainer.images.extra.tokens.shape[:2] == (1, 24)

    interrupted = partial_config(tmp_path, model_dir, "interrupted", blocks=1, steps=6)
    interrupted.save_every = 3
    Trainer(interrupted).train(stop_after=3)
    torch.manual_seed(77)
    Trainer(interrupted).train(resume=True)
    a = load_file(str(Path(straight.out_dir) / "model" / "model.safetensors"))
    b = load_file(str(Path(interrupted.out_dir) / "model" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the saved model's whole tower reproduces what training computed from the prefix
    saved, _ = load_model(str(Path(straight.out_dir) / "model"))
    for key, value in saved.image_tower.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_trainable_blocks_config_is_checked(tmp_path, tiny_model_dir, make_processor) -> None:
    with pytest.raises(ConfigError, match="experimental.image_trainable_blocks must be >= 0"):
        ExperimentalSection(image_trainable_blocks=-1).validate()
    config = TrainConfig(data=DataSection(train="x"))
    config.experimental.image_trainable_blocks = 2
    config.model.lock_image = True
    with pytest.raises(ConfigError, match="set one of them"):
        config.validate()
    config.model.lock_image, config.model.cached_views = False, 3
    config.validate()  # a cached prefix
    with pytest.raises(ConfigError, match="needs an EfficientNet-Lite image tower"):
        Trainer(partial_config(tmp_path, tiny_model_dir, "hf"))
    model_dir = efficientnet_model_dir(tmp_path, make_processor)
    with pytest.raises(
        ConfigError, match="image_trainable_blocks is 17 but the image tower has 16"
    ):
        Trainer(partial_config(tmp_path, model_dir, "many", blocks=17))
