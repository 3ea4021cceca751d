"""Captions run in groups of similar length (``optim.text_length_groups``): the same features
and gradients as the batch at once, and the one-run fallback where padding matters."""

from __future__ import annotations

import pytest
import torch

from xmodal.models import CrossModalModel

CAPTIONS = [
    "a cat",
    "kiss: woman, man: light skin tone, medium-dark skin tone",
    "red apple",
    "a man in a business suit levitating: medium skin tone",
    "flag",
    "people holding hands",
    "an emoji of a smiling face with open mouth and smiling eyes",
    "ok",
    "woman and man holding hands: dark skin tone, light skin tone",
    "a small blue circle on a white background",
]


def _model(make_tiny_config, pooling: str = "mean") -> CrossModalModel:
    torch.manual_seed(0)
    return CrossModalModel(make_tiny_config("cross", pooling)).eval()


@pytest.mark.parametrize("groups", [2, 3, 4])
def test_same_features_as_one_run(make_tiny_config, processor, groups) -> None:
    model = _model(make_tiny_config)
    text = processor(text=CAPTIONS)
    ids, mask = text["input_ids"], text["attention_mask"]
    with torch.no_grad():
        whole = model.text_features(ids, mask)
        grouped = model.text_features_by_length(ids, mask, groups)
    torch.testing.assert_close(grouped.embeds, whole.embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.projected, whole.projected, atol=1e-5, rtol=1e-5)
    assert grouped.tokens.shape == whole.tokens.shape
    assert torch.equal(grouped.mask, mask)
    real = mask.bool()
    torch.testing.assert_close(grouped.tokens[real], whole.tokens[real], atol=1e-5, rtol=1e-5)


def test_same_gradients_as_one_run(make_tiny_config, processor) -> None:
    text = processor(text=CAPTIONS)
    ids, mask = text["input_ids"], text["attention_mask"]
    target = torch.randn(len(CAPTIONS), 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for groups in (1, 3):
        model = _model(make_tiny_config)
        features = model.text_features_by_length(ids, mask, groups)
        (features.embeds * target).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def _tower_calls(model: CrossModalModel, ids, mask, groups: int) -> list[torch.Size]:
    """The input shapes the text tower sees for one ``text_features_by_length`` call."""
    calls: list[torch.Size] = []
    original = model.text_tower.forward

    def recording(input_ids, attention_mask):
        calls.append(input_ids.shape)
        return original(input_ids, attention_mask)

    model.text_tower.forward = recording
    try:
        with torch.no_grad():
            model.text_features_by_length(ids, mask, groups)
    finally:
        del model.text_tower.forward
    return calls


def test_groups_cut_the_padding(make_tiny_config, processor) -> None:
    model = _model(make_tiny_config)
    text = processor(text=CAPTIONS)
    calls = _tower_calls(model, text["input_ids"], text["attention_mask"], 2)
    lengths = sorted(text["attention_mask"].sum(dim=1).tolist())
    assert [tuple(shape) for shape in calls] == [(5, lengths[4]), (5, lengths[9])]
    assert lengths[4] < text["input_ids"].shape[1]


def test_one_run_where_padding_matters(make_tiny_config, processor) -> None:
    """A pooler head (it may read a fixed position), left padding and tiny batches run whole."""
    text = processor(text=CAPTIONS)
    ids, mask = text["input_ids"], text["attention_mask"]
    pooled = _model(make_tiny_config, "pooler")
    assert not pooled.text_tower.padding_free
    shifts = [int((m == 0).sum()) for m in mask]
    left_ids = torch.stack([torch.roll(r, s) for r, s in zip(ids, shifts, strict=True)])
    left_mask = torch.stack([torch.roll(m, s) for m, s in zip(mask, shifts, strict=True)])
    model = _model(make_tiny_config)
    assert len(_tower_calls(model, ids, mask, 4)) == 4  # the case that does split
    cases = {
        "pooler": (pooled, ids, mask, 4),
        "left padding": (model, left_ids, left_mask, 4),
        "batch too small": (model, ids[:3], mask[:3], 2),
        "one group": (model, ids, mask, 1),
    }
    for case, (m, i, k, groups) in cases.items():
        assert _tower_calls(m, i, k, groups) == [i.shape], case
