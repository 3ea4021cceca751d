"""Memory-budgeted indexes on Parquet shards: build time, peak RSS of build and search,
queries/s and recall@10 against exact search (of queries the index never saw, beside the
``measured_recall`` the build recorded on its held-out rows), for the index a budget picks
vs today's in-memory IVF-Flat (``--kind ivf``), each build and search in its own process. A
budget that cannot reach the target recall is refused by ``xmodal index``; the row then
holds its one-line reason.

``--search-memory-limit 2.25G`` runs each search in a fresh memory cgroup with that hard
limit (Linux, root; page cache counts against it), after evicting the index's files from the
page cache, so the figure shows the speed the index keeps when nothing beyond the budget (plus
the stated overhead) may stay resident.

Shards come from ``bench/synthetic_shards.py`` (the queries are drawn from the same
generator, a stream no shard uses, so they are not in the index):

    python bench/synthetic_shards.py --out /work/scratch/index/1m --count 1000000
    python bench/bench_budget.py --shards /work/scratch/index/1m --work /work/scratch/index/b1m \
        --budget 200M --refine 100 --compare-ivf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_shards import add_arguments, generator_from  # noqa: E402

from xmodal.index.budget import parse_size  # noqa: E402


def sample_rss(pid: int, peaks: dict[str, int], done: threading.Event) -> None:
    """Peak anonymous and file-backed resident memory (KiB) of ``pid``, polled every 0.1 s:
    mapped index files count as RssFile (page cache the kernel can drop), heap as RssAnon."""
    while not done.wait(0.1):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in text.splitlines():
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                peaks[key] = max(peaks.get(key, 0), int(line.split()[1]))


def memory_cgroup(limit: int) -> Path:
    """A fresh memory cgroup limited to ``limit`` bytes (v2 where mounted, else v1)."""
    name = f"xmodal-bench-{os.getpid()}"
    for root, limit_file in (
        (Path("/sys/fs/cgroup"), "memory.max"),
        (Path("/sys/fs/cgroup/unified"), "memory.max"),
        (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
    ):
        if (root / limit_file).exists() or (root / "cgroup.controllers").exists():
            group = root / name
            try:
                group.mkdir(exist_ok=True)
                (group / limit_file).write_text(str(limit))
                return group
            except OSError:
                if group.exists():
                    group.rmdir()
    raise SystemExit("--search-memory-limit needs a writable memory cgroup (Linux, as root)")


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (clean pages only; they are read back)."""
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class Refused(Exception):
    """A build that exited 2: the one-line reason (e.g. the budget cannot reach the target
    recall)."""


def run_child(
    argv: list[str], cgroup: Path | None = None
) -> tuple[float, float, str, dict[str, int]]:
    """Wall seconds, peak RSS (MiB), stdout and peak RssAnon / RssFile (KiB) of a child (in
    ``cgroup`` when given); Refused with its error line when it exits 2."""
    start = time.perf_counter()
    enter = None
    if cgroup is not None:
        procs = cgroup / "cgroup.procs"
        enter = lambda: procs.write_text(str(os.getpid()))  # noqa: E731 (runs in the child)
    errors = tempfile.TemporaryFile("w+")
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=errors, text=True, preexec_fn=enter
    )
    peaks: dict[str, int] = {}
    done = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(child.pid, peaks, done), daemon=True)
    sampler.start()
    out = child.stdout.read() if child.stdout else ""
    done.set()
    sampler.join()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    errors.seek(0)
    error_lines = [line for line in errors.read().splitlines() if "error:" in line]
    errors.close()
    if child.returncode == 2 and error_lines:
        raise Refused(error_lines[-1].split("error: ", 1)[1])
    if child.returncode:
        raise SystemExit(f"{argv} failed ({child.returncode}): {out[-2000:]}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out, peaks


def exact_top(shards: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k positions by streaming over the shards (never all in memory)."""
    from xmodal.index.stream import ShardSource
    from xmodal.index.tuning import HeldOut

    held = HeldOut(np.zeros(0, np.int64), queries, k)
    for batch in ShardSource(shards, "images").batches(65_536, with_ids=False):
        held.update(batch.start, batch.embeddings)
    return held.found


def search_worker(index: str, queries_file: str, out_file: str, repeats: int) -> None:
    """Child: load the index, search the queries ``repeats`` times, save positions, print
    queries/s and the resident memory (anonymous and file-backed) after searching."""
    from xmodal.index import open_index

    queries = np.load(queries_file)
    loaded = open_index(index)
    loaded.search_arrays(queries[:10], 10)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, found = loaded.search_arrays(queries, 10)
        best = min(best, time.perf_counter() - start)
    np.save(out_file, found)
    status = Path("/proc/self/status").read_text()
    rss = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if "Rss" in line}
    print(json.dumps({"qps": len(queries) / best, "rss_kib": rss}))


def human(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--work", type=Path, help="folder for the indexes and queries")
    parser.add_argument("--budget", default="200M", help="--max-index-memory")
    parser.add_argument("--build-memory", default=None, help="--max-build-memory")
    parser.add_argument("--refine", type=int, default=100, help="0: no stored vectors")
    parser.add_argument("--target-recall", default=None, help="xmodal index --target-recall")
    parser.add_argument("--accept-recall", default=None, help="xmodal index --accept-recall")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-ivf", action="store_true", help="also today's IVF-Flat")
    parser.add_argument("--reuse", action="store_true", help="search indexes already built")
    parser.add_argument(
        "--search-memory-limit",
        default=None,
        help="run each search in a memory cgroup with this hard limit (e.g. 2.25G; root)",
    )
    parser.add_argument("--search-worker", nargs=3, help=argparse.SUPPRESS)
    add_arguments(parser)
    args = parser.parse_args()
    if args.search_worker:
        search_worker(*args.search_worker, args.repeats)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.1f} at start (the machine is shared)",
        flush=True,
    )
    queries = generator_from(args).queries(args.queries)
    saved = args.work / "queries.npy"
    exact_file = args.work / "exact.npy"
    if args.reuse and saved.is_file() and exact_file.is_file():
        same = np.array_equal(np.load(saved), queries)
    else:
        same = False
    if same:
        exact = np.load(exact_file)
        print("exact top-10 of the same queries: read from an earlier run", flush=True)
    else:
        np.save(saved, queries)
        start = time.perf_counter()
        exact = exact_top(args.shards, queries)
        np.save(exact_file, exact)
        print(
            f"exact top-10 of {len(queries)} queries, streamed: {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    xmodal = [sys.executable, "-m", "xmodal.cli", "index", "--shards", str(args.shards)]
    runs = {
        f"budget {args.budget}": [
            "--max-index-memory",
            args.budget,
            "--refine",
            str(args.refine),
            *(["--max-build-memory", args.build_memory] if args.build_memory else []),
            *(["--target-recall", args.target_recall] if args.target_recall else []),
            *(["--accept-recall", args.accept_recall] if args.accept_recall else []),
        ],
    }
    if args.compare_ivf:
        runs["today's --kind ivf"] = ["--kind", "ivf"]
    rows = []
    for name, flags in runs.items():
        out = args.work / name.split()[0].strip("'")
        if args.reuse and (out / "index.json").is_file():
            built_s, build_rss, build_peaks = 0.0, 0.0, {"reused": 1}  # not measured here
        else:
            try:
                started = time.perf_counter()
                built_s, build_rss, _, build_peaks = run_child([*xmodal, "--out", str(out), *flags])
            except Refused as refused:  # the budget cannot reach the target recall
                seconds = round(time.perf_counter() - started, 1)
                rows.append({"index": name, "refused": str(refused), "build_s": seconds})
                print(json.dumps(rows[-1]), flush=True)
                continue
        info = json.loads((out / "index.json").read_text())
        found_file = args.work / "found.npy"
        worker = [
            sys.executable,
            __file__,
            "--search-worker",
            str(out),
            str(args.work / "queries.npy"),
            str(found_file),
            "--repeats",
            str(args.repeats),
        ]
        cgroup = None
        if args.search_memory_limit:
            evict(out)
            cgroup = memory_cgroup(parse_size(args.search_memory_limit))
        try:
            _, search_rss, text, search_peaks = run_child(worker, cgroup)
        finally:
            if cgroup is not None:
                cgroup.rmdir()
        report = json.loads(text.strip().splitlines()[-1])
        found = np.load(found_file)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact, strict=True)])
        rows.append(
            {
                "index": name,
                "kind": info["kind"],
                "factory": info.get("plan", {}).get("factory", "IVF,Flat (in memory)"),
                "params": {k: v for k, v in info["params"].items() if k != "factory"},
                "disk_mib": round(human(out), 1),
                "build_s": round(built_s, 1),
                "build_peak_rss_mib": round(build_rss),
                "search_peak_rss_mib": round(search_rss),
                "build_peak_kib": build_peaks,
                "search_peak_kib": search_peaks,
                "search_rss_kib": report["rss_kib"],
                "search_memory_limit": args.search_memory_limit,
                "qps": round(report["qps"]),
                "recall_at_10": round(float(recall), 4),
                "measured_recall": info["params"].get("measured_recall"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
