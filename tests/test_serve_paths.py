"""What the service tells a client about the server's files: dataset-relative names only (unless
the operator opts in), and no path when an indexed image is gone or damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_extract import make_image_folder, save_tiny_model, tiny_processor

from xmodal.extract import extract
from xmodal.index import SearchIndex, build_index
from xmodal.models.identity import identify
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor
from xmodal.search import Searcher
from xmodal.serve import ServeSettings, create_app
from xmodal.serve.public import PublicNames

LOCAL = "http://localhost"  # a Host name the server answers when bound to loopback


def write_rows(data: Path) -> Path:
    """rows.jsonl beside a pics/ folder, without image ids: each image's id is its path."""
    make_image_folder(data / "pics", broken=False)
    rows = [{"image": f"pics/img{i}.png", "caption": f"photo {i}"} for i in range(10)]
    (data / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data / "rows.jsonl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path):
    root = tmp_path_factory.mktemp("paths")
    model_dir = save_tiny_model(root / "model", tiny_processor(minilm_tokenizer, minilm_path))
    rows = write_rows(root / "data")
    extract(model_dir, rows, root / "emb", workers=0, progress=False)
    build_index(root / "emb", root / "images")
    build_index(root / "emb", root / "texts", modality="texts")
    model = CrossModalModel.from_pretrained(model_dir)
    processor = MultimodalProcessor.from_pretrained(model_dir)
    identity = identify(model, processor, model_dir)

    def searcher(index: str | Path) -> Searcher:
        return Searcher(model, processor, SearchIndex(root / index), identity)

    return {"root": root, "model_dir": model_dir, "searcher": searcher}


def server_paths(root: Path) -> tuple[str, ...]:
    return tuple({str(root), str(root.resolve())})


def every_response(client: TestClient, image: Path) -> dict[str, str]:
    """The text of every kind of response the service gives, good and bad."""
    upload = {"image": ("query.png", image.read_bytes(), "image/png")}
    texts = {
        "page": client.get("/").text,
        "health": client.get("/health").text,
        "openapi": client.get("/openapi.json").text,
        "docs": client.get("/docs").text,
        "search-text": client.post("/search", json={"text": "photo 3", "k": 10}).text,
        "search-image": client.post("/search", files=upload, data={"k": "10"}).text,
        "embed": client.post("/embed", json={"text": "photo 1"}).text,
        "match": client.post("/match", files=upload, data={"caption": "photo 3"}).text,
        "bad-k": client.post("/search", json={"text": "photo", "k": 0}).text,
        "unknown-image": client.get("/images/nope").text,
    }
    hits = json.loads(texts["search-text"])["results"]
    for hit in hits[:3]:
        if hit["thumbnail"]:
            texts[f"thumbnail {hit['id']}"] = client.get(hit["thumbnail"]).text
    return texts


@pytest.mark.parametrize("index", ["images", "texts"])
def test_no_server_path_in_any_response_by_default(setup, index) -> None:
    root = setup["root"]
    with TestClient(base_url=LOCAL, app=create_app(setup["searcher"](index))) as client:
        texts = every_response(client, root / "data" / "pics" / "img3.png")
        hits = client.post("/search", json={"text": "photo 3", "k": 10}).json()["results"]
        for hit in hits[:3]:
            if hit["thumbnail"]:  # served by its public id
                image = client.get(hit["thumbnail"])
                assert image.status_code == 200
                assert image.content == (root / "data" / hit["source"]).read_bytes()
    for name, text in texts.items():
        for path in server_paths(root):
            assert path not in text, (name, text[:300])
    assert len(hits) == 10
    if index == "images":  # dataset-relative locations, as the dataset wrote them
        assert {h["id"] for h in hits} == {f"pics/img{i}.png" for i in range(10)}
        assert all(h["source"] == h["id"] for h in hits)
    else:
        assert {h["image_id"] for h in hits} == {f"pics/img{i}.png" for i in range(10)}
        assert all(h["source"].startswith("photo ") for h in hits)
    assert json.loads(texts["health"])["model"]["id"] == "model"


def test_expose_sources_shows_the_stored_locations(setup) -> None:
    root = setup["root"]
    settings = ServeSettings(expose_sources=True)
    app = create_app(setup["searcher"]("images"), settings)
    with TestClient(base_url=LOCAL, app=app) as client:
        hits = client.post("/search", json={"text": "photo 3", "k": 10}).json()["results"]
        expected = {str((root / "data" / "pics" / f"img{i}.png").resolve()) for i in range(10)}
        assert {h["id"] for h in hits} == expected and {h["source"] for h in hits} == expected
        assert client.get(hits[0]["thumbnail"]).status_code == 200
        assert client.get("/images/pics/img3.png").status_code == 404  # only stored ids here
        model_id = client.get("/health").json()["model"]["id"]
        assert model_id == str(Path(setup["model_dir"]).resolve())


def test_names_without_the_shards_manifest_fall_back_to_the_common_folder(setup, tmp_path) -> None:
    """An index whose shard folder is gone still shows no server path: names relative to the
    deepest folder holding all its images."""
    shutil.copytree(setup["root"] / "emb", tmp_path / "emb")
    build_index(tmp_path / "emb", tmp_path / "idx")
    shutil.rmtree(tmp_path / "emb")
    names = PublicNames(SearchIndex(tmp_path / "idx"))
    assert sorted(names.ids) == sorted(f"img{i}.png" for i in range(10))
    assert names.sources == names.ids
    assert names.position("img4.png") is not None and names.position("pics/img4.png") is None


def test_a_model_folder_is_shown_by_its_name(setup) -> None:
    names = PublicNames(SearchIndex(setup["root"] / "images"))
    assert names.model_id("/srv/models/clip-b32") == "clip-b32"
    assert names.model_id("hf:/srv/models/clip-b32") == "hf:clip-b32"  # a folder, hf: prefixed
    for kept in ("hf:openai/clip-vit-base-patch32", "open_clip:ViT-B-32/laion2b", "offline"):
        assert names.model_id(kept) == kept
    exposed = PublicNames(SearchIndex(setup["root"] / "images"), expose=True)
    assert exposed.model_id("hf:/srv/models/clip-b32") == "hf:/srv/models/clip-b32"


def test_images_outside_the_dataset_folder_are_named_without_climbing(setup, tmp_path) -> None:
    """A dataset file listing absolute paths elsewhere: names relative to the folder of those
    images, never ``../..`` up the server's folders from the dataset file."""
    make_image_folder(tmp_path / "store" / "pics", broken=False)
    (tmp_path / "lists").mkdir()
    pics = tmp_path / "store" / "pics"
    rows = [{"image": str(pics / f"img{i}.png"), "caption": f"photo {i}"} for i in range(10)]
    (tmp_path / "lists" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows_file = tmp_path / "lists" / "rows.jsonl"
    extract(setup["model_dir"], rows_file, tmp_path / "emb", workers=0, progress=False)
    build_index(tmp_path / "emb", tmp_path / "images")
    build_index(tmp_path / "emb", tmp_path / "texts", modality="texts")
    searcher = setup["searcher"]("images")
    names = {f"img{i}.png" for i in range(10)}
    for modality in ("images", "texts"):
        index = SearchIndex(tmp_path / modality)
        app = create_app(Searcher(searcher.model, searcher.processor, index))
        with TestClient(base_url=LOCAL, app=app) as client:
            hits = client.post("/search", json={"text": "photo 3", "k": 10}).json()["results"]
            field = "id" if modality == "images" else "image_id"
            assert {h[field] for h in hits} == names
            if modality == "images":
                image = client.get(hits[0]["thumbnail"])
                assert image.content == (pics / hits[0]["id"]).read_bytes()


def test_deleted_or_damaged_indexed_images_answer_without_paths(setup, tmp_path) -> None:
    rows = write_rows(tmp_path / "data")
    extract(
        setup["model_dir"], rows, tmp_path / "emb", modality="images", workers=0, progress=False
    )
    build_index(tmp_path / "emb", tmp_path / "idx")
    pics = tmp_path / "data" / "pics"
    (pics / "img1.png").unlink()
    (pics / "img2.png").write_bytes(b"no longer a picture")
    whole = (pics / "img3.png").read_bytes()
    (pics / "img3.png").write_bytes(whole[: len(whole) // 2])
    searcher = setup["searcher"]("images")
    index = SearchIndex(tmp_path / "idx")
    searcher = Searcher(searcher.model, searcher.processor, index, rerank_weight=1.0)
    with TestClient(base_url=LOCAL, app=create_app(searcher)) as client:
        gone = client.get("/images/pics%2Fimg1.png")
        assert gone.status_code == 404
        assert gone.json()["detail"] == (
            "image 'pics/img1.png' is gone (deleted or moved since indexing)"
        )
        damaged = client.get("/images/pics/img2.png")
        assert damaged.status_code == 500
        assert damaged.json()["detail"].startswith(
            "image 'pics/img2.png' cannot be decoded any more: not a recognised image format"
        )
        truncated = client.get("/images/pics/img3.png")
        assert truncated.status_code == 500 and "truncated" in truncated.json()["detail"]
        assert client.get("/images/pics/img4.png").status_code == 200
        # re-ranking needs the indexed images too: the same answer, from a search
        rerank = client.post("/search", json={"text": "photo 1", "k": 10, "rerank": True})
        assert rerank.status_code in (404, 500)
        assert rerank.json()["detail"].startswith("image 'pics/img")
        assert client.get("/health").status_code == 200
        for response in (gone, damaged, truncated, rerank):
            for path in server_paths(tmp_path):
                assert path not in response.text
