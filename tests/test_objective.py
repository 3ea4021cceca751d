"""The training objective's ITM term against an explicit loop over the pairs it scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.losses import sample_hard_negatives
from xmodal.models.model import Features
from xmodal.train.objective import itm_hard_negative_loss

ROWS, DIM, SEED = 7, 6, 3


class PairHeadModel:
    """What the ITM objective reads from a model: the CLIP scale and an ITM head (here a fixed
    bilinear function of the pair's embeddings)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.head = torch.randn(2, DIM, DIM, generator=g, dtype=torch.float64)

    def clip_scale(self) -> torch.Tensor:
        return torch.tensor(12.0, dtype=torch.float64)

    def itm_logits(self, image: Features, text: Features) -> torch.Tensor:
        return torch.einsum("bi,kij,bj->bk", image.embeds, self.head, text.embeds)

    def itm_pair_logits(self, image: Features, text: Features, image_rows, text_rows):
        return self.itm_logits(image.index(image_rows), text.index(text_rows))


def features(seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    embeds = F.normalize(torch.randn(ROWS, DIM, generator=g, dtype=torch.float64), dim=-1)
    return Features(embeds, embeds.clone(), torch.zeros(ROWS, 1, 1, dtype=torch.float64))


def cross_entropy(logits: list[float], label: int) -> float:
    top = max(logits)
    return top + math.log(sum(math.exp(v - top) for v in logits)) - logits[label]


@pytest.mark.parametrize("ids", [list(range(ROWS)), [0, 0, 1, 2, 2, 2, 3], [5] * ROWS])
def test_itm_loss_and_its_row_shares_match_a_loop(ids) -> None:
    model, image, text = PairHeadModel(), features(10), features(11)
    image_ids = torch.tensor(ids)
    similarity = model.clip_scale() * image.embeds @ text.embeds.t()
    neg_text, neg_image, valid = sample_hard_negatives(
        similarity, image_ids, torch.Generator().manual_seed(SEED)
    )

    def logit_pair(i: int, t: int) -> list[float]:
        return [float(image.embeds[i] @ model.head[k] @ text.embeds[t]) for k in range(2)]

    terms = {i: [cross_entropy(logit_pair(i, i), 1)] for i in range(ROWS)}
    for i in range(ROWS):
        if valid[i]:
            assert ids[int(neg_text[i])] != ids[i] and ids[int(neg_image[i])] != ids[i]
            terms[i].append(cross_entropy(logit_pair(i, int(neg_text[i])), 0))
            terms[i].append(cross_entropy(logit_pair(int(neg_image[i]), i), 0))
    pairs = sum(len(t) for t in terms.values())
    assert pairs == ROWS + 2 * int(valid.sum())

    whole = itm_hard_negative_loss(
        model, image, text, image_ids, torch.Generator().manual_seed(SEED)
    )
    assert whole.item() == pytest.approx(sum(sum(t) for t in terms.values()) / pairs, abs=1e-12)
    for start, stop in ((0, 3), (3, 7), (2, 2)):
        share = itm_hard_negative_loss(
            model,
            image,
            text,
            image_ids,
            torch.Generator().manual_seed(SEED),
            rows=slice(start, stop),
        )
        want = sum(sum(terms[i]) for i in range(start, stop)) / pairs
        assert share.item() == pytest.approx(want, abs=1e-12)
