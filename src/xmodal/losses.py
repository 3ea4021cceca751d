"""Contrastive and matching losses: pure functions of tensors.

All embeddings are L2-normalised (N, D). ``image_ids`` (N,) says which rows show the same image:
two captions of one image are both positives for it, never negatives of each other.

Every loss scores ``rows`` of the batch (default: all N) against all N columns, as OpenCLIP's
``ClipLoss`` does with ``local_loss``: a process holding rows [start, stop) of a gathered
global batch passes ``rows=slice(start, stop)``, and the positive of its local row r is the
global column ``start + r``. With ``reduction="sum"`` the per-row terms are summed, so the sums
over disjoint row ranges covering the batch add up to the whole batch's sum.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum"]


def row_range(rows: slice | None, batch: int) -> slice:
    """``rows`` as a checked ``slice(start, stop)`` inside a batch of ``batch`` (None: all)."""
    if rows is None:
        return slice(0, batch)
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"rows must be a contiguous slice(start, stop), got {rows!r}")
    start = 0 if rows.start is None else int(rows.start)
    stop = batch if rows.stop is None else int(rows.stop)
    if not 0 <= start <= stop <= batch:
        raise ValueError(f"rows {start}:{stop} are not inside a batch of {batch}")
    return slice(start, stop)


def same_image_mask(
    image_ids: torch.Tensor | None,
    batch: int,
    device: torch.device | str | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """(n, N) bool: True where scored row ``rows.start + r`` and column j show the same image
    (the diagonal at least); n = N when ``rows`` is None."""
    rows = row_range(rows, batch)
    if image_ids is None:
        return torch.eye(batch, dtype=torch.bool, device=device)[rows]
    image_ids = torch.as_tensor(image_ids, device=device)
    if image_ids.shape != (batch,):
        raise ValueError(f"image_ids must have shape ({batch},), got {tuple(image_ids.shape)}")
    return image_ids[rows, None] == image_ids[None, :]


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    *,
    rows: slice | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): image row i's positive is caption column i, and caption row i's
    positive is image column i.

    Other columns showing the same image as row i are removed from the softmax (they are
    neither positives nor negatives), so repeated captions of one image do not push apart.
    ``logit_scale`` is the multiplier itself (already exponentiated and clamped). ``rows``:
    the rows scored against all columns; ``reduction``: mean or sum over them of
    ``(image->text + text->image cross-entropy) / 2``.
    """
    _check_reduction(reduction)
    batch = image_embeds.shape[0]
    rows = row_range(rows, batch)
    device = image_embeds.device
    targets = torch.arange(rows.start, rows.stop, device=device)
    same = same_image_mask(image_ids, batch, device, rows)
    own = targets[:, None] == torch.arange(batch, device=device)[None, :]
    ignore = same & ~own
    image_to_text = (logit_scale * image_embeds[rows] @ text_embeds.t()).masked_fill(
        ignore, float("-inf")
    )
    text_to_image = (logit_scale * text_embeds[rows] @ image_embeds.t()).masked_fill(
        ignore, float("-inf")
    )
    return 0.5 * (
        F.cross_entropy(image_to_text, targets, reduction=reduction)
        + F.cross_entropy(text_to_image, targets, reduction=reduction)
    )


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    *,
    rows: slice | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, caption) pair is a binary decision.

    Pairs showing the same image are positives (label +1), all others negatives (-1). Each
    image row in ``rows`` contributes the sum of its terms over all caption columns;
    ``reduction="mean"`` divides the total by the number of rows (for the whole batch: by the
    batch size, as in the paper).
    """
    _check_reduction(reduction)
    batch = image_embeds.shape[0]
    rows = row_range(rows, batch)
    logits = logit_scale * image_embeds[rows] @ text_embeds.t() + logit_bias
    same = same_image_mask(image_ids, batch, logits.device, rows)
    labels = 2.0 * same.to(logits.dtype) - 1.0
    total = -F.logsigmoid(labels * logits).sum()
    return total if reduction == "sum" else total / (rows.stop - rows.start)


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


def itm_loss(
    positive_logits: torch.Tensor, negative_logits: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Cross-entropy of the ITM head: positive pairs are class 1, negative pairs class 0
    (``reduction``: mean or sum over all the pairs)."""
    _check_reduction(reduction)
    logits = torch.cat([positive_logits, negative_logits])
    labels = torch.cat(
        [
            torch.ones(len(positive_logits), dtype=torch.long, device=logits.device),
            torch.zeros(len(negative_logits), dtype=torch.long, device=logits.device),
        ]
    )
    return F.cross_entropy(logits, labels, reduction=reduction)


def pair_counts(image_ids: torch.Tensor | None, batch: int) -> tuple[int, int]:
    """(positive, negative) numbers of (image row, caption column) pairs in the whole batch."""
    if image_ids is None:
        return batch, batch * batch - batch
    _, per_image = torch.unique(torch.as_tensor(image_ids), return_counts=True)
    positives = int((per_image**2).sum())
    return positives, batch * batch - positives


def cosine_pair_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.0,
    *,
    rows: slice | None = None,
) -> torch.Tensor:
    """``torch.nn.CosineEmbeddingLoss`` over image-caption pairs, with balanced classes.

    Compares image embeddings with caption embeddings (never a tensor with itself, and never
    with every pair labelled 1, which a loss can satisfy by collapsing all embeddings): every
    (image i, caption j) pair showing the same image is labelled 1, every mismatched pair -1.
    Positives and negatives are averaged separately and weighted equally, so the N^2 - N
    negatives do not drown the N positives. With ``rows``, returns those image rows' share:
    their pair terms divided by the whole batch's pair counts, so the shares of disjoint row
    ranges covering the batch add up to the loss.
    """
    batch = image_embeds.shape[0]
    rows = row_range(rows, batch)
    cos = F.normalize(image_embeds[rows], dim=-1) @ F.normalize(text_embeds, dim=-1).t()
    same = same_image_mask(image_ids, batch, cos.device, rows)
    positives, negatives = pair_counts(image_ids, batch)
    positive = (1.0 - cos[same]).sum() / positives
    if not negatives:
        return 0.5 * (positive + cos.new_zeros(()))
    negative = (cos[~same] - margin).clamp(min=0.0).sum() / negatives
    return 0.5 * (positive + negative)
