"""``xmodal index``: a FAISS index over extracted shards (by kind, or the best one that fits a
memory budget), or a sharded index over several built ones."""

from __future__ import annotations

import argparse
import typing

from xmodal.choices import IndexEngine, IndexKind, Modality


def add(commands) -> None:
    p = commands.add_parser("index", help="build a FAISS index over extracted shards")
    p.add_argument("--shards", help="directory written by xmodal extract")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--kind", choices=typing.get_args(IndexKind), default="auto", help="index type")
    p.add_argument(
        "--modality", choices=typing.get_args(Modality), default="images", help="what to index"
    )
    p.add_argument(  # the flag's earlier name, still accepted
        "--what", dest="modality", choices=typing.get_args(Modality), help=argparse.SUPPRESS
    )
    p.add_argument("--add", action="store_true", help="add shards not yet in an existing index")
    p.add_argument(
        "--max-index-memory",
        help="memory the index may use (e.g. 2G): picks flat, IVF-Flat, IVF-SQ or IVF-PQ and "
        "builds it out of RAM with on-disk inverted lists",
    )
    p.add_argument("--max-build-memory", help="memory the build may use (e.g. 4G)")
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        help="keep the vectors on disk and re-rank this many candidates exactly per query",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 the index must reach against exact search, measured on held-out rows "
        "of the data (nprobe is tuned to it; under a budget OPQ, finer lists and longer "
        "--refine shortlists are tried); an index that cannot is refused (exit 2), naming "
        "the best recall and the --max-index-memory that would reach it",
    )
    p.add_argument(
        "--accept-recall",
        type=float,
        default=None,
        metavar="X",
        help="build anyway when the target is out of reach but the measured recall@10 is at "
        "least X (recorded in index.json as accept_recall)",
    )
    p.add_argument(
        "--engine",
        choices=typing.get_args(IndexEngine),
        default="plain",
        help="plain: this process; ray: the rows of an index with on-disk lists "
        "(--max-index-memory) added in parallel Ray tasks, the same index "
        "(pip install 'xmodal[ray]')",
    )
    p.add_argument(
        "--ray-address",
        help="--engine ray: an existing cluster's address (default: start one for this run)",
    )
    p.add_argument(
        "--ray-tasks",
        type=int,
        default=None,
        help="--engine ray: parts the shards are split into (default: the cluster's CPUs)",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="INDEX",
        help="write a sharded index in --out over these built index directories",
    )


def run(args: argparse.Namespace) -> int:
    from xmodal.errors import InputError
    from xmodal.index import build_index, combine_indexes, describe

    if args.combine:
        if args.shards:
            raise InputError("--combine takes built indexes, not --shards")
        info = combine_indexes(args.combine, args.out)
        print(
            f"sharded index of {info['count']} {info['modality']} in {args.out} "
            f"({len(info['parts'])} parts)"
        )
        return 0
    if not args.shards:
        raise InputError("give --shards (or --combine with built indexes)")
    info = build_index(
        args.shards,
        args.out,
        kind=args.kind,
        modality=args.modality,
        add=args.add,
        max_index_memory=args.max_index_memory,
        max_build_memory=args.max_build_memory,
        refine=args.refine,
        target_recall=args.target_recall,
        accept_recall=args.accept_recall,
        engine=args.engine,
        ray_address=args.ray_address,
        ray_tasks=args.ray_tasks,
    )
    print(f"{describe(info)} in {args.out}")
    params = info["params"]
    measured = params.get("measured_recall")
    if measured and measured["value"] < params.get("target_recall", 0.0):
        print(
            f"note: recall@10 {measured['value']} is below the target "
            f"{params['target_recall']}, kept as --accept-recall {params.get('accept_recall')} "
            "allows"
        )
    return 0
