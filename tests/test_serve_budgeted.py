"""Serving and searching a memory-budgeted index end to end (on-disk lists, ids read from
Parquet): public names without per-item Python lists, the public id -> position table, and
exact re-ranking (refine) chosen per query from the CLI and per request over HTTP."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_extract import read_all, save_tiny_model, tiny_processor
from test_index import random_vectors, write_fake_shards

from xmodal.cli import main
from xmodal.errors import OutputError
from xmodal.extract import extract
from xmodal.index import SearchIndex, ShardedIndex, build_index
from xmodal.models.identity import identify
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor
from xmodal.search import Searcher
from xmodal.serve import ServeSettings, create_app
from xmodal.serve import public as public_module
from xmodal.serve.public import PublicNames

LOCAL = "http://localhost"  # a Host name the server answers when bound to loopback

IMAGES = 120  # enough rows for an IVF index (the budget refuses IVF below 78)
BUDGET = "6K"  # 120 x 32-d: exact search needs 15K, IVF-SQ8 ~5.5K
REFINE = 20


def write_dataset(data: Path) -> Path:
    """IMAGES small PNGs in data/pics and rows.jsonl without image ids (ids are paths)."""
    (data / "pics").mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows = []
    for i in range(IMAGES):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / "pics" / f"img{i}.png")
        rows.append({"image": f"pics/img{i}.png", "caption": f"photo number {i}"})
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data / "rows.jsonl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path):
    root = tmp_path_factory.mktemp("served_budget")
    model_dir = save_tiny_model(root / "model", tiny_processor(minilm_tokenizer, minilm_path))
    rows = write_dataset(root / "data")
    extract(
        model_dir, rows, root / "emb", shard_size=50, dtype="float16", workers=0, progress=False
    )
    for modality in ("images", "texts"):
        argv = ["index", "--shards", str(root / "emb"), "--out", str(root / modality)]
        argv += ["--modality", modality, "--max-index-memory", BUDGET, "--refine", str(REFINE)]
        assert main(argv) == 0
    # the same rows without stored vectors: refine is refused on it (its SQ8 codes miss the
    # 0.95 target on these near-identical tiny-model embeddings: accepted as they are)
    plain = ["index", "--shards", str(root / "emb"), "--out", str(root / "plain")]
    assert main([*plain, "--max-index-memory", BUDGET, "--accept-recall", "0.5"]) == 0
    model = CrossModalModel.from_pretrained(model_dir)
    processor = MultimodalProcessor.from_pretrained(model_dir)
    identity = identify(model, processor, model_dir)

    def searcher(index) -> Searcher:
        loaded = index if isinstance(index, SearchIndex | ShardedIndex) else SearchIndex(index)
        return Searcher(model, processor, loaded, identity)

    return {
        "root": root,
        "model_dir": model_dir,
        "searcher": searcher,
        "images": read_all(root / "emb", "images"),
        "texts": read_all(root / "emb", "texts"),
    }


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and positions of the exact top-k by inner product (the stored float16 values)."""
    scores, found = faiss.knn(
        np.atleast_2d(query).astype(np.float32),
        np.asarray(vectors, np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return scores[0], found[0]


def per_item_containers(names: PublicNames, count: int) -> list[str]:
    """Attributes of ``names`` (and of the sequences it exposes) that are Python containers
    with one entry or more per indexed item."""
    found = []
    for owner, values in [("names", vars(names))] + [
        (key, vars(value)) for key, value in vars(names).items() if hasattr(value, "name_at")
    ]:
        for key, value in values.items():
            if isinstance(value, list | tuple | dict | set) and len(value) >= count // 2:
                found.append(f"{owner}.{key}")
    return found


def test_the_budgeted_indexes_are_on_disk(setup) -> None:
    for modality in ("images", "texts"):
        index = SearchIndex(setup["root"] / modality)
        assert index.kind == "ivf-sq8" and index.count == IMAGES
        assert "lists_file" in index.info and index.refinable
        assert index.info["params"]["refine"] == REFINE
    assert not SearchIndex(setup["root"] / "plain").refinable


def test_serving_a_budgeted_index_without_per_item_lists(setup) -> None:
    root = setup["root"]
    index = SearchIndex(root / "images")
    names = PublicNames(index)
    assert per_item_containers(names, IMAGES) == []
    assert names.hashes.nbytes + names.positions.nbytes == 16 * IMAGES
    assert len(index.ids_file._cache) == 0  # the table is built from its own reader
    expected = [f"pics/img{i}.png" for i in range(IMAGES)]
    assert list(names.ids) == expected and names.sources == expected
    assert [names.position(name) for name in expected] == list(range(IMAGES))
    assert names.position("img5.png") is None and names.position(str(root)) is None

    searcher = setup["searcher"](index)
    query = "photo number 7"
    vector = searcher.embed_texts([query])[0]
    with TestClient(base_url=LOCAL, app=create_app(searcher)) as client:
        health = client.get("/health").json()
        assert (health["kind"], health["count"], health["refinable"]) == ("ivf-sq8", IMAGES, True)
        # at the index's own settings: the library's answer, under public names
        body = client.post("/search", json={"text": query, "k": 10}).json()
        direct = index.search(vector[None], 10)[0]
        assert [(h["id"], h["score"]) for h in body["results"]] == [
            (expected[p], pytest.approx(s, abs=1e-5)) for p, s in direct
        ]
        assert all(h["source"] == h["id"] for h in body["results"])
        # every list visited and every row re-ranked: exact search
        nlist = index.info["params"]["nlist"]
        wide = {"text": query, "k": 10, "nprobe": nlist, "refine": IMAGES}
        body = client.post("/search", json=wide).json()
        scores, positions = exact_top(setup["images"]["embeddings"], vector, 10)
        assert [h["id"] for h in body["results"]] == [expected[p] for p in positions]
        np.testing.assert_allclose([h["score"] for h in body["results"]], scores, atol=1e-5)
        # search by an indexed item's public id: its own image, found through the hash table
        for hit in body["results"][:3]:
            image = client.get(hit["thumbnail"])
            assert image.status_code == 200
            assert image.content == (root / "data" / hit["id"]).read_bytes()
        assert client.get("/images/pics%2Fimg119.png").status_code == 200
        assert client.get("/images/pics%2Fimg120.png").status_code == 404
        assert client.get("/images/img7.png").status_code == 404
        for response in (client.get("/images/nope"), client.post("/search", json=wide)):
            assert str(root) not in response.text


def test_a_budgeted_caption_index_shows_relative_image_ids(setup) -> None:
    index = SearchIndex(setup["root"] / "texts")
    searcher = setup["searcher"](index)
    with TestClient(base_url=LOCAL, app=create_app(searcher)) as client:
        upload = {"image": ("q.png", (setup["root"] / "data/pics/img4.png").read_bytes())}
        body = client.post("/search", files=upload, data={"k": "5", "refine": "0"}).json()
    assert len(body["results"]) == 5
    texts = setup["texts"]
    by_caption = dict(zip(texts["sources"], texts["ids"], strict=True))
    for hit in body["results"]:
        number = int(hit["source"].rsplit(" ", 1)[1])
        assert hit["image_id"] == f"pics/img{number}.png"
        assert hit["id"] == by_caption[hit["source"]]
        assert hit["thumbnail"] is None


def test_public_names_hold_no_per_item_objects(setup, tmp_path: Path, monkeypatch) -> None:
    """20,000 entries: what PublicNames keeps is the 16-byte-per-item table (the old lists and
    dictionary of the same names took over 100 bytes per item)."""
    count = 20_000
    like = json.loads((setup["root"] / "emb" / "manifest.json").read_text())
    shards = write_fake_shards(tmp_path / "emb", random_vectors(count), like, shard_size=5000)
    build_index(shards, tmp_path / "idx", modality="texts")
    index = SearchIndex(tmp_path / "idx")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    names = PublicNames(index)
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert per_item_containers(names, count) == []
    assert kept < 16 * count + 200_000, kept
    assert names.position("v12345") == 12345 and names.ids[12345] == "v12345"
    assert names.image_ids[-1] == f"v{count - 1}" and names.position("v20000") is None


def test_the_table_is_saved_beside_a_large_index_and_reused(setup, tmp_path, monkeypatch) -> None:
    count = 3000
    like = json.loads((setup["root"] / "emb" / "manifest.json").read_text())
    shards = write_fake_shards(tmp_path / "emb", random_vectors(count), like, shard_size=1000)
    build_index(shards, tmp_path / "idx", modality="texts", max_index_memory="1M")
    index = SearchIndex(tmp_path / "idx")
    first = PublicNames(index, cache_min_items=1000)
    saved = sorted(p.name for p in (tmp_path / "idx").glob("serve-names-*"))
    assert [Path(n).suffix for n in saved] == [".json", ".npy"]
    assert PublicNames(index).hashes is not None  # below the size: nothing more written
    assert len(list((tmp_path / "idx").glob("serve-names-*"))) == 2

    def no_rebuild(self):
        raise AssertionError("the saved table should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(PublicNames, "_build_table", no_rebuild)
        again = PublicNames(SearchIndex(tmp_path / "idx"), cache_min_items=1000)
    assert isinstance(again.hashes, np.memmap)
    np.testing.assert_array_equal(again.hashes, first.hashes)
    assert again.position("v2999") == 2999 and again.position("v3000") is None
    exposed = PublicNames(index, expose=True, cache_min_items=1000)  # its own table
    assert exposed.position("v7") == 7
    assert len(list((tmp_path / "idx").glob("serve-names-*"))) == 4

    # a rebuilt index (new ids file): the old table is not used, and is replaced
    build_index(shards, tmp_path / "idx", modality="texts", max_index_memory="1M")
    rebuilt = PublicNames(SearchIndex(tmp_path / "idx"), cache_min_items=1000)
    assert rebuilt.position("v42") == 42
    public = sorted((tmp_path / "idx").glob("serve-names-public-*"))
    assert len(public) == 2 and public[0].name not in saved

    # a damaged table is rebuilt, not trusted
    npy = next(p for p in public if p.suffix == ".npy")
    npy.write_bytes(npy.read_bytes()[:100])
    fixed = PublicNames(SearchIndex(tmp_path / "idx"), cache_min_items=1000)
    assert fixed.position("v2500") == 2500


def test_a_hash_collision_is_resolved_by_the_stored_id(setup, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(public_module, "id_hash", lambda value: len(value))  # many collisions
    names = PublicNames(SearchIndex(setup["root"] / "images"))
    assert names.position("pics/img42.png") == 42
    assert names.position("pics/img7.png") == 7
    assert names.position("pics/img_7.png") is None


def test_refine_per_request_over_http(setup) -> None:
    root = setup["root"]
    index = SearchIndex(root / "images")
    settings = ServeSettings(max_refine=50)
    with TestClient(base_url=LOCAL, app=create_app(setup["searcher"](index), settings)) as client:

        def search(**fields):
            return client.post("/search", json={"text": "photo number 3", **fields})

        nlist = index.info["params"]["nlist"]
        off = search(k=10, nprobe=nlist, refine=0).json()["results"]
        on = search(k=10, nprobe=nlist, refine=50).json()["results"]
        vector = setup["searcher"](index).embed_texts(["photo number 3"])[0]
        scores, positions = exact_top(setup["images"]["embeddings"], vector, 10)
        assert [h["id"] for h in on] == [f"pics/img{p}.png" for p in positions]
        # without re-ranking the scores are the SQ8 codes' approximations
        assert max(abs(h["score"] - s) for h, s in zip(off, scores, strict=True)) > 1e-5
        for value, expected in (
            (-1, "refine must be an integer in 0..50, got -1"),
            (51, "refine must be an integer in 0..50, got 51"),
            (True, "refine must be an integer in 0..50, got True"),
            ("many", "refine must be an integer in 0..50, got 'many'"),
        ):
            response = search(refine=value)
            assert response.status_code == 422 and response.json()["detail"] == expected
        assert search(refine=None).status_code == 200  # null: the index's own setting
        upload = {"image": ("q.png", (root / "data/pics/img3.png").read_bytes())}
        form = client.post("/search", files=upload, data={"refine": "60"})
        assert form.status_code == 422 and form.json()["detail"].startswith("refine must be")
        assert "refine" in json.dumps(client.get("/openapi.json").json()["paths"]["/search"])

    plain = SearchIndex(root / "plain")
    with TestClient(base_url=LOCAL, app=create_app(setup["searcher"](plain))) as client:
        assert client.get("/health").json()["refinable"] is False
        refused = client.post("/search", json={"text": "photo", "refine": 10})
        assert refused.status_code == 422
        assert refused.json()["detail"].startswith("refine needs an index that keeps its vectors")
        assert str(root) not in refused.text
        assert client.post("/search", json={"text": "photo", "refine": 0}).status_code == 200


def test_refine_per_query_from_the_cli(setup, capsys) -> None:
    root = setup["root"]
    index = SearchIndex(root / "images")
    nlist = index.info["params"]["nlist"]
    query = "photo number 11"
    argv = ["search", "--index", str(root / "images"), "--model", str(setup["model_dir"])]
    argv += ["--text", query, "-k", "5", "--nprobe", str(nlist)]
    assert main([*argv, "--refine", str(IMAGES)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    vector = setup["searcher"](index).embed_texts([query])[0]
    scores, positions = exact_top(setup["images"]["embeddings"], vector, 5)
    stored = setup["images"]["ids"]
    assert [line.split()[2] for line in lines] == [stored[p] for p in positions]
    np.testing.assert_allclose([float(line.split()[1]) for line in lines], scores, atol=1e-4)

    assert main([*argv, "--refine", "-1"]) == 2
    assert capsys.readouterr().err.strip().endswith("refine must be >= 0, got -1")
    plain = ["search", "--index", str(root / "plain"), "--model", str(setup["model_dir"])]
    assert main([*plain, "--text", query, "--refine", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "keeps no vectors for re-ranking: rebuild it with --refine" in err
    assert main([*plain, "--text", query, "--refine", "0"]) == 0


def test_a_sharded_index_refines_only_when_every_part_can(setup, tmp_path) -> None:
    root = setup["root"]
    both = ShardedIndex(parts=[root / "images", root / "plain"])
    assert not both.refinable
    names = PublicNames(both)  # positions run through the parts: the second repeats the first
    assert names.position("pics/img3.png") == 3 and names.ids[IMAGES + 3] == "pics/img3.png"
    assert public_module.cache_folder(both) is None  # no folder of its own to keep a table in
    twice = ShardedIndex(parts=[root / "images", root / "images"])
    assert twice.refinable
    vector = setup["searcher"](twice).embed_texts(["photo number 9"])[0]
    nlist = twice.parts[0].info["params"]["nlist"]
    scores, found = twice.search_arrays(vector[None], 4, nprobe=nlist, refine=IMAGES)
    exact, positions = exact_top(setup["images"]["embeddings"], vector, 2)
    assert sorted(found[0] % IMAGES) == sorted([*positions, *positions])
    np.testing.assert_allclose(scores[0], np.repeat(exact, 2), atol=1e-5)


def test_public_columns_behave_as_sequences(setup) -> None:
    names = PublicNames(SearchIndex(setup["root"] / "images"))
    assert isinstance(names.ids, Sequence) and len(names.ids) == IMAGES
    assert names.ids[-1] == f"pics/img{IMAGES - 1}.png" and names.ids[2:4] == [
        "pics/img2.png",
        "pics/img3.png",
    ]
    with pytest.raises(IndexError):
        names.ids[IMAGES]
    assert names.image_ids == ()


def test_a_folder_that_cannot_be_written_only_costs_a_rebuild(setup, monkeypatch, caplog) -> None:
    def refuse(path):
        raise OutputError(f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(public_module, "atomic_path", refuse)
    index = SearchIndex(setup["root"] / "texts")
    with caplog.at_level("WARNING", logger="xmodal.serve.public"):
        names = PublicNames(index, cache_min_items=10)
    assert "id lookup table not saved" in caplog.text and "Read-only" in caplog.text
    assert not list((setup["root"] / "texts").glob("serve-names-*"))
    assert names.position(names.ids[17]) == 17
