"""The filter weight: how much the ITM score counts in a pair's ``combined`` score, and its
calibration.

Filtering (``xmodal filter``) ranks aligned (image, caption) pairs by how likely they match.
``combined = itc_logit + weight * itm_score``, with ``itc_logit = logit_scale * cosine`` and
``itm_score`` the ITM head's match-minus-mismatch logit, as in re-ranking
(:mod:`xmodal.evaluate.rerank`); but re-ranking orders one query's candidates, filtering
compares pairs of different captions with one another, so the weight is calibrated apart.

On a validation split, every caption with its own image is a clean pair, and each caption
meets two seeded mismatches: a random other image (an unrelated caption, what noisy web data
holds most) and one drawn from its ``near`` most similar other images by ITC (a near miss: the
same kind of thing, another one). The weight on :data:`WEIGHT_GRID` with the best mean ROC AUC
over the two kinds wins, ties going to the smaller weight (0: the similarity alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from xmodal.evaluate.rerank import WEIGHT_GRID
from xmodal.evaluate.retrieval import PairScorer, _score_pairs

__all__ = ["FilterCalibration", "calibrate_filter_weight", "roc_auc"]


@dataclass
class FilterCalibration:
    """The calibrated weight and the validation ROC AUC of each score, per kind of mismatch."""

    weight: float
    auc: dict[str, dict[str, float]]  # kind ("random", "near") -> score -> AUC
    pairs: int  # clean pairs (each kind adds as many mismatched ones)
    curve: list[dict[str, float]] = field(default_factory=list)  # mean AUC at every weight

    def summary(self) -> dict:
        return {"filter_weight": self.weight, "pairs": self.pairs, "auc": self.auc}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average 1-based rank over ties
    pos, neg = int(positive.sum()), int((~positive).sum())
    if not pos or not neg:
        raise ValueError("ROC AUC needs positive and negative pairs")
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def mismatched_images(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, near: int, seed: int
) -> tuple[Tensor, Tensor]:
    """For each caption, a seeded random image other than its own, and one drawn from its
    ``near`` most similar other images (cosine)."""
    n_img = image_emb.shape[0]
    if n_img < 2:
        raise ValueError("calibrating the filter weight needs at least two images")
    generator = torch.Generator().manual_seed(seed)
    own = text_to_image.cpu()
    other = torch.randint(0, n_img - 1, (len(own),), generator=generator)
    random = other + (other >= own).long()
    scores = (text_emb @ image_emb.T).float().cpu()
    scores[torch.arange(len(own)), own] = float("-inf")
    k = min(near, n_img - 1)
    nearest = scores.topk(k, dim=1).indices
    pick = torch.randint(0, k, (len(own),), generator=generator)
    return random, nearest[torch.arange(len(own)), pick]


def calibrate_filter_weight(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    pair_scorer: PairScorer,
    itc_scale: float,
    near: int = 16,
    seed: int = 0,
    batch_size: int = 256,
) -> FilterCalibration:
    """The weight of the ITM score in ``combined`` that best tells the clean pairs of a split
    (caption ``t`` with image ``text_to_image[t]``) from mismatched ones (see the module)."""
    text_to_image = text_to_image.cpu()
    own = text_to_image
    random, nearest = mismatched_images(image_emb, text_emb, text_to_image, near, seed)
    images = torch.cat([own, random, nearest])
    texts = torch.arange(len(own)).repeat(3)
    device = image_emb.device
    cosine = (image_emb[images.to(device)] * text_emb[texts.to(device)]).sum(-1).float().cpu()
    itm = _score_pairs(images, texts, pair_scorer, batch_size, torch.device("cpu"))
    itc = (itc_scale * cosine).numpy().astype(np.float64)
    itm_np = itm.numpy().astype(np.float64)
    n = len(own)
    kinds = {"random": slice(n, 2 * n), "near": slice(2 * n, 3 * n)}
    labels = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])

    def auc(score: np.ndarray, kind: str) -> float:
        return roc_auc(np.concatenate([score[:n], score[kinds[kind]]]), labels)

    curve = []
    for weight in WEIGHT_GRID:
        combined = itc + weight * itm_np
        per_kind = {kind: auc(combined, kind) for kind in kinds}
        curve.append(
            {"weight": weight, **per_kind, "mean": float(np.mean(list(per_kind.values())))}
        )
    best = max(curve, key=lambda point: (point["mean"], -point["weight"]))
    table = {
        kind: {
            "similarity": auc(itc, kind),
            "itm": auc(itm_np, kind),
            "combined": best[kind],
        }
        for kind in kinds
    }
    return FilterCalibration(best["weight"], table, n, curve)
