"""``xmodal serve``: the HTTP API and web page over an index."""

from __future__ import annotations

import argparse

from xmodal.commands import MODEL_HELP
from xmodal.errors import MissingDependencyError

SERVE_PACKAGES = ("fastapi", "starlette", "pydantic", "uvicorn", "multipart", "python_multipart")


def add(commands) -> None:
    from xmodal.serve.settings import add_arguments

    p = commands.add_parser("serve", help="serve search over HTTP (API + web page)")
    p.add_argument(
        "--index",
        required=True,
        nargs="+",
        help="index directory (a sharded index, or several directories searched as one)",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_arguments(p)  # --host, --port, --expose-sources, the limits: from ServeSettings


def run(args: argparse.Namespace) -> int:
    from xmodal.serve import serve
    from xmodal.serve.settings import from_arguments

    settings = from_arguments(args)
    try:  # FastAPI and uvicorn are imported when the app is built
        serve(args.index, args.model, settings)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in SERVE_PACKAGES:
            raise
        raise MissingDependencyError(f"{err}: pip install 'xmodal[serve]'") from err
    return 0
