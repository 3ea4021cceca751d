"""FastAPI app: embed, search and match over an index, image thumbnails and a small web page."""

import mimetypes
from collections.abc import Callable
from functools import partial
from importlib import resources
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from xmodal.errors import (
    ImageLoadError,
    IncompatibleError,
    InputError,
    MissingFileError,
    XmodalError,
)
from xmodal.search import IndexedImageError, Searcher
from xmodal.serve.limits import BodySizeLimit, read_uploads
from xmodal.serve.public import PublicNames
from xmodal.serve.requests import body, openapi_body, request_models
from xmodal.serve.settings import ServeSettings

T = TypeVar("T")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields beside the image

# HTTP status of each kind of XmodalError (the first that matches); any other kind is 500
ERROR_STATUS: tuple[tuple[type[XmodalError], int], ...] = (
    (ImageLoadError, 400),  # an upload that is not an image
    (InputError, 422),  # a caption without text, re-ranking the wrong pair of modalities
    (IncompatibleError, 409),
    (MissingFileError, 404),
)


class Health(BaseModel):
    status: str
    modality: str
    kind: str
    count: int
    dim: int
    params: dict[str, Any]
    model: dict[str, Any]
    processor_hash: str
    refinable: bool  # whether a search may ask for exact re-ranking (refine)


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
    rerank_weight: float | None = None  # with rerank: the weight of the ITM score
    rerank_note: str | None = None  # with rerank: why results keep the ITC order (weight 0)


class Match(BaseModel):
    itm_score: float
    match_probability: float
    similarity: float


class Problem(BaseModel):
    detail: str


def error_response(err: XmodalError, names: PublicNames) -> tuple[int, str]:
    """Status and one-line detail of an error; an indexed image is named by its public id,
    never by where it lives on the server."""
    if isinstance(err, IndexedImageError):
        shown = names.public_id(err.position)
        detail = str(err) if names.expose else f"image {shown!r} {err.reason}"
        return (404 if err.gone else 500), detail
    status = next((code for kind, code in ERROR_STATUS if isinstance(err, kind)), 500)
    return status, str(err)


def create_app(searcher: Searcher, settings: ServeSettings | None = None) -> FastAPI:
    """The search API over ``searcher``'s index (the searcher has checked that its model and
    index belong together)."""
    settings = settings or ServeSettings()
    index = searcher.index
    names = PublicNames(index, expose=settings.expose_sources)
    models = request_models(settings)
    limiter = anyio.CapacityLimiter(settings.max_concurrency)
    app = FastAPI(
        title="xmodal search",
        description=f"Image-text search over {index.count} {index.modality} ({index.kind} index).",
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD)
    app.state.searcher = searcher
    app.state.settings = settings
    problems = {code: {"model": Problem} for code in (400, 413, 415, 422)}
    # the bodies, validated by the dependency that picks the model by content type
    EmbedBody = Annotated[
        BaseModel, Depends(body(models.text_embed, models.image_embed, settings.max_batch))
    ]
    SearchBody = Annotated[BaseModel, Depends(body(models.text_search, models.image_search, 1))]
    MatchBody = Annotated[BaseModel, Depends(body(None, models.match, 1))]

    @app.exception_handler(XmodalError)
    async def xmodal_error(_: Request, err: XmodalError) -> JSONResponse:
        status, detail = error_response(err, names)
        return JSONResponse({"detail": detail}, status_code=status)

    async def compute(fn: Callable[..., T], *args: Any) -> T:
        """Run model work in the threadpool, at most ``max_concurrency`` at once."""
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=limiter)

    async def uploads(files: list[Any]) -> list[Any]:
        return await read_uploads(files, settings.max_upload_bytes, settings.max_image_pixels)

    def thumbnail(public_id: str) -> str | None:
        return f"/images/{quote(public_id, safe='')}" if index.modality == "images" else None

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("xmodal.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @app.get("/health", response_model=Health, summary="Index and model status")
    def health() -> Health:
        model = dict(index.info["model"])
        model["id"] = names.model_id(str(model.get("id")))
        return Health(
            status="ok",
            modality=index.modality,
            kind=index.kind,
            count=index.count,
            dim=index.dim,
            params=index.info["params"],
            model=model,
            processor_hash=index.info["processor_hash"],
            refinable=index.refinable,
        )

    @app.post(
        "/embed",
        response_model=Embeddings,
        summary="Embed captions or images",
        description='JSON `{"text": [...]}` embeds captions; a multipart upload of one or more '
        "`image` files embeds images. Returns float32 L2-normalised vectors.",
        openapi_extra=openapi_body(models.text_embed, models.image_embed),
        responses=problems,
    )
    async def embed(request: EmbedBody) -> Embeddings:
        if isinstance(request, models.text_embed):
            vectors = await compute(searcher.embed_texts, request.text)
            modality = "text"
        else:
            vectors = await compute(searcher.embed_images, await uploads(request.image))
            modality = "image"
        return Embeddings(
            modality=modality, count=len(vectors), dim=vectors.shape[1], embeddings=vectors.tolist()
        )

    @app.post(
        "/search",
        response_model=SearchResponse,
        summary="Search the index with a caption or an image",
        description='JSON `{"text": "...", "k": 10}` or a multipart `image` upload with form '
        "fields `k`, `nprobe`, `ef_search`, `refine`, `rerank`. Parameters apply to this "
        "request only; `refine` (exact re-ranking of a shortlist) needs an index built with "
        "`--refine` (`refinable` in /health). "
        "Re-ranking uses the model's calibrated weight; at weight 0 results keep the ITC order "
        "and `rerank_note` says why. "
        "Hits name their dataset-relative location"
        + (" (this server shows locations as stored)." if settings.expose_sources else "."),
        openapi_extra=openapi_body(models.text_search, models.image_search),
        responses=problems,
    )
    async def search(query: SearchBody) -> SearchResponse:
        if query.refine and not index.refinable:
            raise HTTPException(
                status_code=422,
                detail="refine needs an index that keeps its vectors for exact re-ranking; "
                "this one was built without --refine (leave refine out or set it to 0)",
            )
        options = {"nprobe": query.nprobe, "ef_search": query.ef_search, "refine": query.refine}
        if isinstance(query, models.text_search):
            kind = "text"
            run = partial(searcher.search_text, query.text, query.k, query.rerank, **options)
        else:
            kind = "image"
            (image,) = await uploads([query.image])
            run = partial(searcher.search_image, image, query.k, query.rerank, **options)
        hits = [names.result(hit, hit["position"]) for hit in await compute(run)]
        results = [Result(**hit, thumbnail=thumbnail(hit["id"])) for hit in hits]
        rerank = {}
        if query.rerank:
            rerank = {"rerank_weight": searcher.rerank.weight, "rerank_note": searcher.rerank_note}
        return SearchResponse(query=kind, k=query.k, results=results, **rerank)

    @app.post(
        "/match",
        response_model=Match,
        summary="Image-text matching score of one pair",
        description="Multipart `image` file and `caption` field: ITM score, its probability "
        "and the embedding cosine similarity.",
        openapi_extra=openapi_body(None, models.match),
        responses=problems,
    )
    async def match(pair: MatchBody) -> Match:
        (image,) = await uploads([pair.image])
        return Match(**await compute(searcher.match, image, pair.caption))

    @app.get(
        "/images/{image_id:path}",
        summary="An indexed image (for thumbnails)",
        description="Only ids present in the image index are served; 404 for any other id and "
        "for an indexed image whose file is gone, 500 for one that no longer decodes.",
        response_class=Response,
        responses={404: {"model": Problem}, 500: {"model": Problem}},
    )
    async def image(image_id: str) -> Response:
        # the lookup reads the ids file (a row group per candidate): off the event loop
        position = await compute(names.position, image_id) if index.modality == "images" else None
        if position is None:
            raise HTTPException(
                status_code=404, detail=f"no image with id {image_id!r} in the index"
            )
        data = await compute(searcher.indexed_image_bytes, position)
        media_type = mimetypes.guess_type(index.sources[position])[0] or "image/*"
        return Response(data, media_type=media_type)

    return app
