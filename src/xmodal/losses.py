"""Contrastive and matching losses: pure functions of tensors.

All embeddings are L2-normalised (B, D). ``image_ids`` (B,) says which rows show the same image:
two captions of one image are both positives for it, never negatives of each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_image_mask(image_ids: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
    """(B, B) bool: True where row i and column j show the same image (the diagonal at least)."""
    if image_ids is None:
        return torch.eye(batch, dtype=torch.bool, device=device)
    image_ids = torch.as_tensor(image_ids, device=device)
    if image_ids.shape != (batch,):
        raise ValueError(f"image_ids must have shape ({batch},), got {tuple(image_ids.shape)}")
    return image_ids[:, None] == image_ids[None, :]


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): row i's positive is column i.

    Other columns showing the same image as row i are removed from the softmax (they are
    neither positives nor negatives), so repeated captions of one image do not push apart.
    ``logit_scale`` is the multiplier itself (already exponentiated and clamped).
    """
    logits = logit_scale * image_embeds @ text_embeds.t()  # (B, B), row = image
    batch = logits.shape[0]
    same = same_image_mask(image_ids, batch, logits.device)
    diagonal = torch.eye(batch, dtype=torch.bool, device=logits.device)
    ignore = same & ~diagonal
    logits = logits.masked_fill(ignore, float("-inf"))
    targets = torch.arange(batch, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, caption) pair is a binary decision.

    Pairs showing the same image are positives (label +1), all others negatives (-1). The loss is
    summed over pairs and divided by the batch size, as in the paper.
    """
    logits = logit_scale * image_embeds @ text_embeds.t() + logit_bias
    batch = logits.shape[0]
    labels = 2.0 * same_image_mask(image_ids, batch, logits.device).to(logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / batch


def sample_hard_negatives(
    similarity: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one hard negative per row and per column of a (B, B) image-text similarity.

    Negatives are drawn with probability softmax(similarity) among pairs that show different
    images, so harder (more similar) mismatches are picked more often. Pass the scaled logits
    (logit scale x cosine): raw cosines make the softmax nearly uniform. Returns
    ``(negative_text_for_image, negative_image_for_text, valid)``: indices (B,) and a bool mask
    of rows that have at least one possible negative (a batch of one image has none).
    """
    similarity = similarity.detach().float()
    batch = similarity.shape[0]
    allowed = ~same_image_mask(image_ids, batch, similarity.device)
    valid = allowed.any(dim=1)
    weights_i2t = _masked_softmax(similarity, allowed)
    weights_t2i = _masked_softmax(similarity.t(), allowed.t())
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image, valid


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=1)
    # Rows with nothing allowed: a harmless uniform row (they are dropped via `valid`).
    return torch.where(allowed.any(dim=1, keepdim=True), weights, torch.ones_like(weights))


def itm_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ITM head: positive pairs are class 1, negative pairs class 0."""
    logits = torch.cat([positive_logits, negative_logits])
    labels = torch.cat(
        [
            torch.ones(len(positive_logits), dtype=torch.long, device=logits.device),
            torch.zeros(len(negative_logits), dtype=torch.long, device=logits.device),
        ]
    )
    return F.cross_entropy(logits, labels)


def cosine_pair_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.0,
) -> torch.Tensor:
    """The design note's ``CosineEmbeddingLoss``, done right.

    Compares image embeddings with caption embeddings (never a tensor with itself): every
    (image i, caption j) pair showing the same image is labelled 1, every mismatched pair -1.
    Positives and negatives are averaged separately and weighted equally, so the B^2 - B
    negatives do not drown the B positives.
    """
    cos = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).t()
    same = same_image_mask(image_ids, cos.shape[0], cos.device)
    positive = (1.0 - cos[same]).mean()
    negatives = (cos[~same] - margin).clamp(min=0.0)
    negative = negatives.mean() if negatives.numel() else cos.new_zeros(())
    return 0.5 * (positive + negative)
