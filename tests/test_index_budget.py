"""Memory-budgeted indexes: the budget's choice, each kind it picks, exact re-ranking, on-disk
lists, ids read by position, sharded search, --add and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from test_index import clustered_vectors, write_fake_shards

from xmodal.cli import main
from xmodal.errors import IncompatibleError, IndexBuildError, InputError, MissingFileError
from xmodal.index import (
    IndexPlan,
    SearchIndex,
    ShardedIndex,
    build,
    build_index,
    combine_indexes,
    format_size,
    open_index,
    parse_size,
    plan_index,
    store,
)
from xmodal.index.budget import batch_rows, candidates, pick_nlist, process_memory
from xmodal.index.build import choose_opq, column_variance

LIKE = {
    "format": "xmodal.embeddings/1",
    "model": {"id": "m", "weights_hash": "0" * 64},
    "processor_hash": "p",
    "created": "x",
}
DIM = 32


def make_data(root: Path, count: int) -> dict:
    vectors = clustered_vectors(count, 30, dim=DIM, seed=5)
    shards = write_fake_shards(root, vectors, LIKE, shard_size=1000)
    rng = np.random.default_rng(9)
    queries = vectors[rng.choice(count, 60, replace=False)] + 0.05 * rng.standard_normal((60, DIM))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    faiss.normalize_L2(queries)
    exact = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    return {"vectors": vectors, "shards": shards, "queries": queries, "exact": exact}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_data(tmp_path_factory.mktemp("budget") / "emb", 3000)


@pytest.fixture(scope="module")
def pq_data(tmp_path_factory) -> dict:
    """Enough vectors that 8-byte PQ codes (+ their codebooks) beat 4-bit SQ in size."""
    return make_data(tmp_path_factory.mktemp("budget_pq") / "emb", 12_000)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact, strict=True)]))


def budget_for(kind: str, count: int = 3000, dim: int = DIM, pq_m: int = 0) -> int:
    plans = [p for p in candidates(count, dim, pick_nlist(count, None, dim)) if p.kind == kind]
    plans = [p for p in plans if p.pq_m == pq_m]
    return plans[0].index_bytes() + 1024


def test_parse_size_and_plan_choice() -> None:
    assert parse_size("2G") == 2 << 30 and parse_size("512m") == 512 << 20
    assert parse_size("1.5KiB") == 1536 and parse_size(4096) == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(IndexBuildError):
            parse_size(bad)
    # 10M x 512-d under 2 GiB: 4 bytes per dimension do not fit, PQ128 (136 B/vector) does
    plan = plan_index(10_000_000, 512, 2 << 30)
    assert (plan.kind, plan.pq_m, plan.nlist) == ("ivf-pq", 128, 4096)
    assert plan.index_bytes() <= 2 << 30 < IndexPlan("ivf-sq4", 10**7, 512, 4096).index_bytes()
    assert plan_index(10_000, 512, 1 << 30).kind == "flat"  # small: exact while it fits
    assert plan_index(1_000_000, 512, 3 << 30).kind == "ivf-flat"
    assert plan_index(1_000_000, 512, 600 << 20).kind == "ivf-sq8"
    assert plan_index(1_000_000, 512, 300 << 20).kind == "ivf-sq4"
    # sizes: flat 4 B/dim; IVF adds an 8-byte id per vector and the centroids
    assert IndexPlan("flat", 100, 8).index_bytes() == 3200
    ivf = IndexPlan("ivf-sq8", 1000, 64, 16)
    assert ivf.index_bytes() == 1000 * (64 + 8) + 16 * (64 * 4 + 64) + 2 * 4 * 64


def test_too_small_budgets_are_refused_up_front(data, tmp_path: Path, capsys) -> None:
    with pytest.raises(IndexBuildError, match=r"too small .* needs 3\.1G"):
        plan_index(200_000_000, 512, 1 << 30)
    argv = ["index", "--shards", str(data["shards"]), "--out", str(tmp_path / "i")]
    assert main([*argv, "--modality", "texts", "--max-index-memory", "20K"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-index-memory 20K is too small for 3,000 32-d vectors" in err
    smallest = min(candidates(3000, DIM, 64), key=lambda p: p.index_bytes())
    assert f"({smallest.factory()}, {smallest.code_size} bytes per vector + 8" in err
    assert err.endswith(f"needs {format_size(smallest.index_bytes())}")
    assert not (tmp_path / "i").exists()
    with pytest.raises(IndexBuildError, match="--max-build-memory 1M is too small"):
        plan_index(1_000_000, 512, 1 << 30, max_build_memory=1 << 20)


def test_opq_check_copies_no_training_sample() -> None:
    """The OPQ check's per-column variance equals numpy's, and it allocates a fraction of the
    sample (at 10M vectors the sample is 512 MiB; two full copies of it broke the budget)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((200_000, 64), dtype=np.float32) * np.linspace(0.2, 3, 64)
    sample = sample.astype(np.float32)
    np.testing.assert_allclose(column_variance(sample), sample.astype(np.float64).var(axis=0))
    plan = IndexPlan("ivf-pq", 1_000_000, 64, 256, pq_m=8)
    tracemalloc.start()
    chosen, check = choose_opq(plan, sample, 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < sample.nbytes / 2
    assert chosen.opq and check["slice_variance_max_over_mean"] > 1.5  # uneven slices


def test_the_build_budget_counts_the_process_itself(data, tmp_path: Path) -> None:
    """Memory the process already holds (interpreter, libraries) leaves less for batches; a
    budget it eats is refused naming what the process holds; index.json records it."""
    assert process_memory() > 10 << 20  # a Python process with numpy and faiss loaded
    plan = plan_index(10_000_000, 512, 2 << 30, 2 << 30)
    spare_rows = batch_rows(plan, 2 << 30)
    assert batch_rows(plan, 2 << 30, reserved=200 << 20) < spare_rows
    per_row = 10 * 512 + plan.code_size + 8 + 8 * plan.nlist
    assert spare_rows - batch_rows(plan, 2 << 30, 200 << 20) == pytest.approx(
        (200 << 20) / per_row, abs=1
    )
    assert plan_index(10_000_000, 512, 2 << 30, 2 << 30, reserved=1 << 29) == plan
    with pytest.raises(IndexBuildError, match=r"needs 2\.[0-9]G, 1\.5G of it this process"):
        plan_index(10_000_000, 512, 2 << 30, 2 << 30, reserved=3 << 29)
    info = build_index(
        data["shards"],
        tmp_path / "i",
        modality="texts",
        max_index_memory="130K",
        max_build_memory=process_memory() + (512 << 20),  # whatever the suite holds, plus room
    )
    assert info["budget"]["process_bytes"] > 10 << 20


@pytest.mark.parametrize(
    ("kind", "pq_m"), [("flat", 0), ("ivf-flat", 0), ("ivf-sq8", 0), ("ivf-sq4", 0), ("ivf-pq", 8)]
)
def test_each_kind_the_budget_picks(
    request, tmp_path: Path, monkeypatch, kind: str, pq_m: int
) -> None:
    data = request.getfixturevalue("pq_data" if kind == "ivf-pq" else "data")
    count = len(data["vectors"])
    monkeypatch.setattr("xmodal.index.budget.FLAT_MAX", 5000 if kind == "flat" else 1000)
    budget = budget_for(kind, count, pq_m=pq_m)
    info = build_index(
        data["shards"], tmp_path / "i", modality="texts", max_index_memory=budget, refine=40
    )
    assert info["kind"] == kind and info["count"] == count
    assert info["budget"]["index_bytes"] <= budget
    params = info["params"]
    assert {"recall_at_1", "recall_at_10", "recall_at_100"} <= set(params)
    loaded = SearchIndex(tmp_path / "i")
    found = loaded.search_arrays(data["queries"], 10)[1]
    assert recall(found, data["exact"]) >= 0.9
    if kind != "flat":
        assert params["recall_at_10"] >= 0.95 and 1 <= params["nprobe"] <= params["nlist"]
        assert params["tuning_queries"] == min(500, count // 10)
        lists = faiss.extract_index_ivf(loaded.index).invlists
        assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    if kind == "ivf-pq":
        assert info["plan"]["pq_m"] == 8 and info["plan"]["code_bytes"] == 8


def test_heldout_queries_are_not_searched(data, tmp_path: Path) -> None:
    """The tuning queries are rows of the data; the exact neighbours and every tuning search
    skip them, so a query never finds itself."""
    info = build_index(
        data["shards"], tmp_path / "i", modality="texts", max_index_memory=budget_for("ivf-sq8")
    )
    held = build.HeldOut.load(tmp_path / "i" / info["heldout_file"])
    assert len(held.positions) == 300
    assert not np.isin(held.found, held.positions).any()
    vectors = data["vectors"]
    np.testing.assert_allclose(held.queries, vectors[held.positions], atol=1e-6)
    keep = np.setdiff1d(np.arange(3000), held.positions)
    _, exact = faiss.knn(held.queries, vectors[keep], 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(held.found[:, :10], keep[exact])


def test_refine_improves_recall_of_pq(pq_data, tmp_path: Path) -> None:
    data = pq_data
    budget = budget_for("ivf-pq", 12_000, pq_m=8)
    build_index(
        data["shards"], tmp_path / "i", modality="texts", max_index_memory=budget, refine=50
    )
    loaded = SearchIndex(tmp_path / "i")
    nlist = loaded.info["params"]["nlist"]
    plain = loaded.search_arrays(data["queries"], 10, nprobe=nlist, refine=0)
    refined = loaded.search_arrays(data["queries"], 10, nprobe=nlist, refine=50)
    assert recall(refined[1], data["exact"]) > recall(plain[1], data["exact"]) + 0.1
    assert recall(refined[1], data["exact"]) >= 0.98
    # refined scores are exact inner products, best first
    rows = data["vectors"][refined[1]]
    exact_scores = np.einsum("qkd,qd->qk", rows, data["queries"])
    np.testing.assert_allclose(refined[0], exact_scores, atol=1e-5)
    assert (np.diff(refined[0], axis=1) <= 1e-7).all()


def test_on_disk_lists_round_trip_and_move(data, tmp_path: Path) -> None:
    budget = budget_for("ivf-sq8")
    build_index(data["shards"], tmp_path / "i", modality="texts", max_index_memory=budget)
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "i", moved)  # the lists file is found beside the index file
    loaded = SearchIndex(moved)
    nlist = loaded.info["params"]["nlist"]
    rows = np.arange(0, 3000, 97)
    hits = loaded.search(data["vectors"][rows], 1, nprobe=nlist)
    assert [h[0][0] for h in hits] == list(rows)
    sizes = [loaded.index.invlists.list_size(i) for i in range(nlist)]
    assert sum(sizes) == 3000


def test_ids_are_read_from_parquet_by_position(data, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store, "ID_ROW_GROUP", 128)
    build_index(data["shards"], tmp_path / "i", modality="texts", max_index_memory="100M")
    loaded = SearchIndex(tmp_path / "i")
    assert loaded.ids_file.file.metadata.num_row_groups == 3 * 8  # 1000 rows / 128 per shard
    assert loaded.ids[0] == "v0" and loaded.ids[2999] == "v2999" and loaded.ids[-1] == "v2999"
    assert loaded.ids[1279] == "v1279" and loaded.image_ids[1500] == "v1500"
    assert loaded.ids[126:130] == ["v126", "v127", "v128", "v129"]
    assert loaded.locations[7] is None
    assert len(loaded.ids_file._cache) == 6  # only the 6 (column, row group) pairs asked for
    assert list(loaded.ids) == [f"v{i}" for i in range(3000)]
    with pytest.raises(IndexError):
        loaded.ids[3000]


def test_sharded_search_equals_one_index_over_the_union(data, tmp_path: Path) -> None:
    vectors = data["vectors"]
    a = write_fake_shards(tmp_path / "a", vectors[:1800], LIKE, shard_size=900, prefix="a")
    b = write_fake_shards(tmp_path / "b", vectors[1800:], LIKE, shard_size=900, prefix="b")
    for name, shards in (("ia", a), ("ib", b)):
        build_index(shards, tmp_path / name, modality="texts", max_index_memory="100M")
    build_index(data["shards"], tmp_path / "all", modality="texts", max_index_memory="100M")
    info = combine_indexes([tmp_path / "ia", tmp_path / "ib"], tmp_path / "sharded")
    assert info["count"] == 3000 and [p["count"] for p in info["parts"]] == [1800, 1200]
    single = SearchIndex(tmp_path / "all").search_arrays(data["queries"], 10)
    for sharded in (
        open_index(tmp_path / "sharded"),
        open_index([tmp_path / "ia", tmp_path / "ib"]),
    ):
        assert isinstance(sharded, ShardedIndex) and sharded.count == 3000
        scores, found = sharded.search_arrays(data["queries"], 10)
        np.testing.assert_array_equal(found, single[1])
        np.testing.assert_allclose(scores, single[0], atol=1e-6)
        assert sharded.ids[1799] == "a1799" and sharded.ids[1800] == "b0"
        assert sharded.info["shards"][-1]["rows"] == 300
    shutil.rmtree(tmp_path / "ib")
    with pytest.raises(MissingFileError, match="part .*ib is missing"):
        open_index(tmp_path / "sharded")
    other = dict(LIKE, model={"id": "other", "weights_hash": "f" * 64})
    c = write_fake_shards(tmp_path / "c", vectors[:100], other, prefix="c")
    build_index(c, tmp_path / "ic", modality="texts", max_index_memory="100M")
    with pytest.raises(IncompatibleError):
        combine_indexes([tmp_path / "ia", tmp_path / "ic"], tmp_path / "bad")


def test_add_to_a_budgeted_index(data, tmp_path: Path) -> None:
    vectors = data["vectors"]
    first = write_fake_shards(tmp_path / "a", vectors[:2000], LIKE, shard_size=1000, prefix="a")
    second = write_fake_shards(tmp_path / "b", vectors[2000:], LIKE, shard_size=500, prefix="b")
    out = tmp_path / "i"
    budget = budget_for("ivf-sq8")
    info = build_index(first, out, modality="texts", max_index_memory=budget, refine=20)
    assert info["kind"] == "ivf-sq8" and info["count"] == 2000
    info = build_index(second, out, modality="texts", add=True)
    assert info["count"] == 3000 and info["generation"] == 2 and info["kind"] == "ivf-sq8"
    assert info["params"]["recall_at_10"] >= 0.95
    assert info["params"]["measured_recall"]["value"] >= 0.95  # measured again after adding
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "heldout-00002.npz",
        "ids-00002.parquet",
        "index-00002.faiss",
        "index.json",
        "lists-00002.ivfdata",
        "trained-00002.faiss",
        "vectors.bin",
    ]
    loaded = SearchIndex(out)
    assert loaded.ids[1999] == "a1999" and loaded.ids[2000] == "b0"
    assert loaded.vectors.shape == (3000, DIM)
    hits = loaded.search(vectors[[5, 2500]], 1)
    assert [h[0][0] for h in hits] == [5, 2500]
    assert build_index(second, out, modality="texts", add=True)["generation"] == 2  # nothing new
    other = dict(LIKE, model={"id": "other", "weights_hash": "f" * 64})
    foreign = write_fake_shards(tmp_path / "c", vectors[:10], other, prefix="c")
    with pytest.raises(IncompatibleError):
        build_index(foreign, out, modality="texts", add=True)
    assert SearchIndex(out).count == 3000


def test_damaged_files_are_named_and_a_failed_build_keeps_the_old_index(
    data, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "i"
    budget = budget_for("ivf-sq8")
    info = build_index(data["shards"], out, modality="texts", max_index_memory=budget)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(build, "merge_blocks", broken)
    with pytest.raises(OSError, match="disk full"):
        build_index(data["shards"], out, modality="texts", max_index_memory=budget)
    monkeypatch.undo()
    assert SearchIndex(out).info["generation"] == info["generation"] == 1
    assert not list(out.glob(".build-*"))

    lists = out / info["lists_file"]
    saved = lists.read_bytes()
    lists.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(IndexBuildError, match=rf"{lists.name}: inverted lists file is"):
        SearchIndex(out)
    lists.write_bytes(saved)
    index_file = out / info["index_file"]
    index_file.write_bytes(index_file.read_bytes()[:-100])
    with pytest.raises(IndexBuildError, match=rf"{index_file.name}: index file does not match"):
        SearchIndex(out)
    record = json.loads((out / "index.json").read_text())
    del record["digest"]
    (out / "index.json").write_text(json.dumps(record))
    with pytest.raises(IndexBuildError, match=rf"{index_file.name}: cannot read the FAISS index"):
        SearchIndex(out)


def test_refine_needs_stored_vectors(data, tmp_path: Path) -> None:
    build_index(data["shards"], tmp_path / "by_kind", modality="texts")
    budget = budget_for("ivf-sq8")
    build_index(data["shards"], tmp_path / "plain", modality="texts", max_index_memory=budget)
    for name in ("by_kind", "plain"):
        loaded = SearchIndex(tmp_path / name)
        with pytest.raises(InputError, match="keeps no vectors"):
            loaded.search(data["queries"][:2], 5, refine=10)
        assert len(loaded.search(data["queries"][:2], 5)[0]) == 5
    with pytest.raises(IndexBuildError, match="need --max-index-memory"):
        build_index(data["shards"], tmp_path / "x", modality="texts", refine=10)
