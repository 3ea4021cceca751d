"""Style-shift check: retrieval on a dataset's images after strong, seeded changes of style.

Each style of :data:`xmodal.data.augment.STYLE_SHIFTS` (greyscale, recolour, blur, low
resolution, crop, small on a tinted canvas, posterised ink drawing; and, redrawn as another
artist might while keeping the colours, warped shape, flat shading, thick outlines) is applied
alone to every image of the dataset; the captions are unchanged. Means are given over all the
styles and over each group (``changed``: the first seven, ``redrawn``: the last three).
The report gives, per style and averaged over the styles, text->image and image->text R@1
(ITC), and the share of the in-style (unchanged images) R@1 that the model keeps: a model
that learned concepts rather than one artist's drawings keeps most of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xmodal.data import ImageTextDataset
from xmodal.data.augment import REDRAWN_STYLES, STYLE_SHIFTS, StyleShift, check_styles
from xmodal.data.images import drop_failed_images
from xmodal.errors import InputError
from xmodal.evaluate.retrieval import retrieval_metrics
from xmodal.evaluate.runner import ImageOutputs, image_tower_outputs, text_embeddings
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor

DEFAULT_STYLES: tuple[str, ...] = tuple(STYLE_SHIFTS)


def _r1(image_embeds: torch.Tensor, text_embeds: torch.Tensor, t2i: torch.Tensor) -> dict:
    metrics = retrieval_metrics(image_embeds, text_embeds, t2i, ks=(1,))
    return {"t2i_R@1": metrics["t2i_R@1"], "i2t_R@1": metrics["i2t_R@1"]}


def _kept(shifted: float, in_style: float) -> float | None:
    return round(100.0 * shifted / in_style, 1) if in_style > 0 else None


@torch.inference_mode()
def style_shift_report(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    dataset: ImageTextDataset,
    styles: Sequence[str] = DEFAULT_STYLES,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 1,
    skip_bad: bool = False,
    in_style: ImageOutputs | None = None,
) -> dict[str, Any]:
    """ITC retrieval R@1 on ``dataset`` in its own style and under each of ``styles``.

    Returns ``in_style`` ({t2i_R@1, i2t_R@1}), ``styles`` (per style: its R@1s and
    ``t2i_kept`` / ``i2t_kept``, percent of the in-style R@1), the mean over styles
    (``t2i_R@1``, ``i2t_R@1``, ``t2i_kept``, ``i2t_kept``) and ``seed``. An undecodable image
    raises (or, with ``skip_bad``, leaves with its captions, as in :func:`evaluate_model`).
    ``in_style``: the tower outputs of ``dataset.unique_images()`` when already computed (as
    for :func:`evaluate_model`), so the unchanged images are not run again.
    """
    check_styles(tuple(styles))
    model.eval()
    device = next(model.parameters()).device
    unique = dataset.unique_images()
    images = [ex.image for ex in unique]
    keys = [ex.image_id for ex in unique]
    plain = in_style
    if plain is None:
        plain = image_tower_outputs(
            model, processor, images, batch_size, num_workers, False, "style shift: in style"
        )
    kept, _ = drop_failed_images(dataset, plain.failures, skip_bad)
    good = [i for i in range(len(images)) if i not in plain.failures]
    texts = text_embeddings(model, processor, kept.captions())
    t2i = kept.text_to_image()
    in_style = _r1(model.embed_image_pooled(plain.pooled.to(device)).cpu(), texts, t2i)
    per_style: dict[str, dict] = {}
    for style in styles:
        outputs = image_tower_outputs(
            model,
            processor,
            [images[i] for i in good],
            batch_size,
            num_workers,
            False,
            f"style shift: {style}",
            change=StyleShift(style, seed),
            keys=[keys[i] for i in good],
        )
        embeds = model.embed_image_pooled(outputs.pooled.to(device)).cpu()
        scores = _r1(embeds, texts, t2i)
        per_style[style] = {
            **scores,
            "t2i_kept": _kept(scores["t2i_R@1"], in_style["t2i_R@1"]),
            "i2t_kept": _kept(scores["i2t_R@1"], in_style["i2t_R@1"]),
        }
    mean = {
        key: sum(s[key] for s in per_style.values()) / len(per_style)
        for key in ("t2i_R@1", "i2t_R@1")
    }
    return {
        "in_style": in_style,
        **mean,
        "t2i_kept": _kept(mean["t2i_R@1"], in_style["t2i_R@1"]),
        "i2t_kept": _kept(mean["i2t_R@1"], in_style["i2t_R@1"]),
        "styles": per_style,
        "groups": _group_means(per_style, in_style),
        "seed": seed,
        "n_images": len(good),
    }


def _group_means(per_style: dict[str, dict], in_style: dict) -> dict[str, dict]:
    """Mean R@1 and share kept over each group of styles (``changed``: the seven colour,
    detail and framing changes; ``redrawn``: :data:`REDRAWN_STYLES`), for the groups whose
    styles were all evaluated."""
    groups = {
        "changed": tuple(s for s in STYLE_SHIFTS if s not in REDRAWN_STYLES),
        "redrawn": REDRAWN_STYLES,
    }
    means = {}
    for group, members in groups.items():
        if not all(style in per_style for style in members):
            continue
        mean = {
            key: sum(per_style[s][key] for s in members) / len(members)
            for key in ("t2i_R@1", "i2t_R@1")
        }
        means[group] = {
            **mean,
            "t2i_kept": _kept(mean["t2i_R@1"], in_style["t2i_R@1"]),
            "i2t_kept": _kept(mean["i2t_R@1"], in_style["i2t_R@1"]),
            "styles": list(members),
        }
    return means


def format_style_shift(report: dict[str, Any]) -> str:
    """The style-shift figures as printed lines."""
    head = (
        f"style shift ({len(report['styles'])} styles, seed {report['seed']}): "
        f"text->image R@1 {report['t2i_R@1']:.1f} (in style {report['in_style']['t2i_R@1']:.1f}, "
        f"kept {report['t2i_kept']}%), image->text R@1 {report['i2t_R@1']:.1f} "
        f"(kept {report['i2t_kept']}%)"
    )
    rows = [
        f"  {style:16} text->image R@1 {s['t2i_R@1']:5.1f}  kept {s['t2i_kept']}%"
        for style, s in report["styles"].items()
    ]
    rows += [
        f"  mean of {group} ({len(g['styles'])}) text->image R@1 {g['t2i_R@1']:5.1f}  "
        f"kept {g['t2i_kept']}%"
        for group, g in report.get("groups", {}).items()
    ]
    return "\n".join([head, *rows])


@torch.inference_mode()
def artist_shift_report(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    dataset: ImageTextDataset,
    drawn: ImageTextDataset,
    batch_size: int = 64,
    num_workers: int = 1,
    in_style: ImageOutputs | None = None,
) -> dict[str, Any]:
    """ITC R@1 on another artist's drawings of ``dataset``'s concepts, against the in-style
    R@1 on the same concepts: the real change of style the seeded styles stand in for.

    ``drawn``'s image ids are ``<artist>/<image id in dataset>`` (as ``xmodal data emoji``
    writes ``test.<artist>.jsonl``); only the images the artist drew are compared, so both
    figures rank the same number of candidates. Returns ``in_style`` and ``drawn``
    ({t2i_R@1, i2t_R@1}), ``t2i_kept`` / ``i2t_kept`` and ``n_images``. ``in_style``: the tower
    outputs of ``dataset.unique_images()`` when already computed (the in-style images are
    then taken from them, not run again).
    """
    model.eval()
    device = next(model.parameters()).device
    original = {ex.image_id: ex.image_id.split("/", 1)[-1] for ex in drawn.examples}
    missing = sorted(set(original.values()) - set(dataset.image_ids()))
    if missing:
        raise InputError(f"{len(missing)} drawn images have no in-style image (e.g. {missing[0]})")
    same = dataset.without_images(set(dataset.image_ids()) - set(original.values()))
    scores = {}
    for name, data in (("in_style", same), ("drawn", drawn)):
        outputs = _rows_of(in_style, dataset, data) if name == "in_style" else None
        if outputs is None:
            images = [ex.image for ex in data.unique_images()]
            outputs = image_tower_outputs(
                model, processor, images, batch_size, num_workers, False, f"artist check: {name}"
            )
        drop_failed_images(data, outputs.failures, skip_bad=False)  # raises, naming the image
        embeds = model.embed_image_pooled(outputs.pooled.to(device)).cpu()
        texts = text_embeddings(model, processor, data.captions())
        scores[name] = _r1(embeds, texts, data.text_to_image())
    return {
        **scores,
        "t2i_kept": _kept(scores["drawn"]["t2i_R@1"], scores["in_style"]["t2i_R@1"]),
        "i2t_kept": _kept(scores["drawn"]["i2t_R@1"], scores["in_style"]["i2t_R@1"]),
        "n_images": len(drawn.image_ids()),
    }


def _rows_of(
    outputs: ImageOutputs | None, dataset: ImageTextDataset, subset: ImageTextDataset
) -> ImageOutputs | None:
    """The rows of ``outputs`` (of ``dataset.unique_images()``) for ``subset``'s images, in
    its order; None when there are no outputs or one of those images failed to decode."""
    if outputs is None:
        return None
    decoded = [
        ex.image_id for i, ex in enumerate(dataset.unique_images()) if i not in outputs.failures
    ]
    row = {image_id: i for i, image_id in enumerate(decoded)}
    wanted = [ex.image_id for ex in subset.unique_images()]
    if any(image_id not in row for image_id in wanted):
        return None
    return ImageOutputs(
        outputs.pooled[torch.tensor([row[i] for i in wanted], dtype=torch.long)], None
    )


def format_artist_shift(artist: str, report: dict[str, Any]) -> str:
    """One printed line of :func:`artist_shift_report`."""
    return (
        f"another artist ({artist}, never trained on; {report['n_images']} test images): "
        f"text->image R@1 {report['drawn']['t2i_R@1']:.1f} (in style on the same names "
        f"{report['in_style']['t2i_R@1']:.1f}, kept {report['t2i_kept']}%), image->text R@1 "
        f"{report['drawn']['i2t_R@1']:.1f} (kept {report['i2t_kept']}%)"
    )
