"""Reordered captions and the ITM order term the ITM stage trains (``itm_stage.reordered``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xmodal.data.reorder import reorderings
from xmodal.models import CrossModalModel
from xmodal.train.objective import itm_reordered_loss


def test_reorderings_swap_two_neighbouring_items_of_one_list() -> None:
    assert reorderings("kiss: woman, man: light skin tone, dark skin tone") == [
        "kiss: man, woman: light skin tone, dark skin tone",
        "kiss: woman, man: dark skin tone, light skin tone",
    ]
    assert reorderings("family: man, woman, girl") == [
        "family: woman, man, girl",
        "family: man, girl, woman",
    ]
    assert reorderings("colours; red,blue") == ["colours; blue,red"]  # spacing kept per slot
    assert reorderings("a red car") == []
    assert reorderings("kiss: man, man") == []  # a swap of equal items changes nothing
    assert reorderings("family: man, man, boy") == ["family: man, boy, man"]
    assert reorderings("odd: a, , b") == []  # empty items are not items


def _pairs(make_tiny_config, grid_positions: bool = True):
    config = make_tiny_config()
    config.fusion.grid_positions = grid_positions
    return CrossModalModel(config)


def test_loss_matches_the_pairwise_reference(make_tiny_config) -> None:
    model = _pairs(make_tiny_config).train()
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, 64, 64)
    own = torch.randint(5, 90, (3, 6))
    reordered = own.flip(1)
    mask = torch.ones(6, 6, dtype=torch.long)
    model.eval()  # no dropout: the reference sees the same scores
    image = model.image_features(pixels)
    text = model.text_features(torch.cat([own, reordered]), mask)
    loss = itm_reordered_loss(model, image, text)
    with torch.no_grad():
        s_own = model.itm_score(image, model.text_features(own, mask[:3]))
        s_reordered = model.itm_score(image, model.text_features(reordered, mask[:3]))
    reference = F.softplus(s_reordered - s_own).sum()
    torch.testing.assert_close(loss.detach(), reference, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.itm_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    with pytest.raises(ValueError, match="2 x 3 caption rows"):
        itm_reordered_loss(model, image, model.text_features(own, mask[:3]))


def _two_colour_pixels(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    image = torch.empty(3, 64, 64)
    image[:, :, :32] = left[:, None, None]
    image[:, :, 32:] = right[:, None, None]
    return image


def test_the_term_teaches_the_head_which_item_is_on_the_left(make_tiny_config) -> None:
    """Images hold two colours side by side; a caption names them left to right ("c3, c5"),
    its reordering right to left. The contrastive embeddings cannot tell the two captions
    apart by their words; trained on the term alone, the ITM head learns to."""
    torch.manual_seed(0)
    colours = torch.randn(6, 3)
    pairs = [(a, b) for a in range(6) for b in range(6) if a != b]
    pixels = torch.stack([_two_colour_pixels(colours[a], colours[b]) for a, b in pairs])
    own = torch.tensor([[10 + a, 30, 10 + b] for a, b in pairs])  # "a , b"
    reordered = torch.tensor([[10 + b, 30, 10 + a] for a, b in pairs])
    mask = torch.ones(2 * len(pairs), 3, dtype=torch.long)
    ids = torch.cat([own, reordered])
    model = _pairs(make_tiny_config)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            image, text = model.image_features(pixels), model.text_features(ids, mask)
            scores = model.itm_pair_logits(
                image,
                text,
                torch.arange(len(pairs)).repeat(2),
                torch.arange(2 * len(pairs)),
            )
        score = scores[:, 1] - scores[:, 0]
        return (score[: len(pairs)] > score[len(pairs) :]).float().mean().item()

    before = accuracy()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(120):
        model.train()
        loss = itm_reordered_loss(
            model, model.image_features(pixels), model.text_features(ids, mask)
        )
        optimiser.zero_grad()
        (loss / len(pairs)).backward()
        optimiser.step()
    assert before < 0.8
    assert accuracy() >= 0.95


def _list_dataset(directory: Path) -> str:
    """Two-colour images captioned left to right ("colours: red, blue"), and some one-colour
    images with a caption that has no list."""
    (directory / "images").mkdir(parents=True)
    names = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
    lines = []
    for i, (left, right) in enumerate(
        [(a, b) for a in names for b in names if a != b] + [(a, a) for a in names]
    ):
        image = Image.new("RGB", (48, 48), names[left])
        image.paste(names[right], (24, 0, 48, 48))
        image.save(directory / "images" / f"{i}.png")
        caption = f"colours: {left}, {right}" if left != right else f"all {left}"
        lines.append({"image": f"images/{i}.png", "caption": caption})
    path = directory / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)
