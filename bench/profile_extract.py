"""Where ``extract()``'s time goes: the main thread's steady loop by stage (cProfile) and the CPU
time of the process and of its decode worker processes.

    python bench/profile_extract.py --data /tmp/xmodal-emoji/train.jsonl --modality images
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import tempfile
import time
from pathlib import Path

from xmodal.extract import extract
from xmodal.extract.mapper import MapperOptions
from xmodal.presets import load_model

STAGES = {
    "model (mapper calls)": ("mapper.py:start_",),
    "  of which ONNX Runtime": ("onnxruntime_pybind11_state.run",),
    "  of which projection + norm": ("model.py:embed_image_pooled", "model.py:embed_text_pooled"),
    "tokenising": ("reader.py:text_batches",),
    "decoding (waited for)": ("images.py:_start", "images.py:_finish"),
    "shard writing": ("pipeline.py:shard_job",),
}


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline-default")
    parser.add_argument("--data", default="/tmp/xmodal-emoji/train.jsonl")
    parser.add_argument("--limit", type=int, default=2048, help="rows of --data")
    parser.add_argument("--modality", choices=("images", "texts"), default="images")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--shard-size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.data)
        rows = [json.loads(line) for line in source.read_text().splitlines()[: args.limit]]
        for r in rows:
            r["image"] = str((source.parent / r["image"]).resolve())
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        model, processor = load_model(args.model)
        model.save_pretrained(Path(tmp) / "model", processor)
        profile = cProfile.Profile()
        before = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        profile.enable()
        extract(
            Path(tmp) / "model", data, Path(tmp) / "out", modality=args.modality,
            shard_size=args.shard_size, progress=False,
            options=MapperOptions(backend=args.backend),
        )  # fmt: skip
        profile.disable()
        wall = time.perf_counter() - start
        own = cpu_seconds(resource.RUSAGE_SELF) - before[0]
        workers = cpu_seconds(resource.RUSAGE_CHILDREN) - before[1]
    stats = pstats.Stats(profile).stats
    cumulative = {f"{k[0]}:{k[2]}": v[3] for k, v in stats.items()}

    def total(*patterns: str) -> float:
        return sum(v for k, v in cumulative.items() if any(p in k for p in patterns))

    loop = total("runner.py:_images", "runner.py:_texts")
    print(f"{args.modality}: {wall:.1f} s in all, steady loop {loop:.1f} s of the main thread")
    for stage, patterns in STAGES.items():
        print(f"  {stage:30} {100 * total(*patterns) / loop:5.1f}% of the loop")
    print(f"  process CPU {own:.1f} s, decode worker processes {workers:.1f} s")


if __name__ == "__main__":
    main()
