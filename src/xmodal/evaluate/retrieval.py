"""Image-text retrieval evaluation: Recall@K from ITC similarities and ITM re-ranking.

Embeddings are ``(N, D)`` floating tensors with L2-normalised rows; the similarity of an
image and a caption is their dot product. All functions work on the device of the inputs and
compute the similarity matrix in row chunks, so memory stays ``O(chunk_size * N)``.

Ranks are 0-based and count only wrong candidates: a caption's rank is the number of other
images scoring at least as high as its image; an image's rank is the number of other images'
captions scoring at least as high as its best caption (its own other captions are never
competitors, even when tied with it). Ties with a wrong candidate are broken pessimistically:
the wrong candidate is ranked ahead. Two distinct images with the same embedding are two
gallery items, so each one's captions find the other tied ahead of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "PairScorer",
    "RerankCandidates",
    "recall_at_k",
    "rerank_candidates",
    "rerank_metrics",
    "rerank_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
]

PairScorer = Callable[[Tensor, Tensor], Tensor]
"""``pair_scorer(image_idx, text_idx) -> logits``: one ITM logit per (image, text) pair."""


def _validate(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> Tensor:
    """Check shapes and the caption->image mapping; return the mapping on the embedding device."""
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(
            f"embeddings must be 2-D (N, D); got image {tuple(image_emb.shape)}, "
            f"text {tuple(text_emb.shape)}"
        )
    if not image_emb.is_floating_point() or not text_emb.is_floating_point():
        raise ValueError("embeddings must be floating point tensors")
    n_img, dim = image_emb.shape
    n_txt = text_emb.shape[0]
    if text_emb.shape[1] != dim:
        raise ValueError(f"embedding dims differ: image D={dim}, text D={text_emb.shape[1]}")
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"need at least one image and one text; got {n_img} and {n_txt}")
    if text_emb.device != image_emb.device:
        raise ValueError(f"embeddings on different devices: {image_emb.device}, {text_emb.device}")
    if text_to_image.dim() != 1 or text_to_image.shape[0] != n_txt:
        raise ValueError(
            f"text_to_image must have shape ({n_txt},); got {tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must be an integer tensor; got {text_to_image.dtype}")
    t2i = text_to_image.to(device=image_emb.device, dtype=torch.long)
    lo, hi = int(t2i.min()), int(t2i.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(f"text_to_image values must lie in [0, {n_img}); got [{lo}, {hi}]")
    counts = torch.bincount(t2i, minlength=n_img)
    missing = torch.nonzero(counts == 0).flatten()
    if missing.numel() > 0:
        shown = missing[:10].tolist()
        raise ValueError(
            f"{missing.numel()} image(s) have no caption (e.g. indices {shown}); "
            "every image needs at least one caption"
        )
    return t2i


def _check_positive(name: str, value: int) -> None:
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")


def retrieval_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """0-based retrieval ranks of the ground truth in both directions (pessimistic ties).

    With ``s(i, t)`` the similarity and ``g(t) = text_to_image[t]``:

    - text->image: ``t2i_rank[t] = |{i != g(t) : s(i, t) >= s(g(t), t)}|``.
    - image->text: ``rank(i, t) = |{t' : g(t') != i, s(i, t') >= s(i, t)}|`` (captions of
      other images only) and ``i2t_rank[i] = min over t with g(t) = i of rank(i, t)``: the
      position of image ``i``'s first caption in the ranked list, as in the standard COCO /
      Flickr30k protocol, with ties against other images' captions lost.

    Returns ``(t2i_rank (Nt,), i2t_rank (Ni,))`` as int64 tensors on the input device.
    """
    t2i = _validate(image_emb, text_emb, text_to_image)
    _check_positive("chunk_size", chunk_size)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device

    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=device)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        scores = text_emb[start:stop] @ image_emb.T  # (c, Ni)
        true = scores.gather(1, t2i[start:stop, None])
        t2i_rank[start:stop] = (scores >= true).sum(1) - 1

    i2t_rank = torch.empty(n_img, dtype=torch.long, device=device)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        scores = image_emb[start:stop] @ text_emb.T  # (c, Nt)
        rows = torch.arange(start, stop, device=device)
        not_own = t2i[None, :] != rows[:, None]
        # The best-scoring own caption has the fewest competitors scoring >= it.
        best_own = scores.masked_fill(not_own, float("-inf")).amax(1, keepdim=True)
        i2t_rank[start:stop] = ((scores >= best_own) & not_own).sum(1)
    return t2i_rank, i2t_rank


def recall_at_k(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Percentage (0-100) of 0-based ``ranks`` strictly below each ``k``."""
    if ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor; got shape {tuple(ranks.shape)}")
    out: dict[int, float] = {}
    for k in ks:
        _check_positive("k", k)
        out[int(k)] = 100.0 * (ranks < k).double().mean().item()
    return out


def _metrics_from_ranks(
    t2i_rank: Tensor, i2t_rank: Tensor, ks: Sequence[int]
) -> dict[str, float | int]:
    """Assemble the metric dict shared by :func:`retrieval_metrics` and :func:`rerank_metrics`."""
    metrics: dict[str, float | int] = {}
    rsum = 0.0
    for direction, ranks in (("t2i", t2i_rank), ("i2t", i2t_rank)):
        for k, value in recall_at_k(ranks, ks).items():
            metrics[f"{direction}_R@{k}"] = value
            rsum += value
    for direction, ranks in (("t2i", t2i_rank), ("i2t", i2t_rank)):
        one_based = ranks.double() + 1.0
        metrics[f"{direction}_mean_rank"] = one_based.mean().item()
        metrics[f"{direction}_median_rank"] = one_based.median().item()
    metrics["rsum"] = rsum
    metrics["n_images"] = int(i2t_rank.numel())
    metrics["n_texts"] = int(t2i_rank.numel())
    return metrics


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float | int]:
    """ITC retrieval metrics.

    Keys: ``t2i_R@k`` / ``i2t_R@k`` (percent) for each ``k``, ``t2i_mean_rank``,
    ``i2t_mean_rank``, ``t2i_median_rank``, ``i2t_median_rank`` (1-based), ``rsum`` (sum of
    all recalls), ``n_images``, ``n_texts``.
    """
    t2i_rank, i2t_rank = retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size)
    return _metrics_from_ranks(t2i_rank, i2t_rank, ks)


def _topk_candidates(
    query: Tensor, gallery: Tensor, k: int, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` gallery items per query.

    Returns ``(idx (Nq, k), sim (Nq, k), itc_rank (Nq, k))`` where ``itc_rank`` is the
    pessimistic ITC rank ``|{g' != g : s(q, g') >= s(q, g)}|`` of each candidate ``g`` among
    all gallery items (right or wrong): ``< k`` iff ``g`` is in the top-k under any tie order.
    """
    n_q = query.shape[0]
    device = query.device
    idx = torch.empty(n_q, k, dtype=torch.long, device=device)
    sim = torch.empty(n_q, k, dtype=query.dtype, device=device)
    rank = torch.empty(n_q, k, dtype=torch.long, device=device)
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        scores = query[start:stop] @ gallery.T  # (c, Ng)
        top_sim, top_idx = scores.topk(k, dim=1, largest=True, sorted=True)
        kth = top_sim[:, -1:]
        # Items outside the top-k that tie with the k-th value also count as competitors.
        extra_ties = (scores >= kth).sum(1, keepdim=True) - k
        within = (top_sim[:, None, :] >= top_sim[:, :, None]).sum(-1)  # includes itself
        idx[start:stop] = top_idx
        sim[start:stop] = top_sim
        rank[start:stop] = within - 1 + (top_sim == kth) * extra_ties
    return idx, sim, rank


def _score_pairs(
    image_idx: Tensor,
    text_idx: Tensor,
    pair_scorer: PairScorer,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Call ``pair_scorer`` in batches of at most ``batch_size`` pairs; return float logits."""
    n = image_idx.numel()
    logits = torch.empty(n, dtype=torch.float32, device=device)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="ITM re-ranking", unit="batch", disable=None):
        stop = min(start + batch_size, n)
        out = pair_scorer(image_idx[start:stop], text_idx[start:stop])
        if out.numel() != stop - start:
            raise ValueError(
                f"pair_scorer returned {out.numel()} values for {stop - start} pairs "
                f"(shape {tuple(out.shape)}); expected one logit per pair"
            )
        logits[start:stop] = out.detach().reshape(-1).to(device=device, dtype=torch.float32)
    return logits


def _rerank_direction(
    cand_idx: Tensor,
    cand_itc: Tensor,
    cand_itc_rank: Tensor,
    is_positive: Tensor,
    itm_logits: Tensor,
    itc_rank: Tensor,
    weight: float,
) -> Tensor:
    """Best re-ranked rank per query, falling back to the ITC rank outside the top-k."""
    k = cand_idx.shape[1]
    final = cand_itc + weight * itm_logits if weight else cand_itc
    # rerank(c) = |{c' in candidates, c' not positive : final(c') >= final(c)}|: only wrong
    # candidates compete (another caption of the same image is never ahead of c).
    ahead = final[:, None, :] >= final[:, :, None]  # [q, c, c']: c' scores >= c
    reranked = (ahead & ~is_positive[:, None, :]).sum(-1)
    eligible = is_positive & (cand_itc_rank < k)
    best = reranked.masked_fill(~eligible, k).amin(1)
    return torch.where(eligible.any(1), best, itc_rank)


@dataclass
class _Direction:
    """One direction's top-k candidates with their ITC logits and ITM scores."""

    idx: Tensor  # (Nq, k) candidate indices
    itc: Tensor  # (Nq, k) float32 ITC logits: itc_scale x similarity
    itc_rank_of_candidate: Tensor  # (Nq, k) pessimistic ITC rank of each candidate
    positive: Tensor  # (Nq, k) bool: the candidate is a right answer
    itm: Tensor  # (Nq, k) float32 ITM scores
    itc_rank: Tensor  # (Nq,) the ground truth's ITC rank (used outside the top-k)

    def ranks(self, weight: float) -> Tensor:
        return _rerank_direction(
            self.idx,
            self.itc,
            self.itc_rank_of_candidate,
            self.positive,
            self.itm,
            self.itc_rank,
            weight,
        )


@dataclass
class RerankCandidates:
    """Both directions' ITC top-``k`` with their ITM scores, scored once: the ranks under any
    re-rank weight follow without calling the ITM head again (:meth:`ranks`)."""

    t2i: _Direction
    i2t: _Direction
    k: int

    def ranks(self, weight: float) -> tuple[Tensor, Tensor]:
        """``(t2i_rank, i2t_rank)`` when the top-k are re-ordered by
        ``itc_scale * similarity + weight * itm_score`` (weight 0: exactly the ITC ranks)."""
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"the re-rank weight must be a finite number >= 0; got {weight}")
        return self.t2i.ranks(weight), self.i2t.ranks(weight)

    def metrics(self, weight: float, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | int]:
        """Retrieval metrics at ``weight``; keys as :func:`retrieval_metrics` plus ``k`` and
        ``weight``."""
        metrics = _metrics_from_ranks(*self.ranks(weight), ks)
        metrics["k"] = int(self.k)
        metrics["weight"] = float(weight)
        return metrics


def rerank_candidates(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    pair_scorer: PairScorer,
    k: int = 16,
    batch_size: int = 256,
    chunk_size: int = 1024,
    itc_scale: float = 1.0,
) -> RerankCandidates:
    """Score the ITC top-``k`` of every query in both directions with ``pair_scorer`` (see
    :func:`rerank_ranks`); ``itc_scale`` turns similarities into ITC logits (the model's
    logit scale), the scale the re-rank weight is relative to."""
    t2i = _validate(image_emb, text_emb, text_to_image)
    for name, value in (("k", k), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        _check_positive(name, value)
    if not itc_scale > 0:
        raise ValueError(f"itc_scale must be > 0; got {itc_scale}")
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    itc_t2i, itc_i2t = retrieval_ranks(image_emb, text_emb, t2i, chunk_size)

    k_t2i, k_i2t = min(k, n_img), min(k, n_txt)
    img_cand, img_sim, img_rank = _topk_candidates(text_emb, image_emb, k_t2i, chunk_size)
    txt_cand, txt_sim, txt_rank = _topk_candidates(image_emb, text_emb, k_i2t, chunk_size)

    # Pairs keyed as image * Nt + text; score each distinct pair once.
    t2i_keys = img_cand * n_txt + torch.arange(n_txt, device=device)[:, None]
    i2t_keys = torch.arange(n_img, device=device)[:, None] * n_txt + txt_cand
    all_keys = torch.cat([t2i_keys.reshape(-1), i2t_keys.reshape(-1)])
    unique_keys, inverse = torch.unique(all_keys, return_inverse=True)
    logits = _score_pairs(
        unique_keys // n_txt, unique_keys % n_txt, pair_scorer, batch_size, device
    )[inverse]
    t2i_logits = logits[: t2i_keys.numel()].view(n_txt, k_t2i)
    i2t_logits = logits[t2i_keys.numel() :].view(n_img, k_i2t)
    own = t2i[txt_cand] == torch.arange(n_img, device=device)[:, None]
    return RerankCandidates(
        t2i=_Direction(
            img_cand,
            img_sim.float() * itc_scale,
            img_rank,
            img_cand == t2i[:, None],
            t2i_logits,
            itc_t2i,
        ),
        i2t=_Direction(txt_cand, txt_sim.float() * itc_scale, txt_rank, own, i2t_logits, itc_i2t),
        k=int(k),
    )


def rerank_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    pair_scorer: PairScorer,
    k: int = 16,
    batch_size: int = 256,
    chunk_size: int = 1024,
    weight: float = 1.0,
    itc_scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Ranks after ITM re-ranking of the ITC top-``k`` (same format as :func:`retrieval_ranks`).

    For each query the top-``k`` candidates by similarity (``k`` capped at the gallery size) are
    re-ordered by ``itc_scale * similarity + weight * pair_scorer(image_idx, text_idx)``;
    everything else keeps its ITC order after them (weight 0 gives exactly the ITC ranks). A
    ground-truth item is re-ranked iff it is in the top-``k`` however
    ties are broken (fewer than ``k`` other items score at least as high); its rank is then
    ``|{c in top-k, c wrong : final(c) >= final(it)}|`` (< k), otherwise its ITC rank (as
    :func:`retrieval_ranks`; >= k unless exact ties at the k-th score put it there).
    Text->image ranks one image per caption; image->text takes the best rank among the
    image's captions, and another caption of the same image never counts against it. Which
    items fill ties at the k-th position is decided by ``torch.topk``.

    ``pair_scorer`` receives LongTensors of image and text indices (on the embedding device)
    in batches of at most ``batch_size`` pairs and returns one logit per pair. Each distinct
    pair is scored once even if it is a candidate in both directions.
    """
    candidates = rerank_candidates(
        image_emb, text_emb, text_to_image, pair_scorer, k, batch_size, chunk_size, itc_scale
    )
    return candidates.ranks(weight)


def rerank_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    pair_scorer: PairScorer,
    k: int = 16,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 256,
    chunk_size: int = 1024,
    weight: float = 1.0,
    itc_scale: float = 1.0,
) -> dict[str, float | int]:
    """Retrieval metrics after ITM re-ranking; keys as :func:`retrieval_metrics` plus ``k``
    and ``weight``."""
    candidates = rerank_candidates(
        image_emb, text_emb, text_to_image, pair_scorer, k, batch_size, chunk_size, itc_scale
    )
    return candidates.metrics(weight, ks)
