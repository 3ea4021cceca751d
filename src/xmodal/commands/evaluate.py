"""``xmodal eval --model DIR --data FILE --out report.json``."""

from __future__ import annotations

import argparse
import typing

from xmodal.commands import MODEL_HELP
from xmodal.config import DatasetFormat, KarpathySplit


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
        "--skip-bad",
        action="store_true",
        help="leave out unusable rows and undecodable images (with their captions), reported",
    )


def run(args: argparse.Namespace) -> int:
    from xmodal.data import load_dataset
    from xmodal.evaluate.runner import evaluate_model, format_report, write_report
    from xmodal.presets import load_model

    model, processor = load_model(args.model)
    kwargs = {"split": args.split} if args.split else {}
    dataset = load_dataset(args.data, args.format, skip_bad=args.skip_bad, **kwargs)
    report = evaluate_model(
        model,
        processor,
        dataset,
        rerank_k=args.rerank_k,
        label_field=args.label_field,
        batch_size=args.batch_size,
        num_workers=args.workers,
        skip_bad=args.skip_bad,
    )
    report["model"] = str(args.model)
    report["data"] = str(args.data)
    report["skipped_rows"] = len(dataset.skipped)
    print(format_report(report))
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
        )
        print(format_style_shift(report["style_shift"]))
    if args.out:
        write_report(report, args.out)
        print(f"report written to {args.out}")
    return 0
