"""ITM stage variants: rerun a run's ITM stage from its last contrastive checkpoint, per variant.

A training run with ``itm_stage`` (the quickstart's) saves a checkpoint at its last contrastive
step, before the stage. This script restores that checkpoint once, computes the stage's frozen
features once, then for each ``--variant`` (``name`` or ``name:key=value,key=value`` of dotted
``itm_stage.*`` and ``experimental.itm_*`` keys) restores the weights, runs the stage with those
keys changed, calibrates on the validation split as training does (re-rank and filter weights),
and measures on the test
split (held-out names): ITC and re-ranked R@1, and the ROC AUC of the similarity, the ITM score
and the combined score at telling clean rows from swapped ones (``bench_pairs.py``'s random and
hard swaps, ``--swap-sets`` seeded sets each), scored in process from the same features.

    python bench/bench_itm_stage.py --run runs/quickstart/train --emoji runs/quickstart/emoji \\
        --variant baseline --variant more:itm_stage.optim.steps=300,itm_stage.optim.lr=0.001 \
        --json itm-variants.json

It drives the trainer's own pieces (``Trainer.image_source``, ``ITMStageTask.frozen_pairs``,
``Validator``), so the features and calibration are those of a real run: the ``baseline``
variant reproduces the run's own re-ranked figures exactly (docs/experiments.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from bench_pairs import SWAPS
from common import add_machine_args, load_average, setup_machine, write_json

from xmodal.config import coerce_key, from_dict, with_keys
from xmodal.data import ImageTextDataset, load_dataset
from xmodal.evaluate.pair_filter import roc_auc
from xmodal.evaluate.retrieval import _score_pairs
from xmodal.evaluate.runner import (
    ImageOutputs,
    ImagePairScorer,
    evaluate_model,
    image_tower_outputs,
    text_embeddings,
)
from xmodal.train.checkpoint import latest_checkpoint, load_checkpoint
from xmodal.train.config import TrainConfig
from xmodal.train.itm_stage import FrozenPairs, ITMStage
from xmodal.train.itm_task import ITMStageTask
from xmodal.train.run_config import RUN_CONFIG, move_old_keys
from xmodal.train.trainer import Trainer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the training run's out_dir")
    parser.add_argument("--emoji", required=True, help="folder with train/val/test.jsonl")
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME or NAME:key=value,... of itm_stage.* / experimental.itm_* keys (YAML values)",
    )
    parser.add_argument("--noise", type=float, default=0.2, help="share of swapped captions")
    parser.add_argument("--swap-sets", type=int, default=2, help="seeded sets of each kind")
    add_machine_args(parser)
    return parser.parse_args()


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, {dotted key: YAML value}), each value checked
    against the key's type."""
    name, _, rest = text.partition(":")
    keys = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if not key.startswith(("itm_stage.", "experimental.itm_")):
            raise SystemExit(f"--variant {name}: {key} does not change the ITM stage")
        keys[key] = coerce_key(TrainConfig, key, yaml.safe_load(value), "--variant")
    return name, keys


def swap_sets(rows: list[dict], share: float, sets: int) -> dict[str, list[list[dict]]]:
    return {kind: [swap(rows, share, seed) for seed in range(sets)] for kind, swap in SWAPS.items()}


def pair_scores(model, processor, test, outputs, pairs: tuple[torch.Tensor, torch.Tensor]):
    """Similarity (logit_scale x cosine) and ITM score of (image row, caption row) pairs of the
    test split, and the combined score at the model's filter weight."""
    images, texts = pairs
    scorer = ImagePairScorer(model, processor, outputs.pooled, outputs.tokens, test.captions())
    with torch.inference_mode():
        image_embeds = model.embed_image_pooled(outputs.pooled).cpu()
        text_embeds = text_embeddings(model, processor, test.captions())
    cosine = (image_embeds[images] * text_embeds[texts]).sum(-1).double().numpy()
    itc = float(model.clip_scale().detach()) * cosine
    itm = _score_pairs(images, texts, scorer, 256, torch.device("cpu")).double().numpy()
    weight = float(model.config.fusion.filter_weight or 0.0)
    return {"similarity": itc, "itm": itm, "combined": itc + weight * itm}


def swap_aucs(model, processor, test, outputs, noisy_sets, rows) -> dict:
    """Per kind of swap and set: the AUC of each score; and the mean per kind."""
    caption_row: dict[str, int] = {}
    for i, row in enumerate(rows):
        caption_row.setdefault(row["caption"], i)
    image_of_row = test.text_to_image()
    result: dict = {}
    for kind, sets in noisy_sets.items():
        per_set = []
        for noisy in sets:
            texts = torch.tensor([caption_row[r["caption"]] for r in noisy])
            scores = pair_scores(model, processor, test, outputs, (image_of_row, texts))
            clean = ~np.array([r["swapped"] for r in noisy])
            per_set.append({name: roc_auc(values, clean) for name, values in scores.items()})
        result[kind] = {
            "sets": per_set,
            "mean": {k: float(np.mean([s[k] for s in per_set])) for k in per_set[0]},
        }
    return result


@dataclasses.dataclass
class RestoredStage:
    """A run restored at its last contrastive checkpoint, ready to rerun its ITM stage: the
    trainer (model, validator), the stage's frozen features, the weights to restore before each
    variant, and the test split with its image tower outputs and rows."""

    config: TrainConfig
    trainer: Trainer
    checkpoint: Path
    pairs: FrozenPairs
    weights: dict
    test: ImageTextDataset
    outputs: ImageOutputs
    rows: list[dict]


def restore_stage(run: Path, emoji: Path, work: Path) -> RestoredStage:
    """Restore ``run``'s last checkpoint (its data paths pointed at ``emoji``, its out_dir at
    ``work``) and compute what every rerun of the stage shares."""
    # read as JSON: YAML 1.1 reads the run config's 5e-05 as a string
    data = move_old_keys(json.loads((run / RUN_CONFIG).read_text(encoding="utf-8")))
    data["data"].update(train=str(emoji / "train.jsonl"), val=str(emoji / "val.jsonl"))
    data["out_dir"] = str(work)
    config = from_dict(TrainConfig, data)
    checkpoint = latest_checkpoint(run / "checkpoints")
    if checkpoint is None:
        raise SystemExit(f"no checkpoint in {run / 'checkpoints'}")
    trainer = Trainer(config)
    progress, _ = load_checkpoint(checkpoint, trainer.model, trainer.optimizer, trainer.scheduler)
    print(f"restored {checkpoint} (step {progress.step})", flush=True)
    started = time.time()
    images, train_set = trainer.image_source()
    task = ITMStageTask(
        trainer.model, trainer.processor, train_set, images, config, trainer.precision
    )
    pairs = task.frozen_pairs()
    print(f"frozen features in {time.time() - started:.0f} s", flush=True)
    weights = copy.deepcopy(trainer.model.state_dict())
    test = load_dataset(emoji / "test.jsonl")
    rows = [json.loads(line) for line in (emoji / "test.jsonl").open()]
    outputs = image_tower_outputs(
        trainer.model, trainer.processor, [ex.image for ex in test.unique_images()]
    )
    return RestoredStage(config, trainer, checkpoint, pairs, weights, test, outputs, rows)


def rerun_stage(restored: RestoredStage, keys: dict, seed: int | None = None) -> tuple[dict, dict]:
    """The stage rerun from the checkpoint's weights with the stage's keys changed (dotted:
    ``itm_stage.optim.lr``, ``experimental.itm_hard_negatives``; and the run's seed, or
    ``seed``), then validation with its calibrations, as training does. Returns the stage's
    last loss terms and the validation record."""
    trainer, config = restored.trainer, restored.config
    trainer.model.load_state_dict(restored.weights)
    variant = with_keys(config, keys)
    variant.validate()
    trainer.config.itm_stage = section = variant.itm_stage
    terms = ITMStage(
        trainer.model,
        restored.pairs,
        section,
        config.seed if seed is None else seed,
        trainer.precision.autocast,
        hard_negatives=variant.experimental.itm_hard_negatives,
        reordered_batch=variant.experimental.itm_reordered_batch,
    ).run()
    trainer.validator.stage_done()
    return terms, trainer.validator()


def test_report(restored: RestoredStage) -> dict:
    """ITC and re-ranked (top 16, the calibrated weight) recall on the test split."""
    report = evaluate_model(
        restored.trainer.model,
        restored.trainer.processor,
        restored.test,
        rerank_k=16,
        image_outputs=restored.outputs,
    )
    return {
        "test_itc": {k: v for k, v in report["retrieval_itc"].items() if "R@" in k},
        "test_rerank": {k: v for k, v in report["retrieval_itm_rerank"].items() if "R@" in k},
    }


def main() -> None:
    args = parse_args()
    setup_machine(args)
    run = Path(args.run)
    work = Path(args.json or "itm-variants").with_suffix("") / "work"
    restored = restore_stage(run, Path(args.emoji), work)
    model, processor = restored.trainer.model, restored.trainer.processor
    noisy_sets = swap_sets(restored.rows, args.noise, args.swap_sets)
    results: dict = {"run": str(run), "checkpoint": str(restored.checkpoint), "variants": {}}
    for text in args.variant:
        name, keys = parse_variant(text)
        started = time.time()
        terms, val = rerun_stage(restored, keys)
        recall = test_report(restored)
        aucs = swap_aucs(
            model, processor, restored.test, restored.outputs, noisy_sets, restored.rows
        )
        results["variants"][name] = {
            "itm_stage": keys,
            "last_terms": terms,
            "validation": val,
            **recall,
            "swaps": aucs,
            "seconds": round(time.time() - started, 1),
            "load": load_average(),
        }
        line = "; ".join(
            f"{kind}: " + " / ".join(f"{k} {v:.3f}" for k, v in a["mean"].items())
            for kind, a in aucs.items()
        )
        rr = recall["test_rerank"]
        print(
            f"{name}: {line}; filter w {val.get('val_filter_weight')}; test re-ranked R@1 "
            f"{rr['t2i_R@1']:.1f} / {rr['i2t_R@1']:.1f} ({time.time() - started:.0f} s)",
            flush=True,
        )
        write_json(args.json or "itm-variants.json", results)


if __name__ == "__main__":
    main()
