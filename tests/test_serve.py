"""The HTTP API: embed, search, match, thumbnails, limits and per-request parameters."""

from __future__ import annotations

import argparse
import dataclasses
import io
import typing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_extract import make_image_folder, save_tiny_model, tiny_processor
from test_index import random_vectors, write_fake_shards

from xmodal.cli import main
from xmodal.commands import serve as serve_command
from xmodal.config import from_dict
from xmodal.errors import (
    CaptionError,
    ConfigError,
    ImageLoadError,
    IncompatibleError,
    IndexBuildError,
    InputError,
    MissingFileError,
)
from xmodal.extract import extract, load_manifest
from xmodal.index import SearchIndex, build_index
from xmodal.models.identity import identify
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor
from xmodal.search import Searcher
from xmodal.serve import ServeSettings, create_app
from xmodal.serve.settings import LogLevel, from_arguments

LOCAL = "http://localhost"  # a Host name the server answers when bound to loopback


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(root / "model", tiny_processor(minilm_tokenizer, minilm_path))
    data = make_image_folder(root / "data", broken=False)
    extract(model_dir, data, root / "emb", modality="images", workers=0, progress=False)
    build_index(root / "emb", root / "idx")
    model = CrossModalModel.from_pretrained(model_dir)
    processor = MultimodalProcessor.from_pretrained(model_dir)
    identity = identify(model, processor, model_dir)
    searcher = Searcher(model, processor, SearchIndex(root / "idx"), identity)
    with TestClient(base_url=LOCAL, app=create_app(searcher)) as client:
        yield {
            "root": root,
            "data": data,
            "model": model,
            "processor": processor,
            "identity": identity,
            "searcher": searcher,
            "client": client,
        }


def png_bytes(path) -> bytes:
    return path.read_bytes()


def test_health_and_docs(setup) -> None:
    client = setup["client"]
    body = client.get("/health").json()
    assert (body["status"], body["modality"], body["kind"], body["count"], body["dim"]) == (
        "ok",
        "images",
        "flat",
        10,
        32,
    )
    assert body["processor_hash"] == setup["processor"].config_hash
    recall = body["measured_recall"]  # measured when the index was built, against exact search
    assert recall["at"] == 10 and recall["value"] == 1.0 and recall["queries"] >= 1
    schema = client.get("/openapi.json").json()
    assert {"/embed", "/search", "/match", "/health", "/images/{image_id}"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/search"]["post"]["requestBody"]["content"]
    # no Swagger UI / ReDoc: they load their scripts from a CDN
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text


def test_embed_text_and_image(setup) -> None:
    client, model, processor = setup["client"], setup["model"], setup["processor"]
    response = client.post("/embed", json={"text": ["photo 1", "a dog on grass"]})
    assert response.status_code == 200
    body = response.json()
    assert (body["modality"], body["count"], body["dim"]) == ("text", 2, 32)
    with torch.no_grad():
        expected = model.encode_text(**processor.process_text(["photo 1", "a dog on grass"]))
    np.testing.assert_allclose(body["embeddings"], expected.numpy(), atol=1e-5)

    path = setup["data"] / "img4.png"
    files = [("image", ("a.png", png_bytes(path), "image/png"))] * 2
    body = client.post("/embed", files=files).json()
    assert (body["modality"], body["count"]) == ("image", 2)
    with torch.no_grad():
        expected = model.encode_image(processor.process_images([path]))[0].numpy()
    np.testing.assert_allclose(body["embeddings"][1], expected, atol=1e-5)


def test_search_text_and_image_and_thumbnails(setup) -> None:
    client = setup["client"]
    body = client.post("/search", json={"text": "photo 2", "k": 3}).json()
    assert body["query"] == "text" and body["k"] == 3 and len(body["results"]) == 3
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)

    # the tiny model was never calibrated: re-ranking is a no-op, and the response says so
    plain = body["results"]
    body = client.post("/search", json={"text": "photo 2", "k": 3, "rerank": True}).json()
    assert body["results"] == plain and body["rerank_weight"] == 0.0
    assert "never calibrated" in body["rerank_note"]
    weighted = Searcher(
        setup["model"], setup["processor"], setup["searcher"].index, rerank_weight=0.5
    )
    with TestClient(base_url=LOCAL, app=create_app(weighted)) as other:
        body = other.post("/search", json={"text": "photo 2", "k": 3, "rerank": True}).json()
    combined = [r["rerank_score"] for r in body["results"]]
    assert len(combined) == 3 and combined == sorted(combined, reverse=True)
    assert all(r["itm_score"] is not None for r in body["results"])
    assert body["rerank_weight"] == 0.5 and body["rerank_note"] is None
    scale = weighted.itc_scale
    for r in body["results"]:
        assert r["rerank_score"] == pytest.approx(scale * r["score"] + 0.5 * r["itm_score"])

    path = setup["data"] / "img6.png"
    files = {"image": ("q.png", png_bytes(path), "image/png")}
    response = client.post("/search", files=files, data={"rerank": "true"})
    assert response.status_code == 422 and "re-ranking" in response.json()["detail"]
    body = client.post("/search", files=files, data={"k": "2"}).json()
    assert body["query"] == "image" and len(body["results"]) == 2
    top = body["results"][0]
    assert top["id"] == "img6" and top["score"] == pytest.approx(1.0, abs=1e-5)
    thumb = client.get(top["thumbnail"])
    assert thumb.status_code == 200 and thumb.content == path.read_bytes()
    assert thumb.headers["content-type"] == "image/png"

    for bad in (
        "/images/nope",
        "/images/..%2F..%2Fetc%2Fpasswd",
        f"/images/{setup['data']}/img1.png",
    ):
        assert client.get(bad).status_code == 404


def test_match(setup) -> None:
    client, model, processor = setup["client"], setup["model"], setup["processor"]
    path = setup["data"] / "img3.png"
    body = client.post(
        "/match",
        files={"image": ("x.png", png_bytes(path), "image/png")},
        data={"caption": "photo 3"},
    ).json()
    with torch.no_grad():
        image = model.image_features(processor.process_images([path]))
        text = model.text_features(**processor.process_text(["photo 3"]))
        itm = float(model.itm_score(image, text)[0])
        similarity = float(image.embeds[0] @ text.embeds[0])
    assert body["itm_score"] == pytest.approx(itm, abs=1e-4)
    assert body["similarity"] == pytest.approx(similarity, abs=1e-5)
    assert body["match_probability"] == pytest.approx(1 / (1 + np.exp(-itm)), abs=1e-4)


def test_oversized_upload_is_413(setup) -> None:
    big = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (2200, 2200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big, format="PNG", compress_level=0)
    assert big.tell() > 10 * 1024 * 1024
    files = {"image": ("big.png", big.getvalue(), "image/png")}
    response = setup["client"].post("/search", files=files)
    assert response.status_code == 413
    assert "exceeds the limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced as the bytes arrive
        for _ in range(12):
            yield b"x" * (1024 * 1024)

    headers = {"content-type": "multipart/form-data; boundary=b"}
    response = setup["client"].post("/embed", content=chunks(), headers=headers)
    assert response.status_code == 413


def test_small_upload_limit_inside_the_form(setup) -> None:
    """A file over the per-image limit but under the body limit is refused by the reader."""
    settings = ServeSettings(max_upload_bytes=100)
    with TestClient(base_url=LOCAL, app=create_app(setup["searcher"], settings)) as client:
        path = setup["data"] / "img0.png"
        files = {"image": ("img0.png", png_bytes(path), "image/png")}
        response = client.post("/embed", files=files)
    assert response.status_code == 413 and "'img0.png'" in response.json()["detail"]


def test_corrupt_image_is_400_naming_the_problem(setup) -> None:
    files = {"image": ("bad.png", b"definitely not an image", "image/png")}
    for route, data in (("/search", {}), ("/embed", {}), ("/match", {"caption": "x"})):
        response = setup["client"].post(route, files=files, data=data)
        assert response.status_code == 400, route
        detail = response.json()["detail"]
        assert "bad.png" in detail and "not a recognised image format" in detail


@pytest.mark.parametrize(
    ("route", "payload", "message"),
    [
        ("/search", {"text": "cat", "k": 0}, "k must be an integer in 1..100"),
        ("/search", {"text": "cat", "k": 101}, "k must be an integer in 1..100"),
        ("/search", {"text": "cat", "k": "many"}, "k must be an integer"),
        ("/search", {"text": "cat", "nprobe": 0}, "nprobe"),
        ("/search", {"text": "x" * 1001}, "1001 characters"),
        ("/search", {"text": "   "}, "text is empty"),
        ("/search", {"k": 3}, "text must be a string"),
        ("/search", {"text": "cat", "rerank": "maybe"}, "rerank must be true or false"),
        ("/embed", {"text": ["a"] * 33}, "33 texts"),
        ("/embed", {"text": []}, "non-empty list"),
        ("/embed", {"text": ["ok", 5]}, "text[1] must be a string"),
    ],
)
def test_bad_parameters_are_422(setup, route, payload, message) -> None:
    response = setup["client"].post(route, json=payload)
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_bad_forms_are_422(setup) -> None:
    client = setup["client"]
    png = png_bytes(setup["data"] / "img0.png")
    assert client.post("/search", data={"k": "3"}, files={"x": ("a", b"1")}).status_code == 422
    response = client.post("/search", files={"image": ("a.png", png)}, data={"k": "1000"})
    assert response.status_code == 422
    response = client.post("/match", files={"image": ("a.png", png)})
    assert response.status_code == 422 and "caption" in response.json()["detail"]
    response = client.post("/search", content=b"text=cat", headers={"content-type": "text/plain"})
    assert response.status_code == 415


def test_per_request_parameters_do_not_leak(setup, tmp_path) -> None:
    like = load_manifest(setup["root"] / "emb")
    shards = write_fake_shards(tmp_path / "emb", random_vectors(3000, seed=5), like)
    build_index(shards, tmp_path / "ivf", kind="ivf", modality="texts")
    index = SearchIndex(tmp_path / "ivf")
    tuned = index.index.nprobe
    searcher = Searcher(setup["model"], setup["processor"], index, setup["identity"])
    with TestClient(base_url=LOCAL, app=create_app(searcher)) as client:
        query = {"text": "a query caption"}
        before = client.post("/search", json=query).json()["results"]
        narrow = client.post("/search", json={**query, "k": 3, "nprobe": 1}).json()["results"]
        after = client.post("/search", json=query).json()["results"]
        assert len(narrow) == 3 and len(before) == 10
        assert after == before and index.index.nprobe == tuned
        assert before[0]["thumbnail"] is None and before[0]["image_id"] == before[0]["id"]

        def ask(k: int) -> int:
            response = client.post("/search", json={**query, "k": k, "nprobe": k})
            return len(response.json()["results"])

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(ask, range(1, 13))) == list(range(1, 13))
        assert index.index.nprobe == tuned


def test_openapi_bodies_are_the_request_models_with_the_servers_limits(setup) -> None:
    settings = ServeSettings(max_k=7, default_k=5, max_text_chars=50, max_batch=4)
    with TestClient(base_url=LOCAL, app=create_app(setup["searcher"], settings)) as client:
        paths = client.get("/openapi.json").json()["paths"]
        search = paths["/search"]["post"]["requestBody"]["content"]
        text = search["application/json"]["schema"]
        assert text["required"] == ["text"]
        assert text["properties"]["text"] == {
            "maxLength": 50,
            "minLength": 1,
            "title": "Text",
            "type": "string",
        }
        k = text["properties"]["k"]
        assert (k["type"], k["minimum"], k["maximum"], k["default"]) == ("integer", 1, 7, 5)
        image = search["multipart/form-data"]["schema"]
        assert image["required"] == ["image"] and image["properties"]["k"] == k
        embed = paths["/embed"]["post"]["requestBody"]["content"]
        one, many = embed["application/json"]["schema"]["properties"]["text"]["anyOf"]
        assert one["type"] == "string" and (many["minItems"], many["maxItems"]) == (1, 4)
        files = embed["multipart/form-data"]["schema"]["properties"]["image"]
        assert files["type"] == "array" and files["maxItems"] == 4
        match = paths["/match"]["post"]["requestBody"]["content"]
        assert list(match) == ["multipart/form-data"]
        assert match["multipart/form-data"]["schema"]["required"] == ["image", "caption"]
        # the server checks what it documents
        for payload, message in (
            ({"text": "cat", "k": 8}, "k must be an integer in 1..7, got 8"),
            ({"text": "x" * 51}, "text has 51 characters; the limit is 50"),
        ):
            response = client.post("/search", json=payload)
            assert response.status_code == 422 and response.json()["detail"] == message
        assert len(client.post("/search", json={"text": "cat"}).json()["results"]) == 5
        response = client.post("/embed", json={"text": ["a"] * 5})
        assert response.json()["detail"] == "5 texts; the limit is 4 per request"
        png = png_bytes(setup["data"] / "img0.png")
        response = client.post("/embed", files=[("image", ("a.png", png, "image/png"))] * 5)
        assert response.status_code == 422
        assert response.json()["detail"] == "5 images; the limit is 4 per request"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ImageLoadError("uploaded file q.png", "not a recognised image format"), 400),
        (CaptionError("caption 0 is empty"), 422),
        (InputError("re-ranking needs a caption query"), 422),
        (IncompatibleError("index vs model: embeddings from different models"), 409),
        (MissingFileError("shard images-00001.parquet is missing"), 404),
        (ConfigError("serve.max_k must be >= 1"), 500),
        (IndexBuildError("ids file and index disagree"), 503),
    ],
)
def test_the_error_family_is_mapped_in_one_handler(setup, monkeypatch, error, status) -> None:
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(setup["searcher"], "search_text", fail)
    with TestClient(base_url=LOCAL, app=create_app(setup["searcher"])) as client:
        response = client.post("/search", json={"text": "cat"})
    assert response.status_code == status
    prefix = "the index cannot be read: " if isinstance(error, IndexBuildError) else ""
    assert response.json() == {"detail": prefix + str(error)}


def test_serve_settings_are_typed_and_validated() -> None:
    assert from_dict(ServeSettings, {"max_k": 20, "expose_sources": True}) == ServeSettings(
        max_k=20, expose_sources=True
    )
    for data, message in (
        ({"max_k": 0}, "serve.max_k must be >= 1, got 0"),
        ({"max_k": "20"}, "serve.max_k must be an integer, got '20'"),
        ({"default_k": 11, "max_k": 10}, "serve.default_k must be in 1..max_k (10), got 11"),
        ({"port": 70000}, "serve.port must be in 0..65535, got 70000"),
        ({"log_level": "loud"}, "serve.log_level must be one of"),
        ({"expose_sources": "yes"}, "serve.expose_sources must be bool"),
        ({"max_batchs": 3}, "unknown key(s) ['max_batchs']"),
    ):
        with pytest.raises(ConfigError) as caught:
            from_dict(ServeSettings, data, "serve")
        assert message in str(caught.value), data
    with pytest.raises(ConfigError, match="max_upload_bytes"):
        ServeSettings(max_upload_bytes=0)  # checked when built directly too


def test_serve_command_options_come_from_the_settings(capsys) -> None:
    parser = argparse.ArgumentParser()
    serve_command.add(parser.add_subparsers())
    args = parser.parse_args(["serve", "--index", "i", "--model", "m", "--max-k", "20"])
    assert from_arguments(args) == ServeSettings(max_k=20)
    options = {a.dest: a for a in parser._subparsers._group_actions[0].choices["serve"]._actions}
    assert {f.name for f in dataclasses.fields(ServeSettings)} <= set(options)
    assert tuple(options["log_level"].choices) == typing.get_args(LogLevel)
    args = parser.parse_args(["serve", "--index", "i", "--model", "m", "--expose-sources"])
    assert from_arguments(args).expose_sources is True
    # a bad value is refused before any model or index is loaded
    assert main(["serve", "--index", "nowhere", "--model", "none", "--max-k", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "xmodal serve: error: serve.max_k must be >= 1, got 0"
    )


def test_one_image_field_given_twice_is_422(setup) -> None:
    png = png_bytes(setup["data"] / "img0.png")
    twice = [("image", ("a.png", png, "image/png"))] * 2
    for route, data in (("/search", {}), ("/match", {"caption": "photo"})):
        response = setup["client"].post(route, files=twice, data=data)
        assert response.status_code == 422
        assert response.json()["detail"] == "image must be given once, got 2 values"
