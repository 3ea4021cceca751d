"""``xmodal index``: a FAISS index over extracted shards (exact, IVF or HNSW)."""

from __future__ import annotations

import argparse
import typing

from xmodal.config import IndexKind, Modality


def add(commands) -> None:
    p = commands.add_parser("index", help="build a FAISS index over extracted shards")
    p.add_argument("--shards", required=True, help="directory written by xmodal extract")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--kind", choices=typing.get_args(IndexKind), default="auto", help="index type")
    p.add_argument(
        "--modality", choices=typing.get_args(Modality), default="images", help="what to index"
    )
    p.add_argument(  # the flag's earlier name, still accepted
        "--what", dest="modality", choices=typing.get_args(Modality), help=argparse.SUPPRESS
    )
    p.add_argument("--add", action="store_true", help="add shards not yet in an existing index")


def run(args: argparse.Namespace) -> int:
    from xmodal.index import build_index

    info = build_index(args.shards, args.out, kind=args.kind, modality=args.modality, add=args.add)
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items()) or "exact"
    print(f"{info['kind']} index of {info['count']} {info['modality']} in {args.out} ({params})")
    return 0
