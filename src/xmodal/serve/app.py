"""FastAPI app: embed, search and match over an index, image thumbnails and a small web page.

Every endpoint's work is bounded (:mod:`xmodal.serve.work`: a cost model checked against the
limits, a deadline, cancellation when the client goes away) and runs in worker threads; who may
call it and what a browser may do with the answers is :mod:`xmodal.serve.security`; errors map
to statuses in :mod:`xmodal.serve.problems`.
"""

import io
import logging
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel

from xmodal.errors import IndexBuildError, XmodalError
from xmodal.index.searching import measured_recall
from xmodal.processing import open_raster
from xmodal.runtime import Deadline
from xmodal.search import Searcher
from xmodal.serve.limits import BodySizeLimit, read_uploads, uploads_pixels
from xmodal.serve.problems import ERROR_STATUS, error_response
from xmodal.serve.public import PublicNames
from xmodal.serve.requests import body, openapi_body, request_models
from xmodal.serve.security import add_security
from xmodal.serve.settings import ServeSettings
from xmodal.serve.work import RequestCost, Workers

__all__ = ["ERROR_STATUS", "create_app", "error_response"]

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields beside the image
# Indexed images are served in their own format when a browser shows it as an image; any other
# accepted format (TIFF, MPO) as a PNG of the decoded image, at most THUMBNAIL_SIDE a side.
SERVED_AS_IS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}
THUMBNAIL_SIDE = 1024
STATIC_TYPES = {"app.js": "text/javascript", "app.css": "text/css"}
log = logging.getLogger("xmodal.serve")


class Health(BaseModel):
    status: str  # ok, or damaged (with 503) when an index file changed on disk
    detail: str | None = None
    modality: str
    kind: str
    count: int
    dim: int
    params: dict[str, Any]
    model: dict[str, Any]
    processor_hash: str
    refinable: bool  # whether a search may ask for exact re-ranking (refine)
    # recall@10 against exact search, measured when the index was built (None: older index)
    measured_recall: dict[str, Any] | None = None


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


def create_app(searcher: Searcher, settings: ServeSettings | None = None) -> FastAPI:
    """The search API over ``searcher``'s index (the searcher has checked that its model and
    index belong together)."""
    settings = settings or ServeSettings()
    index = searcher.index
    names = PublicNames(index, expose=settings.expose_sources)
    models = request_models(settings)
    workers = Workers(settings)
    app = FastAPI(
        title="xmodal search",
        description=f"Image-text search over {index.count} {index.modality} ({index.kind} index).",
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN: /openapi.json only
        redoc_url=None,
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD)
    add_security(app, settings)
    app.state.searcher = searcher
    app.state.settings = settings
    problems = {code: {"model": Problem} for code in (400, 401, 413, 415, 422, 503)}
    # the bodies, validated by the dependency that picks the model by content type
    EmbedBody = Annotated[
        BaseModel, Depends(body(models.text_embed, models.image_embed, settings.max_batch))
    ]
    SearchBody = Annotated[BaseModel, Depends(body(models.text_search, models.image_search, 1))]
    MatchBody = Annotated[BaseModel, Depends(body(None, models.match, 1))]

    @app.exception_handler(XmodalError)
    async def xmodal_error(request: Request, err: XmodalError) -> JSONResponse:
        status, detail = error_response(err, names)
        if status >= 500 or status == 499:  # the server's side of it, in one log line
            log.warning("%s %s: %d %s", request.method, request.url.path, status, err)
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    async def uploads(request: Request, work: Deadline, files: list[Any]) -> tuple[list, int]:
        """The uploads' bytes and their pixels (header checks in a worker thread)."""
        images = await read_uploads(files, settings.max_upload_bytes)
        pixels = await workers.check(
            request, work, uploads_pixels, images, settings.max_image_pixels
        )
        return images, pixels

    def thumbnail(public_id: str) -> str | None:
        return f"/images/{quote(public_id, safe='')}" if index.modality == "images" else None

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_TYPES:
            raise HTTPException(status_code=404, detail="not found")
        return Response(_static(name), media_type=STATIC_TYPES[name])

    @app.get(
        "/health",
        response_model=Health,
        summary="Index and model status",
        responses={503: {"model": Health}},
    )
    def health() -> Any:
        model = dict(index.info["model"])
        model["id"] = names.model_id(str(model.get("id")))
        status, detail = "ok", None
        try:
            index.check_files()
        except IndexBuildError as err:
            status, detail = "damaged", error_response(err, names)[1]
        report = Health(
            status=status,
            detail=detail,
            modality=index.modality,
            kind=index.kind,
            count=index.count,
            dim=index.dim,
            params=index.info["params"],
            model=model,
            processor_hash=index.info["processor_hash"],
            refinable=index.refinable,
            measured_recall=measured_recall(index.info),
        )
        if status != "ok":
            return JSONResponse(report.model_dump(), status_code=503)
        return report

    @app.post(
        "/embed",
        response_model=Embeddings,
        summary="Embed captions or images",
        description='JSON `{"text": [...]}` embeds captions; a multipart upload of one or more '
        "`image` files embeds images. Returns float32 L2-normalised vectors.",
        openapi_extra=openapi_body(models.text_embed, models.image_embed),
        responses=problems,
    )
    async def embed(request: Request, query: EmbedBody) -> Embeddings:
        work = workers.deadline()
        if isinstance(query, models.text_embed):
            RequestCost(captions=len(query.text)).check(settings)
            vectors = await workers.run(request, work, False, searcher.embed_texts, query.text)
            modality = "text"
        else:
            images, pixels = await uploads(request, work, query.image)
            RequestCost(images=len(images), pixels=pixels).check(settings)
            vectors = await workers.run(request, work, True, searcher.embed_images, images)
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
        f"Re-ranking (at most k = {settings.max_rerank}) uses the model's calibrated weight; "
        "at weight 0 results keep the ITC order and `rerank_note` says why. "
        "Hits name their dataset-relative location"
        + (" (this server shows locations as stored)." if settings.expose_sources else "."),
        openapi_extra=openapi_body(models.text_search, models.image_search),
        responses=problems,
    )
    async def search(request: Request, query: SearchBody) -> SearchResponse:
        work = workers.deadline()
        if query.refine and not index.refinable:
            raise HTTPException(
                status_code=422,
                detail="refine needs an index that keeps its vectors for exact re-ranking; "
                "this one was built without --refine (leave refine out or set it to 0)",
            )
        options = {"nprobe": query.nprobe, "ef_search": query.ef_search, "refine": query.refine}
        reranked = query.k if query.rerank and searcher.rerank.active else 0
        if isinstance(query, models.text_search):
            kind, subject, run = "text", query.text, searcher.search_text
            cost = RequestCost(captions=1, rerank_pairs=reranked)
        else:
            kind, run = "image", searcher.search_image
            (subject,), pixels = await uploads(request, work, [query.image])
            cost = RequestCost(images=1, pixels=pixels, rerank_pairs=reranked)
        cost.check(settings)
        found = await workers.run(
            request, work, cost.heavy, run, subject, query.k, query.rerank, **options
        )
        hits = [names.result(hit, hit["position"]) for hit in found]
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
    async def match(request: Request, pair: MatchBody) -> Match:
        work = workers.deadline()
        (image,), pixels = await uploads(request, work, [pair.image])
        RequestCost(images=1, pixels=pixels, captions=1).check(settings)
        return Match(**await workers.run(request, work, True, searcher.match, image, pair.caption))

    @app.get(
        "/images/{image_id:path}",
        summary="An indexed image (for thumbnails)",
        description="Only ids present in the image index are served, as the image type they "
        "decode as (never a type from the file name); 404 for any other id and for an indexed "
        "image whose file is gone, 500 for one that no longer decodes.",
        response_class=Response,
        responses={404: {"model": Problem}, 500: {"model": Problem}},
    )
    async def image(request: Request, image_id: str) -> Response:
        work = workers.deadline()
        if index.modality != "images":
            raise HTTPException(status_code=404, detail=f"no image with id {image_id!r}")
        # the lookup reads the ids file (a row group per candidate): off the event loop
        position = await workers.run(request, work, False, _lookup(names), image_id)
        if position is None:
            raise HTTPException(
                status_code=404, detail=f"no image with id {image_id!r} in the index"
            )
        data, media_type = await workers.run(request, work, False, _image_file(searcher), position)
        return Response(data, media_type=media_type)

    return app


def _static(name: str) -> str:
    return resources.files("xmodal.serve").joinpath(f"static/{name}").read_text("utf-8")


def _lookup(names: PublicNames):
    def lookup(public_id: str, work: Deadline) -> int | None:
        work.check()
        names.index.check_files()
        return names.position(public_id)

    return lookup


def _image_file(searcher: Searcher):
    def read(position: int, work: Deadline) -> tuple[bytes, str]:
        """The bytes to send for an indexed image and their type, from its decoded format."""
        work.check()
        data, decoded = searcher.read_indexed(position)
        media_type = SERVED_AS_IS.get(open_raster(data).format or "")
        if media_type is not None:
            return data, media_type
        decoded.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        decoded.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"

    return read
