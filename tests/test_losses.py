"""Each loss against an independent reference (explicit loops in float64 numpy / torch.nn)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xmodal.losses import (
    clip_loss,
    cosine_pair_loss,
    itm_loss,
    same_image_mask,
    sample_hard_negatives,
    siglip_loss,
)

IDS_CASES = [
    None,
    [0, 1, 2, 3, 4, 5],
    [0, 0, 1, 2, 2, 2],
    [3, 1, 3, 1, 7, 3],
]


def _inputs(batch: int = 6, dim: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64))
    txt = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64))
    return img, txt


def _ids(ids, batch):
    return list(range(batch)) if ids is None else list(ids)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def ref_clip(img: np.ndarray, txt: np.ndarray, scale: float, ids: list[int]) -> float:
    batch = len(ids)
    sim = [[scale * float(np.dot(img[i], txt[j])) for j in range(batch)] for i in range(batch)]
    rows, cols = [], []
    for i in range(batch):
        # image i against captions: keep caption i and captions of other images
        kept = [sim[i][j] for j in range(batch) if j == i or ids[j] != ids[i]]
        rows.append(_logsumexp(kept) - sim[i][i])
        # caption i against images
        kept = [sim[j][i] for j in range(batch) if j == i or ids[j] != ids[i]]
        cols.append(_logsumexp(kept) - sim[i][i])
    return 0.5 * (sum(rows) / batch + sum(cols) / batch)


def ref_siglip(img, txt, scale: float, bias: float, ids: list[int]) -> float:
    batch = len(ids)
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if ids[i] == ids[j] else -1.0
            logit = scale * float(np.dot(img[i], txt[j])) + bias
            total += math.log1p(math.exp(-z * logit))
    return total / batch


@pytest.mark.parametrize("ids", IDS_CASES)
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_reference(ids, scale) -> None:
    img, txt = _inputs()
    batch = img.shape[0]
    tid = None if ids is None else torch.tensor(ids)
    got = clip_loss(img, txt, torch.tensor(scale, dtype=torch.float64), tid)
    want = ref_clip(img.numpy(), txt.numpy(), scale, _ids(ids, batch))
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_clip_loss_repeated_ids_differ_from_plain() -> None:
    img, txt = _inputs()
    scale = torch.tensor(10.0, dtype=torch.float64)
    plain = clip_loss(img, txt, scale)
    grouped = clip_loss(img, txt, scale, torch.tensor([0, 0, 1, 2, 2, 2]))
    assert grouped.item() < plain.item()  # removing same-image columns only shrinks the softmax


def test_clip_loss_float32_and_grad() -> None:
    img, txt = _inputs()
    img32 = img.float().requires_grad_(True)
    loss = clip_loss(img32, txt.float(), torch.tensor(14.0), torch.tensor([0, 0, 1, 2, 2, 2]))
    want = ref_clip(img.numpy(), txt.numpy(), 14.0, [0, 0, 1, 2, 2, 2])
    assert loss.item() == pytest.approx(want, abs=1e-4)
    loss.backward()
    assert torch.isfinite(img32.grad).all() and img32.grad.abs().sum() > 0


@pytest.mark.parametrize("ids", IDS_CASES)
@pytest.mark.parametrize(("scale", "bias"), [(10.0, -10.0), (3.0, 0.5)])
def test_siglip_loss_matches_reference(ids, scale, bias) -> None:
    img, txt = _inputs(seed=1)
    batch = img.shape[0]
    tid = None if ids is None else torch.tensor(ids)
    got = siglip_loss(
        img,
        txt,
        torch.tensor(scale, dtype=torch.float64),
        torch.tensor(bias, dtype=torch.float64),
        tid,
    )
    want = ref_siglip(img.numpy(), txt.numpy(), scale, bias, _ids(ids, batch))
    assert got.item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("ids", IDS_CASES + [[5, 5, 5, 5, 5, 5]])
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_cosine_pair_loss_matches_cosine_embedding_loss(ids, margin) -> None:
    g = torch.Generator().manual_seed(2)
    # not normalised: the loss must compare directions only
    img = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    txt = torch.randn(6, 10, generator=g, dtype=torch.float64) * 0.5
    ids_list = _ids(ids, 6)
    pos_pairs = [(i, j) for i in range(6) for j in range(6) if ids_list[i] == ids_list[j]]
    neg_pairs = [(i, j) for i in range(6) for j in range(6) if ids_list[i] != ids_list[j]]
    reference = torch.nn.CosineEmbeddingLoss(margin=margin)
    pos = reference(
        img[[i for i, _ in pos_pairs]],
        txt[[j for _, j in pos_pairs]],
        torch.ones(len(pos_pairs), dtype=torch.float64),
    )
    if neg_pairs:
        neg = reference(
            img[[i for i, _ in neg_pairs]],
            txt[[j for _, j in neg_pairs]],
            -torch.ones(len(neg_pairs), dtype=torch.float64),
        )
    else:
        neg = torch.tensor(0.0, dtype=torch.float64)
    want = 0.5 * (pos.item() + neg.item())
    tid = None if ids is None else torch.tensor(ids)
    got = cosine_pair_loss(img, txt, tid, margin=margin)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_cosine_pair_loss_is_not_self_similarity() -> None:
    img, txt = _inputs()
    # identical image and caption embeddings: positives are perfect, so only negatives count
    loss = cosine_pair_loss(img, img.clone())
    cos = img @ img.t()
    off = [cos[i, j].item() for i in range(6) for j in range(6) if i != j]
    want = 0.5 * (0.0 + sum(max(c, 0.0) for c in off) / len(off))
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert cosine_pair_loss(img, txt).item() != pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize(("n_pos", "n_neg"), [(4, 4), (3, 6), (5, 1)])
def test_itm_loss_matches_reference(n_pos, n_neg) -> None:
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(n_pos, 2, generator=g, dtype=torch.float64) * 2
    neg = torch.randn(n_neg, 2, generator=g, dtype=torch.float64) * 2
    terms = []
    for row, label in [(r, 1) for r in pos.tolist()] + [(r, 0) for r in neg.tolist()]:
        terms.append(_logsumexp(row) - row[label])
    want = sum(terms) / len(terms)
    assert itm_loss(pos, neg).item() == pytest.approx(want, abs=1e-6)


def test_same_image_mask() -> None:
    mask = same_image_mask(torch.tensor([0, 0, 1]), 3)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert same_image_mask(None, 2).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="shape"):
        same_image_mask(torch.tensor([0, 1]), 3)


# -- hard negatives ----------------------------------------------------------------------------


def test_hard_negatives_never_same_image() -> None:
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(8, 8, generator=g)
    sim[ids[:, None] == ids[None, :]] += 50.0  # same-image pairs look the most similar
    for _ in range(100):
        neg_text, neg_image, valid = sample_hard_negatives(sim, ids, generator=g)
        assert valid.all()
        assert (ids[neg_text] != ids).all()
        assert (ids[neg_image] != ids).all()
        assert neg_text.shape == (8,) and neg_image.shape == (8,)


def test_hard_negatives_valid_mask() -> None:
    sim = torch.randn(4, 4)
    _, _, valid = sample_hard_negatives(sim, torch.tensor([2, 2, 2, 2]))
    assert valid.tolist() == [False] * 4
    _, _, valid = sample_hard_negatives(torch.randn(1, 1))
    assert valid.tolist() == [False]
    neg_text, neg_image, valid = sample_hard_negatives(sim, torch.tensor([2, 2, 2, 5]))
    assert valid.tolist() == [True] * 4
    assert neg_text[:3].tolist() == [3, 3, 3] and neg_image[:3].tolist() == [3, 3, 3]
    assert set(neg_text[3:].tolist()) <= {0, 1, 2}


def test_hard_negatives_follow_softmax() -> None:
    ids = torch.tensor([0, 1, 1, 2, 3])
    batch = 5
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(batch, batch, generator=g)
    draws = 2000
    counts_text = np.zeros((batch, batch))
    counts_image = np.zeros((batch, batch))
    for _ in range(draws):
        neg_text, neg_image, _ = sample_hard_negatives(sim, ids, generator=g)
        counts_text[np.arange(batch), neg_text.numpy()] += 1
        counts_image[np.arange(batch), neg_image.numpy()] += 1
    s = sim.double().numpy()
    ids_l = ids.tolist()
    for i in range(batch):
        # row i: captions j of other images, weight exp(sim[i, j])
        w = np.array([math.exp(s[i, j]) if ids_l[j] != ids_l[i] else 0.0 for j in range(batch)])
        np.testing.assert_allclose(counts_text[i] / draws, w / w.sum(), atol=0.035)
        # caption i: images j of other images, weight exp(sim[j, i])
        w = np.array([math.exp(s[j, i]) if ids_l[j] != ids_l[i] else 0.0 for j in range(batch)])
        np.testing.assert_allclose(counts_image[i] / draws, w / w.sum(), atol=0.035)


def test_hard_negatives_peaked_picks_argmax() -> None:
    g = torch.Generator().manual_seed(4)
    sim = torch.randn(6, 6, generator=g) * 0.1
    target_text = torch.tensor([3, 2, 0, 5, 1, 4])  # never the diagonal
    sim[torch.arange(6), target_text] = 100.0
    sim += torch.eye(6) * 1000.0  # positives are the most similar but must be skipped
    neg_text, neg_image, valid = sample_hard_negatives(sim, generator=g)
    assert valid.all()
    assert neg_text.tolist() == target_text.tolist()
    # column j's hardest negative image is the row whose target is j
    inverse = torch.empty(6, dtype=torch.long)
    inverse[target_text] = torch.arange(6)
    assert neg_image.tolist() == inverse.tolist()


# -- rows scored against all columns, sum reduction (the distributed objective's form) ---------

ROW_SPLITS = [(0, 6), (0, 2), (2, 5), (5, 6), (3, 3)]


def ref_clip_rows(img, txt, scale: float, ids: list[int], start: int, stop: int) -> float:
    """Sum over rows start..stop-1 of (image->text + text->image cross-entropy) / 2, each row
    against all columns, other columns of its own image left out."""
    batch = len(ids)
    total = 0.0
    for i in range(start, stop):
        kept = [j for j in range(batch) if j == i or ids[j] != ids[i]]
        image_row = [scale * float(np.dot(img[i], txt[j])) for j in kept]
        text_row = [scale * float(np.dot(txt[i], img[j])) for j in kept]
        positive = scale * float(np.dot(img[i], txt[i]))
        total += 0.5 * (_logsumexp(image_row) - positive + _logsumexp(text_row) - positive)
    return total


def ref_siglip_rows(img, txt, scale: float, bias: float, ids: list[int], start: int, stop: int):
    total = 0.0
    for i in range(start, stop):
        for j in range(len(ids)):
            z = 1.0 if ids[i] == ids[j] else -1.0
            total += math.log1p(math.exp(-z * (scale * float(np.dot(img[i], txt[j])) + bias)))
    return total


def ref_cosine_rows(img, txt, ids: list[int], margin: float, start: int, stop: int) -> float:
    """Rows start..stop-1's pair terms over the whole batch's positive / negative pair counts."""
    batch = len(ids)
    n_pos = sum(1 for i in range(batch) for j in range(batch) if ids[i] == ids[j])
    n_neg = batch * batch - n_pos
    positive = negative = 0.0
    for i in range(start, stop):
        for j in range(batch):
            cos = float(np.dot(img[i], txt[j]) / np.linalg.norm(img[i]) / np.linalg.norm(txt[j]))
            if ids[i] == ids[j]:
                positive += 1.0 - cos
            else:
                negative += max(cos - margin, 0.0)
    return 0.5 * (positive / n_pos + (negative / n_neg if n_neg else 0.0))


@pytest.mark.parametrize("ids", IDS_CASES)
@pytest.mark.parametrize(("start", "stop"), ROW_SPLITS)
def test_clip_loss_rows_sum_matches_reference(ids, start, stop) -> None:
    img, txt = _inputs(seed=5)
    tid = None if ids is None else torch.tensor(ids)
    scale = torch.tensor(7.0, dtype=torch.float64)
    got = clip_loss(img, txt, scale, tid, rows=slice(start, stop), reduction="sum")
    want = ref_clip_rows(img.numpy(), txt.numpy(), 7.0, _ids(ids, 6), start, stop)
    assert got.item() == pytest.approx(want, abs=1e-9)
    if stop > start:
        mean = clip_loss(img, txt, scale, tid, rows=slice(start, stop))
        assert mean.item() == pytest.approx(want / (stop - start), abs=1e-9)


@pytest.mark.parametrize("ids", IDS_CASES)
@pytest.mark.parametrize(("start", "stop"), ROW_SPLITS)
def test_siglip_loss_rows_sum_matches_reference(ids, start, stop) -> None:
    img, txt = _inputs(seed=6)
    tid = None if ids is None else torch.tensor(ids)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    got = siglip_loss(img, txt, scale, bias, tid, rows=slice(start, stop), reduction="sum")
    want = ref_siglip_rows(img.numpy(), txt.numpy(), 5.0, -2.0, _ids(ids, 6), start, stop)
    assert got.item() == pytest.approx(want, abs=1e-9)
    if stop > start:
        mean = siglip_loss(img, txt, scale, bias, tid, rows=slice(start, stop))
        assert mean.item() == pytest.approx(want / (stop - start), abs=1e-9)


@pytest.mark.parametrize("ids", IDS_CASES + [[5, 5, 5, 5, 5, 5]])
@pytest.mark.parametrize(("start", "stop"), ROW_SPLITS)
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_cosine_pair_loss_rows_share_matches_reference(ids, start, stop, margin) -> None:
    g = torch.Generator().manual_seed(7)
    img = torch.randn(6, 10, generator=g, dtype=torch.float64) * 2
    txt = torch.randn(6, 10, generator=g, dtype=torch.float64)
    tid = None if ids is None else torch.tensor(ids)
    got = cosine_pair_loss(img, txt, tid, margin, rows=slice(start, stop))
    want = ref_cosine_rows(img.numpy(), txt.numpy(), _ids(ids, 6), margin, start, stop)
    assert got.item() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("ids", IDS_CASES)
def test_row_shares_add_up_to_the_whole_batch_value_and_gradient(ids) -> None:
    """Sums over disjoint row ranges give the whole batch's loss and gradient: what lets each
    rank score only its own rows of the global batch."""
    img, txt = _inputs(seed=8)
    tid = None if ids is None else torch.tensor(ids)
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    parts = [slice(0, 2), slice(2, 5), slice(5, 6)]

    def whole_and_parts(loss_fn):
        leaves = [t.clone().requires_grad_(True) for t in (img, txt)]
        whole = loss_fn(*leaves, None)
        grads = torch.autograd.grad(whole, [*leaves, scale])
        leaves = [t.clone().requires_grad_(True) for t in (img, txt)]
        shared = sum(loss_fn(*leaves, rows) for rows in parts)
        return whole, shared, grads, torch.autograd.grad(shared, [*leaves, scale])

    cases = {
        "clip": lambda i, t, rows: clip_loss(i, t, scale, tid, rows=rows, reduction="sum") / 6,
        "siglip": lambda i, t, rows: (
            siglip_loss(i, t, scale, bias, tid, rows=rows, reduction="sum") / 6
        ),
        "cosine": lambda i, t, rows: cosine_pair_loss(i * scale, t, tid, 0.1, rows=rows),
    }
    for name, loss_fn in cases.items():
        whole, shared, want, got = whole_and_parts(loss_fn)
        assert shared.item() == pytest.approx(whole.item(), abs=1e-12), name
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    # reduction="sum" over all rows is the mean times the batch size
    full = clip_loss(img, txt, scale, tid, reduction="sum")
    assert full.item() == pytest.approx(6 * clip_loss(img, txt, scale, tid).item(), rel=1e-12)


def test_itm_loss_sum_reduction() -> None:
    g = torch.Generator().manual_seed(9)
    pos, neg = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g)
    neg = neg.double()
    terms = [_logsumexp(r) - r[1] for r in pos.tolist()] + [
        _logsumexp(r) - r[0] for r in neg.tolist()
    ]
    assert itm_loss(pos, neg, reduction="sum").item() == pytest.approx(sum(terms), abs=1e-9)


def test_same_image_mask_rows() -> None:
    ids = torch.tensor([4, 4, 1, 7, 1])
    assert same_image_mask(ids, 5, rows=slice(1, 3)).tolist() == [
        [True, True, False, False, False],
        [False, False, True, False, True],
    ]
    assert same_image_mask(None, 3, rows=slice(2, 3)).tolist() == [[False, False, True]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (slice(0, 7), "not inside a batch of 6"),
        (slice(4, 2), "not inside a batch of 6"),
        (slice(-1, 3), "not inside a batch of 6"),
        (slice(0, 6, 2), "contiguous"),
        ([0, 1], "contiguous"),
    ],
)
def test_bad_rows_are_refused(rows, message) -> None:
    img, txt = _inputs()
    scale = torch.tensor(2.0, dtype=torch.float64)
    for loss_fn in (
        lambda: clip_loss(img, txt, scale, rows=rows),
        lambda: siglip_loss(img, txt, scale, scale, rows=rows),
        lambda: cosine_pair_loss(img, txt, rows=rows),
    ):
        with pytest.raises(ValueError, match=message):
            loss_fn()


def test_bad_reduction_is_refused() -> None:
    img, txt = _inputs()
    scale = torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        clip_loss(img, txt, scale, reduction="none")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        siglip_loss(img, txt, scale, scale, reduction="max")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        itm_loss(img[:, :2], txt[:, :2], reduction="none")
