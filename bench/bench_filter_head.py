"""Filter heads beside the re-rank ITM head: a second, separate head for telling clean pairs
from mismatched ones, trained on the ITM stage's frozen features.

The re-rank ITM head learns to pick a caption's own image among its ITC top 16; as a pair filter
it is weak (it never meets an unrelated caption). Here the ITM stage is rerun per ``--seeds``
seed from a run's last contrastive checkpoint (``bench_itm_stage.py``'s pieces), then a filter
head reads the stage's (now fixed) head input, ``[fused, image embedding * caption embedding]``,
of training pairs: each caption with its own image, a random and an ITC-near other image, a
random and an ITC-near other caption (the stage's ``nearest_by_itc``). Nothing it learns flows
back into the fusion, so re-ranking is that of the stage alone. Heads (``--heads``):

- ``none``: no filter head, the filter score is the re-rank ITM score (the product today);
- ``linear``: a fresh linear layer on the head input;
- ``residual``: the similarity logit (``logit_scale * cosine``) plus a linear layer on the fused
  vector (L2 ``--l2`` on the linear part only).

Each is fitted by L-BFGS on a class-balanced logistic loss. Scores on the held-out test split
(``bench_pairs.py``'s random and same-subcategory swaps, ``--swap-sets`` sets each): the
similarity, the re-rank ITM score, the filter score, and combined scores whose weight w (on the
re-rank grid, ties to the smaller) is calibrated on the validation split only:

- ``sim+filter``: ``similarity + w * filter``; ``filter+rerank``: ``filter + w * rerank``;
  ``sim+fused_part`` (``residual``): ``similarity + w * (filter - similarity)``, the head's
  similarity coefficient (1 in training, on names the fusion saw) re-fitted on validation;
- each calibrated two ways: ``near``, the product's calibration (each validation caption with
  its own image, a random image and one of its 16 ITC-nearest; mean AUC over the two kinds), and
  ``graded``: each validation image with a random caption and one whose ITC rank among the other
  images' captions is drawn log-uniformly (near misses of every hardness, not only the 16
  nearest: test's same-subcategory swaps are rarely that near); mean AUC over the two kinds.

    python bench/bench_filter_head.py --run RUN/train --emoji RUN/emoji --seeds 0 1 2 \\
        --json docs/figures/filter-head.json --cache /tmp/filter-head

``--cache DIR`` keeps each seed's scored pairs (``seed<N>.pt``), and a later run with the same
``--cache`` refits and rescores the heads from them without rerunning the stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_itm_stage import (
    RestoredStage,
    pair_scores,
    parse_variant,
    rerun_stage,
    restore_stage,
    swap_sets,
    test_report,
)
from common import add_machine_args, describe_machine, load_average, setup_machine

from xmodal.atomic import atomic_write_text
from xmodal.data import ImageTextDataset
from xmodal.evaluate.pair_filter import mismatched_images, roc_auc
from xmodal.evaluate.rerank import WEIGHT_GRID
from xmodal.evaluate.runner import ImageOutputs, image_tower_outputs, text_embeddings
from xmodal.models.model import CrossModalModel, Features, select_rows
from xmodal.train.checkpoint import latest_checkpoint
from xmodal.train.itm_stage import FrozenPairs, nearest_by_itc

HEADS = ("none", "linear", "residual")
CALIBRATIONS = ("near", "graded")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the training run's out_dir")
    parser.add_argument("--emoji", required=True, help="folder with train/val/test.jsonl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="stage seeds")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument(
        "--stage",
        default="",
        help="stage keys changed for every seed: itm_stage.optim.lr=...,... (YAML values)",
    )
    parser.add_argument("--l2", type=float, default=0.01, help="L2 on a head's linear weights")
    parser.add_argument("--noise", type=float, default=0.2, help="share of swapped captions")
    parser.add_argument("--swap-sets", type=int, default=2, help="seeded sets of each kind")
    parser.add_argument("--cache", default=None, help="folder for each seed's scored pairs")
    add_machine_args(parser)
    return parser.parse_args()


# -- scored pairs -------------------------------------------------------------------------------
@dataclass
class ScoredPairs:
    """(image, caption) pairs through the stage's fusion: the ITM head's input per pair
    ``[fused (D), image embedding * caption embedding (D)]``, the similarity logit and the
    re-rank ITM score (match minus mismatch logit)."""

    inputs: torch.Tensor  # (P, 2D) float32
    similarity: np.ndarray  # (P,) float64
    rerank: np.ndarray  # (P,) float64

    def rows(self, part: slice) -> ScoredPairs:
        return ScoredPairs(self.inputs[part], self.similarity[part], self.rerank[part])

    def state(self) -> dict:
        return {"inputs": self.inputs, "similarity": self.similarity, "rerank": self.rerank}


@contextlib.contextmanager
def head_inputs(model: CrossModalModel) -> Iterator[list[torch.Tensor]]:
    """Collects the ITM head's input of every call made inside the block, in call order."""
    captured: list[torch.Tensor] = []

    def keep(_module, inputs, _output) -> None:
        captured.append(inputs[0].detach().float().cpu())

    handle = model.itm_head.register_forward_hook(keep)  # type: ignore[union-attr]
    try:
        yield captured
    finally:
        handle.remove()


def similarity_of(model: CrossModalModel, inputs: torch.Tensor) -> np.ndarray:
    """``logit_scale * cosine`` from the head input (its second half is the embeddings'
    element-wise product, which sums to the cosine)."""
    dim = inputs.shape[1] // 2
    scale = float(model.clip_scale().detach())
    return (scale * inputs[:, dim:].double().sum(-1)).numpy()


@torch.no_grad()
def score_training_pairs(
    model: CrossModalModel,
    pairs: FrozenPairs,
    images: torch.Tensor,
    captions: torch.Tensor,
    batch_size: int = 512,
) -> ScoredPairs:
    """The training pairs (view 0 of ``images[p]``, caption ``captions[p]``) through the fusion
    and re-rank head, from the stage's frozen features; each image and caption of a batch is
    projected once."""
    model.eval()
    rerank = []
    with head_inputs(model) as captured:
        for start in range(0, len(images), batch_size):
            image_ids, image_rows = torch.unique(
                images[start : start + batch_size], return_inverse=True
            )
            caption_ids, caption_rows = torch.unique(
                captions[start : start + batch_size], return_inverse=True
            )
            image = select_rows(pairs.images[0], image_ids)
            image = Features(image.embeds, image.projected, image.tokens.float(), None)
            logits = model.itm_pair_logits(
                image, select_rows(pairs.text, caption_ids), image_rows, caption_rows
            )
            rerank.append((logits[:, 1] - logits[:, 0]).double().cpu())
    inputs = torch.cat(captured)
    return ScoredPairs(inputs, similarity_of(model, inputs), torch.cat(rerank).numpy())


def score_split_pairs(
    model: CrossModalModel,
    processor,
    dataset: ImageTextDataset,
    outputs: ImageOutputs,
    images: torch.Tensor,
    captions: torch.Tensor,
) -> ScoredPairs:
    """Pairs (image row, caption row) of an evaluation split, scored as ``xmodal eval`` and
    ``bench_itm_stage.py`` score them (:func:`bench_itm_stage.pair_scores`)."""
    with head_inputs(model) as captured:
        scores = pair_scores(model, processor, dataset, outputs, (images, captions))
    inputs = torch.cat(captured)
    similarity = similarity_of(model, inputs)
    if not np.allclose(similarity, scores["similarity"], atol=1e-3):
        raise AssertionError("the head input's similarity differs from the embeddings'")
    return ScoredPairs(inputs, scores["similarity"], scores["itm"])


# -- negatives ----------------------------------------------------------------------------------
def other_than(own: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """A uniform draw from ``range(count)`` other than ``own[i]``, per row."""
    other = torch.randint(0, count - 1, (len(own),), generator=generator)
    return other + (other >= own).long()


def caption_of_other_image(image_of_row: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each caption row, a uniformly drawn caption row of another image (redrawn until
    every row has one)."""
    rows = len(image_of_row)
    other = torch.randint(0, rows, (rows,), generator=generator)
    while bool((same := image_of_row[other] == image_of_row).any()):
        other[same] = torch.randint(0, rows, (int(same.sum()),), generator=generator)
    return other


def training_negatives(
    pairs: FrozenPairs, near_images: torch.Tensor, near_captions: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(images, captions, clean) of the filter head's training pairs: every caption with its own
    image, a random other image, one of its ITC-nearest images, a random caption of another
    image and one of its image's ITC-nearest captions of other images."""
    generator = torch.Generator().manual_seed(seed)
    image_of_row = pairs.image_of_row
    rows = torch.arange(len(image_of_row))
    count = len(pairs.images[0].embeds)
    k = near_images.shape[1]
    random_image = other_than(image_of_row, count, generator)
    near_image = near_images[rows, torch.randint(0, k, (len(rows),), generator=generator)]
    random_caption = caption_of_other_image(image_of_row, generator)
    near_caption = near_captions[
        image_of_row, torch.randint(0, near_captions.shape[1], (len(rows),), generator=generator)
    ]
    images = torch.cat([image_of_row, random_image, near_image, image_of_row, image_of_row])
    captions = torch.cat([rows, rows, rows, random_caption, near_caption])
    clean = np.zeros(len(images), dtype=bool)
    clean[: len(rows)] = True
    return images, captions, clean


def graded_captions(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    captions: list[str],
    seed: int,
) -> torch.Tensor:
    """For each row (an image and its caption), the caption of another image whose rank by ITC
    among all such captions (other image, other text) is drawn log-uniformly from 1 to their
    count: as many of ranks 1-4 as of 5-16 or of 17-64."""
    generator = torch.Generator().manual_seed(seed)
    scores = (image_emb[text_to_image] @ text_emb.T).float()
    code = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    text_code = torch.tensor([code[c] for c in captions])
    blocked = (text_to_image[:, None] == text_to_image[None, :]) | (
        text_code[:, None] == text_code[None, :]
    )
    scores = scores.masked_fill(blocked, float("-inf"))
    order = scores.argsort(dim=1, descending=True)
    allowed = (~blocked).sum(dim=1)
    if bool((allowed < 1).any()):
        raise ValueError("graded negatives need a caption of another image for every row")
    uniform = torch.rand(len(scores), generator=generator, dtype=torch.float64)
    rank = torch.floor(allowed.double() ** uniform).long().clamp(1, None) - 1
    rank = torch.minimum(rank, allowed - 1)
    return order[torch.arange(len(order)), rank]


# -- heads --------------------------------------------------------------------------------------
@dataclass
class FilterHead:
    """A fitted filter head: ``logit = offset * similarity + z @ weight + bias``, with ``z``
    the head input's ``part`` standardised by the training pairs' mean and spread."""

    kind: str
    weight: torch.Tensor
    bias: float
    offset: float  # the similarity's coefficient (1 in ``residual``, else 0)
    part: slice
    mean: torch.Tensor
    spread: torch.Tensor

    def __call__(self, pairs: ScoredPairs) -> np.ndarray:
        if self.kind == "none":
            return pairs.rerank
        linear = (self.standardise(pairs.inputs) @ self.weight.double()).numpy()
        return self.offset * pairs.similarity + linear + self.bias

    def standardise(self, inputs: torch.Tensor) -> torch.Tensor:
        return (inputs[:, self.part].double() - self.mean) / self.spread


def fit_head(kind: str, train: ScoredPairs, clean: np.ndarray, l2: float) -> FilterHead:
    """A filter head of ``kind`` fitted on ``train`` by L-BFGS: the class-balanced logistic
    loss (clean pairs and mismatched ones weigh half each) plus ``l2 * |weight|^2``, on
    standardised inputs (the penalty weighs every coordinate alike: the embeddings' products
    are about 1/D of the fused vector's size)."""
    dim = train.inputs.shape[1] // 2
    if kind == "none":
        empty = torch.zeros(0, dtype=torch.float64)
        return FilterHead(kind, empty, 0.0, 0.0, slice(0, 0), empty, empty)
    if kind == "linear":
        part, offset = slice(0, 2 * dim), 0.0
    elif kind == "residual":
        part, offset = slice(0, dim), 1.0
    else:
        raise ValueError(f"unknown filter head {kind!r}; expected one of {HEADS}")
    raw = train.inputs[:, part].double()
    mean, spread = raw.mean(dim=0), raw.std(dim=0).clamp_min(1e-12)
    x = (raw - mean) / spread
    base = torch.from_numpy(offset * train.similarity)
    label = torch.from_numpy(clean)
    share = torch.where(label, 0.5 / label.sum(), 0.5 / (~label).sum()).double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )
    sign = torch.where(label, -1.0, 1.0).double()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logit = base + x @ weight + bias
        loss = (share * F.softplus(sign * logit)).sum() + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return FilterHead(kind, weight.detach(), float(bias.detach()), offset, part, mean, spread)


# -- calibration and goal -----------------------------------------------------------------------
def kind_auc(score: np.ndarray, clean: slice, mismatched: slice) -> float:
    """ROC AUC of ``score`` at telling the ``clean`` rows from the ``mismatched`` ones."""
    values = np.concatenate([score[clean], score[mismatched]])
    labels = np.zeros(len(values), dtype=bool)
    labels[: clean.stop - clean.start] = True
    return roc_auc(values, labels)


def calibrate(
    base: np.ndarray, extra: np.ndarray, clean: slice, kinds: dict[str, slice]
) -> tuple[float, dict[str, float]]:
    """The weight w on WEIGHT_GRID whose ``base + w * extra`` has the best mean AUC over
    ``kinds`` (ties to the smaller w), and its AUC per kind."""
    best: tuple[float, float, dict[str, float]] | None = None
    for weight in WEIGHT_GRID:
        score = base + weight * extra
        per_kind = {name: kind_auc(score, clean, part) for name, part in kinds.items()}
        mean = float(np.mean(list(per_kind.values())))
        if best is None or mean > best[1]:
            best = (weight, mean, per_kind)
    assert best is not None
    return best[0], best[2]


TIE = 0.001  # AUC differences below this are ties (about 100 of 160 x 642 pair orders)


def goal(aucs: dict[str, dict[str, float]], combined: str) -> dict[str, bool]:
    """The issue's goal on the test swaps' mean AUCs: the filter at least the similarity on
    every kind of swap, and ``combined`` above both on every kind by at least :data:`TIE` (a
    combined score at the grid's largest weight is the filter to within rounding)."""
    return {
        "filter_ge_similarity": all(a["filter"] >= a["similarity"] for a in aucs.values()),
        "combined_beats_both": all(
            a[combined] >= max(a["similarity"], a["filter"]) + TIE for a in aucs.values()
        ),
    }


# -- one seed -----------------------------------------------------------------------------------
def validation_split(restored: RestoredStage) -> tuple[ImageTextDataset, ImageOutputs]:
    """The validation split and its image tower outputs (the validator's cache when it has
    one)."""
    validator = restored.trainer.validator
    outputs = validator.cache
    if outputs is None or outputs.tokens is None:
        images = [ex.image for ex in validator.dataset.unique_images()]
        outputs = image_tower_outputs(restored.trainer.model, restored.trainer.processor, images)
    return validator.dataset, outputs


@torch.no_grad()
def split_embeddings(model, processor, dataset, outputs) -> tuple[torch.Tensor, torch.Tensor]:
    image_emb = model.embed_image_pooled(outputs.pooled).cpu()
    return image_emb, text_embeddings(model, processor, dataset.captions())


def run_seed(
    restored: RestoredStage, seed: int, stage: dict, noise: float, swap_count: int
) -> dict:
    """Rerun the stage at ``seed`` (``stage``: its keys changed) and score every pair the heads
    are fitted or measured on."""
    model, processor = restored.trainer.model, restored.trainer.processor
    started = time.time()
    terms, val_record = rerun_stage(restored, stage, seed=seed)
    recall = test_report(restored)
    print(f"seed {seed}: stage and evaluation in {time.time() - started:.0f} s", flush=True)
    pairs = restored.pairs
    near_images, near_captions = nearest_by_itc(
        pairs.images[0].embeds,
        pairs.text.embeds,
        pairs.image_of_row,
        restored.config.experimental.itm_hard_negatives,
    )
    images, captions, clean = training_negatives(pairs, near_images, near_captions, seed)
    train = score_training_pairs(model, pairs, images, captions)

    dataset, outputs = validation_split(restored)
    image_emb, text_emb = split_embeddings(model, processor, dataset, outputs)
    own = dataset.text_to_image()
    random_image, near_image = mismatched_images(image_emb, text_emb, own, near=16, seed=0)
    rows = torch.arange(len(own))
    caption_list = dataset.captions()
    random_caption = caption_of_other_image(own, torch.Generator().manual_seed(1))
    graded = graded_captions(image_emb, text_emb, own, caption_list, seed=1)
    val = score_split_pairs(
        model,
        processor,
        dataset,
        outputs,
        torch.cat([own, random_image, near_image, own, own]),
        torch.cat([rows, rows, rows, random_caption, graded]),
    )

    test = restored.test
    noisy_sets = swap_sets(restored.rows, noise, swap_count)
    caption_row: dict[str, int] = {}
    for i, row in enumerate(restored.rows):
        caption_row.setdefault(row["caption"], i)
    image_of_row = test.text_to_image()
    texts = [
        torch.tensor([caption_row[r["caption"]] for r in noisy])
        for sets in noisy_sets.values()
        for noisy in sets
    ]
    test_pairs = score_split_pairs(
        model,
        processor,
        test,
        restored.outputs,
        image_of_row.repeat(len(texts)),
        torch.cat(texts),
    )
    swapped = {
        kind: [np.array([r["swapped"] for r in noisy]) for noisy in sets]
        for kind, sets in noisy_sets.items()
    }
    print(f"seed {seed}: pairs scored in {time.time() - started:.0f} s", flush=True)
    return {
        "seed": seed,
        "last_terms": terms,
        "validation": val_record,
        **recall,
        "train": train.state(),
        "train_clean": clean,
        "val": val.state(),
        "val_rows": len(own),
        "test": test_pairs.state(),
        "swapped": swapped,
        "seconds": round(time.time() - started, 1),
        "load": load_average(),
    }


def measure_heads(scored: dict, heads: list[str], l2: float) -> dict:
    """Fit each head on the seed's training pairs, calibrate the combined weights on its
    validation pairs and measure every score on its test swaps."""
    train = ScoredPairs(**scored["train"])
    val = ScoredPairs(**scored["val"])
    test = ScoredPairs(**scored["test"])
    n = scored["val_rows"]
    clean = slice(0, n)
    val_kinds = {
        "random": slice(n, 2 * n),
        "near": slice(2 * n, 3 * n),
        "random_caption": slice(3 * n, 4 * n),
        "graded": slice(4 * n, 5 * n),
    }
    calibration_kinds = {
        "near": {k: val_kinds[k] for k in ("random", "near")},
        "graded": {k: val_kinds[k] for k in ("random_caption", "graded")},
    }
    swapped = scored["swapped"]
    size = len(next(iter(swapped.values()))[0])
    result: dict = {}
    for kind in heads:
        started = time.time()
        head = fit_head(kind, train, scored["train_clean"], l2)
        train_filter = head(train)
        scores_val = {"similarity": val.similarity, "rerank": val.rerank, "filter": head(val)}
        scores_test = {"similarity": test.similarity, "rerank": test.rerank, "filter": head(test)}
        weights = {}
        forms = {"sim+filter": ("similarity", "filter")}
        if kind != "none":
            forms["filter+rerank"] = ("filter", "rerank")
        if head.offset:
            # the head's own part: the similarity's coefficient against it re-fitted on
            # validation (names the fusion never saw) instead of the 1 it had in training
            scores_val["fused_part"] = scores_val["filter"] - head.offset * val.similarity
            scores_test["fused_part"] = scores_test["filter"] - head.offset * test.similarity
            forms["sim+fused_part"] = ("similarity", "fused_part")
        for form, (base, extra) in forms.items():
            for how in CALIBRATIONS:
                w, _ = calibrate(scores_val[base], scores_val[extra], clean, calibration_kinds[how])
                name = f"{form}@{how}"
                weights[name] = w
                scores_val[name] = scores_val[base] + w * scores_val[extra]
                scores_test[name] = scores_test[base] + w * scores_test[extra]
        validation = {
            vk: {name: kind_auc(s, clean, part) for name, s in scores_val.items()}
            for vk, part in val_kinds.items()
        }
        per_set: dict = {}
        offset = 0
        for swap_kind, sets in swapped.items():
            per_set[swap_kind] = []
            for flags in sets:
                part = slice(offset, offset + size)
                offset += size
                labels = ~flags
                per_set[swap_kind].append(
                    {name: roc_auc(s[part], labels) for name, s in scores_test.items()}
                )
        mean = {
            swap_kind: {name: float(np.mean([s[name] for s in sets])) for name in scores_test}
            for swap_kind, sets in per_set.items()
        }
        train_auc = roc_auc(train_filter, scored["train_clean"])
        result[kind] = {
            "train_auc_filter": train_auc,
            "weight_norm": float(head.weight.norm()) if kind != "none" else None,
            "combined_weights": weights,
            "validation_auc": validation,
            "test_auc_sets": per_set,
            "test_auc_mean": mean,
            "goal": {form: goal(mean, form) for form in weights},
            "seconds": round(time.time() - started, 1),
        }
    return result


def summarize(seeds: list[dict], heads: list[str]) -> dict:
    """Per head and score: the test AUC range over seeds per kind of swap, and for each
    combined score on how many seeds the goal holds."""
    summary: dict = {}
    for kind in heads:
        runs = [s["heads"][kind] for s in seeds]
        names = list(runs[0]["test_auc_mean"]["random"])
        summary[kind] = {
            "test_auc_range": {
                swap: {
                    name: [
                        min(r["test_auc_mean"][swap][name] for r in runs),
                        max(r["test_auc_mean"][swap][name] for r in runs),
                    ]
                    for name in names
                }
                for swap in runs[0]["test_auc_mean"]
            },
            "goal_seeds": {
                form: sum(all(r["goal"][form].values()) for r in runs) for form in runs[0]["goal"]
            },
            "filter_ge_similarity_seeds": sum(
                next(iter(r["goal"].values()))["filter_ge_similarity"] for r in runs
            ),
        }
    return summary


def main() -> None:
    args = parse_args()
    setup_machine(args)
    cache = Path(args.cache) if args.cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    work = Path(args.cache or "/tmp/filter-head") / "work"
    restored: RestoredStage | None = None
    stage = parse_variant(f"stage:{args.stage}")[1]
    results: dict = {
        "machine": describe_machine(args.threads),
        "run": str(Path(args.run).resolve()),
        "noise": args.noise,
        "swap_sets": args.swap_sets,
        "checkpoint": str(latest_checkpoint(Path(args.run) / "checkpoints")),
        "l2": args.l2,
        "tie": TIE,
        "itm_stage": stage,
        "seeds": [],
    }
    for seed in args.seeds:
        path = None if cache is None else cache / f"seed{seed}.pt"
        if path is not None and path.exists():
            scored = torch.load(path, weights_only=False)
            print(f"seed {seed}: scored pairs from {path}", flush=True)
        else:
            if restored is None:
                restored = restore_stage(Path(args.run), Path(args.emoji), work)
            scored = run_seed(restored, seed, stage, args.noise, args.swap_sets)
            if path is not None:
                torch.save(scored, path)
        heads = measure_heads(scored, args.heads, args.l2)
        record = {
            k: scored[k]
            for k in ("seed", "last_terms", "validation", "test_itc", "test_rerank", "seconds")
        }
        record["load"] = scored["load"]
        record["heads"] = heads
        results["seeds"].append(record)
        for kind, h in heads.items():
            line = "; ".join(
                f"{swap}: " + " ".join(f"{k} {v:.3f}" for k, v in a.items())
                for swap, a in h["test_auc_mean"].items()
            )
            print(f"seed {seed} {kind}: {line}; w {h['combined_weights']}", flush=True)
        results["summary"] = summarize(results["seeds"], args.heads)
        if args.json:
            atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
