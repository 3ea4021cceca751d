"""``xmodal serve``: the HTTP API and web page over an index."""

from __future__ import annotations

import argparse

from xmodal.errors import MissingDependencyError

SERVE_PACKAGES = ("fastapi", "starlette", "pydantic", "uvicorn", "multipart", "python_multipart")


def add(commands) -> None:
    p = commands.add_parser("serve", help="serve search over HTTP (API + web page)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--model", required=True, help="model directory or preset name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def run(args: argparse.Namespace) -> int:
    try:
        from xmodal.serve import serve
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in SERVE_PACKAGES:
            raise
        raise MissingDependencyError(f"{err}: pip install 'xmodal[serve]'") from err

    serve(args.index, args.model, host=args.host, port=args.port)
    return 0
