"""Validation during training: retrieval recall on ``data.val``, and with an ITM head the
re-rank and filter weights calibrated on it (:mod:`xmodal.evaluate.rerank`), kept in the model
config so the saved model carries the latest ones."""

from __future__ import annotations

import torch

from xmodal.data import ImageTextDataset
from xmodal.evaluate.runner import ImageOutputs, evaluate_model
from xmodal.models.model import CrossModalModel
from xmodal.processing import MultimodalProcessor
from xmodal.train.bad_images import BadImageLog
from xmodal.train.config import TrainConfig
from xmodal.train.images import cache_images


class Validator:
    """Validates ``model`` on ``dataset`` as ``config`` asks (``rerank_k``, ``data.skip_bad``,
    ``data.num_workers``), recording undecodable images in ``bad_images``; ``cached``:
    the image tower is locked whole, so the validation images run through it once. With an
    ``itm_stage``, the weights are calibrated only once the stage has run (:meth:`stage_done`)."""

    def __init__(
        self,
        model: CrossModalModel,
        processor: MultimodalProcessor,
        dataset: ImageTextDataset,
        config: TrainConfig,
        bad_images: BadImageLog,
        cached: bool = False,
    ):
        self.model, self.processor, self.dataset = model, processor, dataset
        self.rerank_k, self.num_workers = config.rerank_k, config.data.num_workers
        self.skip_bad, self.bad_images = config.data.skip_bad, bad_images
        self.cached = cached
        self.waiting_for_stage = bool(config.itm_stage.steps)
        self.cache: ImageOutputs | None = None

    def stage_done(self) -> None:
        """The ITM stage has started: validations calibrate from now on."""
        self.waiting_for_stage = False

    @property
    def reranks(self) -> bool:
        return self.model.has_itm and self.rerank_k > 0

    def uncalibrated(self) -> bool:
        """Whether the re-rank weight is still to be calibrated before the model is saved."""
        return self.reranks and self.model.config.fusion.rerank_weight is None

    def __call__(self) -> dict[str, float]:
        """The validation record (``val_*``), the model config's weights updated."""
        calibrate = self.reranks and not self.waiting_for_stage
        if self.cached and self.cache is None:
            self.cache = cache_images(
                self.model,
                self.processor,
                self.dataset,
                "caching val images",
                keep_tokens=self.reranks,
                num_workers=self.num_workers,
            )
        rng = torch.get_rng_state()
        report = evaluate_model(
            self.model,
            self.processor,
            self.dataset,
            rerank_k=self.rerank_k if calibrate else 0,
            num_workers=self.num_workers,
            image_outputs=self.cache,
            skip_bad=self.skip_bad,
            calibrate_rerank=calibrate,
            calibrate_filter=calibrate,
        )
        torch.set_rng_state(rng)
        self.bad_images.record("val", report.get("bad_images", []))
        metrics = report["retrieval_itc"]
        record = {f"val_{k}": v for k, v in metrics.items() if "R@" in k}
        fusion = self.model.config.fusion
        if "rerank_calibration" in report:
            calibration = report["rerank_calibration"]
            fusion.rerank_weight = calibration["rerank_weight"]
            record["val_rerank_weight"] = calibration["rerank_weight"]
            for direction in ("t2i", "i2t"):
                key = f"{direction}_R@1"
                record[f"val_rerank_{key}"] = calibration[f"rerank_{key}"]
        if "filter_calibration" in report:
            calibration = report["filter_calibration"]
            fusion.filter_weight = calibration["filter_weight"]
            record["val_filter_weight"] = calibration["filter_weight"]
            for kind, aucs in calibration["auc"].items():
                for score, value in aucs.items():
                    record[f"val_filter_auc_{kind}_{score}"] = value
        return record
