"""xmodal index --engine ray on a local two-node Ray cluster: the rows added in parallel tasks,
the inverted lists merged on disk, the index equal to the one-process build (same lists, ids,
vectors, tuning and search results) for IVF-Flat and IVF-PQ; still equal after a worker is
killed, a node removed, or the driver killed and the command run again (finished parts taken
up, the rest built)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from ray_cluster import two_node_cluster  # noqa: F401 - the fixture "cluster"
from test_index import clustered_vectors, write_fake_shards
from test_index_recall import LIKE

from xmodal.cli import main
from xmodal.errors import IndexBuildError, MissingDependencyError
from xmodal.index import SearchIndex, ShardSource, build_index, ray_engine
from xmodal.index.budget import candidates, pick_nlist
from xmodal.index.build import Limits, build
from xmodal.index.ray_engine import PART_RECORD, RayFill, add_part, finished_part, split

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'xmodal[ray]')")

COUNT, DIM = 6000, 32
VOLATILE = ("created", "updated", "build_seconds", "digest")  # differ between any two builds


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    vectors = clustered_vectors(COUNT, 30, dim=DIM, seed=5)
    shards = write_fake_shards(tmp_path_factory.mktemp("ray") / "emb", vectors, LIKE, 500)
    return {"vectors": vectors, "shards": shards}


def budget_for(kind: str, pq_m: int = 0) -> int:
    plans = candidates(COUNT, DIM, pick_nlist(COUNT, None, DIM))
    return next(p for p in plans if p.kind == kind and p.pq_m == pq_m).index_bytes() + 1024


def inverted_lists(index: faiss.Index) -> list[tuple[list[int], bytes]]:
    """Every list's ids and codes, in list order."""
    ivf = faiss.extract_index_ivf(index)
    out = []
    for number in range(ivf.nlist):
        size = ivf.invlists.list_size(number)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size).tolist() if size else []
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(number), size * ivf.code_size)
        out.append((ids, bytes(codes) if size else b""))
    return out


def described(out: Path) -> dict:
    info = json.loads((out / "index.json").read_text())
    return {k: v for k, v in info.items() if k not in VOLATILE}


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize(("kind", "pq_m", "refine"), [("ivf-flat", 0, 20), ("ivf-pq", 8, 0)])
def test_the_ray_build_is_the_one_process_build(data, tmp_path, monkeypatch, kind, pq_m, refine):
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 1000)  # no exact search at 6,000
    options = {"modality": "texts", "max_index_memory": budget_for(kind, pq_m), "refine": refine}
    options["accept_recall"] = 0.0  # keep whatever the code reaches: equality is the point
    plain = build_index(data["shards"], tmp_path / "plain", **options)
    spread = build_index(data["shards"], tmp_path / "ray", engine="ray", ray_tasks=5, **options)
    assert plain["kind"] == spread["kind"] == kind
    assert described(tmp_path / "plain") == described(tmp_path / "ray")
    one, many = SearchIndex(tmp_path / "plain"), SearchIndex(tmp_path / "ray")
    assert isinstance(
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(many.index).invlists),
        faiss.OnDiskInvertedLists,
    )
    assert inverted_lists(one.index) == inverted_lists(many.index)
    assert sum(len(ids) for ids, _ in inverted_lists(many.index)) == COUNT
    held = [
        np.load(tmp_path / d / i["heldout_file"]) for d, i in (("plain", plain), ("ray", spread))
    ]
    for key in ("positions", "queries", "scores", "found"):
        np.testing.assert_array_equal(held[0][key], held[1][key])
    assert pq.read_table(tmp_path / "ray" / spread["ids_file"]).equals(
        pq.read_table(tmp_path / "plain" / plain["ids_file"])
    )
    if refine:
        assert (tmp_path / "ray" / "vectors.bin").read_bytes() == (
            tmp_path / "plain" / "vectors.bin"
        ).read_bytes()
    queries = data["vectors"][::97]
    np.testing.assert_array_equal(
        many.search_arrays(queries, 10)[1], one.search_arrays(queries, 10)[1]
    )
    assert not list((tmp_path / "ray").glob(".build-*"))


@pytest.mark.usefixtures("cluster")
def test_adding_shards_on_ray_is_adding_them_in_one_process(data, tmp_path, monkeypatch):
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 1000)
    first = write_fake_shards(tmp_path / "a", data["vectors"][:4000], LIKE, 500)
    second = write_fake_shards(tmp_path / "b", data["vectors"][4000:], LIKE, 500, prefix="b")
    options = {"modality": "texts", "max_index_memory": budget_for("ivf-sq8")}
    for out, engine in ((tmp_path / "plain", "plain"), (tmp_path / "ray", "ray")):
        build_index(first, out, **options)
        build_index(second, out, modality="texts", add=True, engine=engine)
    assert described(tmp_path / "plain")["params"] == described(tmp_path / "ray")["params"]
    one, many = SearchIndex(tmp_path / "plain"), SearchIndex(tmp_path / "ray")
    assert one.count == many.count == COUNT
    assert inverted_lists(one.index) == inverted_lists(many.index)


def dies_once(*args, **kwargs):
    """add_part, but the first task to run it leaves a stale file in its part and kills its
    worker process (marked by a file beside the index folder: <tmp>/ray/.build-1/parts/part-0)."""
    folder = Path(args[5])
    marker = folder.parents[3] / "died"
    if not marker.exists():
        marker.touch()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "block-00099.faiss").write_bytes(b"half written")
        os._exit(1)
    return add_part(*args, **kwargs)


@pytest.mark.usefixtures("cluster")
def test_a_worker_killed_mid_run_loses_nothing(data, tmp_path, monkeypatch):
    """The task whose worker dies is run again by Ray; the index is the one-process one."""
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 1000)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    marker = tmp_path / "died"
    options = {"modality": "texts", "max_index_memory": budget_for("ivf-flat")}
    build_index(data["shards"], tmp_path / "plain", **options)

    class Dying(RayFill):
        part_task = staticmethod(dies_once)

    with Dying(tasks=3) as fill:
        info = build(ShardSource(data["shards"], "texts"), tmp_path / "ray", Limits(
            options["max_index_memory"]), fill=fill)  # fmt: skip
    assert marker.exists() and info["count"] == COUNT
    assert described(tmp_path / "plain") == described(tmp_path / "ray")
    one, many = SearchIndex(tmp_path / "plain"), SearchIndex(tmp_path / "ray")
    assert inverted_lists(one.index) == inverted_lists(many.index)


def test_a_retried_part_starts_again(data, tmp_path):
    """A task run twice (its worker died after writing) leaves one copy of its part."""
    source = ShardSource(data["shards"], "texts")
    parts = split(source, 4)
    assert [p.count for p, _ in parts] == [1500] * 4
    assert [first for _, first in parts] == [0, 1500, 3000, 4500]
    plan = candidates(COUNT, DIM, 16)[1]  # IVF16,Flat
    trained = faiss.index_factory(DIM, plan.factory(), faiss.METRIC_INNER_PRODUCT)
    trained.train(data["vectors"][:2000])
    shared = faiss.serialize_index(trained)
    part, start = parts[1]
    folder = tmp_path / "part"
    inputs = {"first": start, "quantizer": "q1"}
    once = add_part(plan, shared, part, start, 256, str(folder), None, True, "float32", inputs)
    (folder / "stale.faiss").write_bytes(b"left by the killed run")
    again = add_part(plan, shared, part, start, 256, str(folder), None, True, "float32", inputs)
    assert once == again and again["added"] == 1500 and not (folder / "stale.faiss").exists()
    assert pq.read_table(folder / again["ids"]).column("id").to_pylist()[0] == "v1500"
    assert (folder / again["vectors"]).stat().st_size == 1500 * DIM * 4
    assert json.loads((folder / PART_RECORD).read_text()) == again
    assert finished_part(folder, inputs) == again  # a rerun takes it up
    assert finished_part(folder, {**inputs, "quantizer": "q2"}) is None  # another quantizer
    (folder / again["blocks"][0]).unlink()
    assert finished_part(folder, inputs) is None  # a file of it is missing
    (folder / PART_RECORD).write_text("{")
    assert finished_part(folder, inputs) is None  # a torn record: never written so


def test_bad_engine_options_are_one_line_errors(data, tmp_path, capsys, monkeypatch):
    base = ["index", "--shards", str(data["shards"]), "--out", str(tmp_path / "i")]
    assert main([*base, "--modality", "texts", "--ray-tasks", "2"]) == 2
    assert "--ray-address and --ray-tasks need --engine ray" in capsys.readouterr().err
    assert main([*base, "--modality", "texts", "--engine", "ray"]) == 2
    assert "give --max-index-memory" in capsys.readouterr().err
    with pytest.raises(IndexBuildError, match="--ray-tasks must be >= 1"):
        RayFill(tasks=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'xmodal\[ray\]'"):
        build_index(data["shards"], tmp_path / "i", modality="texts", max_index_memory="1G",
                    engine="ray")  # fmt: skip
    assert not (tmp_path / "i").exists()


# The CLI as a driver process killed (SIGKILL) mid-build: parts 0 and 1 finish; the task of
# part 2 or 3 writes half a block, waits for their records, then kills the driver (parts 2 and 3
# never finish).
DRIVER_KILLED = """
import os, signal, sys, time
from pathlib import Path
from xmodal.cli import main
from xmodal.index import budget, ray_engine

budget.FLAT_MAX = 1000
DRIVER = os.getpid()
add = ray_engine.add_part

def add_or_kill_the_driver(*args, **kwargs):
    folder = Path(args[5])
    if int(folder.name.split("-")[1]) < 2:
        return add(*args, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "block-00000.faiss").write_bytes(b"half written")
    records = [folder.parent / f"part-{n:05d}" / "part.json" for n in range(2)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in records) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(DRIVER, signal.SIGKILL)
    time.sleep(600)

ray_engine.RayFill.part_task = staticmethod(add_or_kill_the_driver)
sys.exit(main(sys.argv[1:]))
"""


def runs_and_marks(*args, **kwargs):
    """add_part, marking which part ran in <tmp>/ran (<tmp>/ray/.build-1/parts/part-N)."""
    folder = Path(args[5])
    (folder.parents[3] / "ran" / folder.name).touch()
    return add_part(*args, **kwargs)


@pytest.mark.parametrize(("kind", "pq_m"), [("ivf-flat", 0), ("ivf-pq", 8)])
def test_resume_after_the_driver_is_killed(cluster, data, tmp_path, monkeypatch, kind, pq_m):
    """The same command run again reads the trained quantizer back, takes up the parts the
    killed run finished, builds the rest and clears what matches nothing: the index is the
    one-process build's, and the work folder is gone."""
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 1000)
    budget = budget_for(kind, pq_m)
    options = {"modality": "texts", "max_index_memory": budget, "accept_recall": 0.0}
    plain = build_index(data["shards"], tmp_path / "plain", **options)
    out = tmp_path / "ray"
    args = ["index", "--shards", str(data["shards"]), "--out", str(out), "--modality", "texts"]
    args += ["--max-index-memory", str(budget), "--accept-recall", "0", "--engine", "ray"]
    args += ["--ray-address", cluster.address, "--ray-tasks", "4"]
    script = [sys.executable, "-c", textwrap.dedent(DRIVER_KILLED), *args]
    driver = subprocess.run(script, timeout=240, check=False, capture_output=True)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.decode()[-2000:]
    assert not (out / "index.json").exists()
    (work,) = out.glob(".build-*")
    parts = work / "parts"
    assert (parts / "part-00000" / PART_RECORD).is_file()
    assert (parts / "part-00001" / PART_RECORD).is_file()
    unfinished = [parts / f"part-{n:05d}" for n in (2, 3)]
    assert any((folder / "block-00000.faiss").is_file() for folder in unfinished)
    assert not any((folder / PART_RECORD).exists() for folder in unfinished)
    assert (work / "quantizer" / "trained.faiss").is_file()
    (parts / "part-00009").mkdir()  # a part of another split: cleared
    (parts / "part-00009" / "block-00000.faiss").write_bytes(b"stale")

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    (tmp_path / "ran").mkdir()
    monkeypatch.setattr(RayFill, "part_task", staticmethod(runs_and_marks))
    seen: list[list[str]] = []
    remove = ray_engine._remove_other_parts

    def remove_and_look(folder: Path, keep: set[str]) -> None:
        remove(folder, keep)
        seen.append(sorted(p.name for p in folder.iterdir()))

    monkeypatch.setattr(ray_engine, "_remove_other_parts", remove_and_look)
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "ran").iterdir()) == ["part-00002", "part-00003"]
    (left,) = seen  # what the rerun found once parts of other splits were cleared
    assert {"part-00000", "part-00001"} <= set(left) <= {f"part-0000{n}" for n in range(4)}
    assert not list(out.glob(".build-*"))
    assert described(tmp_path / "plain") == described(out)
    assert plain["kind"] == kind
    one, many = SearchIndex(tmp_path / "plain"), SearchIndex(out)
    assert inverted_lists(one.index) == inverted_lists(many.index)
    assert pq.read_table(out / many.info["ids_file"]).equals(
        pq.read_table(tmp_path / "plain" / plain["ids_file"])
    )


def test_a_part_of_other_inputs_is_built_again(cluster, data, tmp_path, monkeypatch):
    """A finished part left by a run on other shards (a record that does not match) is built
    again, and a failed build keeps its finished parts for the rerun."""
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 1000)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    (tmp_path / "ran").mkdir()
    options = {"modality": "texts", "max_index_memory": budget_for("ivf-flat")}
    out = tmp_path / "ray"

    class Marking(RayFill):
        part_task = staticmethod(runs_and_marks)

    def tune_fails(*args, **kwargs):
        raise KeyboardInterrupt  # as if interrupted after the rows were added

    source = ShardSource(data["shards"], "texts")
    limits = Limits(options["max_index_memory"])
    with monkeypatch.context() as patched:
        patched.setattr("xmodal.index.build._tune", tune_fails)
        with Marking(tasks=3) as fill, pytest.raises(KeyboardInterrupt):
            build(source, out, limits, fill=fill)
    (work,) = out.glob(".build-*")
    assert sorted(p.name for p in work.iterdir()) == ["parts", "quantizer"]
    assert len(list((work / "parts").glob("*/part.json"))) == 3
    record = json.loads((work / "parts" / "part-00001" / PART_RECORD).read_text())
    record["inputs"]["shards"][0]["rows"] += 1  # as if that shard had been written again
    (work / "parts" / "part-00001" / PART_RECORD).write_text(json.dumps(record))
    for marker in (tmp_path / "ran").iterdir():
        marker.unlink()
    with Marking(tasks=3) as fill:
        info = build(source, out, limits, fill=fill)
        assert fill.taken_up == [0, 2]
    assert [p.name for p in (tmp_path / "ran").iterdir()] == ["part-00001"]
    assert info["count"] == COUNT and not list(out.glob(".build-*"))
    build_index(data["shards"], tmp_path / "plain", **options)
    assert described(tmp_path / "plain") == described(out)
    one, many = SearchIndex(tmp_path / "plain"), SearchIndex(out)
    assert inverted_lists(one.index) == inverted_lists(many.index)


def waits_for_go(*args, **kwargs):
    """add_part, once <tmp>/signals/go exists; each task first marks its part and node there."""
    folder = Path(args[5])
    signals = folder.parents[3] / "signals"
    (signals / f"{folder.name}@{ray.get_runtime_context().get_node_id()}").touch()
    deadline = time.monotonic() + 60
    while not (signals / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return add_part(*args, **kwargs)


def test_a_removed_node_loses_nothing(cluster, data, tmp_path, monkeypatch):
    """The worker node is removed while a task runs on it: Ray runs its tasks again on the
    head node, and the index is the one-process one. The last test on the cluster."""
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 1000)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    options = {"modality": "texts", "max_index_memory": budget_for("ivf-pq", 8)}
    options["accept_recall"] = 0.0
    build_index(data["shards"], tmp_path / "plain", **options)
    signals = tmp_path / "signals"
    signals.mkdir()
    worker = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    removed: list[str] = []

    def remove_when_a_task_runs_there() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(p.name.endswith(f"@{worker.node_id}") for p in signals.iterdir()):
                cluster.remove_node(worker)
                removed.append(worker.node_id)
                break
            time.sleep(0.05)
        (signals / "go").touch()

    class Waiting(RayFill):
        part_task = staticmethod(waits_for_go)

    remover = threading.Thread(target=remove_when_a_task_runs_there)
    remover.start()
    try:
        with Waiting(tasks=4) as fill:
            build(ShardSource(data["shards"], "texts"), tmp_path / "ray", Limits(
                options["max_index_memory"]), accept=0.0, fill=fill)  # fmt: skip
    finally:
        remover.join()
    assert removed and sum(1 for n in ray.nodes() if n["Alive"]) == 1
    assert described(tmp_path / "plain") == described(tmp_path / "ray")
    one, many = SearchIndex(tmp_path / "plain"), SearchIndex(tmp_path / "ray")
    assert inverted_lists(one.index) == inverted_lists(many.index)
