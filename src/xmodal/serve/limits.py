"""The limits that protect the server: the request body size (plain ASGI middleware: 413
before or while the body arrives) and, per uploaded image, its size in bytes and in pixels
(413, read from the image header before anything is decoded; a header check runs in a worker
thread, never on the event loop: some headers take seconds to parse)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, UploadFile
from PIL import Image

from xmodal.processing import open_raster

Scope = dict[str, Any]
Message = dict[str, Any]


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Answer 413 when Content-Length, or the bytes actually received, exceed ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send, int(length))
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, received)

    async def _reject(self, send: Any, size: int) -> None:
        detail = f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes"
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Upload:
    """An uploaded image: a byte source whose name shows up in ImageLoadError messages."""

    filename: str
    data: bytes = field(repr=False)

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return f"uploaded file {self.filename}"


async def read_uploads(files: list[UploadFile], max_bytes: int) -> list[Upload]:
    """The uploaded images' bytes; 413 for one over ``max_bytes``. Nothing is parsed here."""
    images = []
    for upload in files:
        data = await upload.read(max_bytes + 1)
        filename = upload.filename or "image"
        if len(data) > max_bytes:
            raise HTTPException(
                status_code=413,
                detail=f"image {filename!r} exceeds the upload limit of {max_bytes} bytes",
            )
        images.append(Upload(filename, data))
    return images


def uploads_pixels(uploads: list[Upload], max_pixels: int) -> int:
    """All the uploads' pixels together, read from their headers (slow for some files: call
    it in a worker thread); 413 for an image over ``max_pixels``."""
    return sum(check_pixels(upload.filename, upload.data, max_pixels) for upload in uploads)


def check_pixels(filename: str, data: bytes, limit: int) -> int:
    """The pixels the image header announces; 413 when more than ``limit`` (read from the
    header only). Undecodable data counts 0 and is left to the decoder, which reports it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = open_raster(data).size
    except Image.DecompressionBombError as err:
        reason = f"too many pixels (decompression bomb?): {err}"
    except Exception:  # noqa: BLE001 - not an image Pillow can even open: the decoder says why
        return 0
    else:
        if width * height <= limit:
            return width * height
        reason = f"{width}x{height} pixels exceeds the limit of {limit} per image"
    raise HTTPException(status_code=413, detail=f"image {filename!r}: {reason}")
