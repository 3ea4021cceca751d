"""Tests for xmodal.evaluate.retrieval against brute-force reference computations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from xmodal.evaluate import (
    recall_at_k,
    rerank_metrics,
    rerank_ranks,
    retrieval_metrics,
    retrieval_ranks,
)


def _normed(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _random_data(counts: list[int], dim: int = 16, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Images with ``counts[i]`` captions each; captions in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    image = _normed(torch.randn(len(counts), dim, generator=g))
    t2i = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    text = _normed(image[t2i] + 0.9 * torch.randn(t2i.numel(), dim, generator=g))
    return image, text, t2i


def _tied_data(counts: list[int], seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Entries +-0.25 in D=16: unit rows whose dot products are exact, with many exact ties."""
    g = torch.Generator().manual_seed(seed)

    def signs(n: int) -> Tensor:
        return torch.randint(0, 2, (n, 16), generator=g).float() * 2 - 1

    image = signs(len(counts)) * 0.25
    image[1] = image[0]  # duplicated images: exactly tied for every caption
    t2i = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    text = signs(t2i.numel()) * 0.25
    text[-1] = text[0]  # duplicated captions
    return image, text, t2i


def _ref_ranks(image: Tensor, text: Tensor, t2i: Tensor) -> tuple[list[int], list[int]]:
    """Full matrix + explicit sorts; the ground truth sorts after equal-scoring candidates, and
    an image's caption is sorted among the other images' captions only."""
    sim = (image @ text.T).tolist()
    n_img, n_txt = len(sim), len(sim[0])
    owner = t2i.tolist()
    t2i_rank = []
    for t in range(n_txt):
        gt = owner[t]
        order = sorted(range(n_img), key=lambda i, t=t, gt=gt: (-sim[i][t], i == gt))
        t2i_rank.append(order.index(gt))
    i2t_rank = []
    for i in range(n_img):
        best = n_txt
        others = [
            u for u in range(n_txt) if owner[u] != i
        ]  # the image's own captions never compete
        for t in (t for t in range(n_txt) if owner[t] == i):
            order = sorted([t, *others], key=lambda u, i=i, t=t: (-sim[i][u], u == t))
            best = min(best, order.index(t))
        i2t_rank.append(best)
    return t2i_rank, i2t_rank


def _ref_rerank(
    image: Tensor, text: Tensor, t2i: Tensor, itm: Tensor, k: int
) -> tuple[list[int], list[int]]:
    """Brute-force re-ranking with ITM logits ``itm[image, text]`` (no ties in the data)."""
    sim = (image @ text.T).tolist()
    logit = itm.tolist()
    n_img, n_txt = len(sim), len(sim[0])
    owner = t2i.tolist()

    def rank_in(order: list[int], target: int, final) -> int:
        top = order[:k]
        if target not in top:
            return order.index(target)
        return sorted(top, key=final, reverse=True).index(target)

    t2i_rank = []
    for t in range(n_txt):
        order = sorted(range(n_img), key=lambda i, t=t: -sim[i][t])
        t2i_rank.append(rank_in(order, owner[t], lambda i, t=t: logit[i][t] + sim[i][t]))
    i2t_rank = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda u, i=i: -sim[i][u])
        own = [t for t in range(n_txt) if owner[t] == i]
        i2t_rank.append(min(rank_in(order, t, lambda u, i=i: logit[i][u] + sim[i][u]) for t in own))
    return t2i_rank, i2t_rank


COUNTS = {
    "one_each": [1] * 40,
    "five_each": [5] * 20,
    "varying": [1, 3, 5, 2, 7, 1, 4, 2, 6, 1, 3, 2, 1, 5, 2, 3, 1, 1, 4, 2],
}


@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_ranks_match_reference(name: str, chunk_size: int) -> None:
    image, text, t2i = _random_data(COUNTS[name], seed=len(name))
    t2i_rank, i2t_rank = retrieval_ranks(image, text, t2i, chunk_size=chunk_size)
    ref_t2i, ref_i2t = _ref_ranks(image, text, t2i)
    assert t2i_rank.dtype == torch.long and i2t_rank.dtype == torch.long
    assert t2i_rank.tolist() == ref_t2i
    assert i2t_rank.tolist() == ref_i2t
    assert 0 < (t2i_rank == 0).sum() < t2i.numel()  # the data is neither trivial nor hopeless


@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_ties_are_pessimistic(chunk_size: int) -> None:
    image, text, t2i = _tied_data([3, 2, 1, 4, 2, 1, 1, 3, 2, 1], seed=3)
    t2i_rank, i2t_rank = retrieval_ranks(image, text, t2i, chunk_size=chunk_size)
    ref_t2i, ref_i2t = _ref_ranks(image, text, t2i)
    assert t2i_rank.tolist() == ref_t2i
    assert i2t_rank.tolist() == ref_i2t
    # Images 0 and 1 are identical, so their captions can never rank them first.
    for t in torch.nonzero(t2i <= 1).flatten().tolist():
        assert t2i_rank[t] >= 1


def test_chunking_is_invariant() -> None:
    image, text, t2i = _random_data([3, 1, 2, 5, 1, 4] * 6, dim=8, seed=11)
    full = retrieval_ranks(image, text, t2i, chunk_size=10_000)
    for chunk_size in (1, 5, 64):
        chunked = retrieval_ranks(image, text, t2i, chunk_size=chunk_size)
        assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])


def test_hand_made_case() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    t2i = torch.tensor([0, 1, 2])
    t2i_rank, i2t_rank = retrieval_ranks(image, text, t2i)
    assert t2i_rank.tolist() == [0, 1, 0]
    # image 1 ties (score 0) with all three captions; image 2 ties with caption 1.
    assert i2t_rank.tolist() == [0, 2, 1]
    m = retrieval_metrics(image, text, t2i, ks=(1, 2, 3))
    assert m["t2i_R@1"] == pytest.approx(200 / 3)
    assert m["t2i_R@2"] == pytest.approx(100.0)
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@2"] == pytest.approx(200 / 3)
    assert m["i2t_R@3"] == pytest.approx(100.0)
    assert m["t2i_mean_rank"] == pytest.approx(4 / 3)
    assert m["i2t_mean_rank"] == pytest.approx(2.0)
    assert m["rsum"] == pytest.approx(200 / 3 + 100 + 100 + 100 / 3 + 200 / 3 + 100)
    assert m["n_images"] == 3 and m["n_texts"] == 3


def test_recall_at_k_known_values() -> None:
    ranks = torch.tensor([0, 1, 4, 9, 10])
    assert recall_at_k(ranks) == pytest.approx({1: 20.0, 5: 60.0, 10: 80.0})
    assert recall_at_k(ranks, ks=(11,)) == {11: 100.0}
    with pytest.raises(ValueError):
        recall_at_k(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError):
        recall_at_k(ranks, ks=(0,))


def test_metrics_keys_and_consistency() -> None:
    image, text, t2i = _random_data([5] * 12, seed=5)
    m = retrieval_metrics(image, text, t2i)
    t2i_rank, i2t_rank = retrieval_ranks(image, text, t2i)
    for k in (1, 5, 10):
        assert m[f"t2i_R@{k}"] == pytest.approx(100 * (t2i_rank < k).float().mean().item())
        assert m[f"i2t_R@{k}"] == pytest.approx(100 * (i2t_rank < k).float().mean().item())
    recalls = [v for key, v in m.items() if "_R@" in key]
    assert len(recalls) == 6 and m["rsum"] == pytest.approx(sum(recalls))
    assert m["t2i_mean_rank"] == pytest.approx(t2i_rank.float().mean().item() + 1)
    assert m["i2t_mean_rank"] == pytest.approx(i2t_rank.float().mean().item() + 1)
    assert (m["n_images"], m["n_texts"]) == (12, 60)


def test_validation_errors() -> None:
    image, text, t2i = _random_data([2, 1, 3], seed=1)
    with pytest.raises(ValueError, match="no caption"):
        retrieval_ranks(image, text, torch.zeros_like(t2i))
    with pytest.raises(ValueError, match="dims differ"):
        retrieval_ranks(image[:, :8], text, t2i)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_ranks(image[0], text, t2i)
    with pytest.raises(ValueError, match="shape"):
        retrieval_ranks(image, text, t2i[:-1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_ranks(image, text, torch.cat([t2i[:-1], torch.tensor([3])]))
    with pytest.raises(ValueError, match="integer"):
        retrieval_ranks(image, text, t2i.float())
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_ranks(image, text, t2i, chunk_size=0)


class _MatrixScorer:
    """ITM logits looked up in a fixed (Ni, Nt) matrix; records every call."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.batches: list[int] = []
        self.pairs: list[tuple[int, int]] = []

    def __call__(self, image_idx: Tensor, text_idx: Tensor) -> Tensor:
        assert image_idx.dtype == torch.long and text_idx.dtype == torch.long
        self.batches.append(image_idx.numel())
        self.pairs.extend(zip(image_idx.tolist(), text_idx.tolist(), strict=True))
        return self.matrix[image_idx, text_idx]


@pytest.mark.parametrize(("name", "k"), [("one_each", 5), ("varying", 4), ("five_each", 16)])
def test_rerank_matches_reference(name: str, k: int) -> None:
    image, text, t2i = _random_data(COUNTS[name], seed=7)
    itm = torch.randn(image.shape[0], text.shape[0], generator=torch.Generator().manual_seed(1))
    scorer = _MatrixScorer(itm)
    t2i_rank, i2t_rank = rerank_ranks(image, text, t2i, scorer, k=k, batch_size=50, chunk_size=9)
    ref_t2i, ref_i2t = _ref_rerank(image, text, t2i, itm, k)
    assert t2i_rank.tolist() == ref_t2i
    assert i2t_rank.tolist() == ref_i2t
    assert max(scorer.batches) <= 50
    assert len(scorer.pairs) == len(set(scorer.pairs))  # each pair scored once
    itc_t2i, _ = retrieval_ranks(image, text, t2i)
    assert not torch.equal(t2i_rank, itc_t2i)  # the scorer really changed the order


@pytest.mark.parametrize("tied", [False, True])
def test_rerank_with_zero_scorer_equals_itc(tied: bool) -> None:
    counts = [3, 2, 1, 4, 2, 1, 1, 3, 2, 1]
    image, text, t2i = _tied_data(counts, seed=4) if tied else _random_data(counts, seed=4)
    scorer = _MatrixScorer(torch.zeros(image.shape[0], text.shape[0]))
    for k in (1, 3, 100):
        got = rerank_ranks(image, text, t2i, scorer, k=k, batch_size=8)
        itc = retrieval_ranks(image, text, t2i)
        assert torch.equal(got[0], itc[0]) and torch.equal(got[1], itc[1])


def test_rerank_oracle_scorer() -> None:
    image, text, t2i = _random_data(COUNTS["varying"], seed=2)
    oracle = (t2i[None, :] == torch.arange(image.shape[0])[:, None]).float() * 10.0
    k = 3
    t2i_rank, i2t_rank = rerank_ranks(image, text, t2i, _MatrixScorer(oracle), k=k)
    itc_t2i, itc_i2t = retrieval_ranks(image, text, t2i)
    assert torch.equal(t2i_rank, torch.where(itc_t2i < k, 0, itc_t2i))
    assert torch.equal(i2t_rank, torch.where(itc_i2t < k, 0, itc_i2t))
    assert (itc_t2i >= k).any() and (itc_t2i[itc_t2i < k] > 0).any()
    m = rerank_metrics(image, text, t2i, _MatrixScorer(oracle), k=k, ks=(1, k))
    assert m["k"] == k
    assert m["t2i_R@1"] == pytest.approx(m["t2i_R@3"])
    assert m["t2i_R@1"] == pytest.approx(100 * (itc_t2i < k).float().mean().item())
    assert m["rsum"] == pytest.approx(sum(v for key, v in m.items() if "_R@" in key))


def test_rerank_validation() -> None:
    image, text, t2i = _random_data([2, 1], seed=0)

    def bad_scorer(image_idx: Tensor, text_idx: Tensor) -> Tensor:
        return torch.zeros(image_idx.numel() + 1)

    with pytest.raises(ValueError, match="one logit per pair"):
        rerank_ranks(image, text, t2i, bad_scorer, k=2)
    with pytest.raises(ValueError, match="k must be"):
        rerank_ranks(image, text, t2i, bad_scorer, k=0)


# -- an image's own captions never compete with each other ------------------------------------


def test_two_identical_top_captions_give_rank_zero() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # image 0: two identical captions
    t2i = torch.tensor([0, 0, 1])
    assert retrieval_ranks(image, text, t2i)[1].tolist() == [0, 0]
    itm = torch.tensor([[2.0, 2.0, -1.0], [0.0, 0.0, 1.0]])  # the twins score alike
    for k in (1, 2, 3):
        assert rerank_ranks(image, text, t2i, _MatrixScorer(itm), k=k)[1].tolist() == [0, 0]


def _duplicated_caption_data() -> tuple[Tensor, Tensor, Tensor]:
    """30 images with one caption each: 27 captions closest to their own image, the captions of
    images 27-29 closest to images 0-2 (but below those images' own captions). Every third
    image (0, 3, ..., 27) has a second, identical caption. Small integer entries: every dot
    product is exact, so the twins tie exactly and other ties are rare."""
    g = torch.Generator().manual_seed(12)
    base = torch.randint(-20, 21, (30, 64), generator=g).float()
    captions = base + torch.randint(-5, 6, (30, 64), generator=g).float()
    captions[27:] = base[:3] // 2
    twins = torch.arange(0, 30, 3)
    t2i = torch.cat([torch.arange(30), twins])
    order = torch.randperm(len(t2i), generator=g)
    return base, torch.cat([captions, captions[twins]])[order], t2i[order]


def _plain_i2t_ranks(image: Tensor, text: Tensor, t2i: Tensor) -> list[int]:
    """For each image: the captions of other images scoring at least its best caption."""
    sim = (image @ text.T).tolist()
    owner = t2i.tolist()
    ranks = []
    for i, row in enumerate(sim):
        best = max(row[t] for t in range(len(row)) if owner[t] == i)
        ranks.append(sum(1 for t in range(len(row)) if owner[t] != i and row[t] >= best))
    return ranks


def _ref_rerank_tied(
    image: Tensor, text: Tensor, t2i: Tensor, itm: Tensor, k: int
) -> tuple[list[int], list[int]]:
    """Brute-force re-ranking where only identical captions tie: each top-k is re-ordered by
    itm + similarity; an item is re-ranked iff fewer than k others score at least as high by
    similarity; only wrong candidates count; otherwise the ITC rank."""
    sim = (image @ text.T).tolist()
    final = (itm + image @ text.T).tolist()
    n_img, n_txt = len(sim), len(sim[0])
    owner = t2i.tolist()
    itc_t2i, itc_i2t = _ref_ranks(image, text, t2i)

    def rank(scores, finals, right: set[int], itc: int) -> int:
        items = range(len(scores))
        top = sorted(items, key=lambda u: -scores[u])[:k]
        ranks = [
            sum(1 for u in top if u not in right and finals[u] >= finals[c])
            for c in right
            if sum(1 for u in items if u != c and scores[u] >= scores[c]) < k
        ]
        return min(ranks) if ranks else itc

    t2i_rank = [
        rank(
            [sim[i][t] for i in range(n_img)],
            [final[i][t] for i in range(n_img)],
            {owner[t]},
            itc_t2i[t],
        )
        for t in range(n_txt)
    ]
    i2t_rank = [
        rank(sim[i], final[i], {t for t in range(n_txt) if owner[t] == i}, itc_i2t[i])
        for i in range(n_img)
    ]
    return t2i_rank, i2t_rank


@pytest.mark.parametrize("chunk_size", [1024, 4])
def test_duplicated_captions_on_a_third_of_the_images(chunk_size: int) -> None:
    image, text, t2i = _duplicated_caption_data()
    t2i_rank, i2t_rank = retrieval_ranks(image, text, t2i, chunk_size=chunk_size)
    assert i2t_rank.tolist() == _plain_i2t_ranks(image, text, t2i)
    assert (t2i_rank.tolist(), i2t_rank.tolist()) == _ref_ranks(image, text, t2i)
    m = retrieval_metrics(image, text, t2i, chunk_size=chunk_size)
    assert m["i2t_R@1"] == pytest.approx(90.0)  # 27 of 30 images; twins do not compete
    assert m["t2i_R@1"] == pytest.approx(90.0)  # 36 of 40 captions


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_rerank_with_duplicated_captions_matches_reference(k: int) -> None:
    image, text, t2i = _duplicated_caption_data()
    g = torch.Generator().manual_seed(k)
    itm = 100 * torch.randint(-2, 3, (30, 64), generator=g).float() @ text.T  # twins alike
    got = rerank_ranks(image, text, t2i, _MatrixScorer(itm), k=k, batch_size=32, chunk_size=7)
    assert (got[0].tolist(), got[1].tolist()) == _ref_rerank_tied(image, text, t2i, itm, k)
    itc = retrieval_ranks(image, text, t2i)
    assert not torch.equal(got[1], itc[1]) or k == 1  # the scorer really re-orders
    zero = rerank_ranks(image, text, t2i, _MatrixScorer(torch.zeros_like(itm)), k=k)
    assert torch.equal(zero[0], itc[0]) and torch.equal(zero[1], itc[1])
    oracle = (t2i[None, :] == torch.arange(30)[:, None]).float() * 1e5
    m = rerank_metrics(image, text, t2i, _MatrixScorer(oracle), k=k)
    assert m["i2t_R@1"] == pytest.approx(100.0 * (itc[1] < k).double().mean().item())
    assert m["i2t_R@1"] >= 90.0


@settings(max_examples=150, deadline=None)
@given(
    owners=st.lists(st.integers(0, 5), min_size=1, max_size=14),
    values=st.lists(st.integers(-2, 2), min_size=2 * 7 * 3, max_size=2 * 7 * 3),
    data=st.data(),
)
def test_any_ties_match_the_plain_definition(owners, values, data) -> None:
    """Small integer embeddings (many exact ties, repeated captions): the ranks are the plain
    counts of wrong candidates scoring at least as high, and a zero ITM scorer changes none."""
    n_img = max(owners) + 1
    t2i = torch.tensor(owners)
    missing = [i for i in range(n_img) if i not in owners]
    t2i = torch.cat([t2i, torch.tensor(missing, dtype=torch.long)])
    grid = torch.tensor(values, dtype=torch.float32).view(14, 3)
    image = grid[:n_img]
    text = grid[
        torch.tensor(data.draw(st.lists(st.integers(0, 13), min_size=len(t2i), max_size=len(t2i))))
    ]
    sim = (image @ text.T).tolist()
    owner = t2i.tolist()
    want_t2i = [
        sum(1 for i in range(n_img) if i != owner[t] and sim[i][t] >= sim[owner[t]][t])
        for t in range(len(owner))
    ]
    t2i_rank, i2t_rank = retrieval_ranks(image, text, t2i, chunk_size=3)
    assert t2i_rank.tolist() == want_t2i
    assert i2t_rank.tolist() == _plain_i2t_ranks(image, text, t2i)
    zero = _MatrixScorer(torch.zeros(n_img, len(owner)))
    for k in (1, 2, 5):
        got = rerank_ranks(image, text, t2i, zero, k=k, chunk_size=4)
        assert torch.equal(got[0], t2i_rank) and torch.equal(got[1], i2t_rank)


def test_image_pair_scorer_matches_the_itm_score_of_each_pair(tmp_path, tiny_model_dir) -> None:
    """Re-ranking's scorer runs each image and each caption of a batch once however many pairs
    share them (a text->image query meets k images); its scores are each pair's own."""
    from conftest import write_colour_dataset

    from xmodal.data import load_dataset
    from xmodal.evaluate.runner import ImagePairScorer, image_tower_outputs
    from xmodal.presets import load_model

    model, processor = load_model(tiny_model_dir)
    model.eval()
    dataset = load_dataset(write_colour_dataset(tmp_path / "d", n=5))
    images = [ex.image for ex in dataset.unique_images()]
    outputs = image_tower_outputs(model, processor, images, num_workers=0)
    captions = ["a red one", "a much longer caption about a blue square", "green"]
    scorer = ImagePairScorer(model, processor, outputs.pooled, outputs.tokens, captions)
    image_idx = torch.tensor([0, 1, 2, 3, 4, 0, 0, 3])
    text_idx = torch.tensor([1, 1, 1, 1, 1, 0, 2, 2])
    scores = scorer(image_idx, text_idx)
    with torch.inference_mode():
        for p, (i, t) in enumerate(zip(image_idx.tolist(), text_idx.tolist(), strict=True)):
            pixels = processor.process_images([images[i]])
            batch = processor.process_text([captions[t]])
            image = model.image_features(pixels)
            text = model.text_features(batch["input_ids"], batch["attention_mask"])
            assert scores[p].item() == pytest.approx(model.itm_score(image, text).item(), abs=1e-3)


def test_image_pair_scorer_runs_each_caption_once(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """Across calls (image->text re-ranking meets a caption in many images' top k) a caption
    goes through the text tower once; with no room in the cache, once per call, and the
    scores are the same either way."""
    from conftest import write_colour_dataset

    from xmodal.data import load_dataset
    from xmodal.evaluate.runner import ImagePairScorer, image_tower_outputs
    from xmodal.presets import load_model

    model, processor = load_model(tiny_model_dir)
    model.eval()
    dataset = load_dataset(write_colour_dataset(tmp_path / "d", n=4))
    images = [ex.image for ex in dataset.unique_images()]
    outputs = image_tower_outputs(model, processor, images, num_workers=0)
    captions = ["a red one", "a much longer caption about a blue square", "green", "yellow"]
    seen: list[int] = []
    original = model.text_tower.forward

    def counting(input_ids, attention_mask):
        seen.append(len(input_ids))
        return original(input_ids, attention_mask)

    monkeypatch.setattr(model.text_tower, "forward", counting)
    calls = [
        (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])),
        (torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 3, 0])),
        (torch.tensor([3, 2]), torch.tensor([2, 1])),
    ]
    scores = {}
    for budget in (1 << 30, 0):
        seen.clear()
        scorer = ImagePairScorer(
            model, processor, outputs.pooled, outputs.tokens, captions, max_text_cache_bytes=budget
        )
        scores[budget] = [scorer(i, t) for i, t in calls]
        assert seen == ([2, 2] if budget else [2, 4, 2])  # captions new to the tower, per call
    for cached, plain in zip(scores[1 << 30], scores[0], strict=True):
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
