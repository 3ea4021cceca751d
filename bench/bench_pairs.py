"""Pairs: noisy-pair detection, linear probes and the cost of scoring pairs, on the emoji data.

noise: the test split (held-out names) with ``--noise`` of its captions swapped (seeded; every
    swapped caption differs from the row's own): ``random`` swaps take another test row's,
    ``hard`` swaps one of the same emoji subcategory (another animal face, another keycap);
    ``--swap-sets`` sets of each. ``xmodal extract --what pairs`` scores the rows; ROC AUC of
    each score (similarity, ITM, combined) at telling clean from swapped rows; then ``filter
    --keep-fraction 0.8`` by each score: the precision (clean share) of the kept rows, read back
    from the written file.
probe: emoji ``category`` from fused / image / text / concatenated features, probe trained on the
    train split's features and tested on the test split (held-out names); and trained on the
    validation split (names the model never saw either).
speed: ``extract`` of the same rows as images, texts, pairs, pairs with fused vectors and
    pairs with the fusion in fp32 (``--precision fp32``; the others use ``--precision``),
    alternating for ``--rounds`` rounds; each run's steady rate is taken between its first and
    last finished shard (model loading and worker start-up not counted), as bench_extract.py
    does. Reported: the median items/s, and pairs time against images + texts time per round.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_pairs.py --model M --emoji DIR --out WORK

The figures go to ``--json`` (default: WORK/bench_pairs.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from common import add_machine_args, load_average, setup_machine, write_json

from xmodal.extract import extract, load_manifest
from xmodal.extract.mapper import MapperOptions
from xmodal.pairs import filter_pairs, probe, read_pair_scores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model trained by xmodal quickstart")
    parser.add_argument("--emoji", required=True, help="folder with train/val/test.jsonl")
    parser.add_argument("--out", required=True, help="work folder (shards, filtered files)")
    parser.add_argument("--parts", nargs="+", default=["noise", "probe", "speed"])
    parser.add_argument("--noise", type=float, default=0.2, help="share of swapped captions")
    parser.add_argument(
        "--swaps",
        nargs="+",
        choices=sorted(SWAPS),
        default=["random", "hard"],
        help="random: another test row's caption; hard: one of the same subcategory",
    )
    parser.add_argument("--swap-sets", type=int, default=2, help="seeded sets of each kind")
    parser.add_argument("--seed", type=int, default=0, help="the first set's seed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--speed-split", default="train", help="split timed by the speed part")
    parser.add_argument("--shard-size", type=int, default=256, help="speed part's shard size")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto", help="as extract's"
    )
    add_machine_args(parser)
    return parser.parse_args()


def swap_captions(rows: list[dict], share: float, seed: int) -> list[dict]:
    """A copy of ``rows`` where a seeded ``share`` of them carry another chosen row's caption
    (a cyclic shift of the chosen rows' captions, re-drawn until every caption differs from the
    row's own); ``swapped`` marks them."""
    rng = np.random.default_rng(seed)
    count = round(share * len(rows))
    while True:
        chosen = rng.choice(len(rows), count, replace=False)
        shift = rng.permutation(chosen)
        if all(
            rows[a]["caption"] != rows[b]["caption"] for a, b in zip(chosen, shift, strict=True)
        ):
            break
    out = [{**row, "swapped": False} for row in rows]
    for a, b in zip(chosen, shift, strict=True):
        out[a]["caption"] = rows[b]["caption"]
        out[a]["swapped"] = True
    return out


def swap_within(
    rows: list[dict], share: float, seed: int, field: str = "subcategory"
) -> list[dict]:
    """Hard swaps: a copy of ``rows`` where a seeded ``share`` of them carry the caption of
    another row of the same ``field`` (emoji: the same subcategory, e.g. one animal face for
    another), drawn among those with another image and another caption; ``swapped`` marks them.
    Rows alone in their group are never chosen."""
    rng = np.random.default_rng(seed)
    groups: dict[object, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get(field), []).append(i)

    def partners(a: int) -> list[int]:
        return [
            b
            for b in groups[rows[a].get(field)]
            if rows[b]["caption"] != rows[a]["caption"] and rows[b]["image"] != rows[a]["image"]
        ]

    eligible = [a for a in range(len(rows)) if partners(a)]
    count = min(round(share * len(rows)), len(eligible))
    chosen = rng.choice(len(eligible), count, replace=False)
    out = [{**row, "swapped": False} for row in rows]
    for k in sorted(int(c) for c in chosen):
        a = eligible[k]
        options = partners(a)
        out[a]["caption"] = rows[options[int(rng.integers(len(options)))]]["caption"]
        out[a]["swapped"] = True
    return out


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half
    (the Mann-Whitney statistic)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = positive.sum()
    neg = len(scores) - pos
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


SWAPS = {"random": swap_captions, "hard": swap_within}


def noise_part(args, options: MapperOptions) -> dict:
    """Every kind of swap in ``args.swaps``, ``args.swap_sets`` seeded sets each; per set the
    ROC AUC of each score and the keep-80% precision of filtering by it."""
    emoji = Path(args.emoji)
    rows = [json.loads(line) for line in (emoji / "test.jsonl").open()]
    for row in rows:
        row["image"] = str((emoji / row["image"]).resolve())
    result: dict = {}
    for kind in args.swaps:
        result[kind] = {}
        for seed in range(args.seed, args.seed + args.swap_sets):
            noisy = SWAPS[kind](rows, args.noise, seed)
            work = Path(args.out) / "noise" / f"{kind}-{seed}"
            result[kind][str(seed)] = noise_set(args, options, noisy, work)
            print(f"{kind} swaps, seed {seed}: " + _noise_line(result[kind][str(seed)]), flush=True)
    result["mean"] = {
        kind: {
            key: float(np.mean([one[key] for one in result[kind].values()]))
            for key in next(iter(result[kind].values()))
            if key.startswith(("auc_", "keep80_"))
        }
        for kind in args.swaps
    }
    for kind, means in result["mean"].items():
        aucs = ", ".join(f"{k[4:]} {v:.4f}" for k, v in means.items() if k.startswith("auc_"))
        print(f"mean over the {args.swap_sets} {kind} sets: ROC AUC {aucs}")
    return result


def noise_set(args, options: MapperOptions, noisy: list[dict], work: Path) -> dict:
    """Score one noisy copy of the test split; AUC and keep-80% figures of every score."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "noisy-test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in noisy), encoding="utf-8")
    scores = work / "scores"
    if scores.exists():  # a rerun scores afresh (the model may have changed)
        shutil.rmtree(scores)
    extract(args.model, data, scores, modality="pairs", options=options, progress=False)
    table = read_pair_scores(scores)
    clean = ~np.array([noisy[int(i)]["swapped"] for i in table.columns["id"]])
    result: dict = {"rows": len(clean), "swapped": int((~clean).sum())}
    weight = load_manifest(scores)["modalities"]["pairs"].get("combined_weight")
    if weight is not None:
        result["combined_weight"] = weight
    for name, values in table.scores.items():
        result[f"auc_{name}"] = roc_auc(values, clean)
        kept = work / f"kept-by-{name}.jsonl"
        filter_pairs(scores, kept, keep_fraction=0.8, by=name, histogram=False)
        kept_rows = [json.loads(line) for line in kept.open()]
        result[f"keep80_{name}_precision"] = float(np.mean([not r["swapped"] for r in kept_rows]))
        result[f"keep80_{name}_swapped_removed"] = float(
            1 - sum(r["swapped"] for r in kept_rows) / (~clean).sum()
        )
    return result


def _noise_line(result: dict) -> str:
    names = [k[4:] for k in result if k.startswith("auc_")]
    return f"{result['rows']} pairs, {result['swapped']} swapped; " + "; ".join(
        f"{n} AUC {result[f'auc_{n}']:.4f} (keep 80%: precision "
        f"{result[f'keep80_{n}_precision']:.4f})"
        for n in names
    )


def probe_part(args, options: MapperOptions) -> dict:
    emoji = Path(args.emoji)
    folders = {}
    for split in ("train", "val", "test"):
        folders[split] = Path(args.out) / "features" / split
        for modality in ("both", "pairs"):
            extract(
                args.model,
                emoji / f"{split}.jsonl",
                folders[split],
                modality=modality,
                fused=modality == "pairs",
                options=options,
                progress=False,
            )
    result = {}
    for train in ("train", "val"):
        report = probe(folders[train], "category", test=folders["test"])
        print(
            f"probe of emoji category, trained on {train} ({report.train_rows} rows), "
            f"tested on test ({report.test_rows} rows, held-out names):"
        )
        print(report.table())
        result[f"{train}->test"] = {
            "train_rows": report.train_rows,
            "test_rows": report.test_rows,
            "classes": report.classes,
            "majority": report.majority_accuracy,
            **{r.kind: [r.accuracy, r.mean_class_accuracy] for r in report.results},
        }
    return result


def speed_part(args, options: MapperOptions) -> dict:
    data = Path(args.emoji) / f"{args.speed_split}.jsonl"
    runs = {
        "images": {"modality": "images"},
        "texts": {"modality": "texts"},
        "pairs": {"modality": "pairs"},
        "pairs --fused": {"modality": "pairs", "fused": True},
        "pairs fp32": {"modality": "pairs", "precision": "fp32"},
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    loads = []
    for round_ in range(args.rounds):
        for name, kwargs in runs.items():
            kwargs = dict(kwargs)
            precision = kwargs.pop("precision", options.precision)
            run_options = MapperOptions(
                device=options.device, backend=options.backend, precision=precision
            )
            out = Path(args.out) / "speed" / f"{round_}-{name.replace(' ', '-')}"
            stamps: list[float] = []
            manifest = extract(
                args.model,
                data,
                out,
                shard_size=args.shard_size,
                options=run_options,
                progress=False,
                on_shard=lambda kind, k, stamps=stamps: stamps.append(time.perf_counter()),
                **kwargs,
            )
            record = manifest["modalities"][kwargs["modality"]]
            sizes = [s["end"] - s["start"] for s in record["shards"]]
            rate = sum(sizes[1:]) / (stamps[-1] - stamps[0])
            rates[name].append(rate)
            seconds[name].append(sum(sizes) / rate)
            loads.append(load_average())
        print(f"  round {round_}: " + ", ".join(f"{n} {rates[n][-1]:.1f}/s" for n in runs))
    ratio = [
        seconds["pairs"][r] / (seconds["images"][r] + seconds["texts"][r])
        for r in range(args.rounds)
    ]
    ratio_fused = [
        seconds["pairs --fused"][r] / (seconds["images"][r] + seconds["texts"][r])
        for r in range(args.rounds)
    ]
    ratio_fp32 = [
        seconds["pairs fp32"][r] / (seconds["images"][r] + seconds["texts"][r])
        for r in range(args.rounds)
    ]
    result = {
        "items_per_s": {n: statistics.median(v) for n, v in rates.items()},
        "pairs_over_images_plus_texts": statistics.median(ratio),
        "fused_over_images_plus_texts": statistics.median(ratio_fused),
        "fp32_pairs_over_images_plus_texts": statistics.median(ratio_fp32),
        "load_average": [min(loads), max(loads)],
        "rows": sum(1 for _ in data.open()),
    }
    print(f"speed on {result['rows']} {args.speed_split} rows (median of {args.rounds} rounds):")
    for name, rate in result["items_per_s"].items():
        print(f"  {name:<14} {rate:8.1f} items/s")
    print(
        f"  pairs time / (images + texts time): {result['pairs_over_images_plus_texts']:.3f}; "
        f"with --fused {result['fused_over_images_plus_texts']:.3f}; fp32 fusion "
        f"{result['fp32_pairs_over_images_plus_texts']:.3f} "
        f"(load average {min(loads):.1f}-{max(loads):.1f})"
    )
    return result


def main() -> None:
    args = parse_args()
    setup_machine(args)
    options = MapperOptions(device="cpu", backend=args.backend, precision=args.precision)
    results = {"model": args.model, "threads": args.threads, "pid": os.getpid()}
    for part in args.parts:
        results[part] = {"noise": noise_part, "probe": probe_part, "speed": speed_part}[part](
            args, options
        )
    path = args.json or str(Path(args.out) / "bench_pairs.json")
    write_json(path, results)
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
