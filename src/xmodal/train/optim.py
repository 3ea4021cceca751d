"""The optimiser and learning-rate schedule of a training run (and of its ITM stage)."""

from __future__ import annotations

import math

import torch

from xmodal.models.model import CrossModalModel
from xmodal.train.config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters AdamW leaves undecayed: norms, biases, embeddings, logit scales."""
    return param.ndim < 2 or "norm" in name.lower() or "embeddings" in name or "logit" in name


def build_optimizer(model: CrossModalModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW: towers at ``tower_lr``, new layers at ``lr``; no decay on norms, biases, scales.
    An aligned model's projections (bias-free, from its checkpoint) are pretrained too."""
    groups: dict[tuple[bool, bool], list] = {}
    pretrained = ("image_tower.", "text_tower.")
    if model.config.projection == "linear_no_bias":
        pretrained += ("image_proj.", "text_proj.")
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_tower = name.startswith(pretrained)
        groups.setdefault((is_tower, no_decay(name, param)), []).append(param)
    optim = config.optim
    param_groups = [
        {
            "params": params,
            "lr": optim.tower_lr if is_tower else optim.lr,
            "weight_decay": 0.0 if undecayed else optim.weight_decay,
        }
        for (is_tower, undecayed), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-6)


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine decay to ``min_ratio`` of it."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's learning rate to ``scheduler``'s value at the step it was restored at,
    under this run's schedule. A checkpoint restores the rate its own run's schedule reached:
    the same value when the run is unchanged, but a run resumed with more steps
    (``xmodal train --resume --steps N``) would keep the rate its shorter schedule ended with
    (0 after a finished run), and its added steps would change nothing."""
    step = scheduler.last_epoch
    pairs = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    rates = [base * factor(step) for base, factor in pairs]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (the rate of the next step)
