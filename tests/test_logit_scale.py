"""The learned logit scales stay under their ceilings and can come back down from them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config
from test_train import make_config

from xmodal.losses import clip_loss, siglip_loss
from xmodal.models.model import CrossModalModel
from xmodal.train import Trainer

CEILING = math.log(100.0)


def noisy_pairs(rows: int = 32, dim: int = 16, noise: float = 1.0):
    """Captions that only loosely match their images: the losses favour a scale well below 100."""
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(rows, dim, generator=g))
    text = F.normalize(image + noise * torch.randn(rows, dim, generator=g))
    return image, text


def test_infonce_scale_pushed_above_the_ceiling_comes_back_down() -> None:
    model = CrossModalModel(tiny_model_config())
    image, text = noisy_pairs()
    at = {s: clip_loss(image, text, torch.tensor(s)).item() for s in (30.0, 100.0)}
    assert at[30.0] < at[100.0]  # the data favour a lower scale
    with torch.no_grad():
        model.logit_scale.fill_(4.7)  # above ln 100, as AdamW can leave it
    clip_loss(image, text, model.clip_scale()).backward()
    assert model.logit_scale.grad.item() == 0.0  # above the ceiling the forward clamp blocks it
    optimizer = torch.optim.AdamW([model.logit_scale], lr=0.05, weight_decay=0.0)
    scales = []
    for _ in range(30):
        optimizer.zero_grad()
        clip_loss(image, text, model.clip_scale()).backward()
        optimizer.step()
        model.clamp_logit_scales_()
        assert model.logit_scale.item() <= CEILING + 1e-6
        scales.append(model.clip_scale().item())
    assert scales[-1] < 60.0
    assert all(b < a for a, b in zip(scales, scales[1:], strict=False))  # never stuck


def test_scale_clamped_at_the_ceiling_still_gets_its_gradient() -> None:
    """In float32, exp(ln 100) rounds above 100: the clamp must not zero the gradient there."""
    for dtype in (torch.float32, torch.float64):
        model = CrossModalModel(tiny_model_config()).to(dtype)
        with torch.no_grad():
            model.logit_scale.fill_(6.0)
            model.siglip_logit_scale.fill_(6.0)
        model.clamp_logit_scales_()
        image, text = (t.to(dtype) for t in noisy_pairs())
        loss = clip_loss(image, text, model.clip_scale()) + siglip_loss(
            image, text, model.siglip_scale(), model.siglip_logit_bias
        )
        loss.backward()
        assert model.clip_scale().item() == pytest.approx(100.0, rel=1e-6)
        assert model.siglip_scale().item() == pytest.approx(100.0, rel=1e-6)
        assert model.logit_scale.grad.item() > 0  # a lower scale is better: descent goes down
        assert model.siglip_logit_scale.grad.item() > 0


def test_siglip_scale_pushed_above_the_ceiling_comes_back_down() -> None:
    model = CrossModalModel(tiny_model_config())
    image, text = noisy_pairs()
    bias = model.siglip_logit_bias.detach()
    at = {s: siglip_loss(image, text, torch.tensor(s), bias).item() for s in (30.0, 100.0)}
    assert at[30.0] < at[100.0]
    with torch.no_grad():
        model.siglip_logit_scale.fill_(5.0)
    assert model.siglip_scale().item() == pytest.approx(100.0, rel=1e-6)  # forward clamp
    optimizer = torch.optim.AdamW([model.siglip_logit_scale], lr=0.05, weight_decay=0.0)
    for _ in range(30):
        optimizer.zero_grad()
        siglip_loss(image, text, model.siglip_scale(), bias).backward()
        optimizer.step()
        model.clamp_logit_scales_()
        assert model.siglip_logit_scale.item() <= CEILING + 1e-6
    assert model.siglip_scale().item() < 60.0


def test_ceilings_follow_the_config() -> None:
    config = tiny_model_config()
    config.max_logit_scale, config.max_siglip_scale = 30.0, 20.0
    model = CrossModalModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        model.siglip_logit_scale.fill_(10.0)
    assert model.clip_scale().item() == pytest.approx(30.0, rel=1e-6)
    assert model.siglip_scale().item() == pytest.approx(20.0, rel=1e-6)
    model.clamp_logit_scales_()
    assert model.logit_scale.item() == pytest.approx(math.log(30.0), rel=1e-6)
    assert model.siglip_logit_scale.item() == pytest.approx(math.log(20.0), rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(1.0)  # below the ceiling: untouched
    model.clamp_logit_scales_()
    assert model.logit_scale.item() == 1.0


def test_trainer_clamps_the_scales_after_each_step(tmp_path, tiny_model_dir) -> None:
    config = make_config(tmp_path, tiny_model_dir, "run", steps=2)
    trainer = Trainer(config)
    with torch.no_grad():
        trainer.model.logit_scale.fill_(5.0)
        trainer.model.siglip_logit_scale.fill_(5.0)
    trainer.train()
    assert trainer.model.logit_scale.item() <= CEILING + 1e-6
    assert trainer.model.siglip_logit_scale.item() <= CEILING + 1e-6
