"""``xmodal demo``: embed a few real photos and captions with the pretrained towers."""

from __future__ import annotations

import argparse


def add(commands) -> None:
    p = commands.add_parser("demo", help="embed a few real photos and captions, print tables")
    p.add_argument("--preset", default="offline-default")


def run(args: argparse.Namespace) -> int:
    from xmodal.apps.demo import run_demo

    run_demo(args.preset)
    return 0
