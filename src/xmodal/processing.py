"""MultimodalProcessor: images and captions to model inputs, in batches.

Images: decoded from paths, bytes, PIL images or arrays; EXIF orientation applied; transparency
composited on white; CMYK, 16-bit and greyscale converted to RGB; then resized, centre-cropped
and normalised as the image backbone expects. Captions: any Hugging Face tokenizer, dynamic
padding by default, truncation always on.
"""

from __future__ import annotations

import io
import json
import os
import stat
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from xmodal import storage
from xmodal.atomic import atomic_write_text, make_dir
from xmodal.config import (
    ConfigError,
    ProcessorConfig,
    from_dict,
    load_json_config,
    stable_hash,
    to_dict,
)
from xmodal.errors import (
    CaptionError,
    ImageLoadError,
    InputError,
    MissingFileError,
    XmodalError,
)

ImageFile.LOAD_TRUNCATED_IMAGES = False
# The only formats xmodal decodes, anywhere (Pillow's names; MPO is the multi-picture JPEG that
# phones write). Every other format Pillow knows is refused before a decoder runs: EPS would
# start Ghostscript, and rarely used decoders are where parser bugs live.
RASTER_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file. A FIFO, a device or a folder is refused without blocking
    on it (``OSError``); ``max_bytes`` refuses a larger file before reading it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{os.fspath(path)} is not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(f"{os.fspath(path)} is {info.st_size} bytes, over {max_bytes}")
        os.set_blocking(fd, True)
        return handle.read()


def open_raster(data: bytes) -> Image.Image:
    """Pillow's lazy open of encoded bytes, restricted to :data:`RASTER_FORMATS`
    (``UnidentifiedImageError`` for anything else)."""
    return Image.open(io.BytesIO(data), formats=_registered_formats())


def _registered_formats() -> tuple[str, ...]:
    """:data:`RASTER_FORMATS` that this Pillow opens by name (some versions open MPO through
    the JPEG plugin only)."""
    if not all(name in Image.OPEN for name in ("PNG", "JPEG", "WEBP", "TIFF")):
        Image.init()  # registers the plugins Pillow does not load up front (WebP, TIFF)
    return tuple(name for name in RASTER_FORMATS if name in Image.OPEN)


@runtime_checkable
class ByteSource(Protocol):
    """Anything that can hand over an encoded image's bytes (e.g. a member of a tar shard)."""

    def read_bytes(self) -> bytes: ...


ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | ByteSource


def describe_source(image: Any) -> str:
    """A short human-readable name for an image input, for error messages."""
    if isinstance(image, str | os.PathLike):
        return repr(os.fspath(image))
    if isinstance(image, bytes):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {image.shape} {image.dtype}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.mode} {image.size}>"
    return repr(str(image))


def load_image(
    image: ImageInput, max_pixels: int = 89_478_485, draft_size: int | None = None
) -> Image.Image:
    """Decode any supported image input to an 8-bit RGB PIL image.

    ``draft_size`` lets JPEG decoding downscale by a power of two while keeping both sides at
    least that large (much faster for big photos). Raises :class:`ImageLoadError` naming the input.
    """
    source = describe_source(image)
    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, np.ndarray):
            return to_rgb(_array_to_pil(image, source))
        else:
            img = _open(image, source)
        _check_pixels(img, max_pixels, source)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except ImageLoadError:
        raise
    except MemoryError as exc:
        raise ImageLoadError(source, "out of memory while decoding") from exc
    except Exception as exc:  # noqa: BLE001 - decoders of untrusted bytes raise anything
        raise ImageLoadError(source, f"{type(exc).__name__}: {exc}") from exc


def _read_url(url: str, source: str) -> bytes:
    """The bytes of an image named by a URL (:mod:`xmodal.storage`)."""
    try:
        return storage.read_bytes(url)
    except FileNotFoundError as exc:
        raise ImageLoadError(source, "file not found") from exc
    except XmodalError as exc:  # no package for the protocol, an unknown protocol
        raise ImageLoadError(source, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - each file system raises its own kinds
        raise ImageLoadError(source, f"cannot be read ({type(exc).__name__}: {exc})") from exc


def _open(image: Any, source: str) -> Image.Image:
    if isinstance(image, str) and storage.is_url(image):
        data = _read_url(image, source)
    elif isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.exists():
            raise ImageLoadError(source, "file not found")
        if not path.is_file():
            raise ImageLoadError(source, "not a regular file")
        try:
            data = read_regular_file(path)
        except OSError as exc:
            raise ImageLoadError(source, f"cannot be read ({type(exc).__name__})") from exc
    elif isinstance(image, bytes):
        data = image
    elif isinstance(image, ByteSource):
        data = image.read_bytes()
    else:
        raise ImageLoadError(source, f"unsupported input type {type(image).__name__}")
    if not data:
        raise ImageLoadError(source, "empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return open_raster(data)
        except UnidentifiedImageError as exc:
            raise ImageLoadError(
                source, f"not a recognised image format (accepted: {ACCEPTED_FORMATS})"
            ) from exc
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageLoadError(source, f"too many pixels (decompression bomb?): {exc}") from exc


def _check_pixels(img: Image.Image, max_pixels: int, source: str) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageLoadError(source, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageLoadError(
            source, f"{width}x{height} pixels exceeds the limit of {max_pixels} (max_image_pixels)"
        )


def _array_to_pil(array: np.ndarray, source: str) -> Image.Image:
    """HxW or HxWxC (C = 1, 3, 4) arrays; bool, uint8, uint16 or float in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(source, "array must be HxW, HxWx1, HxWx3 or HxWx4")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageLoadError(source, f"invalid size {array.shape[1]}x{array.shape[0]}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.bool_:
        data = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        data = array
    elif array.dtype == np.uint16:
        data = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(source, "array has NaN or infinite values")
        data = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageLoadError(source, f"unsupported array dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(data))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray((np.clip(arr / top, 0, 1) * 255 + 0.5).astype(np.uint8))
    if img.mode == "La":  # premultiplied; Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Processor fields added after models were saved: left out of the hash at their defaults, so
# existing extractions stay compatible with the models that made them.
_HASH_DEFAULTS = {"reducing_gap": 3.0, "resize_rounding": "round"}
# Past this aspect ratio only the region the centre crop keeps is resampled (the same pixels up
# to resampling noise): a 1x200000 image would otherwise be scaled to 256x51200000 pixels first
# (gigabytes and seconds, from a 1 kB upload).
_MAX_ASPECT = 16


class ImageTransform:
    """Resize, centre-crop and normalise an RGB PIL image into a float tensor (3, S, S)."""

    def __init__(self, config: ProcessorConfig):
        self.config = config
        self.mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def decode_size(self) -> int:
        """The smallest side a decoded image needs before resizing (for JPEG draft mode)."""
        cfg = self.config
        return cfg.resize_size or cfg.image_size if cfg.resize == "shorter" else cfg.image_size

    def resize_crop(self, img: Image.Image) -> Image.Image:
        cfg = self.config
        resample = _RESAMPLE[cfg.interpolation]
        size, gap = cfg.image_size, cfg.reducing_gap
        if cfg.resize == "squash":
            return img.resize((size, size), resample, reducing_gap=gap)
        target = cfg.resize_size or size
        width, height = img.size
        if cfg.resize_rounding == "floor":  # Hugging Face: the shorter side exact, the other int()
            short, long = sorted((width, height))
            longer = int(target * long / short)
            new_w, new_h = (target, longer) if width <= height else (longer, target)
            new_w, new_h = max(size, new_w), max(size, new_h)
        else:
            scale = target / min(width, height)
            new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        if max(new_w, new_h) > _MAX_ASPECT * target:
            sx, sy = width / new_w, height / new_h
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            return img.resize((size, size), resample, box=box, reducing_gap=gap)
        img = img.resize((new_w, new_h), resample, reducing_gap=gap)
        return img.crop((left, top, left + size, top + size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(self.resize_crop(img), dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((arr - self.mean) / self.std)


class MultimodalProcessor:
    """Turns images and captions into model inputs; its config travels with the model.

    >>> batch = processor(images=["cat.jpg", pil_image], text=["a cat", "a dog"])
    >>> batch["pixel_values"].shape, batch["input_ids"].shape
    """

    def __init__(self, config: ProcessorConfig, tokenizer: Any | None = None):
        config.validate()
        self.config = config
        self.image_transform = ImageTransform(config)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    # -- images -------------------------------------------------------------------------------
    def load_image(self, image: ImageInput) -> Image.Image:
        return load_image(image, self.config.max_image_pixels, self.image_transform.decode_size)

    def process_image(self, image: ImageInput) -> torch.Tensor:
        """One image -> normalised tensor (3, S, S)."""
        return self.image_transform(self.load_image(image))

    def process_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> a batch (B, 3, S, S); the first bad input raises ImageLoadError."""
        if not len(images):
            raise InputError("no images given")
        return torch.stack([self.process_image(img) for img in images])

    # -- captions -----------------------------------------------------------------------------
    def process_text(
        self, text: str | Sequence[str], apply_template: bool = True
    ) -> dict[str, torch.Tensor]:
        """Captions -> ``input_ids`` and ``attention_mask`` (B, L).

        ``apply_template=False`` skips ``caption_template`` (for prompts that bring their own).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise CaptionError("no captions given")
        for i, caption in enumerate(texts):
            check_caption(caption, i)
        cfg = self.config
        if apply_template:
            texts = self.apply_template(texts)
        encoded = self.tokenizer(
            texts,
            padding=cfg.padding,
            truncation=True,
            max_length=cfg.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    process_texts = process_text

    def apply_template(self, captions: Sequence[str]) -> list[str]:
        """The captions wrapped in ``caption_template`` (the one place it is applied)."""
        template = self.config.caption_template
        if template == "{}":
            return list(captions)
        return [template.format(caption) for caption in captions]

    def __call__(
        self,
        images: Sequence[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        if images is None and text is None:
            raise InputError("give images, text or both")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.process_images(images)
        if text is not None:
            out.update(self.process_text(text))
        return out

    # -- identity and persistence -------------------------------------------------------------
    @property
    def config_hash(self) -> str:
        """Stable hash of everything that changes the model inputs (config + vocabulary).

        The tokenizer's location is left out (it differs between machines); its vocabulary and
        class are in.
        """
        config = to_dict(self.config)
        config.pop("tokenizer")
        for key, default in _HASH_DEFAULTS.items():
            if config.get(key) == default:
                config.pop(key)
        tokenizer = {"class": type(self.tokenizer).__name__, "vocab": self.vocab_hash}
        return stable_hash({"config": config, "tokenizer": tokenizer})

    @property
    def vocab_hash(self) -> str:
        vocab = self.tokenizer.get_vocab()
        return stable_hash(sorted(vocab.items(), key=lambda kv: kv[1]))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``processor_config.json`` and the tokenizer files into ``directory``."""
        directory = Path(directory)
        make_dir(directory)
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        data = {"processor": to_dict(self.config), "config_hash": self.config_hash}
        atomic_write_text(directory / "processor_config.json", json.dumps(data, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MultimodalProcessor:
        directory = Path(directory)
        path = directory / "processor_config.json"
        if not path.is_file():
            raise MissingFileError(f"no processor_config.json in {directory}")
        data = load_json_config(path, "the processor config")
        if "processor" not in data:
            raise ConfigError(f"{path}: no 'processor' section")
        try:
            config = from_dict(ProcessorConfig, data["processor"], "processor")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        return cls(config, load_tokenizer(str(directory / "tokenizer")))


MultimodalDataProcessor = MultimodalProcessor  # the original design's name (README)


def check_caption(caption: Any, index: int = 0) -> None:
    """Refuse captions that carry no text or are not valid Unicode."""
    if not isinstance(caption, str):
        raise CaptionError(f"caption {index} is {type(caption).__name__}, not a string")
    problem = caption_problem(caption)
    if problem:
        raise CaptionError(f"caption {index} {problem}: {caption[:80]!r}")


_INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"))


def caption_problem(caption: str) -> str | None:
    """Why ``caption`` is unusable (None when it is fine).

    Empty, whitespace or invisible characters only (zero-width spaces, control characters,
    lone combining marks, U+FFFD left by decoding errors), or lone surrogates (which cannot be
    encoded as UTF-8).
    """
    if not any(ch != "\ufffd" and unicodedata.category(ch) not in _INVISIBLE for ch in caption):
        return "is empty or has only whitespace or invisible characters"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"is not valid Unicode (lone surrogate at position {err.start})"
    return None


def load_tokenizer(name_or_path: str) -> Any:
    """A Hugging Face tokenizer from a folder, or from the hub when the name is not a folder."""
    from transformers import AutoTokenizer

    local = Path(name_or_path).is_dir()
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    except OSError as err:  # transformers: no such folder or hub name (offline)
        raise MissingFileError(f"cannot load tokenizer {name_or_path!r}: {err}") from err
