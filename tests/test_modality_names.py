"""``modality`` (images or texts) is one name across extract, index and search; files and flags
written under the earlier names (``kinds`` / ``what`` / ``kind`` / ``--what``) still work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_index import random_vectors, write_fake_shards

from xmodal.cli import main
from xmodal.extract.ranks import fold_errors
from xmodal.extract.writer import MANIFEST_FORMAT, MANIFEST_NAME, load_errors, load_manifest
from xmodal.index import INDEX_JSON, SearchIndex, ShardSource, build_index

LIKE = {
    "format": MANIFEST_FORMAT,
    "model": {"id": "m", "weights_hash": "0" * 64},
    "processor_hash": "0" * 16,
    "created": "2026-01-01T00:00:00+00:00",
}


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    return write_fake_shards(tmp_path / "emb", random_vectors(40), LIKE, shard_size=16)


def test_a_manifest_written_with_kinds_reads_as_modalities(shards: Path, tmp_path: Path):
    path = shards / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    assert "kinds" not in manifest and sorted(manifest["modalities"]) == ["texts"]
    manifest["kinds"] = manifest.pop("modalities")  # as written before the rename
    path.write_text(json.dumps(manifest))
    assert load_manifest(shards)["modalities"]["texts"]["items"] == 40
    source = ShardSource(shards, "texts")
    columns = next(source.batches(40)).columns
    assert source.count == 40 and "location" not in columns
    assert columns["id"].to_pylist()[:2] == ["v0", "v1"]
    assert columns["image_id"].to_pylist()[:2] == ["v0", "v1"]
    assert main(["index", "--shards", str(shards), "--out", str(tmp_path / "i"), "--modality"]
                + ["texts"]) == 0  # fmt: skip
    assert SearchIndex(tmp_path / "i").count == 40


def test_the_what_flag_is_an_alias_of_modality(shards: Path, tmp_path: Path, capsys):
    for flag, out in (("--modality", tmp_path / "a"), ("--what", tmp_path / "b")):
        assert main(["index", "--shards", str(shards), "--out", str(out), flag, "texts"]) == 0
        assert json.loads((out / INDEX_JSON).read_text())["modality"] == "texts"
    assert "--what" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    help_text = capsys.readouterr().out
    assert "--modality" in help_text and "--what" not in help_text


def test_an_index_written_with_what_and_one_ids_column_still_loads(shards: Path, tmp_path):
    out = tmp_path / "idx"
    info = build_index(shards, out, modality="texts")
    index = SearchIndex(out)
    assert index.modality == "texts" and index.kind == "flat"
    assert index.image_ids[:3] == ["v0", "v1", "v2"] and index.locations[:3] == [None] * 3
    # Rewrite it the way an earlier version did: "what" in index.json, one extra ids column.
    info = json.loads((out / INDEX_JSON).read_text())
    info["what"] = info.pop("modality")
    (out / INDEX_JSON).write_text(json.dumps(info))
    table = pq.read_table(out / info["ids_file"])
    old = pa.table({name: table.column(name) for name in ("id", "source", "image_id")})
    pq.write_table(old, out / info["ids_file"])
    index = SearchIndex(out)
    assert index.modality == "texts"
    assert index.image_ids == [f"v{i}" for i in range(40)] and index.locations == [None] * 40
    found = index.search(random_vectors(40)[7], 1)[0]
    assert found[0][0] == 7 and np.isclose(found[0][1], 1.0, atol=1e-5)


def test_error_records_written_with_kind_read_as_modality(tmp_path: Path):
    records = [{"kind": "images", "shard": "images-00000.parquet", "id": "a", "reason": "x"}]
    (tmp_path / "errors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_errors(tmp_path, {"images-00000.parquet"})
    assert loaded == [
        {"modality": "images", "shard": "images-00000.parquet", "id": "a", "reason": "x"}
    ]
    part = {"errors": [{"kind": "texts", "shard": "texts-00000.parquet", "id": "b", "reason": "y"}]}
    merged = fold_errors(loaded, [part])
    assert [(e["modality"], e["id"]) for e in merged] == [("images", "a"), ("texts", "b")]
