"""Reading and validating request bodies (JSON or multipart) against the server's limits."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request
from PIL import Image
from starlette.datastructures import FormData, UploadFile

from xmodal.processing import caption_problem


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the server; every request is checked against them."""

    max_upload_bytes: int = 10 * 1024 * 1024  # per image; larger -> 413
    # decoded size per image; larger -> 413 before any decoding (a 300 kB PNG can hold 89 M
    # pixels: 1.5 s and 650 MB to decode)
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 1000  # per caption; longer -> 422
    max_batch: int = 32  # captions or images per /embed request; more -> 422
    max_k: int = 100
    default_k: int = 10
    max_concurrency: int = 4  # requests computing at once (model calls are serialised)


@dataclass(frozen=True)
class Upload:
    """An uploaded image: a byte source whose name shows up in ImageLoadError messages."""

    filename: str
    data: bytes = field(repr=False)

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return f"uploaded file {self.filename}"


@dataclass(frozen=True)
class QueryParams:
    k: int
    nprobe: int | None
    ef_search: int | None
    rerank: bool


def unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


async def read_body(request: Request, max_files: int) -> tuple[str, Mapping[str, Any]]:
    """("json", dict) or ("form", FormData), by the request's content type."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            data = json.loads(await request.body())
        except (ValueError, RecursionError) as err:  # also huge numbers and deep nesting
            raise unprocessable(f"body is not valid JSON: {str(err)[:200]}") from None
        if not isinstance(data, dict):
            raise unprocessable(f"JSON body must be an object, got {type(data).__name__}")
        return "json", data
    if content_type.startswith("multipart/form-data"):
        return "form", await request.form(max_files=max_files, max_fields=20)
    raise HTTPException(
        status_code=415,
        detail=f"send application/json or multipart/form-data, not {content_type or 'nothing'}",
    )


def check_text(text: Any, settings: ServeSettings, name: str = "text") -> str:
    if not isinstance(text, str):
        raise unprocessable(f"{name} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise unprocessable(f"{name} is empty")
    if len(text) > settings.max_text_chars:
        raise unprocessable(
            f"{name} has {len(text)} characters; the limit is {settings.max_text_chars}"
        )
    problem = caption_problem(text)
    if problem:
        raise unprocessable(f"{name} {problem}")
    return text


def check_texts(value: Any, settings: ServeSettings) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise unprocessable("text must be a string or a non-empty list of strings")
    if len(texts) > settings.max_batch:
        raise unprocessable(f"{len(texts)} texts; the limit is {settings.max_batch} per request")
    return [check_text(t, settings, f"text[{i}]") for i, t in enumerate(texts)]


def _int(raw: Mapping[str, Any], name: str, low: int, high: int | None) -> int | None:
    value = raw.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise unprocessable(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value) if isinstance(value, int | str) else None
    except ValueError:
        number = None
    if number is None or (high is not None and number > high) or number < low:
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise unprocessable(f"{name} must be an integer in {bounds}, got {value!r}")
    return number


def _bool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "true",
        "1",
        "yes",
        "on",
        "false",
        "0",
        "no",
        "off",
        "",
    ):
        return value.lower() in ("true", "1", "yes", "on")
    raise unprocessable(f"{name} must be true or false, got {value!r}")


def query_params(raw: Mapping[str, Any], settings: ServeSettings) -> QueryParams:
    """k (1..max_k), nprobe and ef_search (>= 1, optional), rerank (bool)."""
    k = _int(raw, "k", 1, settings.max_k)
    return QueryParams(
        k=settings.default_k if k is None else k,
        nprobe=_int(raw, "nprobe", 1, None),
        ef_search=_int(raw, "ef_search", 1, None),
        rerank=_bool(raw, "rerank"),
    )


async def read_images(form: FormData, name: str, settings: ServeSettings) -> list[Upload]:
    """The uploaded files of field ``name``; 413 for one over the size limit."""
    values = form.getlist(name)
    if not values:
        raise unprocessable(f"no '{name}' file in the form")
    if len(values) > settings.max_batch:
        raise unprocessable(f"{len(values)} images; the limit is {settings.max_batch} per request")
    images = []
    for value in values:
        if not isinstance(value, UploadFile):
            raise unprocessable(f"'{name}' must be a file upload, not a text field")
        data = await value.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(
                status_code=413,
                detail=f"image {value.filename!r} exceeds the upload limit of "
                f"{settings.max_upload_bytes} bytes",
            )
        filename = value.filename or name
        check_pixels(filename, data, settings.max_image_pixels)
        images.append(Upload(filename, data))
    return images


def check_pixels(filename: str, data: bytes, limit: int) -> None:
    """413 when the image header announces more than ``limit`` pixels (read from the header
    only); undecodable data is left to the decoder, which reports it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as err:
        reason = f"too many pixels (decompression bomb?): {err}"
    except Exception:  # noqa: BLE001 - not an image Pillow can even open: the decoder says why
        return
    else:
        if width * height <= limit:
            return
        reason = f"{width}x{height} pixels exceeds the limit of {limit} per image"
    raise HTTPException(status_code=413, detail=f"image {filename!r}: {reason}")
