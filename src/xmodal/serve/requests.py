"""Request bodies as pydantic models whose field constraints are the server's limits.

``/embed`` and ``/search`` take JSON (a caption) or a multipart form (an image upload) at the
same path, which FastAPI cannot route by itself: :func:`body` is the dependency that picks the
model by the request's content type and validates with it; the OpenAPI description of the body
is the models' own JSON schema (:func:`openapi_body`). A failed check is one 422 line naming
the field, what it must be and what it got.
"""

# no ``from __future__ import annotations``: the models are built at run time from the settings
import json
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import annotated_types
from fastapi import HTTPException, Request, UploadFile
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import ClientDisconnect

from xmodal.errors import CancelledWorkError
from xmodal.processing import caption_problem
from xmodal.serve.settings import ServeSettings

JSON = "application/json"
MULTIPART = "multipart/form-data"
SEARCH_PARAMETERS = ("k", "nprobe", "ef_search", "refine", "rerank")
MAX_FORM_FIELDS = 20


def _caption(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("caption", "is empty")
    problem = caption_problem(text)
    if problem:
        raise PydanticCustomError("caption", problem)
    return text


def _not_bool(value: Any) -> Any:
    """JSON ``true`` is not a number of results."""
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "a boolean is not an integer")
    return value


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class SearchParameters(BaseModel):
    """Per-request search parameters; blank form fields (and JSON nulls) mean the default."""

    @model_validator(mode="before")
    @classmethod
    def _blanks_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {
                key: value
                for key, value in data.items()
                if key not in SEARCH_PARAMETERS or value not in ("", None)
            }
        return data


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one app (their limits come from its settings)."""

    text_search: type[BaseModel]
    image_search: type[BaseModel]
    text_embed: type[BaseModel]
    image_embed: type[BaseModel]
    match: type[BaseModel]


def request_models(settings: ServeSettings) -> RequestModels:
    """Models whose constraints are ``settings``' limits (and so is their schema in /docs)."""
    Caption = Annotated[
        str,
        Field(min_length=1, max_length=settings.max_text_chars),
        AfterValidator(_caption),
    ]
    Captions = Annotated[list[Caption], Field(min_length=1, max_length=settings.max_batch)]
    Positive = Annotated[int | None, Field(ge=1), BeforeValidator(_not_bool)]

    class Parameters(SearchParameters):
        k: Annotated[int, Field(ge=1, le=settings.max_k), BeforeValidator(_not_bool)] = Field(
            settings.default_k, description="number of results"
        )
        nprobe: Positive = Field(None, description="IVF lists to visit (IVF indexes only)")
        ef_search: Positive = Field(None, description="HNSW search depth (HNSW indexes only)")
        refine: Annotated[
            int | None, Field(ge=0, le=settings.max_refine), BeforeValidator(_not_bool)
        ] = Field(
            None,
            description="re-rank a shortlist of this many candidates exactly from the vectors "
            "the index keeps (indexes built with --refine only); 0 turns it off; default: as "
            "the index was built",
        )
        rerank: bool = Field(
            False,
            description="re-score the top k with the ITM head, at the model's calibrated "
            "weight (a no-op at weight 0; see rerank_note in the response)",
        )

    class TextSearch(Parameters):
        """Search with a caption."""

        text: Caption

    class ImageSearch(Parameters):
        """Search with an uploaded image."""

        image: UploadFile

    class TextEmbed(BaseModel):
        """Embed one caption or a list of them."""

        text: Annotated[
            Captions, BeforeValidator(_listify, json_schema_input_type=Caption | Captions)
        ]

    class ImageEmbed(BaseModel):
        """Embed one or more uploaded images."""

        image: Annotated[list[UploadFile], Field(min_length=1, max_length=settings.max_batch)]

    class MatchForm(BaseModel):
        """An uploaded image and a caption to score together."""

        image: UploadFile
        caption: Caption

    return RequestModels(TextSearch, ImageSearch, TextEmbed, ImageEmbed, MatchForm)


# ----------------------------------------------------------------------------- parsing


def body(
    json_model: type[BaseModel] | None, form_model: type[BaseModel] | None, max_files: int
) -> Callable[[Request], Awaitable[BaseModel]]:
    """A dependency: the request body validated with ``json_model`` (JSON) or ``form_model``
    (multipart), by its content type; 415 for another media type, 422 for a failed check."""
    accepted = [m for m, model in ((JSON, json_model), (MULTIPART, form_model)) if model]

    async def parse(request: Request) -> BaseModel:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        model = {JSON: json_model, MULTIPART: form_model}.get(media)
        if model is None:  # 415 for a media type the API never takes; 422 for the other one
            raise HTTPException(
                status_code=422 if media in (JSON, MULTIPART) else 415,
                detail=f"send {' or '.join(accepted)}, not {content_type or 'nothing'}",
            )
        try:
            if media == JSON:
                return model.model_validate(_json(await request.body()))
            # one file over the limit parses, so that the model's check names the limit
            form = await request.form(max_files=max_files + 1, max_fields=MAX_FORM_FIELDS)
            return model.model_validate(_form_values(form, model))
        except ValidationError as err:
            raise HTTPException(status_code=422, detail=describe(err, model)) from None
        except ClientDisconnect:  # one log line (the handler's), not a traceback
            raise CancelledWorkError("the client went away while sending its request") from None

    return parse


def _json(data: bytes) -> Any:
    """The standard library's parse: it keeps a lone surrogate escape (``"\\ud800"``) for the
    caption check to name, where pydantic's parser refuses the whole body."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # also huge numbers and deep nesting
        raise HTTPException(
            status_code=422, detail=f"body is not valid JSON: {str(err)[:200]}"
        ) from None


def _form_values(form: Any, model: type[BaseModel]) -> dict[str, Any]:
    """The form's values of the model's fields (every value of a list field)."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if typing.get_origin(info.annotation) is list:
            found = form.getlist(name)
            if found:
                values[name] = found
        elif name in form:
            found = form.getlist(name)
            if len(found) > 1:
                raise HTTPException(
                    status_code=422, detail=f"{name} must be given once, got {len(found)} values"
                )
            values[name] = found[0]
    return values


def describe(err: ValidationError, model: type[BaseModel]) -> str:
    """The first problem of ``err`` as one line: the field, what it must be, what it got."""
    error = err.errors(include_url=False)[0]
    kind, loc, ctx = error["type"], error["loc"], error.get("ctx") or {}
    value = error.get("input")
    if not loc:
        return f"JSON body must be an object, got {type(value).__name__}"
    field, item = str(loc[0]), next((p for p in loc[1:] if isinstance(p, int)), None)
    name = field if item is None else f"{field}[{item}]"
    expected = expectation(model, field, item is not None)
    if kind == "caption":
        return f"{name} {error['msg']}"
    if kind == "string_unicode" and isinstance(value, str):  # a lone surrogate
        return f"{name} {caption_problem(value) or 'is not valid Unicode'}"
    if kind == "string_too_short":
        return f"{name} is empty"
    if kind == "string_too_long":
        return f"{name} has {len(value)} characters; the limit is {ctx['max_length']}"
    if kind == "too_long":
        return f"{ctx['actual_length']} {field}s; the limit is {ctx['max_length']} per request"
    if kind in ("missing", "too_short"):
        return f"{name} must be {expected}"
    return f"{name} must be {expected}, got {_short(value)}"


def _short(value: Any) -> str:
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"a {type(value).__name__}"


def expectation(model: type[BaseModel], field: str, item: bool = False) -> str:
    """What ``model.field`` (or one item of it) must be, in words, from its type and limits."""
    info = model.model_fields.get(field)
    if info is None:
        return "absent"
    annotation, metadata = info.annotation, info.metadata
    if typing.get_origin(annotation) is list:
        element = _describe(typing.get_args(annotation)[0], [])
        if item:
            return element
        low = _bound(metadata, annotated_types.MinLen, "min_length") or 0
        high = _bound(metadata, annotated_types.MaxLen, "max_length")
        if element == "a string":
            return "a string or a non-empty list of strings"
        return f"{max(low, 1)}..{high} file uploads" if high else "one or more file uploads"
    return _describe(annotation, metadata)


def _describe(annotation: Any, metadata: list[Any]) -> str:
    if typing.get_origin(annotation) is Annotated:
        base, *extra = typing.get_args(annotation)
        return _describe(base, metadata + [m for e in extra for m in getattr(e, "metadata", [e])])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) is not list:  # X | None
        return _describe(args[0], metadata)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        low = _bound(metadata, annotated_types.Ge, "ge")
        high = _bound(metadata, annotated_types.Le, "le")
        if low is not None and high is not None:
            return f"an integer in {low}..{high}"
        return f"an integer >= {low}" if low is not None else "an integer"
    if annotation is str:
        return "a string"
    if annotation is UploadFile:
        return "a file upload"
    return f"a {getattr(annotation, '__name__', annotation)}"


def _bound(metadata: list[Any], kind: type, attribute: str) -> Any:
    return next((getattr(m, attribute) for m in metadata if isinstance(m, kind)), None)


# ----------------------------------------------------------------------------- OpenAPI


def openapi_body(json_model: type[BaseModel] | None, form_model: type[BaseModel] | None):
    """``openapi_extra`` describing the request body with the models' own JSON schemas."""
    content: dict[str, Any] = {}
    for media, model in ((JSON, json_model), (MULTIPART, form_model)):
        if model is not None:
            content[media] = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": content}}
