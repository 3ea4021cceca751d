"""A short run of bench/bench_serve_load.py: the real server (uvicorn) on a loopback port, 100
mixed requests from 8 clients, every status as planned and the server still answering."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_serve_load.py"
spec = importlib.util.spec_from_file_location("bench_serve_load", BENCH)
bench_serve_load = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench_serve_load  # its dataclasses look their module up
spec.loader.exec_module(bench_serve_load)


def test_plan_is_seeded_and_mixed() -> None:
    first, again = bench_serve_load.plan(200, seed=3), bench_serve_load.plan(200, seed=3)
    assert [(r.kind, r.path) for r in first] == [(r.kind, r.path) for r in again]
    assert set(r.kind for r in first) == set(bench_serve_load.MIX)
    assert {r.expected for r in first} == {200, 400, 413, 422}


def test_short_load_run_has_no_errors(tmp_path: Path, tiny_model_dir: str) -> None:
    index, model = bench_serve_load.build_tiny_setup(tmp_path, tiny_model_dir)
    summary = bench_serve_load.bench(index, model, 100, 8, seed=5, log=tmp_path / "serve.log")
    assert summary["errors"] == 0, summary["first_errors"]
    planned = Counter(str(r.expected) for r in bench_serve_load.plan(100, seed=5))
    assert summary["statuses"] == dict(planned)
    assert summary["server_alive_after"] and summary["server_running_after"]
    assert summary["requests_per_s"] > 0 and 0 < summary["p50_ms"] <= summary["p99_ms"]
