"""``image.token_levels``: image tokens that also carry the earlier stages of their patch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmodal.config import ImageTowerConfig
from xmodal.errors import ConfigError
from xmodal.models.image import EfficientNetLiteTower, grid_mean, standardised
from xmodal.models.inference import inference_copy
from xmodal.train.config import DataSection, TrainConfig


def _tower(token_levels: int, pool_levels: int = 3) -> EfficientNetLiteTower:
    config = ImageTowerConfig(pretrained=False, pool_levels=pool_levels, token_levels=token_levels)
    return EfficientNetLiteTower(config).eval()


def test_tokens_hold_each_level_averaged_to_the_grid() -> None:
    torch.manual_seed(0)
    plain, wide = _tower(1), _tower(7)
    wide.load_state_dict(plain.state_dict())
    stage_outputs = {}
    for idx in wide.token_taps:
        plain.net._blocks[idx].register_forward_hook(
            lambda _m, _i, out, idx=idx: stage_outputs.__setitem__(idx, out)
        )
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        reference, out = plain(pixels), wide(pixels)
    side = 4  # 128 px / stride 32
    widths = [stage_outputs[i].shape[1] for i in wide.token_taps[::-1]]
    assert out.tokens.shape == (2, side * side, 1280 + sum(widths)) == (2, 16, wide.token_dim)
    torch.testing.assert_close(out.pooled, reference.pooled)  # the pooled vector is unchanged
    levels = [reference.tokens]
    for idx in wide.token_taps[::-1]:  # deepest first, as the pooled levels
        stage = stage_outputs[idx]
        b, c, h, w = stage.shape
        patches = stage.view(b, c, side, h // side, side, w // side).mean(dim=(3, 5))
        levels.append(patches.flatten(2).transpose(1, 2))
    expected = torch.cat([standardised(level) for level in levels], dim=-1)
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-4)
    fast = inference_copy(wide)(pixels.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast.tokens, out.tokens, atol=1e-3, rtol=1e-3)


def test_one_level_keeps_the_final_map_as_it_was() -> None:
    tower = _tower(1)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hidden, pooled = tower.prefix(pixels, tower.block_count)
        grid = tower.net._swish(tower.net._bn1(tower.net._conv_head(hidden)))
        out = tower(pixels)
    assert tower.token_dim == 1280
    torch.testing.assert_close(out.tokens, grid.flatten(2).transpose(1, 2))


def test_token_levels_are_checked() -> None:
    with pytest.raises(ConfigError, match="token_levels must be >= 1"):
        ImageTowerConfig(token_levels=0).validate()
    with pytest.raises(ConfigError, match="built for the efficientnet_lite tower"):
        ImageTowerConfig(kind="hf", name="x", token_levels=2).validate()
    with pytest.raises(ConfigError, match="token_levels is 9 but efficientnet-lite0 has 8"):
        _tower(9)
    with pytest.raises(ConfigError, match="cached prefix"):
        _tower(2).prefix(torch.randn(1, 3, 64, 64), 10)
    config = TrainConfig(data=DataSection(train="x"))
    config.model.overrides = {"image.token_levels": 3}
    config.experimental.image_trainable_blocks = 2
    with pytest.raises(ConfigError, match="does not combine with experimental.image_trainable"):
        config.validate()


def test_training_option_widens_the_fusion_and_saves(tmp_path, make_processor) -> None:
    from conftest import TINY_BERT
    from test_train import make_config

    from xmodal.config import FusionConfig, ModelConfig, TextTowerConfig
    from xmodal.models import CrossModalModel
    from xmodal.train import Trainer

    model_dir = tmp_path / "lite"
    config = ModelConfig(
        image=ImageTowerConfig(pretrained=False),
        text=TextTowerConfig(
            name="tiny-bert", package=None, pretrained=False, hf_config=dict(TINY_BERT)
        ),
        fusion=FusionConfig(kind="cross", layers=1, heads=4),
        embed_dim=32,
    )
    CrossModalModel(config).save_pretrained(model_dir, make_processor())
    train_config = make_config(tmp_path, str(model_dir), "run", steps=2, batch_size=4)
    train_config.model.lock_image = True
    train_config.model.overrides = {"image.token_levels": 3}
    trainer = Trainer(train_config)
    assert trainer.model.fusion.image_in.in_features == 1280 + 192 + 320
    result = trainer.train()
    saved = CrossModalModel.from_pretrained(result.model_dir)
    assert saved.config.image.token_levels == 3
    assert saved.image_tower.token_dim == 1792


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((56, 56), (7, 7)),
        ((14, 14), (7, 7)),
        ((7, 7), (7, 7)),
        ((25, 13), (4, 4)),
        ((5, 6), (7, 3)),
    ],
)
def test_grid_mean_is_adaptive_average_pooling(size, grid) -> None:
    """The export-friendly pooling of the token levels gives adaptive pooling's values: the
    same bits where the grid divides the map (every EfficientNet stage at 64 or 224 px), float
    rounding elsewhere; channels_last (the inference copy) too."""
    hidden = torch.randn(2, 8, *size)
    for layout in (torch.contiguous_format, torch.channels_last):
        batch = hidden.contiguous(memory_format=layout)
        expected = F.adaptive_avg_pool2d(batch, grid)
        got = grid_mean(batch, *grid)
        if size[0] % grid[0] == 0 and size[1] % grid[1] == 0:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_token_levels_export_to_onnx_at_an_uneven_grid(tmp_path, make_processor) -> None:
    """At 100 px the grid is 3 x 3 and the first stages' maps (50 and 25 px) do not divide into
    it: the exported tower still gives torch's tokens and pooled vector."""
    pytest.importorskip("onnxruntime")
    from conftest import TINY_BERT

    from xmodal.config import ModelConfig, TextTowerConfig
    from xmodal.export.onnx import export_onnx
    from xmodal.export.ort import OnnxTowers
    from xmodal.models import CrossModalModel

    config = ModelConfig(
        image=ImageTowerConfig(pretrained=False, pool_levels=7, token_levels=7),
        text=TextTowerConfig(
            name="tiny-bert", package=None, pretrained=False, hf_config=dict(TINY_BERT)
        ),
        embed_dim=32,
    )
    config.fusion.heads = 4
    model = CrossModalModel(config).eval()
    export_onnx(model, make_processor(image_size=100, resize_size=100), tmp_path)
    pixels = torch.randn(3, 3, 100, 100)
    with torch.inference_mode():
        expected = model.image_tower(pixels)
    got = OnnxTowers(tmp_path).image(pixels)
    assert got.tokens.shape == expected.tokens.shape == (3, 9, model.image_tower.token_dim)
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.pooled, expected.pooled, rtol=1e-4, atol=1e-4)
