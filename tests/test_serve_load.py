"""A short run of bench/bench_serve_load.py: the real server (uvicorn) on a loopback port, 100
mixed requests from 8 clients, every status as planned and the server still answering."""

from __future__ import annotations

import importlib.util
import io
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


def test_short_attack_run_keeps_normal_searches_answered(tmp_path: Path) -> None:
    """The attack scenario, short: a tiny model with an active re-rank weight, 2.5 s a phase,
    a few attackers of each kind; the server lives, the honest searches all succeed and every
    attacker gets only a refusal, an answer or a closed connection."""
    from PIL import Image

    bomb = bench_serve_load.bomb_png(5000)
    with Image.open(io.BytesIO(bomb)) as image:  # a real PNG: 25 M pixels, 16-bit RGBA
        assert image.size == (5000, 5000) and image.mode == "RGBA" and len(bomb) < 200_000
    index, model = bench_serve_load.build_tiny_setup(tmp_path, "tiny", rerank_weight=1.0)
    attackers = {"rerank": 2, "bomb": 1, "slow": 2, "disconnect": 3}
    summary = bench_serve_load.attack_bench(
        index, model, tmp_path / "serve.log", seconds=2.5, attackers=attackers, bomb_side=5000,
        server_options=["--header-timeout", "1"], ramp=0.5,
    )  # fmt: skip
    assert summary["server_alive_after"] and summary["server_running_after"]
    assert summary["normal_all_ok"] and summary["unexpected_attacker_outcomes"] == {}
    calm, busy = summary["phases"]["no_attack"], summary["phases"]["attack"]
    for phase in (calm, busy):
        assert phase["normal"]["count"] > 0 and phase["normal"]["outcomes"].keys() == {"200"}
        assert 0 < phase["normal"]["p50_ms"] <= phase["normal"]["p99_ms"]
    assert calm["attackers"] == {} and busy["attackers_still_running"] == 0
    got = {kind: set(tally["outcomes"]) for kind, tally in busy["attackers"].items()}
    assert got["rerank"] & {"200", "503"} and got["bomb"] <= {"413", "422", "503", "closed"}
    assert got["bomb"] & {"413", "422"}  # the bombs are refused, not decoded
    slow = busy["attackers"]["slow"]  # closed by the server's header timeout (1 s), each
    assert got["slow"] == {"closed"} and slow["count"] >= 2 and slow["p50_ms"] >= 900
    assert got["disconnect"] <= bench_serve_load.ATTACK_EXPECTED["disconnect"]
    assert summary["p99_ratio_attack_vs_none"] > 0
