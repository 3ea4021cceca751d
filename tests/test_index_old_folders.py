"""Index folders written before every kind was built from a plan (kinds flat, ivf and hnsw:
one in-memory FAISS file, an ids file, an ``index.json`` without ``plan``, held-out rows or
digest) still load, search at their recorded depth, and take ``--add``."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_index import clustered_vectors, write_fake_shards
from test_index_recall import LIKE

from xmodal.errors import InputError
from xmodal.index import SearchIndex, build_index
from xmodal.shards import load_manifest


def old_folder(out: Path, shards: Path, vectors: np.ndarray, kind: str) -> dict:
    """An index folder in the layout (and with the index.json fields) the in-memory build
    wrote: ``index-00001.faiss`` holding every vector, ``ids-00001.parquet``, ``index.json``."""
    count, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        params = {"kind": "flat"}
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 40, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = 4
        params = {"nlist": 40, "nprobe": 4, "recall_at_10": 0.97, "tuning_queries": 200}
        params["train_vectors"] = count
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 24
        params = {"M": 32, "efConstruction": 80, "efSearch": 24, "recall_at_10": 0.97}
    index.add(vectors)
    params.pop("kind", None)
    params["target_recall"] = 0.95
    params["measured_recall"] = {"at": 10, "value": 0.97, "queries": 200}
    out.mkdir(parents=True)
    faiss.write_index(index, str(out / "index-00001.faiss"))
    ids = [f"v{i}" for i in range(count)]
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "source": pa.array(ids, pa.string()),
            "location": pa.nulls(count, pa.string()),
            "image_id": pa.array(ids, pa.string()),
        }
    )
    pq.write_table(table, str(out / "ids-00001.parquet"))
    manifest = load_manifest(shards)
    entries = manifest["modalities"]["texts"]["shards"]
    info = {
        "format": "xmodal.index/1",
        "kind": kind,
        "params": params,
        "modality": "texts",
        "metric": "inner_product",
        "count": count,
        "dim": dim,
        "model": manifest["model"],
        "processor_hash": manifest["processor_hash"],
        "shards": [
            {"dir": str(shards.resolve()), "file": e["file"], "rows": e["rows"]} for e in entries
        ],  # fmt: skip
        "generation": 1,
        "created": "x",
        "index_file": "index-00001.faiss",
        "ids_file": "ids-00001.parquet",
        "updated": "x",
    }
    (out / "index.json").write_text(json.dumps(info, indent=2))
    return info


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_an_old_in_memory_folder_loads_searches_and_takes_new_shards(tmp_path: Path, kind):
    vectors = clustered_vectors(3000, 30, seed=4)
    first = write_fake_shards(tmp_path / "a", vectors[:2000], LIKE, shard_size=1000)
    second = write_fake_shards(tmp_path / "b", vectors[2000:], LIKE, 1000, prefix="b")
    out = tmp_path / "old"
    old_folder(out, first, vectors[:2000], kind)

    loaded = SearchIndex(out)
    assert (loaded.kind, loaded.count, loaded.measured_recall["value"]) == (kind, 2000, 0.97)
    hits = loaded.search(vectors[:2000:100], 1)
    assert [h[0][0] for h in hits] == list(range(0, 2000, 100))
    assert loaded.ids[5] == "v5" and loaded.image_ids[5] == "v5"
    with pytest.raises(InputError, match="keeps no vectors for re-ranking"):
        loaded.search(vectors[:1], 1, refine=10)
    if kind == "ivf":  # the recorded nprobe is the default; a deeper one finds as much or more
        shallow = SearchIndex(out).search_arrays(vectors[:200], 10, nprobe=1)[1]
        default = SearchIndex(out).search_arrays(vectors[:200], 10)[1]
        assert (shallow == default).mean() < 1.0

    info = build_index(second, out, modality="texts", add=True)
    assert (info["kind"], info["count"], info["generation"]) == (kind, 3000, 2)
    assert info["plan"]["kind"] == kind and info["plan"]["count"] == 3000
    measured = info["params"]["measured_recall"]
    assert measured["queries"] == 200 and measured["value"] >= 0.95
    assert (out / info["heldout_file"]).is_file() and not (out / "index-00001.faiss").exists()
    added = SearchIndex(out)
    hits = added.search(vectors[::250], 1)
    assert [h[0][0] for h in hits] == list(range(0, 3000, 250))
    assert added.ids[1999:2001] == ["v1999", "b0"]
    assert build_index(second, out, modality="texts", add=True)["generation"] == 2
