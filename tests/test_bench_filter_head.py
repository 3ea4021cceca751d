"""The pieces of bench/bench_filter_head.py that need no trained run: the filter heads' fit,
the training and graded negatives, the combined weight's calibration and the goal check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # it imports bench_itm_stage and common as its siblings
spec = importlib.util.spec_from_file_location("bench_filter_head", BENCH / "bench_filter_head.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # its dataclasses look their module up
spec.loader.exec_module(bench)

from xmodal.evaluate.pair_filter import roc_auc  # noqa: E402
from xmodal.models.model import Features  # noqa: E402
from xmodal.train.itm_stage import FrozenPairs  # noqa: E402


def synthetic_pairs(n: int = 600, dim: int = 4, seed: int = 0):
    """Pairs whose similarity is half informative and whose fused vector's first coordinate
    carries the rest of the label."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, generator=generator) < 0.3
    signal = clean.double() * 2 - 1
    fused = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    fused[:, 0] += 1.5 * signal
    agreement = torch.randn(n, dim, generator=generator, dtype=torch.float64) * 0.05
    agreement[:, 0] += 0.05 * signal + 0.1 * torch.randn(n, generator=generator).double()
    inputs = torch.cat([fused, agreement], dim=1).float()
    similarity = 10 * agreement.sum(-1).numpy()
    rerank = torch.randn(n, generator=generator, dtype=torch.float64).numpy()
    return bench.ScoredPairs(inputs, similarity, rerank), clean.numpy()


def test_heads_fit_what_the_similarity_misses() -> None:
    train, clean = synthetic_pairs(seed=0)
    test, test_clean = synthetic_pairs(seed=1)
    similarity_auc = roc_auc(test.similarity, test_clean)
    none = bench.fit_head("none", train, clean, 0.01)
    assert np.array_equal(none(test), test.rerank)
    for kind in ("linear", "residual"):
        head = bench.fit_head(kind, train, clean, 0.01)
        assert head(test).shape == (len(test_clean),)
        assert roc_auc(head(test), test_clean) > similarity_auc + 0.05
    residual = bench.fit_head("residual", train, clean, 0.01)
    assert residual.offset == 1.0 and residual.weight.shape == (4,)
    # the residual's similarity term is the similarity itself: zero weights leave it alone
    residual.weight.zero_()
    residual.bias = 0.0
    assert np.allclose(residual(test), test.similarity)
    stronger = bench.fit_head("residual", train, clean, 10.0)
    assert stronger.weight.norm() < bench.fit_head("residual", train, clean, 0.0).weight.norm()


def test_training_negatives_never_pair_an_image_with_its_own_caption() -> None:
    images, rows = 6, 12
    image_of_row = torch.arange(rows) % images
    embeds = torch.nn.functional.normalize(torch.randn(images, 4), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(rows, 4), dim=-1)
    features = Features(embeds, embeds, torch.zeros(images, 2, 4), None)
    text_features = Features(text, text, torch.zeros(rows, 3, 4), torch.ones(rows, 3))
    pairs = FrozenPairs([features], text_features, image_of_row, None, [], [])
    near_images, near_captions = bench.nearest_by_itc(embeds, text, image_of_row, 3)
    picked, captions, clean = bench.training_negatives(pairs, near_images, near_captions, seed=4)
    assert len(picked) == len(captions) == len(clean) == 5 * rows
    assert clean.sum() == rows
    own = image_of_row[captions] == picked
    assert np.array_equal(own.numpy(), clean)
    again = bench.training_negatives(pairs, near_images, near_captions, seed=4)
    assert torch.equal(again[0], picked) and torch.equal(again[1], captions)


def test_graded_captions_reach_every_hardness() -> None:
    rows = 400
    generator = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(rows) // 2  # two captions an image
    normalize = torch.nn.functional.normalize
    image_emb = normalize(torch.randn(rows // 2, 8, generator=generator), dim=-1)
    text_emb = normalize(torch.randn(rows, 8, generator=generator), dim=-1)
    captions = [f"caption {i}" for i in range(rows)]
    captions[5] = captions[100]  # a repeated text is never another row's negative
    picked = bench.graded_captions(image_emb, text_emb, text_to_image, captions, seed=3)
    assert bool((text_to_image[picked] != text_to_image).all())
    assert all(captions[int(p)] != captions[r] for r, p in enumerate(picked))
    scores = image_emb[text_to_image] @ text_emb.T
    ranks = []
    for r, p in enumerate(picked.tolist()):
        others = [
            t
            for t in range(rows)
            if text_to_image[t] != text_to_image[r] and captions[t] != captions[r]
        ]
        ranks.append(sum(float(scores[r, t]) > float(scores[r, p]) for t in others))
    ranks = np.array(ranks)
    assert (ranks < 4).mean() > 0.15 and (ranks >= 64).mean() > 0.15


def test_calibrate_takes_the_best_grid_weight_ties_to_the_smaller() -> None:
    n = 200
    rng = np.random.default_rng(0)
    clean = slice(0, n)
    kinds = {"a": slice(n, 2 * n), "b": slice(2 * n, 3 * n)}
    label = np.r_[np.ones(n), np.zeros(2 * n)]
    weak = rng.normal(size=3 * n) + 0.2 * label
    strong = label + 0.1 * rng.normal(size=3 * n)
    weight, aucs = bench.calibrate(weak, strong, clean, kinds)
    assert weight >= 4 and min(aucs.values()) > 0.99  # the smallest weight at the best AUC
    assert bench.calibrate(weak, strong, clean, kinds)[0] < max(bench.WEIGHT_GRID)
    weight, _ = bench.calibrate(strong, np.zeros(3 * n), clean, kinds)
    assert weight == 0.0


def test_goal_needs_both_kinds() -> None:
    aucs = {
        "random": {"similarity": 0.94, "filter": 0.95, "c": 0.96},
        "hard": {"similarity": 0.83, "filter": 0.85, "c": 0.85},
    }
    assert bench.goal(aucs, "c") == {"filter_ge_similarity": True, "combined_beats_both": False}
    aucs["hard"]["c"] = 0.8505  # within a tie of the filter
    assert not bench.goal(aucs, "c")["combined_beats_both"]
    aucs["hard"]["c"] = 0.86
    assert bench.goal(aucs, "c")["combined_beats_both"]


def test_measure_heads_scores_every_form_on_every_swap_set() -> None:
    train, train_clean = synthetic_pairs(n=600, seed=0)
    val_rows = 100
    parts = [synthetic_pairs(n=val_rows, seed=10 + k)[0] for k in range(5)]
    val = bench.ScoredPairs(
        torch.cat([p.inputs for p in parts]),
        np.concatenate([p.similarity for p in parts]),
        np.concatenate([p.rerank for p in parts]),
    )
    test, test_clean = synthetic_pairs(n=300, seed=20)
    scored = {
        "train": train.state(),
        "train_clean": train_clean,
        "val": val.state(),
        "val_rows": val_rows,
        "test": test.state(),
        "swapped": {"random": [~test_clean[:150]], "hard": [~test_clean[150:]]},
    }
    result = bench.measure_heads(scored, ["none", "residual"], 0.01)
    assert set(result["none"]["combined_weights"]) == {"sim+filter@near", "sim+filter@graded"}
    residual = result["residual"]
    assert set(residual["combined_weights"]) == {
        f"{form}@{how}"
        for form in ("sim+filter", "filter+rerank", "sim+fused_part")
        for how in bench.CALIBRATIONS
    }
    assert all(w in bench.WEIGHT_GRID for w in residual["combined_weights"].values())
    hard = residual["test_auc_sets"]["hard"][0]
    assert hard["filter"] == roc_auc(
        bench.fit_head("residual", train, train_clean, 0.01)(test.rows(slice(150, 300))),
        test_clean[150:],
    )
    assert residual["test_auc_mean"]["random"]["similarity"] == roc_auc(
        test.similarity[:150], test_clean[:150]
    )
    assert set(residual["goal"]["sim+fused_part@near"]) == {
        "filter_ge_similarity",
        "combined_beats_both",
    }
