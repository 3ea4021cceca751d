"""Tower throughput: xmodal's extraction path against the design note's and against peers.

For each tower (EfficientNet-Lite0 image, MiniLM-L6 text) and the fused model it prints items/s,
the GFLOP/s executed (``FlopCounterMode``) as a share of a matmul peak measured in the same run,
and the ratio to the design note's way of running the same backbone, also in this run:

- images: eager, NCHW, grad enabled (the note) -> inference_mode -> channels_last -> batch norm
  folded (xmodal's default) -> bf16 autocast -> ONNX Runtime -> torch.compile (``--compile``);
- captions: padded to 128 with grad enabled (the note); transformers ``AutoModel`` + mean pooling
  padded to 128 and sentence-transformers style (sorted by length, padded to the longest); xmodal
  (length-bucketed batches, inference_mode); ONNX Runtime; bf16 autocast for both;
- fusion: the cross-attention fusion on cached tower outputs, and the whole model.

Real data: skimage photos; captions are the emoji names when /tmp/xmodal-emoji exists, else
generated English captions of 3-20 words (``--captions``).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_towers.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from common import (
    Row,
    add_machine_args,
    count_flops,
    matmul_peak,
    measure,
    print_peaks,
    print_table,
    real_captions,
    real_images,
    row,
    set_ratios,
    setup_machine,
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
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="images per timed run")
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--captions", type=int, default=1024, help="captions per timed run")
    parser.add_argument("--caption-source", choices=("auto", "emoji", "generated"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    parser.add_argument("--skip", nargs="*", default=(), choices=("images", "texts", "fusion"))
    add_machine_args(parser)
    return parser.parse_args()


def autocast(device: str, dtype: torch.dtype | None):
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None)


def timed(
    fn: Callable[[], object], args: argparse.Namespace, grad: bool = False, dtype=None
) -> tuple:
    """(Timing, FLOPs) of ``fn`` run with grad on or in inference mode, under ``dtype``."""

    def call() -> None:
        with torch.set_grad_enabled(grad), autocast(args.device, dtype):
            if grad:
                fn()
            else:
                with torch.inference_mode():
                    fn()

    flops = count_flops(call)
    return measure(call, warmup=1, repeats=args.repeats), flops


def batches_of(tensor: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [tensor[i : i + size] for i in range(0, len(tensor), size)]


def same_flops_as_torch(rows: list[Row]) -> None:
    """ONNX Runtime runs outside FlopCounterMode: its row gets the default torch path's FLOPs."""
    if rows[-1].name.startswith("ONNX"):
        default = next(r for r in rows if r.name.endswith("(default)"))
        rows[-1].gflops_per_item = default.gflops_per_item


def onnx_mapper(model: CrossModalModel, processor: MultimodalProcessor, folder: str):
    """A mapper on ONNX Runtime towers exported into ``folder``; None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime not installed: `pip install xmodal[onnx]` for the ONNX rows")
        return None
    from xmodal.export.onnx import export_onnx

    export_onnx(model, processor, folder)
    return EmbeddingMapper(model, MapperOptions(backend="onnx", onnx_dir=folder))


def mapper(model: CrossModalModel, args: argparse.Namespace, **options) -> EmbeddingMapper:
    return EmbeddingMapper(model, MapperOptions(device=args.device, **options))


def image_rows(model, processor, args, precisions, ort) -> list[Row]:
    photos, source = real_images(args.images, "photos")
    pixels = processor.process_images(photos).to(args.device)
    chunks = batches_of(pixels, args.image_batch)
    print(f"images: {len(pixels)} from {source}, batch {args.image_batch}, 224 px")
    rows = []

    def add(name: str, fn: Callable, grad=False, dtype=None, note="", precision="fp32") -> None:
        timing, flops = timed(lambda: [fn(c) for c in chunks], args, grad, dtype)
        precision = "bf16" if dtype is BF16 else precision
        rows.append(row("image", name, len(pixels), timing, flops, precision, note))
        same_flops_as_torch(rows)
        print(f"  {name}: {rows[-1].items_per_s:.1f} img/s", flush=True)

    add(NOTE, model.encode_image, grad=True, note="NCHW")
    add("eager NCHW, inference_mode", model.encode_image)
    cl_model_tower = _channels_last_copy(model)
    add("+ channels_last", lambda c: cl_model_tower(c.contiguous(memory_format=CL)))
    fast = mapper(model, args)
    add("xmodal: + batch norm folded (default)", fast.images)
    if "bf16" in precisions:
        fast_bf16 = mapper(model, args, precision="bf16")
        add("xmodal, bf16 autocast", fast_bf16.images, precision="bf16")
    if ort is not None:
        add("ONNX Runtime towers (+ torch projection)", ort.images)
    if args.compile:
        compiled = mapper(model, args, compile=True)
        add("xmodal + torch.compile", compiled.images, note="compile time not counted")
    return rows


def _channels_last_copy(model: CrossModalModel) -> Callable:
    tower = copy.deepcopy(model.image_tower).to(memory_format=CL)
    return lambda px: model.image_features_from_tower(tower(px)).embeds


def hf_text_model(model: CrossModalModel):
    """The text backbone as the plain transformers ``AutoModel`` it is (a copy, same weights)."""
    return copy.deepcopy(model.text_tower.model).eval()


def text_rows(model, processor, args, precisions, ort) -> list[Row]:
    captions, source = real_captions(args.captions, args.caption_source)
    tokens = TokenizedCaptions(captions, processor)
    lengths = tokens.lengths
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
        def run() -> None:
            batch_tokens = TokenizedCaptions(captions, processor)
            order = np.argsort(batch_tokens.lengths, kind="stable")
            for start in range(0, len(order), size):
                embed(*batch_tokens.batch(order[start : start + size]))

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

    fast = mapper(model, args)
    rows: list[Row] = []

    def add(name, fn, grad=False, dtype=None, note="", precision="fp32") -> None:
        timing, flops = timed(fn, args, grad, dtype)
        precision = "bf16" if dtype is BF16 else precision
        rows.append(row("text", name, len(captions), timing, flops, precision, note))
        same_flops_as_torch(rows)
        print(f"  {name}: {rows[-1].items_per_s:.1f} captions/s", flush=True)

    add(NOTE, note_path, grad=True, note="pad to 128, dataset order")
    add("transformers AutoModel, pad to 128", hf_128, note="inference_mode")
    add("transformers AutoModel, ST-style padding", hf_sentence_transformers_style)
    add("xmodal: length-bucketed (default)", bucketed(fast.texts))
    if "bf16" in precisions:
        add("transformers ST-style, bf16 autocast", hf_sentence_transformers_style, False, BF16)
        fast_bf16 = mapper(model, args, precision="bf16")
        add("xmodal, bf16 autocast", bucketed(fast_bf16.texts), precision="bf16")
    if ort is not None:
        add("ONNX Runtime towers, length-bucketed", bucketed(ort.texts))
    if args.compile:
        compiled = mapper(model, args, compile=True)
        add("xmodal + torch.compile", bucketed(compiled.texts), note="compile time not counted")
    if importlib.util.find_spec("sentence_transformers") is None:
        print("  sentence-transformers not installed: its padding is reproduced above")
    return rows


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
    rows: list[Row] = []

    def add(group, name, fn, grad=False, dtype=None, note="") -> None:
        timing, flops = timed(fn, args, grad, dtype)
        precision = "bf16" if dtype is BF16 else "fp32"
        rows.append(row(group, name, count, timing, flops, precision, note))
        print(f"  {group} {name}: {rows[-1].items_per_s:.1f} pairs/s", flush=True)

    def fuse(text) -> Callable[[], None]:
        return lambda: [model.fuse(image.index(s), text.index(s)) for s in spans]

    print(f"fusion: {count} (image, caption) pairs, batch {size}")
    add("fusion", NOTE, fuse(text_128), grad=True, note="text tokens padded to 128")
    add("fusion", "xmodal: padded to longest, inference_mode", fuse(text_tight))
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

    add("model", NOTE, note_model, grad=True, note="NCHW, pad to 128")
    add("model", "xmodal: fast towers + fusion", fast_model)
    if "bf16" in precisions:
        add("model", "xmodal, bf16 autocast", fast_model, dtype=BF16)
    return rows


def _plain(features):
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
    model, processor = load_model(args.model)
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        ort = onnx_mapper(model, processor, folder) if args.device == "cpu" else None
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
