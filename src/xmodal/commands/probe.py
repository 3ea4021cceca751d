"""``xmodal probe``: linear-probe accuracy of a label from fused, image, text and concatenated
features, side by side."""

from __future__ import annotations

import argparse
import json
import typing

from xmodal.choices import ProbeFeatures


def add(commands) -> None:
    p = commands.add_parser(
        "probe", help="linear probe of a label column on extracted features (does fusion help?)"
    )
    p.add_argument("--features", required=True, help="xmodal extract folder to train the probe on")
    p.add_argument("--label", required=True, help="the dataset column to predict")
    p.add_argument("--test", default=None, help="extract folder to test on (default: a split)")
    p.add_argument("--data", default=None, help="dataset of --features (default: the manifest's)")
    p.add_argument("--test-data", default=None, help="dataset of --test (default: its manifest's)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held-out share of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--C", dest="c", type=float, default=1.0, help="inverse L2 strength")
    p.add_argument(
        "--kinds",
        nargs="+",
        choices=typing.get_args(ProbeFeatures),
        default=None,
        help="features to probe",
    )
    p.add_argument("--out", default=None, help="write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    from xmodal.atomic import atomic_write_text
    from xmodal.pairs.probe import probe, report_dict

    report = probe(
        args.features,
        args.label,
        test=args.test,
        data=args.data,
        test_data=args.test_data,
        test_fraction=args.test_fraction,
        seed=args.seed,
        c=args.c,
        kinds=tuple(args.kinds) if args.kinds else None,
    )
    print(
        f"{report.label}: {report.classes} classes, {report.train_rows} training rows, "
        f"{report.test_rows} test rows ({report.split})"
    )
    print(report.table())
    if args.out:
        atomic_write_text(args.out, json.dumps(report_dict(report), indent=2))
        print(f"wrote {args.out}")
    return 0
