"""The cross fusion's grid position code: image tokens that know where they lie."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal.config import FusionConfig
from xmodal.errors import ConfigError
from xmodal.models import CrossModalModel
from xmodal.models.fusion import CrossAttentionFusion, grid_position_code


def test_code_matches_the_formula() -> None:
    code = grid_position_code(9, 8)  # a 3x3 grid, 2 frequencies per quarter
    assert code.shape == (9, 8)
    for token in range(9):
        row, column = divmod(token, 3)
        expected = []
        for axis in (row, column):
            for f in (math.sin, math.cos):
                expected += [f(axis * 10000.0 ** (-i / 2)) for i in range(2)]
        assert torch.allclose(code[token], torch.tensor(expected), atol=1e-6), token
    # every place has its own code
    assert len({tuple(row.tolist()) for row in code}) == 9


def test_class_token_gets_zeros_and_the_grid_follows() -> None:
    code = grid_position_code(17, 12)  # a class token + 4x4 patches
    assert torch.equal(code[0], torch.zeros(12))
    assert torch.allclose(code[1:], grid_position_code(16, 12))


@pytest.mark.parametrize("tokens", [0, 3, 7, 12])
def test_non_square_grids_are_refused(tokens: int) -> None:
    with pytest.raises(ConfigError, match=f"gives {tokens}"):
        grid_position_code(tokens, 8)


def _fusion(grid_positions: bool) -> CrossAttentionFusion:
    torch.manual_seed(0)
    return CrossAttentionFusion(6, 5, 16, layers=2, heads=2, grid_positions=grid_positions).eval()


def _mirrored(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """The same tokens with the grid mirrored left to right."""
    batch, _, dim = tokens.shape
    return tokens.view(batch, side, side, dim).flip(2).reshape(batch, side * side, dim)


def test_positions_let_the_fusion_tell_a_mirrored_image_apart() -> None:
    image = torch.randn(3, 16, 6)  # 4x4 grids
    text = torch.randn(3, 4, 5)
    mirrored = _mirrored(image, 4)
    blind = _fusion(False)
    # attention alone is blind to order: a mirrored image fuses to the same vector
    assert torch.allclose(
        blind(image, None, text, None), blind(mirrored, None, text, None), atol=1e-5
    )
    seeing = _fusion(True)
    fused, fused_mirrored = seeing(image, None, text, None), seeing(mirrored, None, text, None)
    assert (fused - fused_mirrored).abs().amax(1).min() > 1e-3
    # same weights, same result on the same input; the code is not trained (no parameters)
    assert torch.allclose(fused, seeing(image, None, text, None))
    assert sum(p.numel() for p in seeing.parameters()) == sum(p.numel() for p in blind.parameters())


def test_pair_indexing_path_adds_the_code_too() -> None:
    """ITM negatives and re-ranking run the fusion with row indices: the same vectors."""
    fusion = _fusion(True)
    image, text = torch.randn(2, 9, 6), torch.randn(3, 4, 5)
    image_rows, text_rows = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 0, 1, 1])
    indexed = fusion(image, None, text, None, image_rows, text_rows)
    direct = fusion(image[image_rows], None, text[text_rows], None)
    assert torch.allclose(indexed, direct, atol=1e-5)


def test_fusion_learns_left_from_right_only_with_positions() -> None:
    """Two images hold the same two things, swapped left and right; the captions say which is
    on the left. Only a fusion with positions can learn to match them."""
    torch.manual_seed(1)
    a, b = torch.randn(6), torch.randn(6)
    left_a = torch.stack([a, b, a, b]).view(1, 4, 6)  # a 2x2 grid: a on the left, b on the right
    images = torch.cat([left_a, _mirrored(left_a, 2)])  # b on the left
    captions = torch.randn(2, 3, 5)  # caption 0: "a left of b", caption 1: "b left of a"
    image_rows = torch.tensor([0, 1, 0, 1])
    text_rows = torch.tensor([0, 1, 1, 0])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])  # match, match, mismatch, mismatch
    accuracy = {}
    for grid_positions in (False, True):
        fusion = _fusion(grid_positions).train()
        head = torch.nn.Linear(16, 1)
        optimiser = torch.optim.Adam([*fusion.parameters(), *head.parameters()], lr=3e-3)
        for _ in range(150):
            logits = head(fusion(images, None, captions, None, image_rows, text_rows))[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            logits = head(fusion(images, None, captions, None, image_rows, text_rows))[:, 0]
        accuracy[grid_positions] = ((logits > 0).float() == target).float().mean().item()
    assert accuracy[True] == 1.0
    assert accuracy[False] <= 0.5  # a mirrored pair fuses alike: at best one of the two right


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="grid_positions"):
        FusionConfig(kind="pooled", grid_positions=True).validate()
    with pytest.raises(ConfigError, match="true or false"):
        FusionConfig(grid_positions="yes").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="divisible by 4"):
        CrossAttentionFusion(6, 5, 18, layers=1, heads=2, grid_positions=True)


def test_model_saves_and_loads_with_positions(tmp_path, make_tiny_config) -> None:
    config = make_tiny_config()
    config.fusion.grid_positions = True
    model = CrossModalModel(config).eval()
    pixels = torch.randn(2, 3, 64, 64)
    ids, mask = torch.randint(5, 90, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        image, text = model.image_features(pixels), model.text_features(ids, mask)
        before = model.itm_score(image, text)
    assert image.tokens.shape[1] > 1  # a grid, not a single token
    model.save_pretrained(tmp_path / "m")
    loaded = CrossModalModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.fusion.grid_positions is True
    with torch.no_grad():
        after = loaded.itm_score(loaded.image_features(pixels), loaded.text_features(ids, mask))
    assert torch.allclose(before, after, atol=1e-5)


def test_training_option_makes_a_fresh_fusion_with_positions(tmp_path, tiny_model_dir) -> None:
    from test_train import make_config

    from xmodal.config import from_dict
    from xmodal.train import Trainer
    from xmodal.train.config import ModelSection

    config = make_config(tmp_path, tiny_model_dir, "run", steps=4)
    config.model.overrides = {"fusion.grid_positions": True}
    trainer = Trainer(config)
    original = CrossModalModel.from_pretrained(tiny_model_dir)
    assert not original.config.fusion.grid_positions
    assert trainer.model.config.fusion.grid_positions
    kept = original.state_dict()
    for key, value in trainer.model.state_dict().items():
        if key.startswith(("image_tower.", "text_tower.", "image_proj.", "text_proj.")):
            assert torch.equal(value, kept[key]), key  # towers and projections kept
    result = trainer.train()
    saved = CrossModalModel.from_pretrained(result.model_dir)
    assert saved.config.fusion.grid_positions
    section = from_dict(ModelSection, {"overrides": {"fusion.grid_positions": False}})
    assert section.overrides["fusion.grid_positions"] is False
    with pytest.raises(ConfigError, match="model.overrides.fusion.grid_positions must be bool"):
        from_dict(ModelSection, {"overrides": {"fusion.grid_positions": "yes"}})
