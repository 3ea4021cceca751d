"""``extract --engine ray`` against the plain ``extract`` on one machine (issue 35: >= 90%).

Data: ``--images`` (256) photos from skimage, rotated and resized to ``--size`` px JPEGs, one
caption each. Model: the offline default towers (EfficientNet-Lite0 + MiniLM, from PyPI).

Per round (the two engines alternate, and which goes first alternates between rounds, so
background load touches both alike):

- plain: ``extract()`` in this process;
- ray: ``extract_ray()`` with one mapper actor on an embedded one-node Ray cluster (started
  once, before the rounds; the actor loads the model once, outside the timings).

Each run's steady rate is taken between its first and last finished shard (model loading, the
ONNX export and actor start-up are not counted), the same rule as bench/bench_extract.py. Once,
also, a cold ``extract_ray()``: Ray started and stopped, an actor started, for the whole wall
time against a plain run's whole wall time. The median of the per-round ratios is checked
against the goal and everything is written to ``--json``.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_extract_ray.py    # ~2 min on 2 quiet cores
    python bench/bench_extract_ray.py --modality texts --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import generated_captions, load_average, photo_arrays, write_json
from PIL import Image

from xmodal.extract import extract
from xmodal.extract.mapper import MapperOptions
from xmodal.extract.ray_engine import MapperPool, extract_ray, import_ray

GOAL = 0.90


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="offline-default", help="preset or model directory")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=160, help="JPEG side in pixels")
    p.add_argument("--modality", choices=("images", "texts"), default="images")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="auto", help="auto (ONNX Runtime on a CPU), torch, onnx")
    p.add_argument("--json", default="/tmp/xmodal-bench-extract-ray.json")
    p.add_argument("--no-cold", action="store_true", help="skip the cold (Ray start) run")
    return p.parse_args()


def prepare_data(folder: Path, count: int, size: int) -> Path:
    photos = [Image.fromarray(a).convert("RGB") for a in photo_arrays()]
    captions = generated_captions(count)
    rows = []
    for i in range(count):
        path = folder / f"photo{i:05d}.jpg"
        photo = photos[i % len(photos)].rotate(7 * (i // len(photos)))
        photo.resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)
        rows.append({"image": str(path), "caption": captions[i], "image_id": path.stem})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return data


def timed(run, model: str, data: Path, out: Path, args, **engine) -> dict[str, float]:
    """Steady items/s between the first and last finished shard, and the whole wall time."""
    stamps: list[float] = []
    started = time.perf_counter()
    manifest = run(
        model,
        data,
        out,
        modality=args.modality,
        shard_size=-(-args.images // args.shards),
        batch_size=args.batch_size,
        progress=False,
        on_shard=lambda _m, _k: stamps.append(time.perf_counter()),
        options=MapperOptions(device="cpu", backend=args.backend),
        **engine,
    )
    wall = time.perf_counter() - started
    shards = manifest["modalities"][args.modality]["shards"]
    steady_rows = sum(s["rows"] for s in shards[1:])
    return {"steady": steady_rows / (stamps[-1] - stamps[0]), "wall": wall}


def main() -> None:
    args = parse_args()
    ray = import_ray()
    if "OMP_WAIT_POLICY" not in os.environ:
        print("note: OMP_WAIT_POLICY is not set; on a shared machine set it to PASSIVE")
    print(f"{os.cpu_count()} cores, 1-min load average at start: {load_average():.2f}")
    results: dict = {"args": vars(args), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="xmodal-bench-ray-") as tmp:
        folder = Path(tmp)
        data = prepare_data(folder, args.images, args.size)
        options = MapperOptions(device="cpu", backend=args.backend)
        if not args.no_cold:  # whole wall times: Ray and its actor started for the run
            plain = timed(extract, args.model, data, folder / "cold-plain", args)
            cold = timed(extract_ray, args.model, data, folder / "cold-ray", args)
            results["cold"] = {"plain_wall_s": plain["wall"], "ray_wall_s": cold["wall"]}
            print(f"cold: plain {plain['wall']:.1f} s, ray {cold['wall']:.1f} s (whole runs)")
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            with MapperPool(args.model, options, actors=1) as pool:
                ray.get([actor.pid.remote() for actor in pool.actors])  # the model is loaded
                for r in range(args.rounds):
                    runs = {
                        "plain": lambda r=r: timed(
                            extract, args.model, data, folder / f"plain{r}", args
                        ),
                        "ray": lambda r=r: timed(
                            extract_ray, args.model, data, folder / f"ray{r}", args, pool=pool
                        ),
                    }
                    order = ["plain", "ray"] if r % 2 == 0 else ["ray", "plain"]
                    done = {name: runs[name]() for name in order}  # alternate who goes first
                    plain, on_ray = done["plain"], done["ray"]
                    ratio = on_ray["steady"] / plain["steady"]
                    results["rounds"].append({"plain": plain, "ray": on_ray, "ratio": ratio})
                    print(
                        f"round {r + 1}: plain {plain['steady']:.1f}/s, ray "
                        f"{on_ray['steady']:.1f}/s, ratio {ratio:.3f} "
                        f"(load {load_average():.2f})",
                        flush=True,
                    )
        finally:
            ray.shutdown()
    ratio = statistics.median(r["ratio"] for r in results["rounds"])
    results["median_ratio"] = ratio
    results["goal"] = GOAL
    results["load_average_end"] = load_average()
    verdict = "meets" if ratio >= GOAL else "MISSES"
    print(
        f"\n{args.modality}: ray / plain steady throughput, median {ratio:.3f} ({verdict} "
        f">= {GOAL:.0%})"
    )
    write_json(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
