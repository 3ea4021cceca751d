"""FastAPI app: embed, search and match over an index, image thumbnails and a small web page."""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable
from functools import partial
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel

from xmodal.data.refs import image_ref
from xmodal.index import SearchIndex
from xmodal.models.identity import ModelIdentity
from xmodal.models.model import CrossModalModel
from xmodal.processing import CaptionError, ImageLoadError, MultimodalProcessor
from xmodal.search import Searcher
from xmodal.serve.limits import BodySizeLimit
from xmodal.serve.payloads import (
    QueryParams,
    ServeSettings,
    check_text,
    check_texts,
    query_params,
    read_body,
    read_images,
    unprocessable,
)

T = TypeVar("T")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields beside the image


class Health(BaseModel):
    status: str
    what: str
    kind: str
    count: int
    dim: int
    params: dict[str, Any]
    model: dict[str, Any]
    processor_hash: str


class Embeddings(BaseModel):
    modality: str
    count: int
    dim: int
    embeddings: list[list[float]]


class Result(BaseModel):
    rank: int
    id: str
    source: str
    score: float
    image_id: str | None = None
    thumbnail: str | None = None
    itm_score: float | None = None
    rerank_score: float | None = None


class SearchResponse(BaseModel):
    query: str
    k: int
    results: list[Result]


class Match(BaseModel):
    itm_score: float
    match_probability: float
    similarity: float


def _body_doc(json_schema: dict[str, Any] | None, form: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = {"multipart/form-data": {"schema": form}}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}


_PARAMS = {
    "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
    "nprobe": {"type": "integer", "minimum": 1, "description": "IVF lists to visit"},
    "ef_search": {"type": "integer", "minimum": 1, "description": "HNSW search depth"},
    "rerank": {"type": "boolean", "default": False},
}
_IMAGE = {"type": "string", "format": "binary"}


def create_app(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    index: SearchIndex,
    settings: ServeSettings | None = None,
    identity: ModelIdentity | None = None,
) -> FastAPI:
    """The search API over ``index``; ``identity`` (when given) is checked against the index."""
    settings = settings or ServeSettings()
    searcher = Searcher(model, processor, index, identity)
    limiter = anyio.CapacityLimiter(settings.max_concurrency)
    app = FastAPI(
        title="xmodal search",
        description=f"Image-text search over {index.count} {index.modality} ({index.kind} index).",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD)
    app.state.searcher = searcher
    app.state.settings = settings

    async def compute(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run model work in the threadpool, at most ``max_concurrency`` at once."""
        try:
            return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=limiter)
        except ImageLoadError as err:
            raise HTTPException(status_code=400, detail=str(err)) from None
        except CaptionError as err:
            raise unprocessable(str(err)) from None

    def thumbnail(item_id: str) -> str | None:
        return f"/images/{quote(item_id, safe='')}" if index.modality == "images" else None

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("xmodal.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @app.get("/health", response_model=Health, summary="Index and model status")
    def health() -> Health:
        return Health(
            status="ok",
            what=index.modality,
            kind=index.kind,
            count=index.count,
            dim=index.dim,
            params=index.info["params"],
            model=index.info["model"],
            processor_hash=index.info["processor_hash"],
        )

    @app.post(
        "/embed",
        response_model=Embeddings,
        summary="Embed captions or images",
        description=(
            'JSON `{"text": [...]}` embeds captions; a multipart upload of one or more `image` '
            "files embeds images. Returns float32 L2-normalised vectors."
        ),
        openapi_extra=_body_doc(
            {
                "type": "object",
                "properties": {"text": {"type": "array", "items": {"type": "string"}}},
            },
            {"type": "object", "properties": {"image": {"type": "array", "items": _IMAGE}}},
        ),
    )
    async def embed(request: Request) -> Embeddings:
        kind, body = await read_body(request, settings.max_batch)
        if kind == "json":
            texts = check_texts(body.get("text"), settings)
            vectors = await compute(searcher.embed_texts, texts)
            modality = "text"
        else:
            images = await read_images(body, "image", settings)
            vectors = await compute(searcher.embed_images, images)
            modality = "image"
        return Embeddings(
            modality=modality, count=len(vectors), dim=vectors.shape[1], embeddings=vectors.tolist()
        )

    @app.post(
        "/search",
        response_model=SearchResponse,
        summary="Search the index with a caption or an image",
        description=(
            'JSON `{"text": "...", "k": 10}` or a multipart `image` upload with form fields '
            "`k`, `nprobe`, `ef_search`, `rerank`. Parameters apply to this request only."
        ),
        openapi_extra=_body_doc(
            {
                "type": "object",
                "required": ["text"],
                "properties": {"text": {"type": "string"}, **_PARAMS},
            },
            {"type": "object", "required": ["image"], "properties": {"image": _IMAGE, **_PARAMS}},
        ),
    )
    async def search(request: Request) -> SearchResponse:
        kind, body = await read_body(request, 1)
        params = query_params(body, settings)
        options = {"nprobe": params.nprobe, "ef_search": params.ef_search}
        if kind == "json":
            text = check_text(body.get("text"), settings)
            run = partial(searcher.search_text, text, params.k, params.rerank, **options)
        else:
            (image,) = await read_images(body, "image", settings)
            run = partial(searcher.search_image, image, params.k, params.rerank, **options)
        try:
            results = await compute(run)
        except ValueError as err:  # re-ranking asked of the wrong pair of modalities
            if isinstance(err, ImageLoadError | CaptionError):
                raise
            raise unprocessable(str(err)) from None
        return _response(kind, params, results, thumbnail)

    @app.post(
        "/match",
        response_model=Match,
        summary="Image-text matching score of one pair",
        description="Multipart `image` file and `caption` field: ITM score, its probability and "
        "the embedding cosine similarity.",
        openapi_extra=_body_doc(
            None,
            {
                "type": "object",
                "required": ["image", "caption"],
                "properties": {"image": _IMAGE, "caption": {"type": "string"}},
            },
        ),
    )
    async def match(request: Request) -> Match:
        kind, body = await read_body(request, 1)
        if kind != "form":
            raise unprocessable("send a multipart form with an 'image' file and a 'caption' field")
        caption = check_text(body.get("caption"), settings, "caption")
        (image,) = await read_images(body, "image", settings)
        return Match(**await compute(searcher.match, image, caption))

    @app.get(
        "/images/{image_id:path}",
        summary="An indexed image (for thumbnails)",
        description="Only ids present in the image index are served.",
        response_class=Response,
    )
    def image(image_id: str) -> Response:
        position = index.position(image_id) if index.modality == "images" else None
        if position is None:
            raise HTTPException(
                status_code=404, detail=f"no image with id {image_id!r} in the index"
            )
        ref = image_ref(index.locations[position])
        if isinstance(ref, str):
            if not os.path.isfile(ref):
                raise HTTPException(status_code=404, detail=f"image {image_id!r}: file is gone")
            return FileResponse(ref, media_type=mimetypes.guess_type(ref)[0] or "image/*")
        try:
            data = ref.read_bytes()
        except OSError as err:
            raise HTTPException(status_code=404, detail=f"image {image_id!r}: {err}") from None
        return Response(data, media_type=mimetypes.guess_type(ref.name)[0] or "image/*")

    return app


def _response(
    kind: str,
    params: QueryParams,
    results: list[dict[str, Any]],
    thumbnail: Callable[[str], str | None],
) -> SearchResponse:
    return SearchResponse(
        query="text" if kind == "json" else "image",
        k=params.k,
        results=[Result(**r, thumbnail=thumbnail(r["id"])) for r in results],
    )
