"""Search throughput: exact (flat) vs the approximate index xmodal picks, on synthetic vectors.

For each size and data kind (uniform random on the sphere; gaussian clusters), builds a flat
inner-product index and, with ``xmodal index --kind`` from shards written to a temporary
folder, xmodal's IVF (nlist ~ 4 sqrt(N), nprobe tuned to recall@10 >= 0.95 on held-out rows of
the data), optionally HNSW, and measures on held-out queries from the same distribution:
queries/s (one batch), single-query latency and recall@10 against exact search.

    python bench/bench_search.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from xmodal.index import (
    FLAT_MAX,
    IVF_MAX_PROBE_FRACTION,
    SearchIndex,
    build_index,
    neighbour_recall,
)
from xmodal.shards import MANIFEST_FORMAT, save_manifest, shard_name, write_shard

SHARD_ROWS = 100_000


def write_shards(out: Path, data: np.ndarray) -> Path:
    """``data`` as the texts shards of an extraction folder (ids = row numbers)."""
    shards = []
    for number, start in enumerate(range(0, len(data), SHARD_ROWS)):
        part = data[start : start + SHARD_ROWS]
        ids = [str(i) for i in range(start, start + len(part))]
        write_shard(out / shard_name("texts", number), ids, ids, part, "float32")
        name = shard_name("texts", number)
        shards.append({"index": number, "file": name, "rows": len(part), "failed": 0})
    texts = {"items": len(data), "num_shards": len(shards), "shards": shards}
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": {"id": "bench", "weights_hash": "0" * 64},
        "processor_hash": "bench",
        "created": "bench",
        "dim": data.shape[1],
        "dtype": "float32",
        "normalised": True,
        "shard_size": SHARD_ROWS,
        "modalities": {"texts": texts},
    }
    save_manifest(out, manifest)
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def random_data(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the unit sphere: the worst case for any partitioning index."""
    return normalise(rng.standard_normal((count, dim), dtype=np.float32))


def clustered_data(
    count: int, dim: int, rng: np.random.Generator, centres: np.ndarray, spread: float
) -> np.ndarray:
    """Points around random unit centres; the noise norm is about ``spread``."""
    owner = rng.integers(0, len(centres), count)
    data = rng.standard_normal((count, dim), dtype=np.float32)
    data *= spread / np.sqrt(dim)
    data += centres[owner]
    return normalise(data)


def make(kind: str, count: int, queries: int, args: argparse.Namespace):
    rng = np.random.default_rng(args.seed)
    if kind == "random":
        return random_data(count, args.dim, rng), random_data(queries, args.dim, rng)
    centres = random_data(args.clusters, args.dim, rng)
    data = clustered_data(count, args.dim, rng, centres, args.spread)
    return data, clustered_data(queries, args.dim, rng, centres, args.spread)


def throughput(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, repeats: int):
    """Best-of-``repeats`` queries/s over one batch, the ids found, and median latency (ms)."""
    search(queries[:10])  # warm up
    best, found = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        found = search(queries)
        best = min(best, time.perf_counter() - start)
    singles = []
    for row in queries[:50]:
        start = time.perf_counter()
        search(row[None])
        singles.append(time.perf_counter() - start)
    return len(queries) / best, found, 1000 * float(np.median(singles))


def run(kind: str, count: int, args: argparse.Namespace) -> list[dict]:
    print(f"\n== {count:,} x {args.dim} {kind} vectors ==", flush=True)
    data, queries = make(kind, count, args.queries, args)
    rows = []

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(data)
    built = time.perf_counter() - start
    qps, exact, latency = throughput(lambda q: flat.search(q, 10)[1], queries, args.repeats)
    rows.append(row(count, kind, "flat", "exact", built, qps, latency, 1.0))
    print(format_row(rows[-1], qps), flush=True)
    flat.reset()  # free its memory before the next index

    with tempfile.TemporaryDirectory() as work:
        shards = write_shards(Path(work) / "shards", data)
        for index_kind in args.indexes:
            start = time.perf_counter()
            info = build_index(shards, Path(work) / index_kind, kind=index_kind, modality="texts")
            built = time.perf_counter() - start
            index = SearchIndex(Path(work) / index_kind).index  # searched at its tuned depth
            found_qps, found, latency = throughput(
                lambda q, i=index: i.search(q, 10)[1], queries, args.repeats
            )
            recall = neighbour_recall(found, exact, 10)
            described = describe(info)
            rows.append(row(count, kind, index_kind, described, built, found_qps, latency, recall))
            print(format_row(rows[-1], qps), flush=True)
            if index_kind == "ivf":
                rejected = "ivf_rejected" in info["params"]
                picked = "flat" if count < FLAT_MAX or rejected else "ivf"
                print(f"   auto picks: {picked}", flush=True)
                rows[-1]["auto"] = picked
            del index
    for r in rows:
        r["ratio"] = r["qps"] / qps
    return rows


def describe(info: dict) -> str:
    params = info["params"]
    if info["kind"] == "ivf":
        return f"nlist={params['nlist']} nprobe={params['nprobe']}"
    if info["kind"] == "hnsw":
        return f"M={params['M']} efSearch={params['efSearch']}"
    return "exact"


def row(count, kind, index, params, built, qps, latency, recall) -> dict:
    return {
        "size": count,
        "data": kind,
        "index": index,
        "params": params,
        "build_s": built,
        "qps": qps,
        "latency_ms": latency,
        "recall": recall,
    }


HEADER = (
    f"{'vectors':>9}  {'data':<9}  {'index':<5}  {'params':<24}  {'build s':>8}  "
    f"{'queries/s':>9}  {'vs flat':>7}  {'1-query ms':>10}  {'recall@10':>9}  auto"
)


def format_row(r: dict, flat_qps: float) -> str:
    return (
        f"{r['size']:>9,}  {r['data']:<9}  {r['index']:<5}  {r['params']:<24}  "
        f"{r['build_s']:>8.1f}  {r['qps']:>9,.0f}  {r['qps'] / flat_qps:>6.1f}x  "
        f"{r['latency_ms']:>10.2f}  {r['recall']:>9.3f}  {r.get('auto', '')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--data", nargs="+", choices=("random", "clustered"), default=["random", "clustered"]
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries per run")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="cluster noise norm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--indexes",
        nargs="*",
        choices=("ivf", "hnsw"),
        default=["ivf"],
        help="approximate indexes to compare with flat (HNSW is slow to build); none: flat only",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="faiss threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"auto: flat below {FLAT_MAX:,} vectors or when IVF needs > "
        f"{IVF_MAX_PROBE_FRACTION:.0%} of its lists"
    )
    rows = []
    for count in args.sizes:
        for kind in args.data:
            rows += run(kind, count, args)
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r, r["qps"] / r["ratio"]))


if __name__ == "__main__":
    main()
