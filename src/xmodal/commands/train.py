"""``xmodal train --config run.yaml [--resume]``."""

from __future__ import annotations

import argparse


def add(commands) -> None:
    p = commands.add_parser("train", help="train or fine-tune a model from a YAML config")
    p.add_argument("--config", required=True, help="training config (YAML); see configs/")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--out-dir", default=None, help="override the config's out_dir")
    p.add_argument("--steps", type=int, default=None, help="override optim.steps")


def run(args: argparse.Namespace) -> int:
    from xmodal.distributed import is_main
    from xmodal.train import load_train_config, train

    overrides: dict = {}
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    if args.steps:
        overrides["optim"] = {"steps": args.steps}
    result = train(load_train_config(args.config, overrides), resume=args.resume)
    if is_main():
        print(f"model written to {result.model_dir} after {result.progress.step} steps")
    return 0
