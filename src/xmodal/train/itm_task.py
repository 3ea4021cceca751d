"""The ITM stage as a task of a training run: its frozen features, taken from the run's image
source where it holds the final tower outputs, and the stage (:mod:`xmodal.train.itm_stage`)
run on them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from xmodal.data import ImageTextDataset
from xmodal.data.images import drop_failed_images
from xmodal.evaluate.runner import ImageOutputs
from xmodal.models.model import CrossModalModel, Features
from xmodal.models.towers import TowerOutput
from xmodal.processing import MultimodalProcessor
from xmodal.train.config import TrainConfig
from xmodal.train.images import CachedImages, ImageSource, cache_images
from xmodal.train.itm_stage import FrozenPairs, ITMStage, frozen_pairs
from xmodal.train.precision import MixedPrecision


class ITMStageTask:
    """The ITM stage of ``config.itm_stage`` on ``dataset`` (the training pairs the contrastive
    steps read, through ``images``)."""

    def __init__(
        self,
        model: CrossModalModel,
        processor: MultimodalProcessor,
        dataset: ImageTextDataset,
        images: ImageSource,
        config: TrainConfig,
        precision: MixedPrecision,
    ):
        self.model, self.processor, self.dataset, self.images = model, processor, dataset, images
        self.section, self.seed, self.precision = config.itm_stage, config.seed, precision
        self.experimental = config.experimental
        self.num_workers, self.skip_bad = config.data.num_workers, config.data.skip_bad

    def image_outputs(self) -> tuple[ImageOutputs, ImageTextDataset]:
        """The final image tower outputs of the training images, and the pairs they cover:
        view 0 of a whole locked tower's cache (the images as evaluation sees them), else one
        pass of the (now frozen) tower over them."""
        images = self.images
        if (
            isinstance(images, CachedImages)
            and images.prefix_start is None
            and images.base.tokens is not None
        ):
            return images.base, self.dataset
        out = cache_images(
            self.model,
            self.processor,
            self.dataset,
            "ITM stage: train images",
            keep_tokens=True,
            num_workers=self.num_workers,
        )
        dataset, _ = drop_failed_images(self.dataset, out.failures, self.skip_bad)
        return out, dataset

    def frozen_pairs(self) -> FrozenPairs:
        """The stage's features: the images' (on the CPU, as the cache: the stage moves each
        step's rows) and the captions'."""
        self.model.eval()
        out, dataset = self.image_outputs()
        with torch.no_grad(), self.precision.autocast():
            image = self.model.image_features_from_tower(
                TowerOutput(out.pooled.to(self.precision.device), out.tokens)
            )
        image = Features(
            image.embeds.float().cpu(), image.projected.float().cpu(), image.tokens.cpu(), None
        )
        image_row = {image_id: i for i, image_id in enumerate(dataset.image_ids())}
        rows = [image_row[ex.image_id] for ex in dataset.examples]
        return frozen_pairs(
            self.model,
            self.processor,
            [image],
            dataset.captions(),
            torch.tensor(rows),
            reorder=bool(self.section.reordered or self.section.reordered_images),
        )

    def run(self, log: Callable[[int, dict], None], log_every: int) -> dict:
        """All the stage's steps, with a progress bar; ``log(step, terms)`` every ``log_every``
        steps and at the last. Returns the last step's terms."""
        pairs = self.frozen_pairs()
        stage = ITMStage(
            self.model,
            pairs,
            self.section,
            self.seed,
            self.precision.autocast,
            hard_negatives=self.experimental.itm_hard_negatives,
            reordered_batch=self.experimental.itm_reordered_batch,
        )
        bar = tqdm(total=self.section.steps, desc="ITM stage", unit="step", disable=None)

        def logged(done: int, terms: dict) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{terms['loss']:.3f}")
            log(done, terms)

        try:
            return stage.run(logged, log_every)
        finally:
            bar.close()
