"""The training objective: the model's features scored by the weighted losses."""

from __future__ import annotations

import torch

from xmodal import losses
from xmodal.models.model import CrossModalModel, Features
from xmodal.train.config import LossSection


def compute_losses(
    model: CrossModalModel,
    image: Features,
    text: Features,
    image_ids: torch.Tensor,
    weights: LossSection,
) -> dict[str, torch.Tensor]:
    """Each enabled loss term and their weighted sum under ``"loss"``.

    Row i of ``image`` and ``text`` is a matching pair; ``image_ids`` marks rows that show the
    same image, so they are never treated as negatives of each other.
    """
    terms: dict[str, torch.Tensor] = {}
    if weights.infonce:
        terms["infonce"] = losses.clip_loss(
            image.embeds, text.embeds, model.clip_scale(), image_ids
        )
    if weights.siglip:
        terms["siglip"] = losses.siglip_loss(
            image.embeds,
            text.embeds,
            model.siglip_logit_scale.exp(),
            model.siglip_logit_bias,
            image_ids,
        )
    if weights.itm:
        terms["itm"] = itm_hard_negative_loss(model, image, text, image_ids)
    if weights.cosine:
        terms["cosine"] = losses.cosine_pair_loss(image.projected, text.projected, image_ids)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {"loss": total, **terms}


def itm_hard_negative_loss(
    model: CrossModalModel, image: Features, text: Features, image_ids: torch.Tensor
) -> torch.Tensor:
    """ITM cross-entropy on the aligned pairs plus one hard negative caption per image and one
    hard negative image per caption, sampled in-batch from the similarity."""
    similarity = image.embeds @ text.embeds.t()
    neg_text, neg_image, valid = losses.sample_hard_negatives(similarity, image_ids)
    rows = valid.nonzero().squeeze(1)
    positive = model.itm_logits(image, text)
    negative_captions = model.itm_logits(image.index(rows), text.index(neg_text[rows]))
    negative_images = model.itm_logits(image.index(neg_image[rows]), text.index(rows))
    return losses.itm_loss(positive, torch.cat([negative_captions, negative_images]))
