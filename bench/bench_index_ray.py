"""``index --engine ray`` against the plain (one-process) build on one machine, IVF-Flat and
IVF-PQ, the per-vector costs they are made of, and the plan for 1B vectors they give.

Data: ``--count`` synthetic clustered ``--dim``-d vectors as float16 extraction shards
(bench/synthetic_shards.py, kept in ``--data`` between runs). Each kind is built under the
budget that picks it (IVF-Flat; IVF-PQ with ``--pq-m`` bytes a code), ``--rounds`` times by
each engine, interleaved (plain, ray, ray, plain, ...: who goes first alternates, so
background load touches both alike), after one warm-up build of each (the shards in the page
cache, Ray's workers started). Ray runs embedded in this process with ``--tasks`` parallel
add tasks (default: the cores); its start is outside the timings.

Per build: the whole wall time and its phases (training, adding the rows, merging the blocks
into on-disk lists, the rest: sampling, tuning nprobe, writing), taken by wrapping the build's
own functions; the recall check, when a plan misses the target recall, apart. The ratios are
plain seconds over ray seconds (above 1: ray is faster), the median over the rounds. The add
cost per vector in core-seconds (Ray's add phase times its tasks, each one core), with the
coarse assignment's share measured apart (one core, random centroids, at this ``nlist`` and
the ``nlist`` a 1B-vector plan picks), gives the plan for ``--target`` vectors: adding spread
over the nodes, merging and the rest on the driver.

    python bench/bench_index_ray.py                      # ~10 min on 2 quiet cores
    python bench/bench_index_ray.py --count 50000 --rounds 3 --json /tmp/index-ray.json
    python bench/bench_index_ray.py --plan-from docs/figures/index-ray.json --node-cores 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from common import describe_machine, load_average, wait_for_quiet, write_json
from synthetic_shards import Generator, write_shards

from xmodal.index import budget as budgets
from xmodal.index import build as building
from xmodal.index.build import Limits, fill_blocks
from xmodal.index.ray_engine import RayFill, import_ray
from xmodal.index.stream import ShardSource

ASSIGN_ROWS = 2_000  # vectors assigned to their nearest centroid when timing the assignment


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=20_000)
    p.add_argument("--pq-m", type=int, default=64, help="IVF-PQ code bytes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=os.cpu_count() or 1, help="Ray add tasks")
    p.add_argument("--data", type=Path, default=Path("/tmp/xmodal-bench-index-ray"))
    p.add_argument("--json", default="docs/figures/index-ray.json")
    p.add_argument("--max-load", type=float, default=1.0, help="wait for a load below this")
    p.add_argument("--wait", type=float, default=300.0, help="longest wait for it (s)")
    plan = p.add_argument_group("the plan (per-vector costs -> nodes, hours)")
    plan.add_argument("--target", type=float, default=1e9, help="vectors")
    plan.add_argument("--node-cores", type=int, default=32, help="cores of a CPU node")
    plan.add_argument("--plan-from", type=Path, help="only the plan again, for this run's JSON")
    return p.parse_args()


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


class Phases:
    """Seconds spent in the build's phases and rows added, by wrapping its functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.added = 0
        self.inside = 0  # phases under way: one inside another counts as the outer one

    def timed(self, phase: str, function: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.inside:
                return function(*args, **kwargs)
            self.inside += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
                self.inside -= 1

        return run


class TimedFill:
    """A fill (the plain one or a RayFill) timed as the ``add`` phase; a RayFill's parts are
    kept and taken up as in a real run (``reused``)."""

    def __init__(self, fill: Callable, phases: Phases):
        self.fill, self.phases = fill, phases
        self.reused = getattr(fill, "reused", frozenset())

    def __call__(self, *args: Any) -> tuple[list[Path], int]:
        started = time.perf_counter()
        blocks, added = self.fill(*args)
        self.phases.seconds["add"] += time.perf_counter() - started
        self.phases.added += added
        return blocks, added


def budget_for(count: int, dim: int, kind: str, pq_m: int) -> int:
    """The --max-index-memory that picks ``kind`` (and ``pq_m``) for ``count`` vectors."""
    plans = budgets.candidates(count, dim, budgets.pick_nlist(count, None, dim))
    chosen = next(p for p in plans if p.kind == kind and p.pq_m == pq_m)
    return chosen.index_bytes() + 1024


def timed_build(source: ShardSource, out: Path, budget: int, fill: Callable) -> dict[str, Any]:
    """One build into ``out`` (removed after), its wall time and phases."""
    phases = Phases()
    wrapped = {"train_index": "train", "blocks_index": "merge", "escalate": "recall_check"}
    originals = {name: getattr(building, name) for name in wrapped}
    for name, phase in wrapped.items():
        setattr(building, name, phases.timed(phase, originals[name]))
    started = time.perf_counter()
    try:
        info = building.build(source, out, Limits(budget), accept=0.0, fill=TimedFill(fill, phases))
    finally:
        for name, function in originals.items():
            setattr(building, name, function)
    wall = time.perf_counter() - started
    seconds = dict(phases.seconds)
    seconds["rest"] = wall - sum(seconds.values())
    folder_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    for entry in out.iterdir():
        entry.unlink()
    out.rmdir()
    return {
        "wall_s": wall,
        "phases_s": seconds,
        "rows_added": phases.added,
        "factory": info["params"]["factory"],
        "nprobe": info["params"].get("nprobe"),
        "recall_at_10": info["params"]["measured_recall"]["value"],
        "index_folder_bytes": folder_bytes,
    }


def compare(source: ShardSource, folder: Path, kind: str, pq_m: int, ray_fill: RayFill, args):
    """Warm-up, then ``args.rounds`` interleaved rounds of plain and ray builds of ``kind``."""
    budget = budget_for(source.count, source.dim, kind, pq_m)
    runs = {"plain": fill_blocks, "ray": ray_fill}
    for engine, fill in runs.items():  # warm-up: page cache, Ray's workers
        timed_build(source, folder / f"{kind}-warm-{engine}", budget, fill)
    rounds = []
    for r in range(args.rounds):
        order = ["plain", "ray"] if r % 2 == 0 else ["ray", "plain"]
        done = {e: timed_build(source, folder / f"{kind}-{e}{r}", budget, runs[e]) for e in order}
        plain, ray = done["plain"], done["ray"]
        assert plain["factory"] == ray["factory"] and plain["nprobe"] == ray["nprobe"]
        build_ratio = plain["wall_s"] / ray["wall_s"]
        add_ratio = plain["phases_s"]["add"] / ray["phases_s"]["add"]
        load = load_average()
        rounds.append({**done, "build_ratio": build_ratio, "add_ratio": add_ratio, "load": load})
        print(
            f"{kind} round {r + 1}: build plain {plain['wall_s']:.1f} s, ray "
            f"{ray['wall_s']:.1f} s (ratio {build_ratio:.3f}); add plain "
            f"{plain['phases_s']['add']:.1f} s, ray {ray['phases_s']['add']:.1f} s "
            f"(ratio {add_ratio:.3f}); load {load:.2f}",
            flush=True,
        )
    ray_add = statistics.median(r["ray"]["phases_s"]["add"] for r in rounds)
    plain_add = statistics.median(r["plain"]["phases_s"]["add"] for r in rounds)
    rows = rounds[0]["ray"]["rows_added"]
    driver = {  # phases on the driver, per vector (median over the ray builds)
        phase: statistics.median(r["ray"]["phases_s"].get(phase, 0.0) for r in rounds)
        / source.count
        for phase in ("merge", "rest", "recall_check")
    }
    return {
        "budget_bytes": budget,
        "factory": rounds[0]["ray"]["factory"],
        "rounds": rounds,
        "median_build_ratio": statistics.median(r["build_ratio"] for r in rounds),
        "median_add_ratio": statistics.median(r["add_ratio"] for r in rounds),
        "ray_add_core_s_per_vector": ray_add * ray_fill.tasks / rows,
        "plain_add_wall_s_per_vector": plain_add / rows,
        "driver_s_per_vector": driver,
        "train_s": statistics.median(r["ray"]["phases_s"].get("train", 0.0) for r in rounds),
    }


def assign_cost(nlist: int, dim: int) -> float:
    """Seconds (one core) to assign one vector to the nearest of ``nlist`` centroids (a flat
    inner-product coarse quantizer, as the plans use)."""
    rng = np.random.default_rng(0)
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(rng.standard_normal((nlist, dim), dtype=np.float32))
    rows = rng.standard_normal((ASSIGN_ROWS, dim), dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        quantizer.search(rows[:200], 1)  # warm-up
        started = time.perf_counter()
        quantizer.search(rows, 1)
        return (time.perf_counter() - started) / ASSIGN_ROWS
    finally:
        faiss.omp_set_num_threads(threads)


def plan(kinds: dict[str, dict], assign: dict[str, float], nlists: dict[str, int], args) -> dict:
    """Hours for ``args.target`` vectors on 1 to 64 nodes of ``args.node_cores`` cores: adding
    at the measured core-seconds a vector, its coarse assignment re-costed at the target's
    nlist, spread over every core; merging the blocks on the driver (sequential) at its
    measured cost a vector. Given apart, as one-process hours scaled linearly from this size
    (upper bounds: they depend on the depth tuning reaches, not only on the rows): the rest of
    the driver's work (sampling, tuning nprobe on the held-out queries, writing) and the recall
    check (:func:`xmodal.index.build.escalate`: every row encoded again, when the plan misses
    the target recall). Training (on a bounded sample) is not counted."""
    out: dict[str, Any] = {
        "estimate": "from per-vector costs measured here: adding spread over the nodes' cores, "
        "its coarse assignment re-costed at the target's nlist; merging on the driver; the "
        "driver's other one-process work and the recall check scaled linearly (upper bounds), "
        "apart; training and reading the shards over the network not counted",
        "vectors": args.target,
        "node_cores": args.node_cores,
        "nlist_measured": nlists["measured"],
        "nlist_target": nlists["target"],
    }
    for kind, result in kinds.items():
        add = result["ray_add_core_s_per_vector"] - assign["measured"] + assign["target"]
        per_vector = result["driver_s_per_vector"]
        merge_hours = args.target * per_vector["merge"] / 3600
        clusters = []
        for nodes in (1, 4, 16, 64):
            add_hours = args.target * add / (nodes * args.node_cores) / 3600
            clusters.append(
                {
                    "nodes": nodes,
                    "cores": nodes * args.node_cores,
                    "add_hours": add_hours,
                    "merge_hours": merge_hours,
                    "wall_hours": add_hours + merge_hours,
                }
            )
        out[kind] = {
            "add_core_s_per_vector_at_target": add,
            "add_core_hours": args.target * add / 3600,
            "merge_s_per_vector": per_vector["merge"],
            "clusters": clusters,
            "driver_rest_hours_linear": args.target * per_vector["rest"] / 3600,
            "recall_check_hours_linear": args.target * per_vector["recall_check"] / 3600,
        }
    return out


def replan(path: Path, args: argparse.Namespace) -> None:
    """The plan of an earlier run's JSON computed again (for another ``--node-cores``, or a
    ``--target`` of the same nlist), its measurements unchanged."""
    results = json.loads(path.read_text())
    kinds = {k: results[k] for k in ("ivf-flat", "ivf-pq") if k in results}
    earlier = results["plan"]
    nlists = {"measured": earlier["nlist_measured"], "target": earlier["nlist_target"]}
    dim = int(results["args"]["dim"])
    if budgets.pick_nlist(int(args.target), None, dim) != nlists["target"]:
        raise SystemExit(f"--target {args.target:.0e} picks another nlist than {path} measured")
    results["plan"] = plan(kinds, results["assign_s_per_vector"], nlists, args)
    write_json(str(path), results)
    print_plan(results["plan"], kinds, args.target)
    print(f"wrote the plan into {path}")


def print_plan(planned: dict, kinds: dict, target: float) -> None:
    for kind in kinds:
        line = ", ".join(
            f"{c['nodes']} nodes {c['wall_hours']:.2f} h" for c in planned[kind]["clusters"]
        )
        print(
            f"plan, {target:.0e} vectors, {kind} (add + merge): {line}; one-process rest "
            f"<= {planned[kind]['driver_rest_hours_linear']:.1f} h, recall check "
            f"<= {planned[kind]['recall_check_hours_linear']:.1f} h"
        )


def main() -> None:
    args = parse_args()
    if args.plan_from is not None:
        replan(args.plan_from, args)
        return
    if args.count < budgets.FLAT_MAX:
        raise SystemExit(
            f"--count must be >= {budgets.FLAT_MAX:,}: below it a budget keeps exact search"
        )
    ray = import_ray()
    load = wait_for_quiet(args.max_load, args.wait)
    machine = describe_machine(faiss.omp_get_max_threads())
    print(f"{cpu_model()}; {machine}\n1-min load average at start: {load:.2f}", flush=True)
    results: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "machine": machine,
        "faiss": faiss.__version__,
        "load_average_start": load,
    }
    shards = args.data / f"shards-{args.count}-{args.dim}"
    write_shards(shards, args.count, Generator(dim=args.dim), args.shard_size)
    source = ShardSource(shards, "images")
    nlists = {
        "measured": budgets.pick_nlist(args.count, None, args.dim),
        "target": budgets.pick_nlist(int(args.target), None, args.dim),
    }
    results["assign_s_per_vector"] = assign = {
        k: assign_cost(n, args.dim) for k, n in nlists.items()
    }
    print(f"coarse assignment, one core: {assign} s a vector (nlist {nlists})", flush=True)
    ray.init(include_dashboard=False, log_to_driver=False)
    kinds: dict[str, dict] = {}
    try:
        with RayFill(tasks=args.tasks) as ray_fill, tempfile.TemporaryDirectory(
            prefix="xmodal-bench-index-ray-"
        ) as tmp:  # fmt: skip
            for kind, pq_m in (("ivf-flat", 0), ("ivf-pq", args.pq_m)):
                kinds[kind] = compare(source, Path(tmp), kind, pq_m, ray_fill, args)
    finally:
        ray.shutdown()
    results.update(kinds)
    results["plan"] = plan(kinds, assign, nlists, args)
    results["load_average_end"] = load_average()
    for kind, result in kinds.items():
        print(
            f"{kind} ({result['factory']}): ray / plain, median build ratio "
            f"{result['median_build_ratio']:.3f}, add ratio {result['median_add_ratio']:.3f}; "
            f"add {result['ray_add_core_s_per_vector'] * 1e6:.1f} core-us a vector (ray), "
            f"driver (merge, rest, recall check) "
            f"{', '.join(f'{v * 1e6:.2f}' for v in result['driver_s_per_vector'].values())} "
            "us a vector"
        )
    print_plan(results["plan"], kinds, args.target)
    write_json(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
