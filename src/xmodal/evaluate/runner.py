"""Evaluate a model on a dataset: retrieval (ITC and ITM re-ranked) and zero-shot accuracy."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from xmodal.atomic import atomic_write_text
from xmodal.models.model import CrossModalModel, Features
from xmodal.processing import MultimodalProcessor


class _ImageBatches(Dataset):
    """Decodes and transforms a batch of images per item (so DataLoader workers do the work)."""

    def __init__(self, images: Sequence[Any], processor: MultimodalProcessor, batch_size: int):
        self.images = list(images)
        self.processor = processor
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:
        chunk = self.images[i * self.batch_size : (i + 1) * self.batch_size]
        return self.processor.process_images(chunk)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


@torch.inference_mode()
def image_tower_outputs(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    images: Sequence[Any],
    batch_size: int = 64,
    num_workers: int = 1,
    keep_tokens: bool = True,
    desc: str = "images",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the image tower over images: pooled (N, Di) float32 and tokens (N, T, Di) float16."""
    device = next(model.parameters()).device
    loader = DataLoader(
        _ImageBatches(images, processor, batch_size),
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG untouched
    )
    pooled, tokens = [], []
    with tqdm(total=len(images), desc=desc, unit="img", disable=None) as bar:
        for pixels in loader:
            out = model.image_tower(pixels.to(device))
            pooled.append(out.pooled.float().cpu())
            if keep_tokens:
                tokens.append(out.tokens.half().cpu())
            bar.update(len(pixels))
    return torch.cat(pooled), (torch.cat(tokens) if keep_tokens else None)


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
    """ITM scores of (image, caption) pairs from cached image tokens, for re-ranking."""

    def __init__(
        self,
        model: CrossModalModel,
        processor: MultimodalProcessor,
        image_pooled: torch.Tensor,
        image_tokens: torch.Tensor,
        captions: Sequence[str],
    ):
        self.model = model
        self.processor = processor
        self.image_pooled = image_pooled
        self.image_tokens = image_tokens
        self.captions = list(captions)

    @torch.inference_mode()
    def __call__(self, image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        from xmodal.models.towers import TowerOutput

        image = self.model.image_features_from_tower(
            TowerOutput(
                self.image_pooled[image_idx].to(device),
                self.image_tokens[image_idx].to(device).float(),
            )
        )
        batch = self.processor.process_text([self.captions[i] for i in text_idx.tolist()])
        text: Features = self.model.text_features(
            batch["input_ids"].to(device), batch["attention_mask"].to(device)
        )
        return self.model.itm_score(image, text).float().cpu()


def evaluate_model(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    dataset,
    rerank_k: int = 16,
    label_field: str | None = None,
    batch_size: int = 64,
    num_workers: int = 1,
    image_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Retrieval (ITC, and ITM re-ranked over the top ``rerank_k``) and, when the dataset has
    labels (or ``label_field`` names an extra column), zero-shot classification."""
    from xmodal.evaluate.retrieval import rerank_metrics, retrieval_metrics

    model.eval()
    started = time.time()
    unique = dataset.unique_images()
    if image_outputs is None:
        image_outputs = image_tower_outputs(
            model, processor, [ex.image for ex in unique], batch_size, num_workers
        )
    pooled, tokens = image_outputs
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
    if rerank_k > 0 and tokens is not None and not model.has_itm:
        report["retrieval_itm_rerank_skipped"] = "the model has no ITM head (fusion: none)"
    elif rerank_k > 0 and tokens is not None:
        scorer = ImagePairScorer(model, processor, pooled, tokens, captions)
        report["retrieval_itm_rerank"] = rerank_metrics(
            image_embeds, text_embeds, text_to_image, scorer, k=rerank_k
        )
    labels = _labels(dataset, label_field)
    if labels is not None:
        report["zeroshot"] = zeroshot_report(model, processor, image_embeds, unique, labels)
    report["seconds"] = round(time.time() - started, 2)
    return report


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
    header = f"{'':22}{'R@1':>8}{'R@5':>8}{'R@10':>8}"
    lines.append(header)
    for key, title in (("retrieval_itc", "ITC"), ("retrieval_itm_rerank", "ITC + ITM re-rank")):
        if key not in report:
            continue
        metrics = report[key]
        for direction, name in (("t2i", "text->image"), ("i2t", "image->text")):
            values = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
            lines.append(f"{title + ' ' + name:22}" + "".join(f"{v:8.1f}" for v in values))
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
