"""``xmodal serve``: the HTTP API and web page over an index."""

from __future__ import annotations

import argparse

from xmodal.commands import MODEL_HELP


def add(commands) -> None:
    p = commands.add_parser("serve", help="serve search over HTTP (API + web page)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def run(args: argparse.Namespace) -> int:
    from xmodal.serve import serve

    serve(args.index, args.model, host=args.host, port=args.port)
    return 0
