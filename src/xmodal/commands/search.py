"""``xmodal search``: top-k ids for a caption or an image, optionally ITM re-ranked."""

from __future__ import annotations

import argparse

from xmodal.commands import MODEL_HELP


def add(commands) -> None:
    p = commands.add_parser("search", help="query an index with a caption or an image")
    p.add_argument(
        "--index",
        required=True,
        nargs="+",
        help="index directory (a sharded index, or several directories searched as one)",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="caption query")
    query.add_argument("--image", help="image query (path)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--rerank", action="store_true", help="re-rank the top-k with the ITM head")
    p.add_argument(
        "--rerank-weight",
        type=float,
        default=None,
        help="weight of the ITM score in the re-rank (default: the model's calibrated one)",
    )
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit")
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        help="re-rank this many candidates exactly (default: as the index was built; 0: off)",
    )


def run(args: argparse.Namespace) -> int:
    from xmodal.errors import InputError
    from xmodal.search import format_results, open_searcher

    if args.k < 1:
        raise InputError(f"k must be >= 1, got {args.k}")
    searcher = open_searcher(args.index, args.model, args.rerank_weight)
    options = {"nprobe": args.nprobe, "refine": args.refine}
    if args.text is not None:
        results = searcher.search_text(args.text, args.k, args.rerank, **options)
    else:
        results = searcher.search_image(args.image, args.k, args.rerank, **options)
    if args.rerank:
        weight = searcher.rerank.weight
        print(searcher.rerank_note or f"re-rank score: ITC logit + {weight:.4g} x ITM score")
    print(format_results(results))
    return 0
