"""The ``xmodal`` command: parses arguments and calls into the library, nothing more.

Each subcommand lives in its own module under ``xmodal/commands/``.
"""

from __future__ import annotations

import argparse
import sys

from xmodal.commands import (
    data,
    demo,
    evaluate,
    export_onnx,
    extract,
    index,
    quickstart,
    search,
    serve,
    train,
)

SUBCOMMANDS = {
    "quickstart": quickstart,
    "demo": demo,
    "data": data,
    "train": train,
    "eval": evaluate,
    "extract": extract,
    "export-onnx": export_onnx,
    "index": index,
    "search": search,
    "serve": serve,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="xmodal", description="Image-text cross-modal features: train, evaluate, search."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        module.add(commands)
    args = parser.parse_args(argv)
    return _guarded(args.command, SUBCOMMANDS[args.command].run, args)


def _guarded(command: str, run, args: argparse.Namespace) -> int:
    """Run a subcommand; expected failures (bad input, mismatched hashes) print one line."""
    try:
        return run(args)
    except (OSError, ValueError) as err:
        print(f"xmodal {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
