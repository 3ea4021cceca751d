"""``xmodal data emoji|fashion-mnist``: build real datasets from packages."""

from __future__ import annotations

import argparse
import json
import typing

from xmodal.apps.builders import FashionMnistSplit
from xmodal.config import ConfigError


def add_artist_arguments(parser: argparse.ArgumentParser, check_default: list[str]) -> None:
    """``--artists``, ``--check-artists`` and ``--artist-from`` (emoji drawn by other artists)."""
    from xmodal.apps.builders import ARTISTS

    known = ", ".join(sorted(ARTISTS))
    parser.add_argument(
        "--artists",
        nargs="*",
        default=[],
        metavar="ARTIST",
        help=f"also train on the training names as these artists drew them ({known}; npm)",
    )
    parser.add_argument(
        "--check-artists",
        nargs="*",
        default=check_default,
        metavar="ARTIST",
        help="write test.<artist>.jsonl: the test names drawn by an artist never trained on "
        f"(default: {' '.join(check_default) or 'none'})",
    )
    parser.add_argument(
        "--artist-from",
        action="append",
        default=[],
        metavar="ARTIST=TARBALL",
        help="use this npm tarball for an artist's package (repeatable)",
    )


def name_value_pairs(values: list[str], option: str, form: str) -> dict[str, str]:
    """``["openmoji=/x/a.tgz"]`` -> ``{"openmoji": "/x/a.tgz"}`` (a repeatable ``option`` of
    the ``form`` NAME=VALUE); a value not of that form is refused, naming the option."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"{option} wants {form}, got {value!r}")
        pairs[name] = rest
    return pairs


def artist_tarballs(values: list[str]) -> dict[str, str]:
    """The ``--artist-from ARTIST=TARBALL`` values as {artist: tarball}."""
    return name_value_pairs(values, "--artist-from", "ARTIST=TARBALL")


def add(commands) -> None:
    p = commands.add_parser("data", help="build a real dataset from a package (emoji, ...)")
    builders = p.add_subparsers(dest="builder", required=True)
    emoji = builders.add_parser("emoji", help="Noto emoji from npm, split by name")
    emoji.add_argument("--out", required=True, help="output folder")
    emoji.add_argument("--from", dest="tarball", default=None, help="use this npm tarball")
    emoji.add_argument("--cache-dir", default=None, help="where the npm tarballs are kept")
    emoji.add_argument(
        "--rich-captions",
        action="store_true",
        help="more training captions per image: short names, CLDR labels and keywords "
        "(emojibase-data from npm); val and test keep the names",
    )
    emoji.add_argument(
        "--keywords-from",
        dest="keywords_tarball",
        default=None,
        help="use this emojibase-data npm tarball (with --rich-captions)",
    )
    add_artist_arguments(emoji, check_default=[])
    emoji.add_argument("--seed", type=int, default=0)
    emoji.add_argument("--force", action="store_true", help="rebuild even if up to date")
    emoji.add_argument(
        "--limit", type=int, default=None, help="a slice of at most this many images (whole names)"
    )
    fmnist = builders.add_parser("fashion-mnist", help="Fashion-MNIST from the Debian package")
    fmnist.add_argument("--out", required=True, help="output folder")
    fmnist.add_argument("--split", choices=typing.get_args(FashionMnistSplit), default="test")
    fmnist.add_argument("--limit", type=int, default=None, help="at most this many images")


def run(args: argparse.Namespace) -> int:
    from xmodal.apps.builders import build_emoji, build_fashion_mnist

    if args.builder == "emoji":
        summary = build_emoji(
            args.out,
            cache_dir=args.cache_dir,
            tarball=args.tarball,
            seed=args.seed,
            force=args.force,
            limit=args.limit,
            rich_captions=args.rich_captions,
            keywords_tarball=args.keywords_tarball,
            artists=args.artists,
            check_artists=args.check_artists,
            artist_tarballs=artist_tarballs(args.artist_from),
        )
    else:
        summary = build_fashion_mnist(args.out, split=args.split, limit=args.limit)
    print(json.dumps(summary, indent=2))
    return 0
