"""Where a training step's image features come from.

- :class:`DecodedImages`: the batch's decoded pixels through the whole image tower (an
  unlocked tower, or a locked one without ``cache_image_features``).
- :class:`CachedImages`: outputs cached once per image (:func:`cache_images`), and per seeded
  augmented view (:func:`augmented_views`, ``model.cached_views``): of the whole locked tower,
  or, with ``prefix_start`` (``experimental.image_trainable_blocks``), of its frozen first blocks,
  whose map the trained blocks then run on every step.

A batch reads a source by ``image_index`` (rows of ``dataset.unique_images()``), ``view`` (the
cached view of each pair, :func:`xmodal.train.batches.sample_views`) and ``pixel_values``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from xmodal.data import ImageTextDataset
from xmodal.data.augment import AugmentView
from xmodal.errors import InputError
from xmodal.evaluate.runner import ImageOutputs, image_tower_outputs
from xmodal.models.model import CrossModalModel, Features
from xmodal.models.towers import TowerOutput
from xmodal.processing import MultimodalProcessor
from xmodal.train.config import TrainConfig
from xmodal.train.objective import needed_fields


class DecodedImages:
    """Image features of decoded pixels, the tower run on every step."""

    decode_images = True
    views = 1

    def __init__(self, model: CrossModalModel, device: torch.device):
        self.model, self.device = model, device

    def features(self, batch: dict) -> Features:
        return self.model.image_features(batch["pixel_values"].to(self.device))


class CachedImages:
    """Image features from cached tower outputs: ``base`` (view 0, the images as evaluation
    sees them) and ``extra`` (views 1.., pooled (V - 1, N, Di), tokens (V - 1, N, ...), or
    None); with ``prefix_start``, the outputs of the tower's frozen blocks before it."""

    decode_images = False

    def __init__(
        self,
        model: CrossModalModel,
        device: torch.device,
        base: ImageOutputs,
        extra: ImageOutputs | None = None,
        prefix_start: int | None = None,
    ):
        self.model, self.device = model, device
        self.base, self.extra, self.prefix_start = base, extra, prefix_start

    @property
    def views(self) -> int:
        return 1 if self.extra is None else 1 + len(self.extra.pooled)

    def rows(self, field: str, idx: torch.Tensor, view: torch.Tensor | None) -> torch.Tensor:
        """Rows ``idx`` of a cached field (``pooled`` or ``tokens``), each from the view its
        pair reads: view 0 (``base``) or, where ``view`` > 0, ``extra``."""
        base = getattr(self.base, field)
        extra = None if self.extra is None else getattr(self.extra, field)
        if view is None or extra is None:
            return base[idx]
        rows = base[idx].clone()
        other = view > 0
        if other.any():
            rows[other] = extra[view[other] - 1, idx[other]]
        return rows

    def features(self, batch: dict) -> Features:
        model = self.model
        idx, view = batch["image_index"], batch.get("view")
        pooled = self.rows("pooled", idx, view).to(self.device)
        if self.base.tokens is None:  # no loss reads them: (B, 0, D) stands in
            empty = pooled.new_zeros(len(idx), 0, pooled.shape[-1])
            return model.image_features_from_tower(TowerOutput(pooled, empty))
        tokens = self.rows("tokens", idx, view).to(self.device).float()
        if self.prefix_start is not None:  # the cached prefix's map, then the trained blocks
            out = model.image_tower.suffix(tokens, pooled, self.prefix_start)
            return model.image_features_from_tower(out)
        return model.image_features_from_tower(TowerOutput(pooled, tokens))


def cache_images(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    dataset: ImageTextDataset,
    desc: str,
    keep_tokens: bool,
    num_workers: int,
    prefix_start: int | None = None,
) -> ImageOutputs:
    """The image tower's outputs over ``dataset.unique_images()`` in eval mode (its token
    grids only when ``keep_tokens``), or those of its first ``prefix_start`` blocks (pooled
    taps and map); undecodable images are listed in ``failures``."""
    model.eval()
    return image_tower_outputs(
        model,
        processor,
        [ex.image for ex in dataset.unique_images()],
        num_workers=num_workers,
        keep_tokens=keep_tokens,
        desc=desc,
        prefix_blocks=prefix_start,
    )


def augmented_views(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    dataset: ImageTextDataset,
    views: int,
    seed: int,
    keep_tokens: bool,
    num_workers: int,
    flip: float = 0.0,
    zoom_out: float = 0.0,
    prefix_start: int | None = None,
) -> ImageOutputs | None:
    """Views 1 .. ``views - 1`` of ``dataset``'s images (whose every image decodes): seeded
    augmentations (:class:`xmodal.data.augment.AugmentView`), the same on every rank and in
    every run of the seed; pooled (V - 1, N, Di), tokens (V - 1, N, ...) when kept. None for
    one view."""
    if views < 2:
        return None
    unique = dataset.unique_images()
    images = [ex.image for ex in unique]
    keys = [ex.image_id for ex in unique]
    outputs = []
    for view in range(1, views):
        model.eval()
        out = image_tower_outputs(
            model,
            processor,
            images,
            num_workers=num_workers,
            keep_tokens=keep_tokens,
            desc=f"caching train view {view + 1}/{views}",
            change=AugmentView(seed, view, flip=flip, zoom_out=zoom_out),
            keys=keys,
            prefix_blocks=prefix_start,
        )
        if out.failures:  # the image decoded for view 0: an augmentation failed
            position, reason = next(iter(out.failures.items()))
            raise InputError(f"augmented view {view} of {images[position]}: {reason}")
        outputs.append(out)
    pooled = torch.stack([v.pooled for v in outputs])
    tokens = torch.stack([v.tokens for v in outputs]) if keep_tokens else None  # type: ignore[misc]
    return ImageOutputs(pooled, tokens)


def cached_training_images(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    dataset: ImageTextDataset,
    config: TrainConfig,
    device: torch.device,
    prefix_start: int | None,
    drop_failed: Callable[[ImageTextDataset, dict[int, str]], ImageTextDataset],
) -> tuple[CachedImages, ImageTextDataset]:
    """The cached source of a run's training images (``config.image_cached``), and the
    training pairs it covers: ``drop_failed(dataset, failures)`` gets the images that failed
    to decode (refused, or dropped with their captions) before the augmented views run.
    Token grids are cached when a loss, the ITM stage or the trained blocks read them."""
    keep_tokens = "tokens" in needed_fields(model, config.loss)  # ITM, cross fusion
    keep_tokens |= prefix_start is not None  # the prefix's map, always
    keep_tokens |= bool(config.itm_stage.steps) and model.has_itm
    workers, section = config.data.num_workers, config.model
    desc = "caching train images"
    base = cache_images(model, processor, dataset, desc, keep_tokens, workers, prefix_start)
    dataset = drop_failed(dataset, base.failures)
    extra = augmented_views(
        model,
        processor,
        dataset,
        section.cached_views,
        config.seed,
        keep_tokens,
        workers,
        flip=config.experimental.view_flip,
        zoom_out=section.view_zoom_out,
        prefix_start=prefix_start,
    )
    return CachedImages(model, device, base, extra, prefix_start), dataset


ImageSource = DecodedImages | CachedImages
