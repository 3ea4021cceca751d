"""xmodal index --engine ray on a local two-node Ray cluster: the rows added in parallel tasks,
the inverted lists merged on disk, the index equal to the one-process build (same lists, ids,
vectors, tuning and search results) for IVF-Flat and IVF-PQ."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_extract_ray import cluster  # noqa: F401 - the two-node cluster fixture
from test_index import clustered_vectors, write_fake_shards
from test_index_recall import LIKE

from xmodal.cli import main
from xmodal.errors import IndexBuildError, MissingDependencyError
from xmodal.index import SearchIndex, ShardSource, build_index
from xmodal.index.budget import candidates, pick_nlist
from xmodal.index.build import Limits, build
from xmodal.index.ray_engine import RayFill, add_part, split

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
    worker process (marked by a file beside the index folder: <tmp>/ray/.build-1/part-0)."""
    folder = Path(args[5])
    marker = folder.parents[2] / "died"
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
    once = add_part(plan, shared, part, start, 256, str(folder), None, True, "float32")
    (folder / "stale.faiss").write_bytes(b"left by the killed run")
    again = add_part(plan, shared, part, start, 256, str(folder), None, True, "float32")
    assert once["added"] == again["added"] == 1500 and not (folder / "stale.faiss").exists()
    assert pq.read_table(again["ids"]).column("id").to_pylist()[0] == "v1500"
    assert Path(again["vectors"]).stat().st_size == 1500 * DIM * 4


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
