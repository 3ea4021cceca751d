"""Tower throughput: xmodal's extraction path against the original design's (README,
``seed`` preset: eager PyTorch, autograd on, captions padded to 128) and against peers.

For each tower (EfficientNet-Lite0 image, MiniLM-L6 text) and the fused model it prints items/s,
the GFLOP/s executed (``FlopCounterMode``) as a share of a matmul peak measured in the same run,
and the ratio to that original way of running the same backbone, also in this run:

- images: eager, NCHW, grad enabled (original) -> inference_mode -> channels_last -> batch norm
  folded (xmodal's default) -> bf16 autocast -> ONNX Runtime -> torch.compile (``--compile``);
- captions: padded to 128 with grad enabled (original); transformers ``AutoModel`` + mean pooling
  padded to 128 and sentence-transformers style (sorted by length, padded to the longest); xmodal
  (length-bucketed batches, inference_mode); ONNX Runtime; bf16 autocast for both;
- fusion: the cross-attention fusion on cached tower outputs, and the whole model.

The paths of a group are timed in interleaved rounds (each path once per round, the median of
the rounds kept), so a load that comes and goes on a shared machine touches them all alike.

Real data: skimage photos; captions are the emoji names when /tmp/xmodal-emoji exists, else
generated English captions of 3-20 words (``--captions``).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_towers.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from common import (
    Row,
    add_machine_args,
    count_flops,
    load_average,
    matmul_peak,
    print_peaks,
    print_table,
    real_captions,
    real_images,
    set_ratios,
    setup_machine,
    synchronize,
    write_json,
)

from xmodal.extract.mapper import EmbeddingMapper, MapperOptions
from xmodal.extract.reader import TokenizedCaptions
from xmodal.models.model import CrossModalModel, Features
from xmodal.models.text import pool_tokens
from xmodal.presets import load_model
from xmodal.processing import MultimodalProcessor

NOTE = "note: eager, grad on"
BF16 = torch.bfloat16
CL = torch.channels_last


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline-default", help="preset or model directory")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="build the preset's architecture without its weights (e.g. --model seed offline)",
    )
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="images per timed run")
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--captions", type=int, default=512, help="captions per timed run")
    parser.add_argument("--caption-source", choices=("auto", "emoji", "generated"), default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    parser.add_argument("--skip", nargs="*", default=(), choices=("images", "texts", "fusion"))
    parser.add_argument(
        "--no-reuse-memory",
        action="store_true",
        help="leave glibc's allocator as it is (the mappers reuse freed memory by default, which "
        "speeds up every path in the process)",
    )
    add_machine_args(parser)
    return parser.parse_args()


@dataclass
class Path:
    """One way of running a workload: ``fn()`` processes all of the group's items once."""

    name: str
    fn: Callable[[], object]
    grad: bool = False  # the original way: autograd on
    dtype: torch.dtype | None = None  # autocast around fn (for paths without their own)
    precision: str = "fp32"  # which matmul peak it is compared with
    note: str = ""
    flops_as: str | None = None  # runs outside torch (ONNX Runtime): count this path's FLOPs


def autocast(device: str, dtype: torch.dtype | None):
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None)


def call_of(path: Path, device: str) -> Callable[[], None]:
    def call() -> None:
        with torch.set_grad_enabled(path.grad), autocast(device, path.dtype):
            if path.grad:
                path.fn()
            else:
                with torch.inference_mode():
                    path.fn()

    return call


def run_group(group: str, paths: list[Path], items: int, args: argparse.Namespace) -> list[Row]:
    """FLOPs of each path (which also warms it up), then ``--repeats`` interleaved rounds."""
    calls = [call_of(p, args.device) for p in paths]
    flops = {p.name: count_flops(c) for p, c in zip(paths, calls, strict=True)}
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    for _ in range(args.repeats):
        for path, call in zip(paths, calls, strict=True):
            start = time.perf_counter()
            call()
            synchronize()
            times[path.name].append(time.perf_counter() - start)
    load = load_average()
    rows = []
    for path in paths:
        executed = flops[path.flops_as or path.name]
        per_s = items / statistics.median(times[path.name])
        gflops = executed / items / 1e9
        rows.append(Row(group, path.name, per_s, gflops, load, path.precision, note=path.note))
        print(f"  {group} {path.name}: {per_s:.1f}/s", flush=True)
    return rows


def onnx_mapper(model: CrossModalModel, processor: MultimodalProcessor, folder: str, args):
    """A mapper on ONNX Runtime towers exported into ``folder``; None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime not installed: `pip install xmodal[onnx]` for the ONNX rows")
        return None
    from xmodal.export.onnx import export_onnx

    export_onnx(model, processor, folder)
    return mapper(model, args, backend="onnx", onnx_dir=folder)


def mapper(model: CrossModalModel, args: argparse.Namespace, **options) -> EmbeddingMapper:
    reuse = not args.no_reuse_memory
    return EmbeddingMapper(model, MapperOptions(device=args.device, reuse_memory=reuse, **options))


DEFAULT_IMAGE = "xmodal: + folded BN, wider kernels, in-place ReLU (default)"
DEFAULT_TEXT = "xmodal: length-bucketed (default)"


def image_rows(model, processor, args, precisions, ort) -> list[Row]:
    photos, source = real_images(args.images, "photos")
    pixels = processor.process_images(photos).to(args.device)
    chunks = [pixels[i : i + args.image_batch] for i in range(0, len(pixels), args.image_batch)]
    print(f"images: {len(pixels)} from {source}, batch {args.image_batch}, 224 px")

    def over_chunks(fn: Callable) -> Callable[[], None]:
        return lambda: [fn(c) for c in chunks]

    cl_tower = copy.deepcopy(model.image_tower).to(memory_format=CL)

    def channels_last(px: torch.Tensor) -> torch.Tensor:
        return model.image_features_from_tower(cl_tower(px.contiguous(memory_format=CL))).embeds

    paths = [
        Path(NOTE, over_chunks(model.encode_image), grad=True, note="NCHW"),
        Path("eager NCHW, inference_mode", over_chunks(model.encode_image)),
        Path("+ channels_last", over_chunks(channels_last)),
        Path(DEFAULT_IMAGE, over_chunks(mapper(model, args).images)),
    ]
    if "bf16" in precisions:
        fast_bf16 = mapper(model, args, precision="bf16")
        paths.append(Path("xmodal, bf16 autocast", over_chunks(fast_bf16.images), precision="bf16"))
    if ort is not None:
        name = "ONNX Runtime towers (+ torch projection)"
        paths.append(Path(name, over_chunks(ort.images), flops_as=DEFAULT_IMAGE))
    if args.compile:
        compiled = mapper(model, args, compile=True)
        paths.append(Path("xmodal + torch.compile", over_chunks(compiled.images)))
    for path in paths[3:]:  # the useful work is the plain tower's: wider kernels add zero taps
        path.flops_as = paths[1].name
    return run_group("image", paths, len(pixels), args)


def hf_text_model(model: CrossModalModel):
    """The text backbone as the plain transformers ``AutoModel`` it is (a copy, same weights)."""
    return copy.deepcopy(model.text_tower.model).eval()


def text_rows(model, processor, args, precisions, ort) -> list[Row]:
    captions, source = real_captions(args.captions, args.caption_source)
    lengths = TokenizedCaptions(captions, processor).lengths
    print(
        f"captions: {len(captions)} {source}; tokens per caption: median "
        f"{int(np.median(lengths))}, max {lengths.max()}; batch {args.text_batch}"
    )
    tokenizer, size = processor.tokenizer, args.text_batch
    chunks = [captions[i : i + size] for i in range(0, len(captions), size)]

    def padded_128(texts):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=128)
        ids, mask = torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])
        return ids.to(args.device), mask.to(args.device)

    def note_path() -> None:
        for texts in chunks:
            model.encode_text(*padded_128(texts))

    def bucketed(embed: Callable) -> Callable[[], None]:
        def run() -> None:  # tokenising and bucketing are part of the timed work
            tokens = TokenizedCaptions(captions, processor)
            order = np.argsort(tokens.lengths, kind="stable")
            for start in range(0, len(order), size):
                embed(*tokens.batch(order[start : start + size]))

        return run

    hf = hf_text_model(model).to(args.device)

    def hf_mean(ids, mask) -> torch.Tensor:
        return pool_tokens(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean")

    def hf_128() -> None:
        for texts in chunks:
            hf_mean(*padded_128(texts))

    def hf_sentence_transformers_style() -> None:
        order = np.argsort([-len(c) for c in captions], kind="stable")  # as ST.encode sorts
        for start in range(0, len(order), size):
            texts = [captions[i] for i in order[start : start + size]]
            enc = tokenizer(
                texts, padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hf_mean(enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device))

    paths = [
        Path(NOTE, note_path, grad=True, note="pad to 128, dataset order"),
        Path("transformers AutoModel, pad to 128", hf_128, note="inference_mode"),
        Path("transformers AutoModel, ST-style padding", hf_sentence_transformers_style),
        Path(DEFAULT_TEXT, bucketed(mapper(model, args).texts)),
    ]
    if "bf16" in precisions:
        name = "transformers ST-style, bf16 autocast"
        paths.append(Path(name, hf_sentence_transformers_style, dtype=BF16, precision="bf16"))
        fast_bf16 = mapper(model, args, precision="bf16")
        paths.append(Path("xmodal, bf16 autocast", bucketed(fast_bf16.texts), precision="bf16"))
    if ort is not None:
        name = "ONNX Runtime towers, length-bucketed"
        paths.append(Path(name, bucketed(ort.texts), flops_as=DEFAULT_TEXT))
    if args.compile:
        compiled = mapper(model, args, compile=True)
        paths.append(Path("xmodal + torch.compile", bucketed(compiled.texts)))
    if importlib.util.find_spec("sentence_transformers") is None:
        print("  sentence-transformers not installed: its padding is reproduced above")
    return run_group("text", paths, len(captions), args)


def fusion_rows(model, processor, args, precisions) -> list[Row]:
    """The cross-attention fusion over cached tower outputs, then the whole model."""
    captions, _ = real_captions(args.images, args.caption_source)
    photos, _ = real_images(args.images, "photos")
    pixels = processor.process_images(photos).to(args.device)
    note_text = processor.tokenizer(
        captions, padding="max_length", truncation=True, max_length=128, return_tensors="pt"
    ).to(args.device)
    tight = {k: v.to(args.device) for k, v in processor.process_text(captions).items()}
    with torch.inference_mode():
        image = model.image_features(pixels)
        text_128 = model.text_features(note_text["input_ids"], note_text["attention_mask"])
        text_tight = model.text_features(tight["input_ids"], tight["attention_mask"])
    image, text_128, text_tight = (_plain(f) for f in (image, text_128, text_tight))
    size, count = args.image_batch, len(pixels)
    spans = [slice(i, i + size) for i in range(0, count, size)]
    print(f"fusion: {count} (image, caption) pairs, batch {size}")

    def fuse(text) -> Callable[[], None]:
        return lambda: [model.fuse(image.index(s), text.index(s)) for s in spans]

    rows = run_group(
        "fusion",
        [
            Path(NOTE, fuse(text_128), grad=True, note="text tokens padded to 128"),
            Path("xmodal: padded to longest, inference_mode", fuse(text_tight)),
        ],
        count,
        args,
    )
    fast = mapper(model, args)

    def note_model() -> None:
        for s in spans:
            model(pixels[s], note_text["input_ids"][s], note_text["attention_mask"][s])

    def fast_model() -> None:
        for s in spans:
            px = pixels[s].contiguous(memory_format=CL)
            img = model.image_features_from_tower(fast.image_tower(px))
            enc = processor.process_text(captions[s])
            ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)
            txt = model.text_features(ids, mask)
            model.output_from_features(img, txt)

    paths = [
        Path(NOTE, note_model, grad=True, note="NCHW, pad to 128"),
        Path("xmodal: fast towers + fusion", fast_model),
    ]
    if "bf16" in precisions:
        paths.append(Path("xmodal, bf16 autocast", fast_model, dtype=BF16, precision="bf16"))
    return rows + run_group("model", paths, count, args)


def _plain(features: Features) -> Features:
    """Features as ordinary tensors (inference tensors cannot enter autograd)."""
    mask = None if features.mask is None else features.mask.clone()
    return Features(
        features.embeds.clone(), features.projected.clone(), features.tokens.clone(), mask
    )


def main() -> None:
    args = parse_args()
    setup_machine(args)
    peaks = matmul_peak(args.device)
    print_peaks(peaks)
    precisions = ["fp32"] if args.no_bf16 else ["fp32", "bf16"]
    model, processor = load_model(args.model, pretrained=not args.random_weights)
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        ort = onnx_mapper(model, processor, folder, args) if args.device == "cpu" else None
        model.to(args.device)
        rows: list[Row] = []
        if "images" not in args.skip:
            rows += image_rows(model, processor, args, precisions, ort)
        if "texts" not in args.skip:
            rows += text_rows(model, processor, args, precisions, ort)
        if "fusion" not in args.skip:
            rows += fusion_rows(model, processor, args, precisions)
    set_ratios(rows, NOTE)
    print()
    print_table(rows, peaks)
    print("open_clip_torch: not installed (and it needs torchvision, which does not import here)")
    write_json(args.json, {"peaks": peaks, "rows": [vars(r) for r in rows]})


if __name__ == "__main__":
    main()
