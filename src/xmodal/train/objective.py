"""The training objective: the model's features scored by the weighted losses.

:func:`compute_losses` scores one batch held by one process. :func:`global_batch_losses` scores
the *global* batch, all ranks' rows (and all accumulated micro-batches) together, and returns
this rank's share of it: the mean over ranks of each returned term is that term of
:func:`compute_losses` on the concatenated batch, and (with the gradient rule of
:mod:`xmodal.distributed`) so is the gradient. Distribution changes speed, not the
objective. Both are built from the same loss functions of :mod:`xmodal.losses`:
:func:`compute_losses` applies them to the whole batch, :func:`global_batch_losses` to this
rank's rows of the gathered batch (``rows=``, ``reduction="sum"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xmodal import losses
from xmodal.distributed import gather_no_grad, gather_rows, world
from xmodal.models.fusion import PooledFusion
from xmodal.models.model import CrossModalModel, Features, pad_tokens
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
            image.embeds, text.embeds, model.siglip_scale(), model.siglip_logit_bias, image_ids
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
    rows: slice | None = None,
) -> torch.Tensor:
    """ITM cross-entropy on the aligned pairs plus one hard negative caption per image and one
    hard negative image per caption, sampled in-batch from the similarity.

    ``rows`` (default: all): only their pairs are scored (their aligned pairs and the negatives
    drawn for them), summed and divided by the number of pairs of the whole batch, so the
    shares of disjoint row ranges add up to the loss. The negatives are drawn from the whole
    batch, so equal ``generator`` states draw the same negatives for every share.
    """
    # Sample from the scaled logits (as ALBEF does with sim / temperature): raw cosines in
    # [-1, 1] would make the softmax almost uniform, i.e. random rather than hard negatives.
    similarity = model.clip_scale().detach() * image.embeds @ text.embeds.t()
    neg_text, neg_image, valid = losses.sample_hard_negatives(similarity, image_ids, generator)
    rows = losses.row_range(rows, len(image_ids))
    own = torch.arange(rows.start, rows.stop, device=similarity.device)
    mine = own[valid[own]]
    image_rows = torch.cat([own, mine, neg_image[mine]])
    text_rows = torch.cat([own, neg_text[mine], mine])
    logits = model.itm_pair_logits(image, text, image_rows, text_rows)
    pairs = len(image_ids) + 2 * int(valid.sum())
    return losses.itm_loss(logits[: len(own)], logits[len(own) :], reduction="sum") / pairs


def itm_reordered_loss(model: CrossModalModel, image: Features, text: Features) -> torch.Tensor:
    """ITM order term, summed over rows: row r of ``image`` (n rows) is scored against its own
    caption (``text`` row r) and a reordering of it (``text`` row n + r), and the cross-entropy
    of the pair's two ITM scores picks its own caption: ``softplus(s_reordered - s_own)``.

    The reordered caption shares every word with the true one, so the term teaches what the
    contrastive embeddings cannot see: which item of a list sits where (see
    :mod:`xmodal.data.reorder`). It is a pairwise term, as re-ranking compares ITM scores.
    """
    n = len(image.embeds)
    if len(text.embeds) != 2 * n:
        raise ValueError(f"expected 2 x {n} caption rows (own, reordered); got {len(text.embeds)}")
    rows = torch.arange(n, device=image.embeds.device)
    both = torch.cat([rows, rows])
    logits = model.itm_pair_logits(image, text, both, torch.cat([rows, rows + n]))
    score = (logits[:, 1] - logits[:, 0]).float()
    pair = torch.stack([score[:n], score[n:]], dim=1)
    target = torch.zeros(n, dtype=torch.long, device=pair.device)
    return F.cross_entropy(pair, target, reduction="sum")


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
    need = needed_fields(model, weights)
    image_all, text_all, ids, counts = _gather_batch(image, text, image_ids, need)
    total = sum(counts)
    start = sum(counts[: w.rank])
    own = slice(start, start + counts[w.rank])
    scored = own if local_loss else slice(0, total)
    share = w.size if local_loss else 1
    terms: dict[str, torch.Tensor] = {}
    if weights.infonce:
        infonce = losses.clip_loss(
            image_all.embeds,
            text_all.embeds,
            model.clip_scale(),
            ids,
            rows=scored,
            reduction="sum",
        )
        terms["infonce"] = infonce * share / total
    if weights.siglip:
        siglip = losses.siglip_loss(
            image_all.embeds,
            text_all.embeds,
            model.siglip_scale(),
            model.siglip_logit_bias,
            ids,
            rows=scored,
            reduction="sum",
        )
        terms["siglip"] = siglip * share / total
    if weights.itm:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=image_all.embeds.device).manual_seed(seed)
        itm = itm_hard_negative_loss(model, image_all, text_all, ids, generator, rows=own)
        terms["itm"] = itm * w.size
    if weights.cosine:
        cosine = losses.cosine_pair_loss(image_all.projected, text_all.projected, ids, rows=scored)
        terms["cosine"] = cosine * share
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    return {"loss": loss, **terms}


def needed_fields(model: CrossModalModel, weights: LossSection) -> set[str]:
    """The Features fields the enabled terms read (only those are gathered across ranks)."""
    need = set()
    itm = weights.itm
    if weights.infonce or weights.siglip or itm:
        need.add("embeds")
    if weights.cosine or (itm and isinstance(model.fusion, PooledFusion)):
        need.add("projected")
    if itm and not isinstance(model.fusion, PooledFusion):
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
