"""``extract --engine ray`` against the plain ``extract`` on one machine (issue 35: >= 90%), the
per-item costs it is made of, and the plan for 1B images they give.

Data: ``--images`` (256) photos from skimage, rotated and resized to ``--size`` px JPEGs, one
caption each. Model: the offline default towers (EfficientNet-Lite0 + MiniLM, from PyPI).

Two phases on an embedded one-node Ray cluster, each with its own warm one-actor pool (the
actor loads the model once, outside the timings) and ``--rounds`` rounds against the plain run
(who goes first alternates, so background load touches both alike):

- ``actor-decode``: the default, the actor decodes its shards as the plain run does;
- ``decode-tasks``: ``--ray-decode-tasks N``, images decoded by Ray CPU tasks.

Each run's steady rate is taken between its first and last finished shard (model loading, the
ONNX export and actor start-up are not counted), the same rule as bench/bench_extract.py; the
median of the per-round ratios is checked against the goal. Once, also, a cold
``extract_ray()``: Ray and an actor started for the run, whole wall times.

Per-item costs, in this process: decoding one ``--cost-size`` px JPEG (img2dataset's default
output size) on one core, and the image and text towers per item on all cores (CPU). With the
GPU towers' rates measured earlier (``--gpu-images-per-s``, ``--gpu-captions-per-s``: an H200,
docs/performance.md) and public prices, they give the plan for ``--target`` images written to
the JSON (and docs/distributed.md): an estimate, the CPU figures measured here.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_extract_ray.py    # ~6 min on 2 quiet cores
    python bench/bench_extract_ray.py --modality texts --decode-tasks 0 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    describe_machine,
    generated_captions,
    load_average,
    photo_arrays,
    wait_for_quiet,
    write_json,
)
from PIL import Image

from xmodal.data.images import ThreadedImageBatches
from xmodal.extract import extract
from xmodal.extract.mapper import EmbeddingMapper, MapperOptions
from xmodal.extract.pipeline import model_threads
from xmodal.extract.ray_engine import MapperPool, extract_ray, import_ray
from xmodal.presets import load_model

GOAL = 0.90


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="offline-default", help="preset or model directory")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=160, help="JPEG side in pixels")
    p.add_argument("--modality", choices=("images", "texts"), default="images")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-tasks", type=int, default=2, help="phase 2's N (0: skip it)")
    p.add_argument("--backend", default="auto", help="auto (ONNX Runtime on a CPU), torch, onnx")
    p.add_argument("--json", default="docs/figures/extract-ray.json")
    p.add_argument("--no-cold", action="store_true", help="skip the cold (Ray start) run")
    p.add_argument("--max-load", type=float, default=1.0, help="wait for a load below this")
    p.add_argument("--wait", type=float, default=300.0, help="longest wait for it (s)")
    plan = p.add_argument_group("the plan (per-item costs -> nodes, GPUs, hours, cost)")
    plan.add_argument("--cost-size", type=int, default=256, help="JPEG side for decode cost")
    plan.add_argument("--target", type=float, default=1e9, help="images (one caption each)")
    plan.add_argument("--gpu-images-per-s", type=float, default=8028.0)
    plan.add_argument("--gpu-captions-per-s", type=float, default=26754.0)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--node-vcpus", type=int, default=192, help="vCPUs of a GPU node")
    plan.add_argument("--gpu-hour-usd", type=float, default=3.0)
    plan.add_argument("--vcpu-hour-usd", type=float, default=0.045)
    return p.parse_args()


def prepare_data(folder: Path, count: int, size: int) -> Path:
    photos = [Image.fromarray(a).convert("RGB") for a in photo_arrays()]
    captions = generated_captions(count)
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
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


def phase(name: str, pool: MapperPool, data: Path, folder: Path, args) -> dict:
    """``args.rounds`` rounds of plain against ``pool``'s engine; the median ratio."""
    pool.ray.get([actor.pid.remote() for actor in pool.actors])  # the model is loaded
    rounds = []
    for r in range(args.rounds):
        runs = {
            "plain": lambda r=r: timed(extract, args.model, data, folder / f"{name}-p{r}", args),
            "ray": lambda r=r: timed(
                extract_ray, args.model, data, folder / f"{name}-r{r}", args, pool=pool
            ),
        }
        order = ["plain", "ray"] if r % 2 == 0 else ["ray", "plain"]
        done = {who: runs[who]() for who in order}
        ratio = done["ray"]["steady"] / done["plain"]["steady"]
        rounds.append({**done, "ratio": ratio, "load": load_average()})
        print(
            f"{name} round {r + 1}: plain {done['plain']['steady']:.1f}/s, ray "
            f"{done['ray']['steady']:.1f}/s, ratio {ratio:.3f} (load {load_average():.2f})",
            flush=True,
        )
    median = statistics.median(r["ratio"] for r in rounds)
    return {"rounds": rounds, "median_ratio": median, "meets_goal": median >= GOAL}


def item_costs(args, folder: Path) -> dict[str, float]:
    """Seconds per item: decoding a ``--cost-size`` JPEG on one core; each tower on all cores
    (CPU, this process, the bench's backend), from pre-decoded / pre-tokenised batches."""
    count, batch = 128, args.batch_size
    data = prepare_data(folder / "costs", count, args.cost_size)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    net, processor = load_model(args.model)
    mapper = EmbeddingMapper(net, MapperOptions(device="cpu", backend=args.backend), processor)
    images = [r["image"] for r in rows]
    batches = [list(range(b, min(count, b + batch))) for b in range(0, count, batch)]
    decode = ThreadedImageBatches(images, processor, batches, 0, mapper.channels_last)
    list(ThreadedImageBatches(images, processor, batches[:1], 0, mapper.channels_last))  # warm
    started_cpu = time.process_time()
    decoded = list(decode)
    decode_s = (time.process_time() - started_cpu) / count
    captions = [
        processor.process_text([r["caption"] for r in rows[b : b + batch]])
        for b in range(0, count, batch)
    ]
    cores = os.cpu_count() or 1
    with model_threads(mapper, cores):
        mapper.start_images(decoded[0].pixel_values).result()  # warm-up
        mapper.start_texts(captions[0]["input_ids"], captions[0]["attention_mask"]).result()
        image = timed_calls(lambda: [mapper.start_images(b.pixel_values).result() for b in decoded])
        text = timed_calls(
            lambda: [
                mapper.start_texts(c["input_ids"], c["attention_mask"]).result() for c in captions
            ]
        )
    return {
        "decode_cpu_s_per_image": decode_s,
        "decode_jpeg_px": args.cost_size,
        "image_tower_cpu_s_per_image": image[1] / count,
        "image_tower_wall_s_per_image": image[0] / count,
        "text_tower_cpu_s_per_caption": text[1] / count,
        "text_tower_wall_s_per_caption": text[0] / count,
        "cpu_cores": cores,
        "backend": mapper.backend,
        "load": load_average(),
    }


def timed_calls(calls) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all its threads) of ``calls()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    calls()
    return time.perf_counter() - wall, time.process_time() - cpu


def plan(costs: dict[str, float], args) -> dict:
    """The plan for ``args.target`` images from the per-item costs: the towers on GPUs at the
    H200 rates given, decoding on vCPUs at the cost measured here (a vCPU taken as one measured
    core), for 1 to 8 nodes; and the towers on CPUs instead, at their measured CPU seconds. An
    estimate: reading the data, start-up and Ray's overhead are not counted."""
    n = args.target
    gpu_s = 1 / args.gpu_images_per_s + 1 / args.gpu_captions_per_s  # both towers, per pair
    gpu_hours = n * gpu_s / 3600
    decode_s = costs["decode_cpu_s_per_image"]
    per_gpu = decode_s / gpu_s  # vCPUs of decoding that keep one GPU busy
    spare = args.node_vcpus - 2 * args.gpus_per_node  # a core per actor, some for Ray and I/O
    extra_per_node = max(0.0, per_gpu * args.gpus_per_node - spare)  # on CPU-only nodes
    clusters = []
    for nodes in (1, 2, 4, 8):
        hours = gpu_hours / (nodes * args.gpus_per_node)
        extra_vcpu_hours = extra_per_node * nodes * hours
        clusters.append(
            {
                "nodes": nodes,
                "gpus": nodes * args.gpus_per_node,
                "wall_hours": hours,
                "extra_decode_vcpus": extra_per_node * nodes,
                "cost_usd": gpu_hours * args.gpu_hour_usd + extra_vcpu_hours * args.vcpu_hour_usd,
            }
        )
    tower_s = costs["image_tower_cpu_s_per_image"] + costs["text_tower_cpu_s_per_caption"]
    cpu_only_vcpu_hours = n * (tower_s + decode_s) / 3600
    return {
        "estimate": "from per-item costs: CPU figures measured here, GPU tower rates from an "
        "H200 (docs/performance.md); data reading, start-up and Ray overhead not counted",
        "images": n,
        "gpu_s_per_pair": gpu_s,
        "gpu_hours": gpu_hours,
        "decode_vcpu_hours": n * decode_s / 3600,
        "decode_vcpus_per_gpu": per_gpu,
        "gpus_per_node": args.gpus_per_node,
        "node_vcpus": args.node_vcpus,
        "usd_per_gpu_hour": args.gpu_hour_usd,
        "usd_per_vcpu_hour": args.vcpu_hour_usd,
        "clusters": clusters,
        "cpu_only_vcpu_hours": cpu_only_vcpu_hours,
        "cpu_only_cost_usd": cpu_only_vcpu_hours * args.vcpu_hour_usd,
    }


def main() -> None:
    args = parse_args()
    ray = import_ray()
    if "OMP_WAIT_POLICY" not in os.environ:
        print("note: OMP_WAIT_POLICY is not set; on a shared machine set it to PASSIVE")
    load = wait_for_quiet(args.max_load, args.wait)
    print(f"{describe_machine(os.cpu_count() or 1)}\n1-min load average at start: {load:.2f}")
    results: dict = {
        "args": vars(args),
        "machine": describe_machine(os.cpu_count() or 1),
        "load_average_start": load,
        "goal": GOAL,
    }
    with tempfile.TemporaryDirectory(prefix="xmodal-bench-ray-") as tmp:
        folder = Path(tmp)
        results["costs"] = item_costs(args, folder)  # first: its CPU times are the plan's
        data = prepare_data(folder / "data", args.images, args.size)
        options = MapperOptions(device="cpu", backend=args.backend)
        if not args.no_cold:  # whole wall times: Ray and its actor started for the run
            plain = timed(extract, args.model, data, folder / "cold-plain", args)
            cold = timed(extract_ray, args.model, data, folder / "cold-ray", args)
            results["cold"] = {"plain_wall_s": plain["wall"], "ray_wall_s": cold["wall"]}
            print(f"cold: plain {plain['wall']:.1f} s, ray {cold['wall']:.1f} s (whole runs)")
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            phases = {"actor-decode": 0}
            if args.decode_tasks and args.modality == "images":
                phases["decode-tasks"] = args.decode_tasks
            for name, tasks in phases.items():
                with MapperPool(args.model, options, actors=1, decode_tasks=tasks) as pool:
                    results[name] = phase(name, pool, data, folder, args)
        finally:
            ray.shutdown()
    results["plan"] = plan(results["costs"], args)
    results["load_average_end"] = load_average()
    for name in ("actor-decode", "decode-tasks"):
        if name in results:
            ratio = results[name]["median_ratio"]
            verdict = "meets" if ratio >= GOAL else "MISSES"
            print(f"{args.modality}, {name}: ray / plain steady, median {ratio:.3f} ({verdict})")
    print(json.dumps({"costs": results["costs"], "plan": results["plan"]}, indent=1))
    write_json(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
