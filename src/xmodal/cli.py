"""The ``xmodal`` command: parses arguments and calls into the library, nothing more."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xmodal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="embed a few real photos and captions, print tables")
    demo.add_argument("--preset", default="offline-default")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from xmodal.demo import run_demo

        run_demo(args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
