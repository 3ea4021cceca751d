"""Seeded image changes on PIL images: training views and the style-shift check.

Both are pure functions of (seed, image key, view or style): the same inputs give the same
pixels in any process, so a cache of augmented views can be rebuilt on ``--resume`` and a
style-shift evaluation is repeatable.

- :class:`AugmentView`: a training view (random resized crop, optional flip, colour jitter,
  greyscale, blur; optionally zoomed out: :func:`zoom_out`), for the cached views of a locked
  image tower.
- :class:`StyleShift`: one strong, named change (greyscale, colour change, blur, low
  resolution, crop, posterised ink drawing, and redrawn: warped shape, flat shading, thick
  outlines) for evaluating robustness to a change of style.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from xmodal.errors import ConfigError


def keyed_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded by a stable hash of ``parts`` (not Python's salted hash)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return random.Random(int.from_bytes(hashlib.sha256(text).digest()[:8], "big"))


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop(
    image: Image.Image, rng: random.Random, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """A crop of ``scale`` of the area and aspect ``ratio``, resized back to the image's size."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = rng.uniform(*ratio)
        w = round((target * aspect) ** 0.5)
        h = round((target / aspect) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            return image.resize((width, height), Image.Resampling.BICUBIC, box=box)
    return image


def colour_jitter(
    image: Image.Image, rng: random.Random, strength: float, hue: float
) -> Image.Image:
    """Brightness, contrast and saturation in [1 - strength, 1 + strength] (random order),
    then a hue rotation of up to ``hue`` of the colour circle either way."""
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(enhancers)
    for enhancer in enhancers:
        image = enhancer(image).enhance(rng.uniform(1 - strength, 1 + strength))
    if hue:
        image = rotate_hue(image, rng.uniform(-hue, hue))
    return image


def rotate_hue(image: Image.Image, turn: float) -> Image.Image:
    """Rotate every pixel's hue by ``turn`` of a full circle (saturation and value kept)."""
    h, s, v = _rgb(image).convert("HSV").split()
    shift = round(turn * 256) % 256
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


@dataclass(frozen=True)
class AugmentView:
    """One training view of an image: ``AugmentView(seed, view)(key, image)``.

    The change depends only on (seed, view, key), so a view is the same in any worker and
    after a resume. View 0 is the image unchanged (what evaluation sees). The defaults are
    mild (no hue change, rare greyscale): emoji names carry colour, e.g. skin tones; a stronger
    setting (crops from 35%, jitter 0.4, hue 0.1, greyscale 0.2) measured worse in and out of
    style (docs/experiments.md).
    """

    seed: int
    view: int
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: float = 0.0
    jitter: float = 0.2
    hue: float = 0.0
    greyscale: float = 0.1
    blur: float = 0.2
    zoom_out: float = 0.0

    def __call__(self, key: str, image: Image.Image) -> Image.Image:
        if self.view == 0:
            return image
        rng = keyed_rng("view", self.seed, self.view, key)
        image = _rgb(image)
        image = random_resized_crop(image, rng, self.crop_scale)
        if rng.random() < self.flip:
            image = ImageOps.mirror(image)
        if rng.random() < 0.8:
            image = colour_jitter(image, rng, self.jitter, self.hue)
        if rng.random() < self.greyscale:
            image = ImageOps.grayscale(image).convert("RGB")
        if rng.random() < self.blur:
            radius = rng.uniform(0.1, 2.0) * max(image.size) / 64
            image = image.filter(ImageFilter.GaussianBlur(radius))
        if self.zoom_out:  # its own stream: the draws above are the same with or without it
            zoom_rng = keyed_rng("zoom", self.seed, self.view, key)
            if zoom_rng.random() < self.zoom_out:
                image = zoom_out(image, zoom_rng)
        return image


def zoom_out(
    image: Image.Image, rng: random.Random, scale: tuple[float, float] = (0.55, 0.9)
) -> Image.Image:
    """The image shrunk by a factor in ``scale`` and placed at a random position on a canvas of
    its size, filled with its top-left pixel's colour (the background of a drawing): the same
    subject drawn smaller in the frame, as another artist or a photo may frame it."""
    image = _rgb(image)
    factor = rng.uniform(*scale)
    return place_smaller(image, factor, image.getpixel((0, 0)), rng)


def place_smaller(
    image: Image.Image, factor: float, fill: tuple[int, ...], rng: random.Random
) -> Image.Image:
    """``image`` resized by ``factor`` and pasted at a random position on a canvas of its own
    size filled with ``fill``."""
    width, height = image.size
    w, h = max(1, round(width * factor)), max(1, round(height * factor))
    canvas = Image.new("RGB", image.size, fill)
    small = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas.paste(small, (rng.randint(0, width - w), rng.randint(0, height - h)))
    return canvas


def _greyscale(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def _recolour(image: Image.Image, rng: random.Random) -> Image.Image:
    turn = rng.choice((-1, 1)) * rng.uniform(0.25, 0.5)
    image = rotate_hue(image, turn)
    return ImageEnhance.Color(image).enhance(rng.uniform(0.4, 1.6))


def _blur(image: Image.Image, rng: random.Random) -> Image.Image:
    radius = rng.uniform(1.5, 2.5) * max(image.size) / 64
    return image.filter(ImageFilter.GaussianBlur(radius))


def _low_resolution(image: Image.Image, rng: random.Random) -> Image.Image:
    side = rng.randint(14, 20)
    small = image.resize((side, side), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.NEAREST)


def _crop(image: Image.Image, rng: random.Random) -> Image.Image:
    return random_resized_crop(image, rng, (0.35, 0.5), (0.8, 1.25))


def _small_on_canvas(image: Image.Image, rng: random.Random) -> Image.Image:
    """Re-rendered smaller, off centre, on a tinted background."""
    factor = rng.uniform(0.45, 0.6)
    shade = tuple(rng.randint(170, 255) for _ in range(3))
    return place_smaller(image, factor, shade, rng)


def _ink(image: Image.Image, rng: random.Random) -> Image.Image:
    """A flat drawing: few colours, strong contrast, darkened outlines."""
    flat = ImageOps.posterize(ImageEnhance.Contrast(image).enhance(1.6), rng.choice((2, 3)))
    edges = ImageOps.invert(ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES))
    edges = edges.point(lambda x: 0 if x < 200 else 255)
    return Image.composite(flat, Image.new("RGB", image.size, (0, 0, 0)), edges)


def _odd(value: float) -> int:
    return max(3, int(value) // 2 * 2 + 1)


def _warp(image: Image.Image, rng: random.Random) -> Image.Image:
    """Drawn in another shape: rotated, sheared and stretched about the centre, on white."""
    angle = rng.choice((-1, 1)) * rng.uniform(8, 18)
    shear = rng.uniform(-0.25, 0.25)
    return affine_about_centre(image, angle, shear, rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))


def affine_about_centre(
    image: Image.Image, degrees: float, shear: float, sx: float, sy: float
) -> Image.Image:
    """``image`` scaled by (sx, sy), sheared by ``shear`` and rotated by ``degrees`` about its
    centre, on white."""
    width, height = image.size
    angle = math.radians(degrees)
    # forward map: rotate(angle) @ shear @ scale; PIL's AFFINE takes the inverse map
    a, b = math.cos(angle) * sx, (math.cos(angle) * shear - math.sin(angle)) * sy
    c, d = math.sin(angle) * sx, (math.sin(angle) * shear + math.cos(angle)) * sy
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    cx, cy = width / 2, height / 2
    coefficients = (ia, ib, cx - ia * cx - ib * cy, ic, id_, cy - ic * cx - id_ * cy)
    return image.transform(
        image.size,
        Image.Transform.AFFINE,
        coefficients,
        Image.Resampling.BICUBIC,
        fillcolor=(255, 255, 255),
    )


def _flat(image: Image.Image, rng: random.Random) -> Image.Image:
    """Flat shading: gradients and texture smoothed away, fewer tones of the same colours."""
    return flatten_shading(image, rng.uniform(14, 20), rng.choice((3, 4)))


def flatten_shading(image: Image.Image, divisor: float, bits: int) -> Image.Image:
    """A median filter ``1/divisor`` of the image wide, then ``bits`` bits per channel."""
    size = _odd(max(image.size) / divisor)
    return ImageOps.posterize(image.filter(ImageFilter.MedianFilter(size)), bits)


def _outline(image: Image.Image, rng: random.Random) -> Image.Image:
    """Thick dark outlines around the shapes, fill colours kept (a line-art house style)."""
    edges = ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES)
    edges = edges.point(lambda x: 255 if x > 96 else 0)
    width = int(max(image.size) / rng.uniform(40, 60)) // 2 * 2 + 1
    if width > 1:  # thicker lines on larger images
        edges = edges.filter(ImageFilter.MaxFilter(width))
    ink = Image.new("RGB", image.size, tuple(rng.randint(0, 60) for _ in range(3)))
    return Image.composite(ink, image, edges)


STYLE_SHIFTS = {
    "greyscale": _greyscale,
    "recolour": _recolour,
    "blur": _blur,
    "low_resolution": _low_resolution,
    "crop": _crop,
    "small_on_canvas": _small_on_canvas,
    "ink": _ink,
    "warp": _warp,
    "flat": _flat,
    "outline": _outline,
}
"""The named strong changes of the style-shift check, each applied alone. The first seven
change colour, detail or framing (greyscale and recolour remove colour cues such as skin tone
by construction); the last three redraw the image as another artist might, keeping its
colours (:data:`REDRAWN_STYLES`)."""

REDRAWN_STYLES: tuple[str, ...] = ("warp", "flat", "outline")
"""Styles closer to another artist's drawing of the same thing (shape, shading, outlines)."""


def check_styles(styles: list[str] | tuple[str, ...]) -> None:
    """Refuse unknown style-shift names (a ConfigError listing the known ones)."""
    unknown = [s for s in styles if s not in STYLE_SHIFTS]
    if unknown or not styles:
        raise ConfigError(
            f"unknown style shift(s) {unknown or styles!r}; known: {', '.join(STYLE_SHIFTS)}"
        )


@dataclass(frozen=True)
class StyleShift:
    """The named style change of an image: ``StyleShift("blur", seed)(key, image)``; its random
    parameters depend only on (style, seed, key)."""

    style: str
    seed: int = 0

    def __post_init__(self) -> None:
        check_styles([self.style])

    def __call__(self, key: str, image: Image.Image) -> Image.Image:
        rng = keyed_rng("style", self.style, self.seed, key)
        return STYLE_SHIFTS[self.style](_rgb(image), rng)
