"""xmodal extract --engine ray on a local two-node Ray cluster: the same shards, manifest and error
log as the plain run; a mapper actor killed mid-run and a driver killed mid-run lose nothing and
write nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_cluster import two_node_cluster  # noqa: F401 - the fixture "cluster"
from test_extract import make_image_folder, save_tiny_model, tiny_processor

from xmodal.errors import ExtractError, MissingDependencyError
from xmodal.extract import extract, load_manifest
from xmodal.extract.mapper import MapperOptions
from xmodal.extract.ray_engine import (
    ActorSpec,
    MapperPool,
    actor_spec,
    extract_ray,
    import_ray,
)

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'xmodal[ray]')")

SHARD = 3
VOLATILE = ("created", "updated")  # manifest keys that differ between any two runs


@pytest.fixture(scope="module")
def pool(cluster, setup):
    """One mapper actor per node, shared by the tests (actors take seconds to start)."""
    with MapperPool(setup["model"], MapperOptions(device="cpu")) as actors:
        yield actors


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path) -> dict:
    """A tiny model, an image folder with a broken image, and the plain run's output."""
    root = tmp_path_factory.mktemp("ray")
    processor = tiny_processor(minilm_tokenizer, minilm_path)
    model = save_tiny_model(root / "model", processor)
    data = make_image_folder(root / "data")
    plain = root / "plain"
    plain_run(extract, model, data, plain)
    return {"root": root, "model": model, "data": data, "plain": plain}


def plain_run(run, model: Path, data: Path, out: Path, **kwargs) -> None:
    """Images and texts, then the scored pairs with fused vectors, into one folder."""
    run(model, data, out, shard_size=SHARD, progress=False, **kwargs)
    run(model, data, out, modality="pairs", fused=True, shard_size=SHARD, progress=False, **kwargs)


def assert_same_output(out: Path, plain: Path) -> None:
    """The same shard files with equal tables, the same manifest (but its times) and logs."""
    names = sorted(p.name for p in plain.glob("*.parquet"))
    assert sorted(p.name for p in out.glob("*.parquet")) == names
    assert len(names) == 4 + 7 + 7  # 11 images (one broken), 21 captions, 21 pairs; 3 a shard
    for name in names:
        assert pq.read_table(out / name).equals(pq.read_table(plain / name)), name
    ours, theirs = load_manifest(out), load_manifest(plain)
    for key in VOLATILE:
        ours.pop(key), theirs.pop(key)
    ours["data"] = theirs["data"]  # the same folder, at the same path: kept for clarity
    assert ours == theirs
    assert (out / "errors.jsonl").read_text() == (plain / "errors.jsonl").read_text()
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {(e["modality"], e["shard"]) for e in errors} == {
        ("images", "images-00001.parquet"),
        ("pairs", "pairs-00003.parquet"),
    }
    assert not list(out.glob(".*.tmp"))


def mapper_pids() -> list[int]:
    """Processes of this machine running a mapper actor (Ray titles them ray::MapperActor)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::MapperActor"):
            pids.append(int(entry.name))
    return pids


def only_the_pool_is_left(pool: MapperPool, wait_s: float = 30) -> bool:
    """Whether the mapper actors of other runs are gone (stopping one takes a moment)."""
    deadline = time.monotonic() + wait_s
    while len(mapper_pids()) > len(pool.actors) and time.monotonic() < deadline:
        time.sleep(0.2)
    return len(mapper_pids()) == len(pool.actors)


def test_ray_engine_writes_what_the_plain_run_writes(pool, setup, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    written: list[tuple[str, int]] = []
    record = lambda m, k: written.append((m, k))  # noqa: E731
    plain_run(extract_ray, setup["model"], setup["data"], out, on_shard=record, pool=pool)
    # every shard written once, by the driver, in shard order
    assert written == [
        (m, k) for m, n in (("images", 4), ("texts", 7), ("pairs", 7)) for k in range(n)
    ]
    assert_same_output(out, setup["plain"])
    assert len(pool.actors) == 2  # one per node
    with pytest.raises(ExtractError, match="the Ray pool holds the model"):
        extract_ray(setup["root"] / "another", setup["data"], tmp_path / "x", pool=pool)


def test_a_killed_mapper_actor_loses_nothing(pool, setup, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    first = pool.ray.get(pool.actors[0].pid.remote())

    def kill_an_actor(modality: str, k: int) -> None:
        if (modality, k) == ("images", 0):  # shards 1-3 are queued on the two actors
            os.kill(first, signal.SIGKILL)

    plain_run(extract_ray, setup["model"], setup["data"], out, on_shard=kill_an_actor, pool=pool)
    assert_same_output(out, setup["plain"])
    assert pool.ray.get(pool.actors[0].pid.remote()) != first  # Ray restarted it


# The CLI as a driver process that dies (SIGKILL) right after writing texts shard 1.
DRIVER = """
import os, signal, sys
from xmodal.cli import main
from xmodal.extract import ray_engine

write = ray_engine._write

def write_then_die(run, strategy, k, items, buffer):
    write(run, strategy, k, items, buffer)
    if (strategy.name, k) == ("texts", 1):
        os.kill(os.getpid(), signal.SIGKILL)

ray_engine._write = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_the_driver_is_killed(cluster, pool, setup, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    args = ["extract", "--engine", "ray", "--ray-address", cluster.address, "--ray-actors", "1"]
    args += ["--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out)]
    args += ["--shard-size", str(SHARD), "--device", "cpu"]
    args += ["--backend", "torch", "--precision", "fp32"]  # as MapperOptions()
    script = textwrap.dedent(DRIVER)
    driver = subprocess.run([sys.executable, "-c", script, *args], timeout=180, check=False)
    assert driver.returncode == -signal.SIGKILL
    manifest = load_manifest(out)
    assert [len(r["shards"]) for r in manifest["modalities"].values()] == [4, 2]
    assert not manifest["modalities"]["texts"]["complete"]
    assert only_the_pool_is_left(pool)  # Ray stops the dead driver's actor

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    written: list[tuple[str, int]] = []
    record = lambda m, k: written.append((m, k))  # noqa: E731
    plain_run(extract_ray, setup["model"], setup["data"], out, on_shard=record, pool=pool)
    assert written[:5] == [("texts", k) for k in range(2, 7)]  # only what was missing
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert all(after[name] == stamp for name, stamp in before.items())
    assert_same_output(out, setup["plain"])


# The CLI with decoding in Ray tasks, as a driver whose job's first decode task kills its worker
# (a setup hook each worker process of the job runs); Ray runs the task again.
DECODE_DIES_ONCE = """
import os, sys
import ray
from xmodal.cli import main

MARK, ADDRESS, ARGS = sys.argv[1], sys.argv[2], sys.argv[3:]

def die_in_the_first_decode_task():
    from xmodal.extract import ray_engine
    decode = ray_engine.decode_batch

    def decode_or_die(*args):
        try:
            os.close(os.open(MARK, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return decode(*args)
        os._exit(1)

    ray_engine.decode_batch = decode_or_die

hook = {"worker_process_setup_hook": die_in_the_first_decode_task}
ray.init(address=ADDRESS, log_to_driver=False, runtime_env=hook)
sys.exit(main(ARGS) or main([*ARGS, "--modality", "pairs", "--fused"]))
"""


def test_decode_tasks_retried_after_a_worker_dies(cluster, pool, setup, tmp_path: Path) -> None:
    """--ray-decode-tasks: images (and the pairs' images) decoded by Ray tasks write what the
    plain run writes, although the first task's worker died."""
    out, mark = tmp_path / "ray", tmp_path / "died"
    args = ["extract", "--engine", "ray", "--ray-actors", "1", "--ray-decode-tasks", "2"]
    args += ["--model", str(setup["model"]), "--data", str(setup["data"]), "--out", str(out)]
    args += ["--shard-size", str(SHARD), "--device", "cpu", "--backend", "torch"]
    args += ["--precision", "fp32"]
    script = [sys.executable, "-c", textwrap.dedent(DECODE_DIES_ONCE), str(mark), cluster.address]
    driver = subprocess.run([*script, *args], timeout=300, check=False, capture_output=True)
    assert driver.returncode == 0, driver.stderr.decode()[-2000:]
    assert mark.exists()  # a decode task's worker died
    assert b"sending it again" not in driver.stderr  # Ray ran the task again, not its shard
    assert_same_output(out, setup["plain"])
    assert only_the_pool_is_left(pool)


def test_a_users_error_in_an_actor_is_one_line(cluster, pool, setup, tmp_path, capsys) -> None:
    """An --onnx-dir with no towers fails where the model loads: in the actor under Ray. The CLI
    prints the plain engine's one line, not Ray's error with the actor's traceback."""
    from xmodal.cli import main

    args = ["extract", "--model", str(setup["model"]), "--data", str(setup["data"])]
    args += ["--device", "cpu", "--backend", "onnx", "--onnx-dir", str(tmp_path / "none")]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 2
    plain = capsys.readouterr().err
    assert plain.startswith("xmodal extract: error: ") and str(tmp_path / "none") in plain
    ray_args = ["--engine", "ray", "--ray-address", cluster.address, "--ray-actors", "1"]
    assert main([*args, *ray_args, "--out", str(tmp_path / "ray")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == plain.strip()  # after the progress bar
    assert only_the_pool_is_left(pool)  # the run's actor is stopped


def test_a_removed_node_loses_nothing(cluster, pool, setup, tmp_path: Path) -> None:
    """The last test on the cluster: it leaves the head node alone."""
    out = tmp_path / "ray"
    worker = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)

    def remove_a_node(modality: str, k: int) -> None:
        if (modality, k) == ("images", 0):  # its actor's shards are lost with it
            cluster.remove_node(worker)

    plain_run(extract_ray, setup["model"], setup["data"], out, on_shard=remove_a_node, pool=pool)
    assert_same_output(out, setup["plain"])
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 1


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'xmodal\[ray\]'"):
        import_ray()


def test_ray_options_need_the_ray_engine(capsys) -> None:
    from xmodal.cli import main

    argv = ["extract", "--model", "m", "--data", "d", "--out", "o", "--ray-address", "auto"]
    assert main(argv) == 2
    assert "--ray-address, --ray-actors and --ray-decode-tasks need" in capsys.readouterr().err


def test_decode_tasks_and_workers_are_one_choice(tmp_path: Path) -> None:
    with pytest.raises(ExtractError, match="--workers and --ray-decode-tasks"):
        extract_ray(tmp_path / "m", tmp_path / "d", tmp_path / "o", workers=2, decode_tasks=2)


def test_actor_spec_one_per_gpu_else_one_per_node() -> None:
    cpu, auto = MapperOptions(device="cpu"), MapperOptions(device="auto")
    gpu_nodes = [{"CPU": 16, "GPU": 4}, {"CPU": 48, "GPU": 8}]
    assert actor_spec(gpu_nodes, auto, None) == ActorSpec(12, 4, 1, 4)  # 16 / 4 cores a GPU
    assert actor_spec(gpu_nodes, cpu, None) == ActorSpec(2, 1, 0)
    assert actor_spec(gpu_nodes, auto, None, 4) == ActorSpec(12, 1, 1, 1)  # tasks decode
    assert actor_spec(gpu_nodes, cpu, None, 4) == ActorSpec(2, 1, 0)
    assert actor_spec([{"CPU": 8}] * 3, auto, None) == ActorSpec(3, 1, 0)
    assert actor_spec([{"CPU": 8}] * 3, cpu, 5).count == 5
    with pytest.raises(ExtractError, match="no GPU"):
        actor_spec([{"CPU": 8}], MapperOptions(device="cuda"), None)
    with pytest.raises(ExtractError, match=">= 1"):
        actor_spec([{"CPU": 8}], cpu, 0)
    with pytest.raises(ExtractError, match="decode tasks must be >= 0"):
        actor_spec([{"CPU": 8}], cpu, None, -1)


def test_ray_engine_reads_and_writes_urls(pool, setup, tmp_path: Path) -> None:
    """file:// URLs in and out (the actors read the images through fsspec, the driver writes
    through it): the plain run's rows and logs."""
    from test_extract_urls import same_rows

    data, out = f"file://{setup['data']}", tmp_path / "urls"
    plain_run(extract_ray, setup["model"], data, f"file://{out}", pool=pool)
    same_rows(out, setup["plain"], {data: "DATA", str(setup["data"]): "DATA"})
