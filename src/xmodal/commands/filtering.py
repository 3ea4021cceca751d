"""``xmodal filter``: keep the pairs whose scores pass, in the input dataset's own format."""

from __future__ import annotations

import argparse
import typing

from xmodal.choices import PairScore


def add(commands) -> None:
    p = commands.add_parser(
        "filter", help="drop mismatched image-caption pairs by their scores (extract --what pairs)"
    )
    p.add_argument("--scores", required=True, help="folder written by xmodal extract --what pairs")
    p.add_argument("--out", required=True, help="kept rows (same format as the input: .jsonl/.csv)")
    p.add_argument("--data", default=None, help="the dataset (default: the one scored)")
    p.add_argument("--min-similarity", type=float, default=None, help="keep cosine >= this [-1, 1]")
    p.add_argument(
        "--min-itm", type=float, default=None, help="keep ITM probability >= this [0, 1]"
    )
    p.add_argument(
        "--keep-fraction", type=float, default=None, help="keep this best fraction (0, 1] by --by"
    )
    p.add_argument(
        "--by",
        choices=typing.get_args(PairScore),
        default="similarity",
        help="score for --keep-fraction",
    )
    p.add_argument("--no-histogram", action="store_true", help="skip the score histogram PNG")


def run(args: argparse.Namespace) -> int:
    from xmodal.pairs import filter_pairs

    report = filter_pairs(
        args.scores,
        args.out,
        data=args.data,
        min_similarity=args.min_similarity,
        min_itm=args.min_itm,
        keep_fraction=args.keep_fraction,
        by=args.by,
        histogram=not args.no_histogram,
    )
    cutoffs = ", ".join(f"{k} >= {v:.4f}" for k, v in report.cutoffs.items())
    print(
        f"kept {report.kept} of {report.rows_scored} scored pairs ({cutoffs}); dropped "
        f"{report.dropped}; {report.unscored} rows could not be scored (see errors.jsonl / "
        "skipped.jsonl)"
    )
    print(
        f"wrote {report.out}, {report.report}"
        + (f", {report.histogram}" if report.histogram else "")
    )
    return 0
