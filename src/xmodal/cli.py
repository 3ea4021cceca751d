"""The ``xmodal`` command: parses arguments and calls into the library, nothing more.

Each subcommand lives in its own module under ``xmodal/commands/``. An :class:`XmodalError`
(a problem the user can fix) prints one line and exits with code 2; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from xmodal.atomic import is_out_of_space, space_reason
from xmodal.commands import (
    data,
    demo,
    evaluate,
    export_onnx,
    extract,
    filtering,
    index,
    probe,
    quickstart,
    search,
    serve,
    train,
)
from xmodal.errors import XmodalError

SUBCOMMANDS = {
    "quickstart": quickstart,
    "demo": demo,
    "data": data,
    "train": train,
    "eval": evaluate,
    "extract": extract,
    "filter": filtering,
    "probe": probe,
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
    """Run a subcommand; a user-fixable failure (bad input, config, mismatched hashes, an
    unwritable output folder) prints one line and returns 2, anything else propagates."""
    try:
        return run(args)
    except XmodalError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"xmodal {command}: error: {'; '.join(lines)}", file=sys.stderr)
        return 2
    except Exception as err:  # a write outside the atomic helpers met a full disk
        if not is_out_of_space(err):
            raise
        output = getattr(err, "filename", None) or _output_of(args) or "the output"
        print(
            f"xmodal {command}: error: cannot write {output}: {space_reason(err)}; free "
            "space and run the same command again (finished parts are kept)",
            file=sys.stderr,
        )
        return 2


def _output_of(args: argparse.Namespace) -> str | None:
    """The output the command line names (``--out`` or ``--out-dir``), if any."""
    return getattr(args, "out", None) or getattr(args, "out_dir", None)


if __name__ == "__main__":
    sys.exit(main())
