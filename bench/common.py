"""Shared pieces of the benchmark scripts: machine load, matmul peak, timing, FLOPs, tables, data.

Every figure a script prints comes from the same process and run as the figures it is compared
with (the peak, the baselines), and every table row carries the 1-minute load average at the
time it was measured.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

EMOJI_DIR = Path("/tmp/xmodal-emoji")


# -- the machine ------------------------------------------------------------------------------
def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, timeout: float, poll: float = 15.0) -> float:
    """Sleep until the 1-minute load average is below ``max_load`` (or ``timeout`` s passed)."""
    deadline = time.monotonic() + timeout
    load = load_average()
    while load >= max_load and time.monotonic() < deadline:
        print(f"  load average {load:.2f} >= {max_load}: waiting", flush=True)
        time.sleep(poll)
        load = load_average()
    return load


def describe_machine(threads: int) -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"({'+'.join(isa) or 'no SIMD flags found'}), {gpu}; torch {torch.__version__}, "
        f"{threads} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def add_machine_args(parser) -> None:
    """--threads, --max-load, --wait: the options every script shares."""
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument(
        "--max-load", type=float, default=1.0, help="wait until the 1-min load is below this"
    )
    parser.add_argument("--wait", type=float, default=600.0, help="longest wait for it (s)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda")


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def setup_machine(args) -> None:
    """Threads as asked, then wait for a quiet machine; prints what was found."""
    torch.set_num_threads(args.threads)
    args.device = pick_device(args.device)
    if "OMP_WAIT_POLICY" not in os.environ:
        print("note: OMP_WAIT_POLICY is not set; on a shared machine set it to PASSIVE")
    print(describe_machine(args.threads))
    load = wait_for_quiet(args.max_load, args.wait)
    print(f"1-min load average at start: {load:.2f}\n", flush=True)


# -- timing and FLOPs -------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call: the median and the best of the repeats."""

    median: float
    best: float
    load: float  # 1-minute load average when the measurement ended


def synchronize() -> None:
    """Wait for queued GPU work (timings of CUDA calls end when the GPU is done)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> Timing:
    """Time ``fn()`` after ``warmup`` untimed calls; ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), load_average())


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one ``fn()`` call (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _matmul_gflops(x, y, repeats: int) -> float:
    flops = 2 * x.shape[0] * x.shape[1] * y.shape[1]
    return flops / measure(lambda: x @ y, 1, repeats).best / 1e9


def matmul_peak(device: str = "cpu", repeats: int = 3) -> dict[str, float]:
    """Achieved GFLOP/s of large matrix products (best of ``repeats``), by library, precision and
    size; ``fp32`` and ``bf16`` are the best of each: the practical peak the table compares with.

    On a CPU that includes a 1x1 convolution run by oneDNN (a matrix product by another library):
    MKL's sgemm, which torch's fp32 matmul calls, takes its AVX2 path on AMD CPUs and reaches
    well under half of what oneDNN's AVX-512 kernels reach there."""
    sizes = (8192,) if device.startswith("cuda") else (2048, 4096)
    peaks: dict[str, float] = {}
    for size in sizes:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        peaks[f"torch fp32 {size}"] = _matmul_gflops(a, b, repeats)
        peaks[f"torch bf16 {size}"] = _matmul_gflops(a.bfloat16(), b.bfloat16(), repeats)
        if device == "cpu":
            peaks[f"numpy fp32 {size}"] = _matmul_gflops(a.numpy(), b.numpy(), repeats)
    if device == "cpu":
        for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            peaks[f"oneDNN {precision} conv1x1"] = _conv1x1_gflops(dtype, repeats)
    for precision in ("fp32", "bf16"):
        peaks[precision] = max(v for k, v in peaks.items() if f" {precision} " in f"{k} ")
    return peaks


def _conv1x1_gflops(
    dtype: torch.dtype, repeats: int, channels: int = 1024, side: int = 64
) -> float:
    """A (channels x channels) by (channels x side^2) product as a channels_last 1x1 convolution."""
    conv = torch.nn.Conv2d(channels, channels, 1, bias=False).to(dtype=dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(1, channels, side, side, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    best = float("inf")
    with torch.inference_mode():
        conv(x)
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - start)
    return 2 * channels * channels * side * side / best / 1e9


def print_peaks(peaks: dict[str, float]) -> None:
    text = ", ".join(f"{name} {value:.0f}" for name, value in peaks.items())
    print(f"matmul peak (this run), GFLOP/s: {text}; load {load_average():.2f}\n")


# -- results ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured configuration; ``precision`` picks the matmul peak it is compared with."""

    group: str
    name: str
    items_per_s: float
    gflops_per_item: float
    load: float
    precision: str = "fp32"
    ratio: float | None = None  # items/s over the group's baseline
    note: str = ""

    def gflops_per_s(self) -> float:
        return self.items_per_s * self.gflops_per_item


def set_ratios(rows: Sequence[Row], baseline: str) -> None:
    """Each row's items/s over that of the row named ``baseline`` in the same group."""
    base = {r.group: r.items_per_s for r in rows if r.name == baseline}
    for r in rows:
        if r.group in base:
            r.ratio = r.items_per_s / base[r.group]


def print_table(rows: Sequence[Row], peaks: dict[str, float]) -> None:
    """items/s, GFLOP/s executed, % of the matmul peak of the row's precision, ratio to the
    group's baseline, and the 1-minute load average when the row was measured."""
    head = (
        f"{'group':8} {'path':46} {'items/s':>9} {'GFLOP/it':>9} {'GFLOP/s':>8} "
        f"{'%peak':>6} {'ratio':>6} {'load':>5}  note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r.ratio:6.2f}" if r.ratio is not None else f"{'':>6}"
        share = 100 * r.gflops_per_s() / peaks[r.precision]
        print(
            f"{r.group:8} {r.name:46} {r.items_per_s:9.1f} {r.gflops_per_item:9.3f} "
            f"{r.gflops_per_s():8.1f} {share:6.1f} {ratio} {r.load:5.2f}  {r.note}"
        )
    print()


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=vars), encoding="utf-8")


# -- data -------------------------------------------------------------------------------------
_WORDS = {
    "det": ["a", "the", "two", "three", "some", "an old", "a small", "a large"],
    "adj": "red wooden smiling busy quiet striped shiny wet tall".split(),
    "noun": (
        "dog woman bicycle kitchen street child boat cat train table building man bird car "
        "field market beach horse"
    ).split(),
    "verb": [
        "sitting on",
        "walking along",
        "standing next to",
        "riding",
        "looking at",
        "parked in front of",
        "playing with",
        "lying under",
        "crossing",
    ],  # fmt: skip
    "tail": [
        "on a sunny day",
        "at night",
        "in the rain",
        "near the water",
        "in a city",
        "covered in snow",
        "with trees in the background",
        "while people watch",
    ],  # fmt: skip
}


def generated_captions(count: int, seed: int = 0) -> list[str]:
    """English captions of 3-20 words (COCO-like structure), reproducible."""
    rng = random.Random(seed)
    pick = lambda kind: rng.choice(_WORDS[kind])  # noqa: E731
    out = []
    for _ in range(count):
        words = [pick("det"), pick("adj"), pick("noun")]
        if rng.random() < 0.8:
            words += [pick("verb"), pick("det"), pick("noun")]
        if rng.random() < 0.6:
            words.append(pick("tail"))
        if rng.random() < 0.3:
            words += ["and", pick("det"), pick("adj"), pick("noun")]
        out.append(" ".join(words)[:160])
    return out


def real_captions(count: int, source: str = "auto", seed: int = 0) -> tuple[list[str], str]:
    """``count`` captions and where they came from: the emoji names when the emoji set exists
    (``source`` auto/emoji), else generated English captions."""
    path = EMOJI_DIR / "train.jsonl"
    if source in ("auto", "emoji") and path.is_file():
        from xmodal.data import load_dataset

        captions = load_dataset(path).captions()
        rng = random.Random(seed)
        chosen = [captions[i % len(captions)] for i in range(count)]
        rng.shuffle(chosen)
        return chosen, f"emoji names ({path})"
    if source == "emoji":
        raise FileNotFoundError(f"{path} not found (build it with `xmodal data emoji`)")
    return generated_captions(count, seed), "generated English captions (3-20 words)"


PHOTOS = (
    "astronaut chelsea coffee rocket horse camera immunohistochemistry hubble_deep_field "
    "stereo_motorcycle colorwheel logo coins clock"
).split()


def photo_arrays() -> list[np.ndarray]:
    """skimage's photos that load offline (RGB, RGBA and grey; 300 to 1,000 px)."""
    from skimage import data

    photos = []
    for name in PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a loader that needs the network is skipped
            continue
        photos.append(image[0] if isinstance(image, tuple) else image)
    return photos


def real_images(count: int, source: str = "photos") -> tuple[list, str]:
    """``count`` image inputs and where they came from: skimage photos (cycled), or emoji PNG
    paths when ``source`` is ``emoji`` (or ``auto``) and the emoji set exists."""
    folder = EMOJI_DIR / "images"
    if source in ("auto", "emoji") and folder.is_dir():
        files = sorted(folder.glob("*.png"))
        if files:
            return [str(files[i % len(files)]) for i in range(count)], f"emoji PNGs ({folder})"
    if source == "emoji":
        raise FileNotFoundError(f"{folder} not found (build it with `xmodal data emoji`)")
    photos = photo_arrays()
    return [photos[i % len(photos)] for i in range(count)], f"{len(photos)} skimage photos"
