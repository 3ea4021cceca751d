"""Multi-level pooling of the image tower (``image.pool_levels``): shapes, values, cache, config."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config
from test_train import make_config

from xmodal.config import ConfigError, ImageTowerConfig, ModelConfig, from_dict, to_dict
from xmodal.models.image import EfficientNetLiteTower
from xmodal.models.model import CrossModalModel
from xmodal.train import Trainer
from xmodal.train.config import ModelSection


def zscore(vector: torch.Tensor) -> torch.Tensor:
    """Reference: each row minus its mean over channels, over its std (eps as layer_norm)."""
    centred = vector - vector.mean(dim=1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=1, keepdim=True) + 1e-5).sqrt()


def mean_max_std(hidden: torch.Tensor) -> torch.Tensor:
    """Reference pooling of a (B, C, H, W) map: per-channel mean, max and std, each z-scored."""
    std = (hidden.var(dim=(2, 3), unbiased=False) + 1e-6).sqrt()
    stats = (hidden.mean(dim=(2, 3)), hidden.amax(dim=(2, 3)), std)
    return torch.cat([zscore(s) for s in stats], dim=1)


def tiny_model(levels: int) -> CrossModalModel:
    config = tiny_model_config()
    config.image.pool_levels = levels
    return CrossModalModel(config).eval()


def test_hf_tower_concatenates_earlier_stages_deepest_first() -> None:
    # tiny ResNet: hidden states are the stem (8 ch), stage 1 (16 ch) and stage 2 (32 ch, final)
    widths = {1: 32, 2: 3 * (32 + 16), 3: 3 * (32 + 16 + 8)}
    pixels = torch.randn(3, 3, 64, 64)
    for levels, width in widths.items():
        model = tiny_model(levels)
        assert model.image_tower.output_dim == width and model.image_tower.token_dim == 32
        assert model.image_proj.in_features == width
        with torch.no_grad():
            out = model.image_tower(pixels)
            hidden = model.image_tower.model(pixel_values=pixels, output_hidden_states=True)
        assert out.pooled.shape == (3, width) and out.tokens.shape == (3, 64, 32)
        states = hidden.hidden_states
        if levels == 1:
            expected = [states[-1].mean(dim=(2, 3))]
        else:
            expected = [mean_max_std(states[-1 - k]) for k in range(levels)]
        torch.testing.assert_close(out.pooled, torch.cat(expected, dim=1))
        assert model.encode_image(pixels).shape == (3, 32)


def test_efficientnet_levels_add_the_last_stages_and_keep_the_final_mean() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    plain = EfficientNetLiteTower(ImageTowerConfig(pretrained=False)).eval()
    multi = EfficientNetLiteTower(ImageTowerConfig(pretrained=False, pool_levels=3)).eval()
    multi.load_state_dict(plain.state_dict())
    assert plain.stage_ends == [0, 2, 4, 7, 10, 14, 15]  # 16, 24, 40, 80, 112, 192, 320 ch
    assert plain.output_dim == 1280 and multi.output_dim == 3 * (1280 + 320 + 192)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base, out = plain(pixels), multi(pixels)
        x = multi.net._swish(multi.net._bn0(multi.net._conv_stem(pixels)))
        stages = []
        for block in multi.net._blocks:
            x = block(x)
            stages.append(x)
    torch.testing.assert_close(out.tokens, base.tokens)
    grid = base.tokens.transpose(1, 2).reshape(2, 1280, 2, 2)
    torch.testing.assert_close(out.pooled[:, :3840], mean_max_std(grid))
    torch.testing.assert_close(out.pooled[:, 3840:4800], mean_max_std(stages[15]))
    torch.testing.assert_close(out.pooled[:, 4800:], mean_max_std(stages[14]))
    every = EfficientNetLiteTower(ImageTowerConfig(pretrained=False, pool_levels=8))
    assert every.output_dim == 3 * (1280 + 16 + 24 + 40 + 80 + 112 + 192 + 320)
    with pytest.raises(ConfigError, match="pool_levels is 9 but efficientnet-lite0 has 8"):
        EfficientNetLiteTower(ImageTowerConfig(pretrained=False, pool_levels=9))


def test_pool_levels_config_is_validated_and_saved(tmp_path, processor) -> None:
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="image.pool_levels must be >= 1"):
            from_dict(ImageTowerConfig, {"pool_levels": bad})
    with pytest.raises(ConfigError, match="pool_levels must be an integer"):
        from_dict(ImageTowerConfig, {"pool_levels": "3"})
    aligned = to_dict(tiny_model_config())
    aligned["image"]["pool_levels"] = 2
    aligned["projection"] = "linear_no_bias"
    with pytest.raises(ConfigError, match="needs a new projection"):
        from_dict(ModelConfig, aligned)
    with pytest.raises(ConfigError, match="model.overrides: image.pool_levels must be >= 1"):
        from_dict(ModelSection, {"overrides": {"image.pool_levels": 0}})
    with pytest.raises(ConfigError, match="has 3 feature levels"):
        tiny_model(4)
    model = tiny_model(3)
    model.save_pretrained(tmp_path / "m", processor)
    again = CrossModalModel.from_pretrained(tmp_path / "m")
    assert again.config.image.pool_levels == 3
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.eval().encode_image(pixels), model.encode_image(pixels))


def test_cached_features_equal_uncached_and_projection_is_new(tmp_path, tiny_model_dir) -> None:
    config = make_config(tmp_path, tiny_model_dir, "levels")
    config.model.lock_image = True
    config.model.cache_image_features = True
    config.model.overrides = {"image.pool_levels": 3}
    trainer = Trainer(config)
    model = trainer.model
    assert model.config.image.pool_levels == 3 and model.image_proj.in_features == 3 * 56
    original = CrossModalModel.from_pretrained(tiny_model_dir)
    kept = {k: v for k, v in original.state_dict().items() if k.startswith("image_tower.")}
    for key, value in kept.items():  # the towers are kept
        torch.testing.assert_close(model.state_dict()[key], value)
    images, train_set = trainer.image_source()
    model.eval()
    rows = train_set.unique_images()[:5]
    pixels = trainer.processor.process_images([ex.image for ex in rows])
    position = {image_id: i for i, image_id in enumerate(train_set.image_ids())}
    idx = torch.tensor([position[ex.image_id] for ex in rows])
    with torch.no_grad():
        uncached = model.image_features(pixels)
        cached = images.features({"image_index": idx})
    assert images.base.pooled.shape == (24, 168)
    torch.testing.assert_close(cached.embeds, uncached.embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached.tokens, uncached.tokens, rtol=1e-2, atol=1e-2)  # fp16 cache
    result = trainer.train()
    saved = CrossModalModel.from_pretrained(result.model_dir)
    assert saved.config.image.pool_levels == 3 and saved.image_tower.output_dim == 168


def test_onnx_export_carries_the_multi_level_pooled_vector(tmp_path, processor) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from xmodal.export.onnx import export_onnx
    from xmodal.export.ort import OnnxTowers

    model = tiny_model(3)
    export_onnx(model, processor, tmp_path, "levels")
    towers = OnnxTowers(tmp_path)
    towers.check(model)
    pixels = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        expected = model.image_tower(pixels)
    got = towers.image(pixels)
    assert got.pooled.shape == (4, 168) and got.tokens.shape == expected.tokens.shape
    torch.testing.assert_close(got.pooled, expected.pooled, rtol=1e-4, atol=1e-4)
