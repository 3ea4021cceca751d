"""The re-rank weight: how much the ITM score counts against the ITC logit, and its calibration.

A re-ranked candidate scores ``final = itc_logit + weight * itm_score`` where
``itc_logit = logit_scale * cosine`` (the model's learned contrastive scale, as in its InfoNCE
logits) and ``itm_score`` is the ITM head's match-minus-mismatch logit. Both are logits, so
``weight = 1`` trusts the two equally; ``weight = 0`` leaves the ITC order unchanged.

The weight is calibrated on a validation split: the grid :data:`WEIGHT_GRID` is searched for
the weight maximising the mean of text->image and image->text R@1 of the re-ranked lists,
ties going to the smaller weight. Since 0 is on the grid, a head that does not beat ITC on
validation gets weight 0 and re-ranking is a no-op. The weight is saved in the model config
(``fusion.rerank_weight``); ``None`` means never calibrated, and re-ranking is then a no-op
too unless a weight is given explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from xmodal.errors import InputError
from xmodal.evaluate.retrieval import RerankCandidates

__all__ = [
    "WEIGHT_GRID",
    "Calibration",
    "RerankWeight",
    "calibrate_weight",
    "resolve_rerank_weight",
]

# 0, then 2^(-6) .. 2^6 in steps of sqrt(2): 26 weights, from "ITC decides" to "ITM decides".
WEIGHT_GRID: tuple[float, ...] = (0.0, *(2.0 ** (i / 2) for i in range(-12, 13)))


@dataclass
class Calibration:
    """The calibrated weight, its validation R@1 and that of ITC alone (weight 0)."""

    weight: float
    t2i_r1: float
    i2t_r1: float
    itc_t2i_r1: float
    itc_i2t_r1: float
    curve: list[dict[str, float]] = field(default_factory=list)  # every weight tried

    @property
    def helps(self) -> bool:
        return self.weight > 0

    def summary(self) -> dict[str, float]:
        return {
            "rerank_weight": self.weight,
            "rerank_t2i_R@1": self.t2i_r1,
            "rerank_i2t_R@1": self.i2t_r1,
            "itc_t2i_R@1": self.itc_t2i_r1,
            "itc_i2t_R@1": self.itc_i2t_r1,
        }


def calibrate_weight(
    candidates: RerankCandidates, grid: tuple[float, ...] = WEIGHT_GRID
) -> Calibration:
    """The weight on ``grid`` maximising mean R@1 (text->image, image->text) of the re-ranked
    lists; ties go to the smaller weight, so 0 unless re-ranking strictly beats ITC."""
    weights = sorted({float(w) for w in grid} | {0.0})
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"re-rank weights must be finite and >= 0; got {grid}")
    curve = []
    for weight in weights:
        t2i, i2t = candidates.ranks(weight)
        r1_t2i = 100.0 * (t2i == 0).double().mean().item()
        r1_i2t = 100.0 * (i2t == 0).double().mean().item()
        curve.append({"weight": weight, "t2i_R@1": r1_t2i, "i2t_R@1": r1_i2t})
    best = curve[0]
    for point in curve[1:]:  # strictly better only: ties keep the smaller weight
        if point["t2i_R@1"] + point["i2t_R@1"] > best["t2i_R@1"] + best["i2t_R@1"] + 1e-9:
            best = point
    return Calibration(
        weight=best["weight"],
        t2i_r1=best["t2i_R@1"],
        i2t_r1=best["i2t_R@1"],
        itc_t2i_r1=curve[0]["t2i_R@1"],
        itc_i2t_r1=curve[0]["i2t_R@1"],
        curve=curve,
    )


@dataclass
class RerankWeight:
    """The weight a re-rank uses, where it comes from, and what to tell the user."""

    weight: float
    source: str  # "calibrated", "override" or "uncalibrated"
    note: str | None = None  # set when re-ranking is a no-op (weight 0)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def to_dict(self) -> dict:
        out: dict = {"weight": self.weight, "source": self.source}
        if self.note:
            out["note"] = self.note
        return out


NOT_BETTER = "re-rank weight 0: the ITM head did not beat ITC on validation; results are ITC order"
UNCALIBRATED = (
    "re-rank weight unknown: this model's ITM head was never calibrated on validation data; "
    "results are ITC order (calibrate it with `xmodal eval --calibrate-rerank`, or pass "
    "--rerank-weight)"
)
OVERRIDE_ZERO = "re-rank weight 0 (given): results are ITC order"


def resolve_rerank_weight(saved: float | None, override: float | None = None) -> RerankWeight:
    """The weight to re-rank with: ``override`` when given, else the model's saved one; a model
    never calibrated (``saved`` None) re-ranks with weight 0, with a note saying so."""
    if override is not None:
        if override < 0 or not math.isfinite(override):
            raise InputError(f"--rerank-weight must be a finite number >= 0; got {override}")
        return RerankWeight(float(override), "override", None if override else OVERRIDE_ZERO)
    if saved is None:
        return RerankWeight(0.0, "uncalibrated", UNCALIBRATED)
    return RerankWeight(float(saved), "calibrated", None if saved else NOT_BETTER)
