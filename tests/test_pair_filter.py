"""The filter weight of the ``combined`` pair score, calibrated on a validation split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmodal.evaluate.pair_filter import calibrate_filter_weight, mismatched_images, roc_auc


def test_roc_auc_counts_ordered_pairs_and_half_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, positive) == pytest.approx(brute)
    with pytest.raises(ValueError, match="positive and negative"):
        roc_auc(scores, np.ones(60, bool))


def _split(seed: int = 0, images: int = 40, dim: int = 64):
    """Images in pairs of near twins; each caption near its own image, so the similarity tells
    a random image from its own but hardly the twin."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(images // 2, dim, generator=generator).repeat_interleave(2, 0)
    image = F.normalize(base + 0.05 * torch.randn(images, dim, generator=generator), dim=1)
    text = F.normalize(image + 0.1 * torch.randn(images, dim, generator=generator), dim=1)
    return image, text, torch.arange(images)


def test_mismatches_are_never_the_own_image_and_near_ones_are_nearest() -> None:
    image, text, own = _split()
    random, near = mismatched_images(image, text, own, near=1, seed=0)
    assert not bool((random == own).any()) and not bool((near == own).any())
    assert torch.equal(near, own ^ 1)  # the twin is each caption's nearest other image
    again = mismatched_images(image, text, own, near=1, seed=0)
    assert torch.equal(again[0], random)  # seeded


def test_an_itm_head_that_knows_the_twins_gets_weight_and_a_useless_one_none() -> None:
    image, text, own = _split()

    def knows(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        return torch.where(image_idx == own[text_idx], 4.0, -4.0)

    calibration = calibrate_filter_weight(image, text, own, knows, itc_scale=10.0, near=1)
    assert calibration.weight > 0 and calibration.pairs == 40
    assert calibration.auc["near"]["itm"] == 1.0 and calibration.auc["near"]["combined"] == 1.0
    assert calibration.auc["near"]["similarity"] < 0.9  # the twin is hard for the similarity
    assert calibration.auc["random"]["combined"] >= calibration.auc["random"]["similarity"]
    assert len(calibration.curve) == 26 and calibration.curve[0]["weight"] == 0.0

    def constant(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(image_idx))

    useless = calibrate_filter_weight(image, text, own, constant, itc_scale=10.0, near=1)
    assert useless.weight == 0.0  # ties go to the smaller weight
    assert useless.summary()["auc"]["random"]["itm"] == 0.5
