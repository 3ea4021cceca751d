"""``xmodal serve``: the HTTP API and web page over an index."""

from __future__ import annotations

import argparse


def add(commands) -> None:
    from xmodal.serve.settings import add_arguments

    p = commands.add_parser("serve", help="serve search over HTTP (API + web page)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--model", required=True, help="model directory or preset name")
    add_arguments(p)  # --host, --port, --expose-sources, the limits: from ServeSettings


def run(args: argparse.Namespace) -> int:
    from xmodal.serve import serve
    from xmodal.serve.settings import from_arguments

    serve(args.index, args.model, from_arguments(args))
    return 0
