"""``xmodal quickstart``: build emoji data, fine-tune, evaluate on held-out names."""

from __future__ import annotations

import argparse


def add(commands) -> None:
    p = commands.add_parser("quickstart", help="emoji data -> fine-tune -> held-out evaluation")
    p.add_argument("--out", default="runs/quickstart", help="where data, model and report go")
    p.add_argument("--from", dest="tarball", default=None, help="emoji npm tarball to use")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override the contrastive steps (the ITM stage after them keeps its share)",
    )
    p.add_argument("--workers", type=int, default=1, help="image decoding processes")
    p.add_argument("--batch-size", type=int, default=None, help="override optim.batch_size")
    p.add_argument(
        "--limit", type=int, default=None, help="a slice of at most this many emoji images"
    )
    p.add_argument("--cache-dir", default=None, help="where the emoji npm tarballs are kept")
    p.add_argument(
        "--rich-captions",
        action="store_true",
        help="train on more captions per image: short names, CLDR labels and keywords "
        "(emojibase-data from npm)",
    )
    p.add_argument(
        "--keywords-from",
        dest="keywords_tarball",
        default=None,
        help="emojibase-data npm tarball to use for the extra training captions",
    )
    from xmodal.apps.builders import QUICKSTART_ARTISTS, QUICKSTART_CHECK_ARTISTS
    from xmodal.commands.data import add_artist_arguments

    add_artist_arguments(p, check_default=list(QUICKSTART_CHECK_ARTISTS))
    p.set_defaults(artists=list(QUICKSTART_ARTISTS))


def run(args: argparse.Namespace) -> int:
    from xmodal.apps.quickstart import run_quickstart
    from xmodal.commands.data import artist_tarballs

    run_quickstart(
        args.out,
        tarball=args.tarball,
        steps=args.steps,
        num_workers=args.workers,
        limit=args.limit,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        keywords_tarball=args.keywords_tarball,
        rich_captions=args.rich_captions,
        artists=args.artists,
        check_artists=args.check_artists,
        artist_tarballs=artist_tarballs(args.artist_from),
    )
    return 0
