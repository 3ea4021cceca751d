"""End-to-end extraction throughput against model-only throughput, on real images and captions.

Model only: the mapper on images decoded beforehand (and captions tokenised beforehand). Then
``extract()`` itself, whose steady rate is taken between its first and last finished shard
(model loading, hashing and worker start-up are not counted). Model only and ``extract()``
alternate for ``--rounds`` rounds and each round's ratio compares the two of that round; the
median ratio is reported (the first round also pays for oneDNN kernels of each new batch shape).
``--splits`` also streams the images through other worker / thread splits (timed from the first
batch, so worker start-up is not counted).

Data: the emoji set (/tmp/xmodal-emoji, from ``xmodal data emoji``) or, without it, skimage
photos written to a temporary JSONL set with generated captions.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_extract.py --backend torch
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    EMOJI_DIR,
    add_machine_args,
    generated_captions,
    load_average,
    photo_arrays,
    setup_machine,
    synchronize,
    write_json,
)

from xmodal.data import load_dataset
from xmodal.data.images import image_loader
from xmodal.extract import extract
from xmodal.extract.mapper import EmbeddingMapper, MapperOptions
from xmodal.extract.reader import TokenizedCaptions, image_items
from xmodal.extract.reader import text_items as caption_items
from xmodal.presets import load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline-default", help="preset or model directory")
    parser.add_argument("--data", default=str(EMOJI_DIR / "train.jsonl"))
    parser.add_argument("--limit", type=int, default=2048, help="rows of the data set to use")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (extract's own)")
    parser.add_argument("--splits", nargs="*", default=[], help="worker:thread pairs to try")
    add_machine_args(parser)
    return parser.parse_args()


def prepare_data(args: argparse.Namespace, folder: Path) -> Path:
    """The first ``--limit`` rows of ``--data`` (or a photo set) as a JSONL file in ``folder``."""
    source = Path(args.data)
    out = folder / "data.jsonl"
    if source.is_file():
        lines = source.read_text(encoding="utf-8").splitlines()[: args.limit]
        rows = [json.loads(line) for line in lines]
        for r in rows:
            r["image"] = str((source.parent / r["image"]).resolve())
    else:
        from PIL import Image

        print(f"{source} not found: using skimage photos with generated captions")
        photos = photo_arrays()
        captions = generated_captions(args.limit)
        rows = []
        for i in range(args.limit):
            path = folder / f"photo{i:05d}.jpg"
            Image.fromarray(photos[i % len(photos)]).convert("RGB").save(path, quality=90)
            rows.append({"image": str(path), "caption": captions[i], "image_id": path.name})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def options(args: argparse.Namespace) -> MapperOptions:
    return MapperOptions(device=args.device, precision=args.precision, backend=args.backend)


def rate(count: int, seconds: float) -> float:
    return count / seconds


def model_only(mapper, processor, items, captions, args) -> dict[str, float]:
    """Images/s and captions/s of the mapper alone on the batches ``extract()`` forms (captions
    sorted by length within each shard), decoded and tokenised beforehand."""
    batch_size = args.batch_size
    pixels = processor.process_images([item.ref for item in items])
    image_batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    text_batches_ = []
    for first in range(0, len(captions), args.shard_size):
        tokens = TokenizedCaptions(captions[first : first + args.shard_size], processor)
        order = np.argsort(tokens.lengths, kind="stable")
        text_batches_ += [
            tokens.batch(order[i : i + batch_size]) for i in range(0, len(order), batch_size)
        ]
    for batch in image_batches[:2]:  # warm-up (and every caption length once, for GPUs)
        mapper.images(batch)
    for ids, mask in text_batches_:
        mapper.texts(ids, mask)
    synchronize()
    start = time.perf_counter()
    for batch in image_batches:
        mapper.images(batch)
    synchronize()
    images = rate(len(pixels), time.perf_counter() - start)
    start = time.perf_counter()
    for ids, mask in text_batches_:
        mapper.texts(ids, mask)
    synchronize()
    texts = rate(len(captions), time.perf_counter() - start)
    return {"images": images, "texts": texts}


def streamed_images(mapper, processor, items, batch_size, workers, threads) -> tuple[float, float]:
    """Images/s decoded by ``workers`` DataLoader workers while ``threads`` torch threads embed,
    and the share of that time the model waited for a decoded batch."""
    batches = [
        list(range(i, min(len(items), i + batch_size))) for i in range(0, len(items), batch_size)
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loader = iter(
            image_loader([i.ref for i in items], processor, batches, workers, mapper.channels_last)
        )
        mapper.images(next(loader).pixel_values)  # timed from here: worker start-up not counted
        start, done, waited = time.perf_counter(), 0, 0.0
        for _ in batches[1:]:
            asked = time.perf_counter()
            batch = next(loader)
            waited += time.perf_counter() - asked
            mapper.images(batch.pixel_values)
            done += len(batch.positions)
        seconds = time.perf_counter() - start
        return rate(done, seconds), waited / seconds
    finally:
        torch.set_num_threads(before)


def full_extract(model_dir, data, out, kind, args) -> tuple[float, float]:
    """(steady items/s between the first and last finished shard, total seconds)."""
    stamps: list[float] = []
    start = time.perf_counter()
    manifest = extract(
        model_dir,
        data,
        out,
        modality=kind,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        progress=False,
        on_shard=lambda _kind, _k: stamps.append(time.perf_counter()),
        workers=args.workers,
        options=options(args),
    )
    total = time.perf_counter() - start
    shards = manifest["modalities"][kind]["shards"]
    steady_items = sum(s["rows"] for s in shards[1:])
    steady = rate(steady_items, stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return steady, total


def main() -> None:
    args = parse_args()
    setup_machine(args)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = prepare_data(args, folder)
        model, processor = load_model(args.model)
        model_dir = folder / "model"
        model.save_pretrained(model_dir, processor)
        dataset = load_dataset(data)
        images, texts = image_items(dataset), caption_items(dataset)
        captions = [item.source for item in texts]
        mapper = EmbeddingMapper(model, options(args), processor)
        print(
            f"{len(images)} images, {len(texts)} captions from {args.data}; {args.precision}, "
            f"backend {args.backend} -> {mapper.backend}"
        )

        ratios: dict[str, list[float]] = {"images": [], "texts": []}
        for round_ in range(1, args.rounds + 1):
            only = model_only(mapper, processor, images, captions, args)
            print(
                f"round {round_}: model only {only['images']:.1f} img/s, "
                f"{only['texts']:.1f} captions/s (load {load_average():.2f})",
                flush=True,
            )
            for kind in ("images", "texts"):
                out = folder / f"out-{kind}-{round_}"
                steady, total = full_extract(model_dir, data, out, kind, args)
                ratios[kind].append(steady / only[kind])
                results[f"round {round_} model-only {kind}/s"] = only[kind]
                results[f"round {round_} extract() {kind}/s steady"] = steady
                print(
                    f"  extract() {kind}: steady {steady:.1f}/s = "
                    f"{100 * steady / only[kind]:.0f}% of model only; {total:.1f} s in all "
                    f"with model load (load {load_average():.2f})",
                    flush=True,
                )
        for kind, values in ratios.items():
            results[f"extract() {kind} / model only, median"] = float(np.median(values))
            print(f"extract() {kind}: median {100 * np.median(values):.0f}% of model only")
        for split in args.splits:
            workers, threads = (int(x) for x in split.split(":"))
            value, waiting = streamed_images(
                mapper, processor, images, args.batch_size, workers, threads
            )
            results[f"streamed images/s, {workers} workers, {threads} threads"] = value
            print(
                f"streamed images, {workers} workers + {threads} torch threads: {value:.1f} "
                f"img/s = {100 * value / only['images']:.0f}% of the last model only, "
                f"model waiting for data {100 * waiting:.0f}% of the time "
                f"(load {load_average():.2f})",
                flush=True,
            )
    print(f"(cores {os.cpu_count()}; extract() picks its own workers and threads)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
