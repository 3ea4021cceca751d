"""``xmodal quickstart``: real data to a measured model, offline, on a laptop CPU.

1. builds the emoji image-caption set (npm package, split by name: test names are never trained;
   ``rich_captions`` gives training images more captions: short names, CLDR labels, keywords);
2. fine-tunes the offline default (configs/quickstart.yaml);
3. evaluates on the held-out names: retrieval (ITC, and re-ranked with the weight calibrated on
   the validation names during training), zero-shot categories, and retrieval from the same
   images under strong style changes (the style-shift check);
4. writes ``report.json`` and ``training.png`` and prints the table.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from xmodal.apps.builders import QUICKSTART_ARTISTS, QUICKSTART_CHECK_ARTISTS, build_emoji
from xmodal.data import load_dataset
from xmodal.evaluate.runner import (
    evaluate_model,
    format_report,
    image_tower_outputs,
    write_report,
)
from xmodal.evaluate.style_shift import (
    artist_shift_report,
    format_artist_shift,
    format_style_shift,
    style_shift_report,
)
from xmodal.train import load_train_config, train


def quickstart_config_path() -> Path:
    return Path(str(resources.files("xmodal") / "configs" / "quickstart.yaml"))


def run_quickstart(
    out_dir: str | Path = "runs/quickstart",
    tarball: str | None = None,
    steps: int | None = None,
    num_workers: int = 1,
    limit: int | None = None,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    keywords_tarball: str | Path | None = None,
    rich_captions: bool = False,
    artists: Sequence[str] = QUICKSTART_ARTISTS,
    check_artists: Sequence[str] = QUICKSTART_CHECK_ARTISTS,
    artist_tarballs: dict[str, str | Path] | None = None,
) -> dict:
    """Build data, train, evaluate; return the test report (also written to out_dir).

    ``steps`` / ``batch_size`` override the config's contrastive steps and batch (the ITM stage
    after them keeps its share of the steps); ``limit`` uses a slice of at most that
    many emoji images (a quick check; the batch is then capped at the training split's size).
    ``rich_captions``: train on more captions per image (:mod:`xmodal.apps.emoji_captions`);
    ``keywords_tarball``: their emojibase-data tarball (default: cached in ``cache_dir`` or
    fetched with ``npm pack``). ``artists``: also train on the training names as these
    artists drew them; ``check_artists``: report retrieval of the test names as these artists,
    never trained on, drew them (:func:`xmodal.apps.builders.build_emoji`; tarballs from
    ``artist_tarballs`` or ``npm pack``).
    """
    started = time.time()
    out_dir = Path(out_dir)
    data_dir = out_dir / "emoji"
    summary = build_emoji(
        data_dir,
        cache_dir=cache_dir,
        tarball=tarball,
        limit=limit,
        rich_captions=rich_captions,
        keywords_tarball=keywords_tarball,
        artists=artists,
        check_artists=check_artists,
        artist_tarballs=artist_tarballs,
    )
    train_split = summary["splits"]["train"]
    print(
        f"emoji data: {summary['images']} images, {summary['names']} names in {data_dir} "
        f"({train_split['captions']} training captions)"
    )
    overrides: dict = {
        "data": {
            "train": str(data_dir / "train.jsonl"),
            "val": str(data_dir / "val.jsonl"),
            "num_workers": num_workers,
        },
        "out_dir": str(out_dir / "train"),
    }
    optim: dict = {}
    if steps:
        optim["steps"] = steps
        # the ITM stage keeps its share of the run (the config's 150 of 300: half)
        base = load_train_config(quickstart_config_path())
        if base.itm_stage.steps:
            stage_steps = max(1, round(base.itm_stage.steps * steps / base.optim.steps))
            overrides["itm_stage"] = {"optim": {"steps": stage_steps}}
    if batch_size:
        optim["batch_size"] = batch_size
    elif limit is not None:
        optim["batch_size"] = min(128, train_split["captions"])
    if optim:
        overrides["optim"] = optim
    config = load_train_config(quickstart_config_path(), overrides)
    result = train(config, resume=True)

    from xmodal.models.loading import load_model

    model, processor = load_model(result.model_dir)
    test = load_dataset(data_dir / "test.jsonl")
    # the test images through the tower once, for retrieval, the style shift and the artists
    in_style = image_tower_outputs(
        model, processor, [ex.image for ex in test.unique_images()], num_workers=num_workers
    )
    report = evaluate_model(
        model,
        processor,
        test,
        rerank_k=16,
        label_field="category",
        num_workers=num_workers,
        image_outputs=in_style,
    )
    report["style_shift"] = style_shift_report(
        model, processor, test, num_workers=num_workers, in_style=in_style
    )
    report["other_artists"] = {
        artist: artist_shift_report(
            model,
            processor,
            test,
            load_dataset(data_dir / f"test.{artist}.jsonl"),
            num_workers=num_workers,
            in_style=in_style,
        )
        for artist in check_artists
    }
    report["trained_artists"] = list(artists)
    report["held_out"] = "test names never seen in training"
    # calibrated on the validation names during training (None: not calibrated)
    report["rerank_weight"] = model.config.fusion.rerank_weight
    report["model"] = str(result.model_dir)
    report["train_steps"] = result.progress.step  # the contrastive steps
    report["itm_stage_steps"] = config.itm_stage.steps  # the ITM stage's, after them
    report["total_seconds"] = round(time.time() - started, 1)
    write_report(report, out_dir / "report.json")
    print("\nheld-out emoji names (test split)")
    print(format_report(report))
    print(format_style_shift(report["style_shift"]))
    for artist, check in report["other_artists"].items():
        print(format_artist_shift(artist, check))
    print(f"\nreport: {out_dir / 'report.json'}  plot: {out_dir / 'train' / 'training.png'}")
    print(f"model: {result.model_dir}  total time: {report['total_seconds']} s")
    return report
