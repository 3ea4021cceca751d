"""Evaluate a model on a dataset: retrieval (ITC and ITM re-ranked) and zero-shot accuracy."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from xmodal.atomic import atomic_write_text
from xmodal.data.images import ImageChange, drop_failed_images, image_loader
from xmodal.data.skipped import SkippedRow, skipped_records
from xmodal.models.inference import has_conv, inference_copy
from xmodal.models.model import CrossModalModel, Features, cat_features
from xmodal.models.towers import TowerOutput
from xmodal.processing import MultimodalProcessor


@dataclass
class ImageOutputs:
    """The image tower's outputs for the images that decoded (in input order), and the reasons
    of those that did not (position in the input list -> reason)."""

    pooled: torch.Tensor  # (N_ok, Di) float32
    tokens: torch.Tensor | None  # (N_ok, T, Di) float16 (a prefix's map: (N_ok, C, H, W)), or None
    failures: dict[int, str] = field(default_factory=dict)


@torch.inference_mode()
def image_tower_outputs(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    images: Sequence[Any],
    batch_size: int = 64,
    num_workers: int = 1,
    keep_tokens: bool = True,
    desc: str = "images",
    change: ImageChange | None = None,
    keys: Sequence[str] | None = None,
    prefix_blocks: int | None = None,
) -> ImageOutputs:
    """Run the image tower over images decoded in ``num_workers`` DataLoader workers; images
    that cannot be decoded are left out and listed in ``failures``. ``change(keys[i], image)``
    alters each decoded image first (an augmented view, a style shift).

    ``prefix_blocks``: run only the tower's first blocks (``tower.prefix``, for a training
    run that trains the blocks after them): ``pooled`` is then the statistics of the stages
    they tap, ``tokens`` the map entering the next block (N, C, H, W), always kept.

    A convolutional tower runs as an inference copy (batch norms folded, channels_last: the
    same outputs to float rounding, less work per image; docs/performance.md); the model is
    unchanged. Transformers run as they are (no rewrite applies; no copy is made)."""
    device = next(model.parameters()).device
    channels_last = has_conv(model.image_tower)
    tower = model.image_tower
    if channels_last:
        tower = inference_copy(tower, widen_kernels=device.type == "cpu")
    batches = [
        list(range(start, min(len(images), start + batch_size)))
        for start in range(0, len(images), batch_size)
    ]
    pooled, tokens, failures = [], [], {}
    with tqdm(total=len(images), desc=desc, unit="img", disable=None) as bar:
        for batch in image_loader(
            images, processor, batches, num_workers, change=change, keys=keys
        ):
            failures.update(batch.failures)
            if batch.pixel_values is not None:
                pixels = batch.pixel_values.to(device)
                if channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                if prefix_blocks is None:
                    out = tower(pixels)
                else:
                    hidden, prefix_pooled = tower.prefix(pixels, prefix_blocks)
                    out = TowerOutput(pooled=prefix_pooled, tokens=hidden)
                pooled.append(out.pooled.float().cpu())
                if keep_tokens or prefix_blocks is not None:
                    tokens.append(out.tokens.half().contiguous().cpu())
            bar.update(len(batch.positions) + len(batch.failures))
    if not pooled:
        return ImageOutputs(torch.empty(0), None, failures)
    return ImageOutputs(torch.cat(pooled), torch.cat(tokens) if tokens else None, failures)


@torch.inference_mode()
def text_embeddings(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    captions: Sequence[str],
    batch_size: int = 256,
    apply_template: bool = True,
) -> torch.Tensor:
    """Caption embeddings (N, D); batches are built from length-sorted captions (less padding)."""
    device = next(model.parameters()).device
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
    out = torch.empty(len(captions), model.config.embed_dim)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = processor.process_text([captions[i] for i in idx], apply_template)
        embeds = model.encode_text(
            batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )
        out[idx] = embeds.float().cpu()
    return out


class ImagePairScorer:
    """ITM scores of (image, caption) pairs from cached image tokens, for re-ranking.

    Each caption's text features are computed once and kept (up to ``max_text_cache_bytes``
    of them; beyond that, per call): image->text re-ranking meets each caption among the
    top k of many images, and ran it through the text tower each time (802 emoji captions:
    12,800 tower passes where 802 do)."""

    def __init__(
        self,
        model: CrossModalModel,
        processor: MultimodalProcessor,
        image_pooled: torch.Tensor,
        image_tokens: torch.Tensor,
        captions: Sequence[str],
        max_text_cache_bytes: int = 1 << 30,
    ):
        self.model = model
        self.processor = processor
        self.image_pooled = image_pooled
        self.image_tokens = image_tokens
        self.captions = list(captions)
        self.max_text_cache_bytes = max_text_cache_bytes
        self._text_rows: dict[int, Features] = {}
        self._text_bytes = 0

    @torch.inference_mode()
    def __call__(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        # each image of the batch once, however many of its pairs are scored
        images, image_rows = torch.unique(image_idx, return_inverse=True)
        image = self.model.image_features_from_tower(
            TowerOutput(
                self.image_pooled[images].to(device),
                self.image_tokens[images].to(device).float(),
            )
        )
        # each caption once too: a text->image query scores its caption against k images
        texts, text_rows = torch.unique(text_idx, return_inverse=True)
        text = self._text_features(texts.tolist(), device)
        logits = self.model.itm_pair_logits(
            image, text, image_rows.to(device), text_rows.to(device)
        )
        return (logits[:, 1] - logits[:, 0]).float().cpu()

    def _text_features(self, texts: list[int], device: torch.device) -> Features:
        """Text features of captions ``texts``: those seen before from the cache, the others
        through the tower (and into the cache while it has room)."""
        fresh: dict[int, Features] = {}
        missing = [t for t in texts if t not in self._text_rows]
        if missing:
            batch = self.processor.process_text([self.captions[t] for t in missing])
            features = self.model.text_features(
                batch["input_ids"].to(device), batch["attention_mask"].to(device)
            )
            fields = (features.embeds, features.projected, features.tokens, features.mask)
            for row, t in enumerate(missing):
                # copies: a kept row must not hold its whole batch alive
                kept = [f[row : row + 1].clone() for f in fields]  # type: ignore[index]
                one = Features(*kept)
                size = sum(f.numel() * f.element_size() for f in kept)
                if self._text_bytes + size <= self.max_text_cache_bytes:
                    self._text_rows[t] = one
                    self._text_bytes += size
                else:
                    fresh[t] = one
        return cat_features([fresh[t] if t in fresh else self._text_rows[t] for t in texts])


def evaluate_model(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    dataset,
    rerank_k: int = 16,
    label_field: str | None = None,
    batch_size: int = 64,
    num_workers: int = 1,
    image_outputs: ImageOutputs | None = None,
    skip_bad: bool = False,
    rerank_weight: float | None = None,
    calibrate_rerank: bool = False,
    calibrate_filter: bool = False,
) -> dict[str, Any]:
    """Retrieval (ITC, and ITM re-ranked over the top ``rerank_k``) and, when the dataset has
    labels (or ``label_field`` names an extra column), zero-shot classification.

    Re-ranking scores ``logit_scale * cosine + w * itm_score`` (:mod:`xmodal.evaluate.rerank`)
    with ``w`` = ``rerank_weight`` when given, else the model's saved ``fusion.rerank_weight``
    (never calibrated: 0, with a note in ``report["rerank"]``). ``calibrate_rerank`` picks
    ``w`` on this dataset instead (``report["rerank_calibration"]``). ``report["rerank_curve"]``
    lists R@1 at every weight of the calibration grid. ``calibrate_filter`` also picks the
    filter weight of the ``combined`` pair score on this dataset
    (``report["filter_calibration"]``, :mod:`xmodal.evaluate.pair_filter`).

    An image that cannot be decoded raises :class:`ImageLoadError` naming the file and its
    dataset row; with ``skip_bad`` it is left out of the whole evaluation together with its
    captions (which would have no image to retrieve), and listed under ``bad_images``.

    ``report["skipped"]`` lists every dataset row left out, ``{"row": "data.jsonl:7",
    "reason": ...}`` (:mod:`xmodal.data.skipped`): those the reader refused
    (``report["skipped_rows"]`` of them), then each row of an undecodable image."""
    from xmodal.evaluate.retrieval import rerank_candidates, retrieval_metrics

    model.eval()
    started = time.time()
    if image_outputs is None:
        images = [ex.image for ex in dataset.unique_images()]
        keep_tokens = rerank_k > 0 and model.has_itm  # only re-ranking reads the token grids
        image_outputs = image_tower_outputs(
            model, processor, images, batch_size, num_workers, keep_tokens
        )
    n_rows, loaded = len(dataset), dataset
    dataset, bad_images = drop_failed_images(dataset, image_outputs.failures, skip_bad)
    unique = dataset.unique_images()
    pooled, tokens = image_outputs.pooled, image_outputs.tokens
    with torch.inference_mode():
        device = next(model.parameters()).device
        image_embeds = model.embed_image_pooled(pooled.to(device)).cpu()
    captions = dataset.captions()
    text_embeds = text_embeddings(model, processor, captions)
    text_to_image = dataset.text_to_image()
    report: dict[str, Any] = {
        "n_images": len(unique),
        "n_texts": len(captions),
        "retrieval_itc": retrieval_metrics(image_embeds, text_embeds, text_to_image),
    }
    if bad_images:
        report["bad_images"] = bad_images
        report["n_bad_images"] = len(bad_images)
        report["n_dropped_captions"] = n_rows - len(dataset)
    report["skipped_rows"] = len(loaded.skipped)
    report["skipped"] = skipped_records(left_out_rows(loaded, bad_images))
    if rerank_k > 0 and not model.has_itm:
        report["retrieval_itm_rerank_skipped"] = "the model has no ITM head (fusion: none)"
    elif rerank_k > 0 and tokens is not None:
        scorer = ImagePairScorer(model, processor, pooled, tokens, captions)
        candidates = rerank_candidates(
            image_embeds,
            text_embeds,
            text_to_image,
            scorer,
            k=rerank_k,
            itc_scale=float(model.clip_scale().detach()),
        )
        report.update(rerank_report(model, candidates, rerank_weight, calibrate_rerank))
        if calibrate_filter:
            from xmodal.evaluate.pair_filter import calibrate_filter_weight

            calibration = calibrate_filter_weight(
                image_embeds,
                text_embeds,
                text_to_image,
                scorer,
                itc_scale=float(model.clip_scale().detach()),
            )
            report["filter_calibration"] = calibration.summary()
    labels = _labels(dataset, label_field)
    if labels is not None:
        report["zeroshot"] = zeroshot_report(model, processor, image_embeds, unique, labels)
    report["seconds"] = round(time.time() - started, 2)
    return report


def left_out_rows(dataset, bad_images: Sequence[dict[str, str]]) -> list[SkippedRow]:
    """Every row of ``dataset`` an evaluation leaves out, in dataset order (``data.jsonl:7``
    before ``data.jsonl:10``): those the reader refused (``dataset.skipped``) and each row of
    an image in ``bad_images`` (:func:`~xmodal.data.images.failure_record` records), with the
    image's reason."""
    reasons = {r["image_id"]: f"cannot load image {r['source']}: {r['reason']}" for r in bad_images}
    rows = list(dataset.skipped)
    rows += [
        SkippedRow(ex.origin or str(ex.image), reasons[ex.image_id])
        for ex in dataset.examples
        if ex.image_id in reasons
    ]
    return sorted(rows, key=lambda row: natural_key(row.origin))


def natural_key(text: str) -> tuple:
    """Sort key that orders the numbers in ``text`` by value: ``a:7`` < ``a:10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def rerank_report(
    model: CrossModalModel,
    candidates,
    override: float | None = None,
    calibrate: bool = False,
) -> dict[str, Any]:
    """The re-ranked metrics at the weight in use (see :func:`evaluate_model`), where that
    weight comes from, and R@1 along the calibration grid."""
    from xmodal.evaluate.rerank import (
        NOT_BETTER,
        RerankWeight,
        calibrate_weight,
        resolve_rerank_weight,
    )

    out: dict[str, Any] = {}
    calibration = calibrate_weight(candidates)
    if calibrate:
        weight = RerankWeight(
            calibration.weight, "calibrated on this data", None if calibration.helps else NOT_BETTER
        )
        out["rerank_calibration"] = calibration.summary()
    else:
        weight = resolve_rerank_weight(model.config.fusion.rerank_weight, override)
    out["retrieval_itm_rerank"] = candidates.metrics(weight.weight)
    out["rerank"] = weight.to_dict()
    out["rerank_curve"] = calibration.curve
    return out


def _labels(dataset, label_field: str | None) -> list[str] | None:
    unique = dataset.unique_images()
    if label_field:
        values = [
            ex.extra.get(label_field) if label_field != "label" else ex.label for ex in unique
        ]
    else:
        values = [ex.label for ex in unique]
    if any(v is None for v in values):
        return None
    return [str(v) for v in values]


def zeroshot_report(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    image_embeds: torch.Tensor,
    examples: Sequence,
    labels: list[str],
) -> dict[str, Any]:
    """Zero-shot accuracy of the images against their label names (prompt ensemble)."""
    from xmodal.evaluate.zeroshot import DEFAULT_TEMPLATES, build_classifier, zeroshot_metrics

    class_names = sorted(set(labels))
    classifier = build_classifier(
        class_names,
        lambda prompts: text_embeddings(model, processor, prompts, apply_template=False),
        DEFAULT_TEMPLATES,
    )
    index = {name: i for i, name in enumerate(class_names)}
    targets = torch.tensor([index[label] for label in labels])
    return zeroshot_metrics(image_embeds, targets, classifier, class_names)


def format_report(report: dict[str, Any]) -> str:
    """The headline numbers as a printed table."""
    lines = [f"images: {report['n_images']}  captions: {report['n_texts']}"]
    left_out = []
    if report.get("skipped_rows"):
        left_out.append(f"{report['skipped_rows']} rows the reader refused")
    if report.get("n_bad_images"):
        left_out.append(
            f"{report['n_bad_images']} undecodable images with "
            f"{report['n_dropped_captions']} rows of captions"
        )
    if left_out:
        lines.append(f"left out: {', '.join(left_out)}")
    header = f"{'':31}{'R@1':>8}{'R@5':>8}{'R@10':>8}"
    lines.append(header)
    for key, title in (("retrieval_itc", "ITC"), ("retrieval_itm_rerank", "ITC + ITM re-rank")):
        if key not in report:
            continue
        metrics = report[key]
        for direction, name in (("t2i", "text->image"), ("i2t", "image->text")):
            values = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
            lines.append(f"{title + ' ' + name:31}" + "".join(f"{v:8.1f}" for v in values))
    if "rerank" in report:
        rerank = report["rerank"]
        weight = f"ITC logit + {rerank['weight']:.4g} x ITM score (weight: {rerank['source']})"
        lines.append(rerank.get("note") or f"re-rank score: {weight}")
    if "retrieval_itm_rerank_skipped" in report:
        lines.append(f"ITM re-rank skipped: {report['retrieval_itm_rerank_skipped']}")
    if "zeroshot" in report:
        zs = report["zeroshot"]
        lines.append(
            f"zero-shot: top-1 {zs['top1']:.1f}  top-5 {zs['top5']:.1f}  "
            f"mean per class {zs['mean_per_class']:.1f}"
        )
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(report, indent=2))
