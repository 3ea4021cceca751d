"""Training throughput and peak memory per configuration, and the largest batch for a budget.

Configurations (the offline default model, real emoji images and names, AdamW, CLIP + ITM loss):

- ``cached``: image tower locked, its outputs computed once and reused (text tower, projections
  and fusion train);
- ``full224`` / ``full128``: everything trains, images at 224 or 128 px;
- each with gradient checkpointing off and on (``CrossModalModel.set_gradient_checkpointing``).

Each measurement runs in a fresh process, so its peak memory is its own: the peak resident set
(``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on a GPU. ``--memory-gb`` then finds
the largest batch whose peak fits the budget (doubling, then bisection).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_train.py --batch 32
    OMP_WAIT_POLICY=PASSIVE python bench/bench_train.py --memory-gb 8 --search full224
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import (
    add_machine_args,
    pick_device,
    real_captions,
    real_images,
    setup_machine,
    write_json,
)

CONFIGS = ("cached", "full224", "full128")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline-default", help="preset or model directory")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--memory-gb", type=float, default=None, help="budget for --search")
    parser.add_argument("--search", nargs="*", default=[], choices=CONFIGS)
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument(
        "--no-reuse-memory",
        action="store_true",
        help="leave glibc's allocator as it is (the trainer keeps freed memory for reuse on CPUs, "
        "see xmodal.runtime)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    add_machine_args(parser)
    return parser.parse_args(argv)


# -- one measurement (child process) ----------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so loading the model does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), else since the process started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(config: str, args: argparse.Namespace):
    """Model, optimizer and a batch maker for ``config``."""
    import torch

    from xmodal.config import ProcessorConfig
    from xmodal.presets import load_model
    from xmodal.processing import MultimodalProcessor

    model, processor = load_model(args.model)
    device = torch.device(pick_device(args.device))
    model.to(device).train()
    size = 128 if config == "full128" else 224
    cfg = processor.config
    processor = MultimodalProcessor(
        ProcessorConfig(**{**vars(cfg), "image_size": size, "resize_size": size * 8 // 7}),
        processor.tokenizer,
    )
    images, _ = real_images(args.batch, "auto")
    captions, _ = real_captions(args.batch)
    pixels = processor.process_images(images).to(device)
    text = {k: v.to(device) for k, v in processor.process_text(captions).items()}
    cached = None
    if config == "cached":
        model.image_tower.requires_grad_(False).eval()
        with torch.no_grad():
            out = model.image_tower(pixels)
        cached = (out.pooled, out.tokens)
    model.set_gradient_checkpointing(args.gc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    return model, optimizer, pixels, text, cached, device


def train_step(model, optimizer, pixels, text, cached) -> float:
    """One step of CLIP + ITM (each caption against the next image as its negative)."""
    import torch

    from xmodal.losses import clip_loss, itm_loss
    from xmodal.models.towers import TowerOutput

    if cached is None:
        image = model.image_features(pixels)
    else:
        image = model.image_features_from_tower(TowerOutput(*cached))
    caption = model.text_features(text["input_ids"], text["attention_mask"])
    loss = clip_loss(image.embeds, caption.embeds, model.clip_scale())
    shifted = image.index(torch.roll(torch.arange(len(pixels), device=pixels.device), 1))
    loss = loss + itm_loss(model.itm_logits(image, caption), model.itm_logits(shifted, caption))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


def child(args: argparse.Namespace) -> None:
    """Measure one configuration and print one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    if not args.no_reuse_memory:
        from xmodal.runtime import reuse_freed_memory

        reuse_freed_memory()
    model, optimizer, pixels, text, cached, device = build(args.child, args)
    gc.collect()
    base = rss_mb()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, pixels, text, cached)  # warm-up (allocates optimizer state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, pixels, text, cached)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    result = {
        "config": args.child,
        "checkpointing": args.gc,
        "batch": args.batch,
        "samples_per_s": args.batch / seconds,
        "s_per_step": seconds,
        "peak_mb": peak,
        "before_mb": base if device.type == "cpu" else 0.0,  # model, data, no optimizer state
        "device": device.type,
        "load": os.getloadavg()[0],
    }
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver ---------------------------------------------------------------------------------
def measure(config: str, batch: int, ckpt: bool, args: argparse.Namespace, steps: int) -> dict:
    """Run one configuration in a fresh process; its result (or an error record)."""
    command = (
        [
            sys.executable,
            __file__,
            "--child",
            config,
            "--batch",
            str(batch),
            "--steps",
            str(steps),
            "--model",
            args.model,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        + (["--gc"] if ckpt else [])
        + (["--no-reuse-memory"] if args.no_reuse_memory else [])
    )
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"config": config, "batch": batch, "checkpointing": ckpt, "error": tail[0]}


def fits(result: dict, budget_mb: float) -> bool:
    return "error" not in result and result["peak_mb"] <= budget_mb


def largest_batch(config: str, ckpt: bool, args: argparse.Namespace) -> tuple[int, list[dict]]:
    """The largest batch whose peak memory fits ``--memory-gb``: double, then bisect."""
    budget = args.memory_gb * 1024
    probes: list[dict] = []

    def probe(batch: int) -> bool:
        result = measure(config, batch, ckpt, args, steps=1)
        probes.append(result)
        peak = result.get("peak_mb", float("nan"))
        print(f"    batch {batch}: peak {peak:.0f} MiB {'fits' if fits(result, budget) else 'no'}")
        return fits(result, budget)

    low, high = 0, 8
    while probe(high):
        low, high = high, high * 2
    while high - low > max(1, low // 16):  # within ~6%
        middle = (low + high) // 2
        low, high = (middle, high) if probe(middle) else (low, middle)
    return low, probes


def print_rows(results: list[dict]) -> None:
    head = f"{'config':9} {'ckpt':>5} {'batch':>5} {'samples/s':>10} {'s/step':>7} {'peak MiB':>9} "
    head += f"{'before MiB':>10} {'load':>5}"
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(
                f"{r['config']:9} {str(r['checkpointing']):>5} {r['batch']:5}  error: {r['error']}"
            )
            continue
        print(
            f"{r['config']:9} {str(r['checkpointing']):>5} {r['batch']:5} "
            f"{r['samples_per_s']:10.2f} {r['s_per_step']:7.2f} {r['peak_mb']:9.0f} "
            f"{r['before_mb']:10.0f} {r['load']:5.2f}"
        )


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    setup_machine(args)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    results = []
    for config in args.configs:
        for ckpt in modes:
            results.append(measure(config, args.batch, ckpt, args, args.steps))
            print(f"  {config} checkpointing={ckpt}: done", flush=True)
    print_rows(results)
    searches = {}
    if args.search:
        if args.memory_gb is None:
            raise SystemExit("--search needs --memory-gb")
        for config in args.search:
            for ckpt in modes:
                print(f"largest batch for {config}, checkpointing={ckpt}, {args.memory_gb} GB:")
                batch, _ = largest_batch(config, ckpt, args)
                searches[f"{config} checkpointing={ckpt}"] = batch
                print(f"  -> {batch}")
    write_json(args.json, {"rows": results, "largest_batch": searches})


if __name__ == "__main__":
    main()
