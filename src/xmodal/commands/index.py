"""``xmodal index``: a FAISS index over extracted shards (exact, IVF or HNSW)."""

from __future__ import annotations

import argparse
import typing

from xmodal.config import IndexKind, Modality


def add(commands) -> None:
    p = commands.add_parser("index", help="build a FAISS index over extracted shards")
    p.add_argument("--shards", required=True, help="directory written by xmodal extract")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--kind", choices=typing.get_args(IndexKind), default="auto")
    p.add_argument("--what", choices=typing.get_args(Modality), default="images")
    p.add_argument("--add", action="store_true", help="add shards not yet in an existing index")


def run(args: argparse.Namespace) -> int:
    from xmodal.index import build_index

    info = build_index(args.shards, args.out, kind=args.kind, what=args.what, add=args.add)
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items()) or "exact"
    print(f"{info['kind']} index of {info['count']} {info['what']} in {args.out} ({params})")
    return 0
