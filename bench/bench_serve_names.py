"""Serving a large index: start-up time and resident memory of the names the service shows
(``xmodal.serve.public.PublicNames``: names computed per position, the public id -> position
hash table) and the cost of a lookup, each start in its own process.

A cold start builds the table (one pass over the ids file) and saves it beside the index; a
warm start maps the saved table. Rounds alternate cold and warm starts (the machine may be
shared: compare within one run):

    python bench/bench_serve_names.py --index /work/scratch/index/b1m/budget --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_budget import run_child  # noqa: E402


def anon_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon"))


def worker(index_dir: str, cold: bool, lookups: int) -> None:
    """Child: open the index, build or map the names, look up random public ids; print JSON."""
    from xmodal.index import open_index
    from xmodal.serve.public import TABLE_PREFIX, PublicNames

    index = open_index(index_dir)
    if cold:
        for old in Path(index_dir).glob(f"{TABLE_PREFIX}-*"):
            old.unlink()
    before = anon_kib()
    start = time.perf_counter()
    names = PublicNames(index)
    started = time.perf_counter() - start
    grown = anon_kib() - before
    picks = np.random.default_rng(0).integers(0, index.count, lookups)
    shown = [names.ids[int(p)] for p in picks]
    start = time.perf_counter()
    for position, public_id in zip(picks, shown, strict=True):
        if names.position(public_id) != int(position):
            raise SystemExit(f"{public_id!r} found at {names.position(public_id)}, not {position}")
    lookup_s = (time.perf_counter() - start) / lookups
    start = time.perf_counter()
    for position in picks[:100]:
        names.result({"score": 1.0}, int(position))
    result_s = (time.perf_counter() - start) / 100
    print(
        json.dumps(
            {
                "start_s": round(started, 3),
                "rss_anon_growth_mib": round(grown / 1024, 1),
                "lookup_ms": round(1000 * lookup_s, 3),
                "result_ms": round(1000 * result_s, 3),
                "table_mapped": isinstance(names.hashes, np.memmap),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="index folder (or a sharded index)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lookups", type=int, default=1000, help="random public ids per start")
    parser.add_argument("--worker", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.index, args.worker == "cold", args.lookups)
        return
    from xmodal.index import open_index

    count = open_index(args.index).count
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.1f} at start; index of {count:,} items",
        flush=True,
    )
    rows: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(args.rounds):
        for mode in ("cold", "warm"):
            argv = [sys.executable, __file__, "--index", args.index, "--worker", mode]
            _, peak_mib, out, _ = run_child([*argv, "--lookups", str(args.lookups)])
            row = json.loads(out.strip().splitlines()[-1]) | {"peak_rss_mib": round(peak_mib)}
            rows[mode].append(row)
            print(mode, json.dumps(row), flush=True)
    for mode, runs in rows.items():
        medians = {
            key: statistics.median(r[key] for r in runs)
            for key in ("start_s", "rss_anon_growth_mib", "lookup_ms", "result_ms", "peak_rss_mib")
        }
        print(f"median {mode}: {json.dumps(medians)}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
