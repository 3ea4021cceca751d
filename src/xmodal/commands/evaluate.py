"""``xmodal eval --model DIR --data FILE --out report.json``."""

from __future__ import annotations

import argparse
import sys
import typing
import warnings
from pathlib import Path

from xmodal.commands import MODEL_HELP
from xmodal.data.datasets import DatasetFormat, KarpathySplit


def add(commands) -> None:
    p = commands.add_parser("eval", help="retrieval Recall@K (+ ITM re-ranking) and zero-shot")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="dataset (JSONL, CSV, COCO, Karpathy, ...)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument(
        "--format",
        choices=typing.get_args(DatasetFormat),
        default=None,
        help="dataset format (default: detected)",
    )
    p.add_argument("--split", choices=typing.get_args(KarpathySplit), help="Karpathy split")
    p.add_argument("--rerank-k", type=int, default=16, help="ITM re-rank the top k (0: off)")
    p.add_argument(
        "--rerank-weight",
        type=float,
        default=None,
        help="weight of the ITM score in the re-rank (default: the model's calibrated one)",
    )
    p.add_argument(
        "--calibrate-rerank",
        action="store_true",
        help="calibrate the re-rank weight on this (validation) data and save it into the "
        "model directory's config.json",
    )
    p.add_argument("--label-field", default=None, help="column holding zero-shot class names")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="image decoding processes")
    p.add_argument(
        "--style-shift",
        action="store_true",
        help="also retrieve from the images under strong seeded style changes (greyscale, "
        "recolour, blur, low resolution, crop, ...): R@1 and the share of in-style R@1 kept",
    )
    p.add_argument("--style-seed", type=int, default=0, help="seed of the style changes")
    p.add_argument(
        "--other-artist",
        action="append",
        default=[],
        metavar="NAME=DATA",
        help="also retrieve from another artist's drawings of the same concepts (DATA: rows "
        "whose image_id is NAME/<image_id in --data>, e.g. data/emoji/test.openmoji.jsonl from "
        "`xmodal data emoji --check-artists openmoji`), against the same names in style",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unusable rows and undecodable images (with their captions): each row "
        "left out is listed with its reason in the report and in REPORT.skipped.jsonl beside it",
    )


SHOWN_SKIPPED = 10  # rows left out printed when there is no --out to list them in


def skipped_list_path(report_path: str | Path) -> Path:
    """Where the rows an evaluation left out are listed: ``report.json`` ->
    ``report.skipped.jsonl`` beside it (two reports in one folder keep their own lists)."""
    from xmodal.data.skipped import SKIPPED_NAME

    path = Path(report_path)
    return path.with_name(f"{path.stem}.{SKIPPED_NAME}")


def load_quietly(path: str, data_format: str | None, skip_bad: bool, **kwargs):
    """``load_dataset`` without the reader's "skipped N rows (first: ...)" warning: eval
    reports every row it leaves out itself (the report, REPORT.skipped.jsonl)."""
    from xmodal.data import load_dataset
    from xmodal.data.datasets import SkippedRowsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRowsWarning)
        return load_dataset(path, data_format, skip_bad=skip_bad, **kwargs)


def print_left_out(report: dict, listed_in: Path | None) -> None:
    """How many dataset rows were left out and where they are listed, in one line; without a
    list file (no --out), that line and the first SHOWN_SKIPPED rows on stderr."""
    rows = report.get("skipped", [])
    if not rows:
        return
    if listed_in is not None:
        print(f"{len(rows)} dataset rows left out, each with its reason: {listed_in}")
        return
    shown = rows[:SHOWN_SKIPPED]
    more = f"; {len(rows) - len(shown)} more" if len(rows) > len(shown) else ""
    print(
        f"{len(rows)} dataset rows left out (--out REPORT lists every one{more}):",
        file=sys.stderr,
    )
    for row in shown:
        print(f"  {row['row']}: {row['reason']}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from xmodal.data.skipped import skipped_records, write_skipped
    from xmodal.errors import InputError
    from xmodal.evaluate.runner import (
        evaluate_model,
        format_report,
        image_tower_outputs,
        write_report,
    )
    from xmodal.models.loading import load_model
    from xmodal.models.model import (
        CONFIG_NAME,
        not_saved_by_xmodal,
        save_rerank_weight,
        saved_by_xmodal,
    )
    from xmodal.runtime import reuse_freed_memory

    if args.calibrate_rerank:
        if args.rerank_weight is not None:
            raise InputError("--calibrate-rerank and --rerank-weight exclude each other")
        if args.rerank_k < 1:
            raise InputError("--calibrate-rerank needs --rerank-k >= 1")
        if not (Path(args.model) / CONFIG_NAME).is_file():
            raise InputError(
                f"--calibrate-rerank saves the weight into a model directory; {args.model} "
                "is not one (save the model first, e.g. by training it)"
            )
        if not saved_by_xmodal(args.model):  # before the evaluation, not after it
            raise InputError(not_saved_by_xmodal(args.model))
    model, processor = load_model(args.model)
    if next(model.parameters()).device.type == "cpu":
        # tower passes (and each style of --style-shift) reuse freed memory instead of
        # page-faulting fresh pages on every batch; the process keeps its peak until it exits
        reuse_freed_memory()  # docs/performance.md: "Freed memory kept for reuse"
    kwargs = {"split": args.split} if args.split else {}
    dataset = load_quietly(args.data, args.format, args.skip_bad, **kwargs)
    # the images through the tower once, for retrieval and the style and artist checks
    images = image_tower_outputs(
        model,
        processor,
        [ex.image for ex in dataset.unique_images()],
        args.batch_size,
        args.workers,
        keep_tokens=args.rerank_k > 0 and model.has_itm,
    )
    report = evaluate_model(
        model,
        processor,
        dataset,
        rerank_k=args.rerank_k,
        label_field=args.label_field,
        batch_size=args.batch_size,
        num_workers=args.workers,
        image_outputs=images,
        skip_bad=args.skip_bad,
        rerank_weight=args.rerank_weight,
        calibrate_rerank=args.calibrate_rerank,
    )
    report["model"] = str(args.model)
    report["data"] = str(args.data)
    print(format_report(report))
    if "rerank_calibration" in report:
        weight = report["rerank_calibration"]["rerank_weight"]
        save_rerank_weight(args.model, weight)
        print(f"re-rank weight {weight:.4g} saved in {Path(args.model) / CONFIG_NAME}")
    if args.style_shift:
        from xmodal.evaluate.style_shift import format_style_shift, style_shift_report

        report["style_shift"] = style_shift_report(
            model,
            processor,
            dataset,
            seed=args.style_seed,
            batch_size=args.batch_size,
            num_workers=args.workers,
            skip_bad=args.skip_bad,
            in_style=images,
        )
        print(format_style_shift(report["style_shift"]))
    if args.other_artist:
        from xmodal.commands.data import name_value_pairs
        from xmodal.evaluate.style_shift import artist_shift_report, format_artist_shift

        report["other_artists"] = {}
        for name, path in name_value_pairs(
            args.other_artist, "--other-artist", "NAME=DATA"
        ).items():
            drawn = load_quietly(path, None, args.skip_bad)
            check = artist_shift_report(
                model, processor, dataset, drawn, args.batch_size, args.workers, images
            )
            check["skipped_rows"] = len(drawn.skipped)
            report["skipped"] += skipped_records(drawn.skipped)
            report["other_artists"][name] = check
            print(format_artist_shift(name, check))
    listed_in = None
    if args.out:
        listed_in = skipped_list_path(args.out) if report["skipped"] else None
        report["skipped_list"] = str(listed_in) if listed_in else None
        write_skipped(skipped_list_path(args.out), report["skipped"])
        write_report(report, args.out)
        print(f"report written to {args.out}")
    print_left_out(report, listed_in)
    return 0
