"""The training objective: the model's features scored by the weighted losses.

:func:`compute_losses` scores one batch held by one process. :func:`global_batch_losses` scores
the *global* batch, all ranks' rows (and all accumulated micro-batches) together, and returns
this rank's share of it: the mean over ranks of each returned term is that term of
:func:`compute_losses` on the concatenated batch, and (with the gradient rule of
:mod:`xmodal.distributed`) so is the gradient. Distribution changes speed, not the
objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xmodal import losses
from xmodal.distributed import gather_no_grad, gather_rows, world
from xmodal.models.fusion import PooledFusion
from xmodal.models.model import CrossModalModel, Features
from xmodal.train.config import LossSection


def negatives_seed(seed: int, step: int) -> int:
    """Seed of one step's ITM negative sampling: the same on every rank and for any accumulation."""
    return (seed * 1_000_003 + step) % 2**62


def compute_losses(
    model: CrossModalModel,
    image: Features,
    text: Features,
    image_ids: torch.Tensor,
    weights: LossSection,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Each enabled loss term and their weighted sum under ``"loss"``.

    Row i of ``image`` and ``text`` is a matching pair; ``image_ids`` marks rows that show the
    same image, so they are never treated as negatives of each other. ``generator`` draws the
    ITM negatives (default: the global RNG).
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
        terms["itm"] = itm_hard_negative_loss(model, image, text, image_ids, generator)
    if weights.cosine:
        terms["cosine"] = losses.cosine_pair_loss(image.projected, text.projected, image_ids)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {"loss": total, **terms}


def itm_hard_negative_loss(
    model: CrossModalModel,
    image: Features,
    text: Features,
    image_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ITM cross-entropy on the aligned pairs plus one hard negative caption per image and one
    hard negative image per caption, sampled in-batch from the similarity."""
    # Sample from the scaled logits (as ALBEF does with sim / temperature): raw cosines in
    # [-1, 1] would make the softmax almost uniform, i.e. random rather than hard negatives.
    similarity = model.clip_scale().detach() * image.embeds @ text.embeds.t()
    neg_text, neg_image, valid = losses.sample_hard_negatives(similarity, image_ids, generator)
    rows = valid.nonzero().squeeze(1)
    positive = model.itm_logits(image, text)
    negative_captions = model.itm_logits(
        select_rows(image, rows), select_rows(text, neg_text[rows])
    )
    negative_images = model.itm_logits(select_rows(image, neg_image[rows]), select_rows(text, rows))
    return losses.itm_loss(positive, torch.cat([negative_captions, negative_images]))


def global_batch_losses(
    model: CrossModalModel,
    image: Features,
    text: Features,
    image_ids: torch.Tensor,
    weights: LossSection,
    local_loss: bool = False,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's share of the loss terms of the global batch (all ranks' rows, rank order).

    ``local_loss=False``: every rank scores the whole (N, N) similarity of the N global rows,
    so its InfoNCE / SigLIP / cosine term *is* the global value (O(N^2) memory and compute on
    every rank). ``local_loss=True``: each rank scores only its own n rows against all N
    columns (O(n N)); its term is W times its rows' share, so the mean over the W ranks is the
    global value. Both give exactly the global gradient once gradients are averaged over ranks.
    ITM always scores each rank's own pairs, with hard negatives drawn from the whole global
    batch by a generator seeded with ``seed`` (identical on every rank; None: the global RNG).
    With one process both modes equal :func:`compute_losses`.
    """
    w = world()
    need = _needed_fields(model, weights)
    image_all, text_all, ids, counts = _gather_batch(image, text, image_ids, need)
    total = sum(counts)
    device = ids.device
    start = sum(counts[: w.rank])
    own = torch.arange(start, start + counts[w.rank], device=device)
    scored = own if local_loss else torch.arange(total, device=device)
    share = w.size if local_loss else 1
    terms: dict[str, torch.Tensor] = {}
    if weights.infonce:
        infonce = _infonce_sum(image_all.embeds, text_all.embeds, model.clip_scale(), ids, scored)
        terms["infonce"] = infonce * share / total
    if weights.siglip:
        siglip = _siglip_sum(
            image_all.embeds,
            text_all.embeds,
            model.siglip_logit_scale.exp(),
            model.siglip_logit_bias,
            ids,
            scored,
        )
        terms["siglip"] = siglip * share / total
    if weights.itm:
        terms["itm"] = _itm_share(model, image_all, text_all, ids, own, seed) * w.size
    if weights.cosine:
        cosine = _cosine_share(image_all.projected, text_all.projected, ids, scored)
        terms["cosine"] = cosine * share
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    return {"loss": loss, **terms}


def _needed_fields(model: CrossModalModel, weights: LossSection) -> set[str]:
    """The Features fields the enabled terms read (only those are gathered across ranks)."""
    need = set()
    if weights.infonce or weights.siglip or weights.itm:
        need.add("embeds")
    if weights.cosine or (weights.itm and isinstance(model.fusion, PooledFusion)):
        need.add("projected")
    if weights.itm and not isinstance(model.fusion, PooledFusion):
        need.add("tokens")
    return need


def _gather_batch(
    image: Features, text: Features, image_ids: torch.Tensor, need: set[str]
) -> tuple[Features, Features, torch.Tensor, list[int]]:
    """Every rank's rows of the needed fields, text tokens padded to one length (masked)."""
    rows, length = len(image_ids), text.tokens.shape[1]
    if not world().distributed:
        return image, text, image_ids, [rows]
    shapes = gather_no_grad(torch.tensor([[rows, length]], device=image_ids.device))
    counts = [int(n) for n in shapes[:, 0]]
    if "tokens" in need:
        text = pad_tokens(text, int(shapes[:, 1].max()))
    tensors, slots = [image_ids], []
    for which, features in (("image", image), ("text", text)):
        for name in ("embeds", "projected", "tokens", "mask"):
            value = getattr(features, name)
            wanted = name in need or (name == "mask" and "tokens" in need)
            if wanted and value is not None:
                slots.append((which, name))
                tensors.append(value)
    gathered = gather_rows(tensors, counts)
    total = sum(counts)
    fields: dict[str, dict[str, torch.Tensor | None]] = {"image": {}, "text": {}}
    for (which, name), value in zip(slots, gathered[1:], strict=True):
        fields[which][name] = value
    image_all, text_all = (
        Features(
            embeds=fields[which].get("embeds", _absent(total, image_ids.device)),
            projected=fields[which].get("projected", _absent(total, image_ids.device)),
            tokens=fields[which].get("tokens", _absent(total, image_ids.device)),
            mask=fields[which].get("mask"),
        )
        for which in ("image", "text")
    )
    return image_all, text_all, gathered[0], counts


def _absent(rows: int, device: torch.device) -> torch.Tensor:
    """A (rows, 0) stand-in for a field no enabled loss reads (so it is not gathered)."""
    return torch.zeros(rows, 0, device=device)


def pad_tokens(features: Features, length: int) -> Features:
    """``features`` with tokens (and mask) padded to ``length`` positions; padding is masked."""
    extra = length - features.tokens.shape[1]
    if extra <= 0:
        return features
    mask = features.mask
    if mask is None:
        tokens = features.tokens
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    return Features(
        features.embeds,
        features.projected,
        F.pad(features.tokens, (0, 0, 0, extra)),
        F.pad(mask, (0, extra)),
    )


def select_rows(features: Features, rows: torch.Tensor) -> Features:
    """The rows ``rows`` of every field, via ``index_select``: its backward sums repeated rows
    in a fixed order on CPUs (indexing's backward uses racing atomic adds on large tensors)."""
    return Features(
        features.embeds.index_select(0, rows),
        features.projected.index_select(0, rows),
        features.tokens.index_select(0, rows),
        None if features.mask is None else features.mask.index_select(0, rows),
    )


def _infonce_sum(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Sum over ``rows`` of CLIP's symmetric cross-entropy against all columns (clip_loss x N)."""
    same = ids[rows, None] == ids[None, :]
    own = torch.zeros_like(same)
    own[torch.arange(len(rows), device=rows.device), rows] = True
    ignore = same & ~own
    image_to_text = (scale * image.index_select(0, rows) @ text.t()).masked_fill(
        ignore, float("-inf")
    )
    text_to_image = (scale * text.index_select(0, rows) @ image.t()).masked_fill(
        ignore, float("-inf")
    )
    return 0.5 * (
        F.cross_entropy(image_to_text, rows, reduction="sum")
        + F.cross_entropy(text_to_image, rows, reduction="sum")
    )


def _siglip_sum(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Sum over ``rows`` x all columns of SigLIP's pairwise terms (siglip_loss x N)."""
    logits = scale * image.index_select(0, rows) @ text.t() + bias
    labels = 2.0 * (ids[rows, None] == ids[None, :]).to(logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum()


def _cosine_share(
    image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``rows``' part of cosine_pair_loss: their pair terms over the global pair counts."""
    cos = F.normalize(image.index_select(0, rows), dim=-1) @ F.normalize(text, dim=-1).t()
    same = ids[rows, None] == ids[None, :]
    _, per_image = torch.unique(ids, return_counts=True)
    positives = int((per_image**2).sum())
    negatives = len(ids) ** 2 - positives
    positive = (1.0 - cos[same]).sum() / positives
    negative = cos[~same].clamp(min=0.0).sum() / negatives if negatives else cos.new_zeros(())
    return 0.5 * (positive + negative)


def _itm_share(
    model: CrossModalModel,
    image: Features,
    text: Features,
    ids: torch.Tensor,
    own: torch.Tensor,
    seed: int | None,
) -> torch.Tensor:
    """This rank's pairs' part of the ITM loss (its sum of cross-entropies / all pairs).

    Negatives are sampled from the global (N, N) similarity on every rank with the same
    generator, so all ranks draw the same negatives and each takes its own rows'.
    """
    # Sample from the scaled logits (as ALBEF does with sim / temperature): raw cosines in
    # [-1, 1] would make the softmax almost uniform, i.e. random rather than hard negatives.
    similarity = model.clip_scale().detach() * image.embeds @ text.embeds.t()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=similarity.device).manual_seed(seed)
    neg_text, neg_image, valid = losses.sample_hard_negatives(similarity, ids, generator)
    pairs = len(ids) + 2 * int(valid.sum())
    mine = own[valid[own]]
    image_rows = torch.cat([own, mine, neg_image[mine]])
    text_rows = torch.cat([own, neg_text[mine], mine])
    logits = model.itm_logits(select_rows(image, image_rows), select_rows(text, text_rows))
    labels = torch.zeros(len(image_rows), dtype=torch.long, device=logits.device)
    labels[: len(own)] = 1
    return F.cross_entropy(logits, labels, reduction="sum") / pairs
