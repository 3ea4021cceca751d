"""The contrastive stage's optimiser step: the objective of the global batch over every rank
and accumulated micro-batch (:mod:`xmodal.train.objective`, :mod:`xmodal.train.accumulate`),
gradients averaged over ranks, clipped, fp16-scaled, and one optimiser and schedule step."""

from __future__ import annotations

import warnings

import torch

from xmodal import distributed
from xmodal.models.model import CrossModalModel, Features
from xmodal.train.accumulate import accumulated_backward
from xmodal.train.config import TrainConfig
from xmodal.train.images import ImageSource
from xmodal.train.objective import global_batch_losses, negatives_seed
from xmodal.train.precision import MixedPrecision
from xmodal.train.surgery import set_train_mode


class ContrastiveStage:
    """Steps ``optimizer`` (and ``scheduler``) on the ``config.loss`` terms of global batches
    whose image features come from ``images`` (``config.optim``: clipping, local loss, text
    length groups; ``config.seed``: the ITM negatives); ``image_eval`` keeps the image tower
    in eval mode (a partly trained one keeps its batch-norm statistics)."""

    def __init__(
        self,
        model: CrossModalModel,
        images: ImageSource,
        config: TrainConfig,
        precision: MixedPrecision,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        image_eval: bool = False,
    ):
        self.model, self.images, self.seed = model, images, config.seed
        self.loss, self.optim = config.loss, config.optim
        self.precision, self.optimizer, self.scheduler = precision, optimizer, scheduler
        self.image_eval = image_eval
        self.device = precision.device
        self.world_size = distributed.world().size

    def step(self, micro: list[dict], step: int) -> tuple[dict[str, float], int]:
        """One optimiser step on the global batch whose rank share is ``micro``; returns the
        loss terms (means over ranks, with ``grad_norm`` / ``grad_scale``) and its pairs."""
        model, scaler = self.model, self.precision.scaler
        set_train_mode(model, image_eval=self.image_eval)
        self.optimizer.zero_grad(set_to_none=True)
        seed = negatives_seed(self.seed, step)
        terms = accumulated_backward(
            model,
            micro,
            self.features,
            lambda image, text, ids: self._scaled(self.objective(image, text, ids, seed)),
        )
        terms["loss"] = terms.pop("unscaled_loss")
        distributed.average_gradients(model.parameters())
        names = list(terms)
        rows = sum(len(b["image_index"]) for b in micro)
        count = torch.tensor(float(rows), device=self.device)
        means = distributed.all_reduce_mean(
            torch.stack([*(terms[n].float() for n in names), count])
        )
        means = means.tolist()
        totals = dict(zip(names, means[:-1], strict=True))
        scaler.unscale_(self.optimizer)  # true gradients before clipping (fp16 only)
        if self.optim.grad_clip:
            params = [p for p in model.parameters() if p.grad is not None]
            totals["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip)
            )
        if scaler.is_enabled():
            totals["grad_scale"] = scaler.get_scale()
        scaler.step(self.optimizer)  # skipped when an fp16 gradient overflowed
        scaler.update()
        model.clamp_logit_scales_()
        with warnings.catch_warnings():  # the schedule follows steps, skipped ones included
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        distributed.broadcast_module(model, parameters=False)  # buffers, as DDP does
        return totals, round(means[-1] * self.world_size)

    def features(self, batch: dict) -> tuple[Features, Features, torch.Tensor]:
        """(image, text, image ids) of one micro-batch."""
        with self.precision.autocast():
            image = self.images.features(batch)
            text = self.model.text_features_by_length(
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                self.optim.text_length_groups,
            )
        return image, text, batch["image_index"].to(self.device)

    def objective(
        self, image: Features, text: Features, image_ids: torch.Tensor, seed: int
    ) -> dict[str, torch.Tensor]:
        """This rank's share of the global batch's loss terms, ``loss`` their weighted sum."""
        with self.precision.autocast():
            return global_batch_losses(
                self.model,
                image,
                text,
                image_ids,
                self.loss,
                local_loss=self.optim.local_loss,
                seed=seed,
            )

    def _scaled(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss terms with ``loss`` multiplied by the fp16 loss scale (to back-propagate)
        and the true loss kept under ``unscaled_loss``."""
        scaled = self.precision.scaler.scale(terms["loss"])
        return {**terms, "loss": scaled, "unscaled_loss": terms["loss"]}
