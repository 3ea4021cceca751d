"""Zero-shot image classification from prompt-ensembled text embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.errors import ConfigError, InputError

__all__ = ["DEFAULT_TEMPLATES", "build_classifier", "zeroshot_metrics"]

DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of {}.",
    "a drawing of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "an emoji of {}.",
    "{}.",
]


def build_classifier(
    class_names: Sequence[str],
    encode_text: Callable[[list[str]], Tensor],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 1024,
) -> Tensor:
    """Zero-shot weights ``(C, D)``: per class, the re-normalised mean of its L2-normalised
    prompt embeddings.

    Each template must contain exactly one ``{}``, replaced by the class name. Prompts of all
    classes are encoded together in calls of at most ``batch_size`` prompts.
    """
    names = list(class_names)
    if not names:
        raise InputError("class_names must not be empty")
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise InputError("class names must be non-empty strings")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"class names must be unique; duplicated: {dupes}")
    temps = list(templates)
    if not temps:
        raise ConfigError("templates must not be empty")
    bad = [t for t in temps if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"each template must contain exactly one '{{}}'; bad: {bad}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")

    prompts = [t.replace("{}", name) for name in names for t in temps]
    parts: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        emb = encode_text(batch)
        if emb.dim() != 2 or emb.shape[0] != len(batch):
            raise ValueError(
                f"encode_text returned shape {tuple(emb.shape)} for {len(batch)} prompts; "
                "expected (n_prompts, D)"
            )
        parts.append(emb.detach().float())
    emb = F.normalize(torch.cat(parts), dim=-1).view(len(names), len(temps), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zeroshot_metrics(
    image_emb: Tensor,
    labels: Tensor,
    classifier: Tensor,
    class_names: Sequence[str],
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, object]:
    """Zero-shot accuracy of ``image_emb (N, D)`` against ``classifier (C, D)``.

    The rank of an image's true class is ``|{c != y : s(c) >= s(y)}|`` (pessimistic ties).
    Keys: ``top{k}`` for each ``k`` (percent; ``k`` capped at ``C``), ``per_class``
    ``{name: top-1 percent, or None when the class has no image}``, ``mean_per_class``
    (mean over present classes), ``n``.
    """
    if image_emb.dim() != 2 or classifier.dim() != 2:
        raise ValueError(
            f"image_emb and classifier must be 2-D; got {tuple(image_emb.shape)} and "
            f"{tuple(classifier.shape)}"
        )
    n, dim = image_emb.shape
    n_cls = classifier.shape[0]
    if classifier.shape[1] != dim:
        raise ValueError(f"dims differ: images D={dim}, classifier D={classifier.shape[1]}")
    if n == 0 or n_cls == 0:
        raise ValueError(f"need at least one image and one class; got {n} and {n_cls}")
    names = list(class_names)
    if len(names) != n_cls:
        raise ValueError(f"{len(names)} class names for a classifier with {n_cls} rows")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},); got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    device = image_emb.device
    labels = labels.to(device=device, dtype=torch.long)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_cls:
        raise ValueError(f"labels must lie in [0, {n_cls}); got [{lo}, {hi}]")
    weights = classifier.to(device=device, dtype=image_emb.dtype)

    ranks = torch.empty(n, dtype=torch.long, device=device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        scores = image_emb[start:stop] @ weights.T  # (c, C)
        true = scores.gather(1, labels[start:stop, None])
        ranks[start:stop] = (scores >= true).sum(1) - 1

    metrics: dict[str, object] = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        metrics[f"top{int(k)}"] = 100.0 * (ranks < min(int(k), n_cls)).double().mean().item()

    correct = torch.bincount(labels[ranks == 0], minlength=n_cls).tolist()
    total = torch.bincount(labels, minlength=n_cls).tolist()
    per_class: dict[str, float | None] = {
        name: (100.0 * c / t if t > 0 else None)
        for name, c, t in zip(names, correct, total, strict=True)
    }
    present = [v for v in per_class.values() if v is not None]
    metrics["per_class"] = per_class
    metrics["mean_per_class"] = sum(present) / len(present)
    metrics["n"] = int(n)
    return metrics
