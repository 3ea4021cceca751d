"""The training loop: optimiser, schedule, accumulation, clipping, checkpoints, resume, logging.

Resuming continues exactly: model, optimiser, scheduler, RNG states and the data position are
restored, so a run stopped at step 10 and resumed ends with the weights of an uninterrupted run.

Under ``torchrun`` (docs/distributed.md) every rank runs this loop on its block of each global
batch (:mod:`xmodal.train.batches`); the objective is that of the whole global batch
(:func:`~xmodal.train.objective.global_batch_losses`), gradients are averaged over ranks once
per step, and only rank 0 logs, validates and writes checkpoints and the final model.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from xmodal import distributed
from xmodal.atomic import atomic_write_text, make_dir
from xmodal.config import ConfigError
from xmodal.data import ImageTextDataset, load_dataset
from xmodal.data.augment import AugmentView
from xmodal.data.images import data_loader, drop_failed_images, failure_record, image_error
from xmodal.errors import InputError
from xmodal.evaluate.runner import ImageOutputs, evaluate_model, image_tower_outputs
from xmodal.models.model import CrossModalModel, Features
from xmodal.models.towers import TowerOutput
from xmodal.presets import assemble, load_model
from xmodal.processing import MultimodalProcessor
from xmodal.runtime import pick_autocast, pick_device, reuse_freed_memory
from xmodal.train.accumulate import accumulated_backward
from xmodal.train.batches import PairBatches, rank_micro_batches, sample_views
from xmodal.train.batches import epoch_batches as epoch_batches  # re-exported
from xmodal.train.checkpoint import (
    TrainProgress,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_final_model,
)
from xmodal.train.config import ModelSection, TrainConfig
from xmodal.train.itm_stage import FrozenPairs, ITMStage, frozen_pairs
from xmodal.train.objective import global_batch_losses, needed_fields, negatives_seed
from xmodal.train.optim import build_optimizer, cosine_schedule, resume_schedule
from xmodal.train.plot import plot_metrics, read_metrics
from xmodal.train.run_config import check_resumed_config, save_run_config


@dataclass
class TrainResult:
    model_dir: Path
    progress: TrainProgress
    last_metrics: dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_trainable(model: CrossModalModel, config: TrainConfig) -> None:
    """Lock towers or train only the last layers (blocks) of a tower."""
    section = config.model
    if section.lock_image:
        model.image_tower.requires_grad_(False)
    elif section.image_trainable_blocks is not None:
        model.image_tower.requires_grad_(False)
        start = image_suffix_start(model, section.image_trainable_blocks)
        for module in model.image_tower.suffix_modules(start):
            module.requires_grad_(True)
    if section.lock_text:
        model.text_tower.requires_grad_(False)
    elif section.text_trainable_layers is not None:
        layers = _encoder_layers(model.text_tower.model)
        model.text_tower.requires_grad_(False)
        keep = section.text_trainable_layers
        for layer in list(layers)[len(layers) - keep :] if keep else []:
            layer.requires_grad_(True)


def image_suffix_start(model: CrossModalModel, trainable_blocks: int) -> int:
    """The first block of the image tower's trained part (``model.image_trainable_blocks``)."""
    tower = model.image_tower
    if not hasattr(tower, "suffix"):
        raise ConfigError(
            "model.image_trainable_blocks needs an EfficientNet-Lite image tower "
            f"(this model's is {type(tower).__name__}); use lock_image or train it whole"
        )
    if trainable_blocks > tower.block_count:
        raise ConfigError(
            f"model.image_trainable_blocks is {trainable_blocks} but the image tower has "
            f"{tower.block_count} blocks"
        )
    return tower.block_count - trainable_blocks


def _encoder_layers(module: torch.nn.Module) -> torch.nn.ModuleList:
    encoder = getattr(module, "encoder", None)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError("model.text_trainable_layers: this text tower has no encoder.layer list")


def set_train_mode(model: CrossModalModel, image_eval: bool = False) -> None:
    """Train mode, except locked towers (their batch-norm statistics and dropout stay fixed)
    and, with ``image_eval``, the image tower (a partly trained one keeps its statistics)."""
    model.train()
    for tower in (model.image_tower, model.text_tower):
        if not any(p.requires_grad for p in tower.parameters()):
            tower.eval()
    if image_eval:
        model.image_tower.eval()


class Trainer:
    """Runs one training configuration to the end (or resumes it), alone or as one rank."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        self.out_dir = Path(config.out_dir)
        device = pick_device(config.device)  # this rank's GPU under torchrun
        self.world = distributed.init_distributed("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        if device.type == "cpu" and config.cpu_reuse_memory:
            reuse_freed_memory()  # faster steps, higher peak: docs/performance.md
        self.autocast = pick_autocast(config.precision, self.device)
        # fp16 gradients underflow without loss scaling: a dynamic scaler (bf16/fp32: a no-op).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)
        seed_everything(config.seed)
        self.model, self.processor = self._build_model()
        self.train_set = load_dataset(
            config.data.train, config.data.format, skip_bad=config.data.skip_bad
        )
        self.val_set = (
            load_dataset(config.data.val, config.data.format, skip_bad=config.data.skip_bad)
            if config.data.val
            else None
        )
        optim = config.optim
        if len(self.train_set) < self.global_batch:
            raise ConfigError(
                f"optim.batch_size x optim.accum_steps x ranks ({optim.batch_size} x "
                f"{optim.accum_steps} x {self.world.size}) exceeds the {len(self.train_set)} "
                f"training pairs in {config.data.train}"
            )
        # Training changes the ITM head: a weight calibrated for the old one no longer holds.
        self.model.config.fusion.rerank_weight = None
        self.model.config.fusion.filter_weight = None
        configure_trainable(self.model, config)
        # With image_trainable_blocks: the first trained block; its input is what is cached.
        self.image_start: int | None = None
        if config.model.image_trainable_blocks is not None:
            self.image_start = image_suffix_start(self.model, config.model.image_trainable_blocks)
        self.model.set_gradient_checkpointing(config.model.gradient_checkpointing)
        self.model.to(self.device)
        distributed.broadcast_module(self.model)  # every rank starts from rank 0's weights
        if self.world.rank:  # its own dropout stream; rank 0 keeps the single-process one
            seed_everything(config.seed + 7919 * self.world.rank)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = cosine_schedule(
            self.optimizer, optim.warmup_steps, optim.steps, optim.min_lr_ratio
        )
        self.image_index = {iid: i for i, iid in enumerate(self.train_set.image_ids())}
        self.cache: ImageOutputs | None = None
        self.extra_views: ImageOutputs | None = None  # augmented views 1.. (model.cached_views)
        self.val_cache: ImageOutputs | None = None
        self.bad_images: dict[tuple[str, str], dict] = {}  # (dataset, image id) -> record
        self.step_bad_images: list[dict] = []  # this rank's, met since the last step
        self.itm_stage_started = False  # itm_stage: validations calibrate only after it

    @property
    def global_batch(self) -> int:
        """Pairs per optimiser step over all ranks: batch_size x accum_steps x world size."""
        return self.config.optim.batch_size * self.config.optim.accum_steps * self.world.size

    def _build_model(self) -> tuple[CrossModalModel, MultimodalProcessor]:
        section = self.config.model
        if section.assembled:
            model, processor = assemble(
                section.image,
                section.text,
                text_pooling=section.text_pooling or "mean",
                embed_dim=section.embed_dim or 512,
                fusion=section.fusion or "cross",
                fusion_layers=section.fusion_layers,
            )
            model = _with_new_heads(model, section)  # image_pool_levels
        else:
            model, processor = load_model(section.source, fusion=section.fusion)
            model = _with_new_heads(model, section)
        loss = self.config.loss
        if not model.has_itm and self.config.itm_stage.steps:
            raise ConfigError(
                "itm_stage trains the fusion and ITM head, and this model has none (fusion: "
                "none); set model.fusion (cross or pooled) or itm_stage.steps: 0"
            )
        if not model.has_itm and loss.itm:
            if self.world.is_main:
                print("the model has no fusion (fusion: none): the ITM loss term is off")
            loss.itm = 0.0
            if not (loss.infonce or loss.siglip or loss.cosine):
                raise ConfigError(
                    "loss: itm is the only loss and the model has no fusion (fusion: none); "
                    "give infonce, siglip or cosine a weight > 0"
                )
        processor.config.caption_template = self.config.data.caption_template
        processor.config.validate()
        return model, processor

    # -- data -----------------------------------------------------------------------------------
    def _use_cache(self) -> bool:
        return self.config.model.image_cached

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        cfg = self.config
        return rank_micro_batches(
            len(self.train_set),
            cfg.optim.batch_size,
            cfg.optim.accum_steps,
            self.world.size,
            self.world.rank,
            cfg.seed,
            epoch,
        )

    def _loader(self, epoch: int, start: int) -> DataLoader:
        cfg = self.config
        dataset = PairBatches(
            self.train_set,
            self._micro_batches(epoch)[start:],
            self.processor,
            self.image_index,
            decode_images=not self._use_cache(),
        )
        return data_loader(dataset, cfg.data.num_workers, cfg.seed + epoch, batch_size=None)

    def _checked(self, batch: dict) -> dict:
        """The batch, once its undecodable images are kept for the step's record
        (``data.skip_bad``) or refused (ImageLoadError naming the file and row)."""
        if batch["bad_images"]:
            failed = [(self.train_set[j], reason) for j, reason in batch["bad_images"]]
            if not self.config.data.skip_bad:
                raise image_error(*failed[0])
            self.step_bad_images += [failure_record(*f) for f in failed]
            if "image_index" not in batch:
                raise InputError(
                    f"no image of a training micro-batch could be decoded (first: "
                    f"{failed[0][0].image}: {failed[0][1]}); see {self.out_dir / 'errors.jsonl'}"
                )
        return batch

    def _record_step_bad_images(self) -> None:
        """Record the undecodable training images every rank met in this step (rank 0 writes
        the log, so it gathers the other ranks' records)."""
        if self.config.data.skip_bad:  # the same on every rank: all take part in the gather
            parts = distributed.gather_objects(self.step_bad_images)
            self._record_bad_images("train", [record for part in parts for record in part])
        self.step_bad_images = []

    def _record_bad_images(self, dataset: str, records: list[dict]) -> None:
        """Add undecodable images to ``errors.jsonl``, each once, with a warning (rank 0)."""
        new = [r for r in records if (dataset, r["image_id"]) not in self.bad_images]
        for record in new:
            self.bad_images[(dataset, record["image_id"])] = {"dataset": dataset, **record}
            if self.world.is_main:
                tqdm.write(
                    f"skipped undecodable {dataset} image {record['source']} "
                    f"({record['row']}): {record['reason']}"
                )
        if new and self.world.is_main:
            lines = "".join(json.dumps(r) + "\n" for r in self.bad_images.values())
            atomic_write_text(self.out_dir / "errors.jsonl", lines)

    def _load_bad_images(self, resume: bool) -> None:
        """A resumed run keeps the images recorded so far; a fresh one starts a new log."""
        path = self.out_dir / "errors.jsonl"
        if not path.exists():
            return
        if not resume:
            if self.world.is_main:
                path.unlink()
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            self.bad_images[(record["dataset"], record["image_id"])] = record

    def _cache_train_images(self) -> None:
        """Run the locked image tower once over the training images; an undecodable one is
        refused, or (``data.skip_bad``) dropped from the run with its captions."""
        keep_tokens = "tokens" in needed_fields(self.model, self.config.loss)  # ITM, cross fusion
        keep_tokens |= self.image_start is not None  # the prefix's map, always
        keep_tokens |= bool(self.config.itm_stage.steps) and self.model.has_itm
        cache = self._cache_images(self.train_set, "caching train images", keep_tokens)
        kept, records = drop_failed_images(
            self.train_set, cache.failures, self.config.data.skip_bad
        )
        if records:
            self._record_bad_images("train", records)
            self.train_set = kept
            self.image_index = {iid: i for i, iid in enumerate(kept.image_ids())}
            if len(kept) < self.global_batch:
                raise InputError(
                    f"{len(kept)} training pairs are left once {len(records)} undecodable "
                    f"images are dropped: fewer than one global batch ({self.global_batch})"
                )
        self.cache = cache
        self.extra_views = self._augmented_views(keep_tokens)

    def _augmented_views(self, keep_tokens: bool) -> ImageOutputs | None:
        """Views 1 .. ``model.cached_views - 1`` of the training images (view 0 is
        ``self.cache``): seeded augmentations, the same on every rank and in every run of the
        seed; pooled (V - 1, N, Di), tokens (V - 1, N, T, Di) when kept. None for one view."""
        section = self.config.model
        if section.cached_views < 2:
            return None
        unique = self.train_set.unique_images()
        images = [ex.image for ex in unique]
        keys = [ex.image_id for ex in unique]
        views = []
        for view in range(1, section.cached_views):
            self.model.eval()
            outputs = image_tower_outputs(
                self.model,
                self.processor,
                images,
                num_workers=self.config.data.num_workers,
                keep_tokens=keep_tokens,
                desc=f"caching train view {view + 1}/{section.cached_views}",
                change=AugmentView(
                    self.config.seed,
                    view,
                    flip=section.view_flip,
                    zoom_out=section.view_zoom_out,
                ),
                keys=keys,
                prefix_blocks=self.image_start,
            )
            if outputs.failures:  # the image decoded for view 0: an augmentation failed
                position, reason = next(iter(outputs.failures.items()))
                raise InputError(f"augmented view {view} of {images[position]}: {reason}")
            views.append(outputs)
        pooled = torch.stack([v.pooled for v in views])
        tokens = torch.stack([v.tokens for v in views]) if keep_tokens else None  # type: ignore[misc]
        return ImageOutputs(pooled, tokens)

    def _add_views(self, batch: dict, epoch: int, position: int) -> None:
        """Draw the cached view each pair of the micro-batch at ``position`` reads."""
        views = self.config.model.cached_views
        if views > 1 and self._use_cache() and "image_index" in batch:
            rows = len(batch["image_index"])
            batch["view"] = sample_views(
                rows, views, self.config.seed, self.world.rank, epoch, position
            )

    def _cached_rows(self, field: str, idx: torch.Tensor, view) -> torch.Tensor:
        """Rows ``idx`` of a cached field (``pooled`` or ``tokens``), each from the view its
        pair reads: view 0 (``self.cache``) or, where ``view`` > 0, ``self.extra_views``."""
        base = getattr(self.cache, field)
        extra = None if self.extra_views is None else getattr(self.extra_views, field)
        if view is None or extra is None:
            return base[idx]
        rows = base[idx].clone()
        other = view > 0
        if other.any():
            rows[other] = extra[view[other] - 1, idx[other]]
        return rows

    def _image_features(self, batch: dict):
        if self.cache is None:
            return self.model.image_features(batch["pixel_values"].to(self.device))
        idx, view = batch["image_index"], batch.get("view")
        pooled = self._cached_rows("pooled", idx, view).to(self.device)
        if self.cache.tokens is None:  # no loss reads them: (B, 0, D) stands in
            return self.model.image_features_from_tower(
                TowerOutput(pooled, pooled.new_zeros(len(idx), 0, pooled.shape[-1]))
            )
        tokens = self._cached_rows("tokens", idx, view).to(self.device).float()
        if self.image_start is not None:  # the cached prefix's map, then the trained blocks
            out = self.model.image_tower.suffix(tokens, pooled, self.image_start)
            return self.model.image_features_from_tower(out)
        return self.model.image_features_from_tower(TowerOutput(pooled, tokens))

    # -- loop -----------------------------------------------------------------------------------
    def train(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run to ``optim.steps``; ``stop_after`` ends the process's work early at that step
        (right after its checkpoint), as a stop or kill would, leaving ``--resume`` to finish."""
        cfg = self.config
        main = self.world.is_main
        if main:
            make_dir(self.out_dir)
        progress = TrainProgress()
        if resume:
            check_resumed_config(self.out_dir, cfg)
            progress = self._resume(progress)
        if main:
            self._truncate_log(progress.step)
            if progress.step == 0:
                save_run_config(self.out_dir, cfg)
        self._load_bad_images(resume)
        if self._use_cache():
            self._cache_train_images()
        last_metrics: dict = {}
        micro_per_epoch = len(self._micro_batches(0))
        bar = tqdm(
            total=cfg.optim.steps,
            initial=progress.step,
            desc="train",
            unit="step",
            disable=None if main else True,
        )
        started, samples_at_start = time.time(), progress.samples_seen
        while progress.step < cfg.optim.steps:
            micro: list[dict] = []
            for batch in self._loader(progress.epoch, progress.batch_in_epoch):
                self._add_views(batch, progress.epoch, progress.batch_in_epoch)
                progress.batch_in_epoch += 1
                micro.append(self._checked(batch))
                if len(micro) < cfg.optim.accum_steps:
                    continue
                losses, samples = self._optimizer_step(micro, progress.step)
                self._record_step_bad_images()
                progress.step += 1
                progress.samples_seen += samples
                micro = []
                if progress.batch_in_epoch >= micro_per_epoch:
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                rate = (progress.samples_seen - samples_at_start) / (time.time() - started)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", samples_s=f"{rate:.0f}")
                bar.update(1)
                last_metrics = self._after_step(progress, losses, rate)
                if stop_after is not None and progress.step >= stop_after:
                    bar.close()
                    return TrainResult(self.out_dir / "model", progress, last_metrics)
                if progress.step >= cfg.optim.steps:
                    break
        bar.close()
        final = self.out_dir / "model"
        if cfg.itm_stage.steps:
            self._itm_stage(progress.step)
        if main and self._uncalibrated():  # e.g. resumed from the last checkpoint
            self.validate()
        if main:
            save_final_model(self.out_dir, self.model, self.processor)
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "training.png")
        distributed.barrier()
        return TrainResult(final, progress, last_metrics)

    # -- the ITM stage ----------------------------------------------------------------------------
    def _itm_stage(self, step: int) -> None:
        """``itm_stage``: the fusion and ITM head train alone on frozen features (rank 0; the
        other ranks wait and receive its weights), then validation calibrates the re-rank
        weight. Logged after the contrastive steps, as steps ``step + 1 ..``."""
        self.itm_stage_started = True
        if self.world.is_main:
            section = self.config.itm_stage
            pairs = self._frozen_pairs()
            stage = ITMStage(self.model, pairs, section, self.config.seed, self._autocast)
            bar = tqdm(total=section.steps, desc="ITM stage", unit="step", disable=None)

            def log(done: int, terms: dict) -> None:
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{terms['loss']:.3f}")
                record = {"step": step + done, "stage": "itm", **terms}
                if done == section.steps and self.val_set is not None:
                    record.update(self.validate())
                with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")

            stage.run(log, self.config.log_every or section.steps)
            bar.close()
        distributed.broadcast_module(self.model)

    def _frozen_pairs(self) -> FrozenPairs:
        """The ITM stage's features: view 0 of a locked image tower's cache (the images as
        evaluation sees them), else one pass of the (now frozen) tower over them."""
        self.model.eval()
        dataset = self.train_set
        if self.cache is not None and self.image_start is None and self.cache.tokens is not None:
            outputs = [self.cache]
        else:  # the tower trained (or is not cached): its final outputs, once
            out = self._cache_images(dataset, "ITM stage: train images", True, prefix=False)
            dataset, _ = drop_failed_images(dataset, out.failures, self.config.data.skip_bad)
            outputs = [out]
        with torch.no_grad(), self._autocast():
            images = [
                self.model.image_features_from_tower(
                    TowerOutput(out.pooled.to(self.device), out.tokens)
                )
                for out in outputs
            ]
        images = [  # on the CPU, as the cache: the stage moves each step's rows
            Features(f.embeds.float().cpu(), f.projected.float().cpu(), f.tokens.cpu(), None)
            for f in images
        ]
        image_row = {image_id: i for i, image_id in enumerate(dataset.image_ids())}
        rows = [image_row[ex.image_id] for ex in dataset.examples]
        return frozen_pairs(
            self.model,
            self.processor,
            images,
            dataset.captions(),
            torch.tensor(rows),
            reorder=bool(self.config.itm_stage.reordered or self.config.itm_stage.reordered_images),
        )

    def _resume(self, progress: TrainProgress) -> TrainProgress:
        """Every rank restores the latest checkpoint, with its own RNG states."""
        checkpoint = latest_checkpoint(self.out_dir / "checkpoints")
        if checkpoint is None:
            return progress
        progress, extra = load_checkpoint(
            checkpoint,
            self.model,
            self.optimizer,
            self.scheduler,
            rank=self.world.rank,
            scaler=self.scaler,
        )
        resume_schedule(self.scheduler)  # this run's schedule (optim.steps may have grown)
        ranks = extra.get("world_size", 1)
        if ranks != self.world.size:
            raise ConfigError(
                f"{checkpoint} was written by a run of {ranks} rank(s); resume it with "
                f"{ranks} rank(s), not {self.world.size} (the global batch would change)"
            )
        if self.world.is_main:
            print(f"resumed from {checkpoint} at step {progress.step}")
        return progress

    def _optimizer_step(self, micro: list[dict], step: int) -> tuple[dict[str, float], int]:
        """One optimiser step on the global batch; returns the loss terms and its pair count."""
        set_train_mode(self.model, image_eval=self.image_start is not None)
        self.optimizer.zero_grad(set_to_none=True)
        seed = negatives_seed(self.config.seed, step)
        terms = accumulated_backward(
            self.model,
            micro,
            self._features,
            lambda image, text, ids: self._scaled(self._objective(image, text, ids, seed)),
        )
        terms["loss"] = terms.pop("unscaled_loss")
        distributed.average_gradients(self.model.parameters())
        names = list(terms)
        rows = sum(len(b["image_index"]) for b in micro)
        count = torch.tensor(float(rows), device=self.device)
        means = distributed.all_reduce_mean(
            torch.stack([*(terms[n].float() for n in names), count])
        )
        means = means.tolist()
        totals = dict(zip(names, means[:-1], strict=True))
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping (fp16 only)
        if self.config.optim.grad_clip:
            params = [p for p in self.model.parameters() if p.grad is not None]
            totals["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
            )
        if self.scaler.is_enabled():
            totals["grad_scale"] = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped when an fp16 gradient overflowed
        self.scaler.update()
        self.model.clamp_logit_scales_()
        with warnings.catch_warnings():  # the schedule follows steps, skipped ones included
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        distributed.broadcast_module(self.model, parameters=False)  # buffers, as DDP does
        return totals, round(means[-1] * self.world.size)

    def _scaled(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss terms with ``loss`` multiplied by the fp16 loss scale (to back-propagate)
        and the true loss kept under ``unscaled_loss``."""
        return {**terms, "loss": self.scaler.scale(terms["loss"]), "unscaled_loss": terms["loss"]}

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)
        )

    def _features(self, batch: dict) -> tuple[Features, Features, torch.Tensor]:
        with self._autocast():
            image = self._image_features(batch)
            text = self.model.text_features_by_length(
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                self.config.optim.text_length_groups,
            )
        return image, text, batch["image_index"].to(self.device)

    def _objective(
        self, image: Features, text: Features, image_ids: torch.Tensor, seed: int
    ) -> dict[str, torch.Tensor]:
        with self._autocast():
            return global_batch_losses(
                self.model,
                image,
                text,
                image_ids,
                self.config.loss,
                local_loss=self.config.optim.local_loss,
                seed=seed,
            )

    def _after_step(self, progress: TrainProgress, losses: dict, rate: float) -> dict:
        """Log (rank 0), validate (rank 0; the others wait) and checkpoint when due."""
        cfg = self.config
        main = self.world.is_main
        record: dict = {}
        final = progress.step >= cfg.optim.steps
        if final or (cfg.log_every and progress.step % cfg.log_every == 0):
            record.update(losses)
            record["lr"] = self.scheduler.get_last_lr()[-1]
            record["logit_scale"] = float(self.model.clip_scale().detach())
            record["samples_per_s"] = round(rate, 2)
            if self.bad_images:
                record["bad_images"] = len(self.bad_images)
        if self.val_set is not None and (
            final or (cfg.eval_every and progress.step % cfg.eval_every == 0)
        ):
            if main:
                record.update(self.validate())
            distributed.barrier()
        if record and main:
            record = {"step": progress.step, "epoch": progress.epoch, **record}
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if final or (cfg.save_every and progress.step % cfg.save_every == 0):
            self._save_checkpoint(progress)
        return record

    def _save_checkpoint(self, progress: TrainProgress) -> None:
        """Rank 0 writes the checkpoint (atomically) with every rank's RNG states; all wait."""
        states = distributed.gather_objects(rng_state())
        if self.world.is_main:
            save_checkpoint(
                self.out_dir / "checkpoints",
                self.model,
                self.processor,
                self.optimizer,
                self.scheduler,
                progress,
                extra={"world_size": self.world.size},
                rng_states=states,
                scaler=self.scaler,
            )
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "training.png")
        distributed.barrier()

    def validate(self) -> dict[str, float]:
        """Retrieval recall on the validation set, and (with an ITM head) the re-rank weight
        calibrated on it (:mod:`xmodal.evaluate.rerank`), kept in the model config so the
        saved model carries the latest one."""
        rerank = self.model.has_itm and self.config.rerank_k > 0
        calibrate = rerank and (not self.config.itm_stage.steps or self.itm_stage_started)
        if self._use_cache() and self.image_start is None and self.val_cache is None:
            self.val_cache = self._cache_images(self.val_set, "caching val images", rerank)
        rng = torch.get_rng_state()
        report = evaluate_model(
            self.model,
            self.processor,
            self.val_set,
            rerank_k=self.config.rerank_k if calibrate else 0,
            num_workers=self.config.data.num_workers,
            image_outputs=self.val_cache,
            skip_bad=self.config.data.skip_bad,
            calibrate_rerank=calibrate,
            calibrate_filter=calibrate,
        )
        torch.set_rng_state(rng)
        self._record_bad_images("val", report.get("bad_images", []))
        metrics = report["retrieval_itc"]
        record = {f"val_{k}": v for k, v in metrics.items() if "R@" in k}
        if "rerank_calibration" in report:
            calibration = report["rerank_calibration"]
            self.model.config.fusion.rerank_weight = calibration["rerank_weight"]
            record["val_rerank_weight"] = calibration["rerank_weight"]
            for direction in ("t2i", "i2t"):
                key = f"{direction}_R@1"
                record[f"val_rerank_{key}"] = calibration[f"rerank_{key}"]
        if "filter_calibration" in report:
            calibration = report["filter_calibration"]
            self.model.config.fusion.filter_weight = calibration["filter_weight"]
            record["val_filter_weight"] = calibration["filter_weight"]
            for kind, aucs in calibration["auc"].items():
                for score, value in aucs.items():
                    record[f"val_filter_auc_{kind}_{score}"] = value
        return record

    def _uncalibrated(self) -> bool:
        """Whether the re-rank weight is still to be calibrated before the model is saved."""
        return (
            self.val_set is not None
            and self.model.has_itm
            and self.config.rerank_k > 0
            and self.model.config.fusion.rerank_weight is None
        )

    def _cache_images(
        self, dataset: ImageTextDataset, desc: str, keep_tokens: bool, prefix: bool = True
    ) -> ImageOutputs:
        """The locked image tower's outputs (its token grids only when ``keep_tokens``), or,
        with ``image_trainable_blocks`` (unless ``prefix`` is False), those of its frozen
        prefix (pooled taps and map)."""
        self.model.eval()
        images = [ex.image for ex in dataset.unique_images()]
        return image_tower_outputs(
            self.model,
            self.processor,
            images,
            num_workers=self.config.data.num_workers,
            keep_tokens=keep_tokens,
            desc=desc,
            prefix_blocks=self.image_start if prefix else None,
        )

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the resumed step, so a resumed run's log has no duplicates."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [record for record in read_metrics(path) if record["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def _with_new_heads(model: CrossModalModel, section: ModelSection) -> CrossModalModel:
    """The model under a fresh fusion and ITM head when ``fusion``, ``fusion_layers``,
    ``fusion_grid_positions``, ``image_token_levels`` or ``embed_dim`` change it, with a fresh
    image projection when ``image_pool_levels`` or ``image_projection_hidden`` do (else the
    model unchanged).

    The towers are kept, and in the same shared space the projections and logit scales too, so
    an aligned model keeps its alignment under a new fusion; a new ``embed_dim`` gets fresh
    projections (``linear``, trained at ``lr`` as new layers are), new pool levels a fresh
    image projection (its input is wider or narrower), a new projection shape one too.
    """
    model_config = model.config
    new_fusion = section.fusion is not None and section.fusion != model_config.fusion.kind
    new_layers = (
        section.fusion_layers is not None and section.fusion_layers != model_config.fusion.layers
    )
    positions = section.fusion_grid_positions
    new_positions = positions is not None and positions != model_config.fusion.grid_positions
    new_dim = section.embed_dim is not None and section.embed_dim != model_config.embed_dim
    token_levels = section.image_token_levels
    new_tokens = token_levels is not None and token_levels != model_config.image.token_levels
    levels = section.image_pool_levels
    new_levels = levels is not None and levels != model_config.image.pool_levels
    hidden = section.image_projection_hidden
    new_head = hidden is not None and hidden != model_config.image_projection_hidden
    changed = (new_fusion, new_layers, new_positions, new_tokens, new_dim, new_levels, new_head)
    if not any(changed):
        return model
    if new_tokens:
        model_config.image.token_levels = token_levels  # type: ignore[assignment]
    if new_levels:
        model_config.image.pool_levels = levels  # type: ignore[assignment]
    if new_head:
        model_config.image_projection_hidden = hidden  # type: ignore[assignment]
    if new_fusion:
        model_config.fusion.kind = section.fusion  # type: ignore[assignment]
    if new_layers:
        model_config.fusion.layers = section.fusion_layers  # type: ignore[assignment]
    if new_positions:
        model_config.fusion.grid_positions = positions  # type: ignore[assignment]
    if new_dim:
        model_config.embed_dim = section.embed_dim  # type: ignore[assignment]
        model_config.projection = "linear"  # not the aligned model's pretrained projections
    try:
        model_config.validate()
    except ConfigError as err:
        raise ConfigError(f"model: {err}") from None
    towers = (model.image_tower, model.text_tower)
    model_config.image.pretrained = model_config.text.pretrained = False
    model_config.image.hf_config = getattr(towers[0], "architecture", lambda: None)()
    model_config.text.hf_config = towers[1].architecture()
    fresh = CrossModalModel(model_config)
    kept: tuple[str, ...] = ("image_tower.", "text_tower.")
    if not new_dim:
        kept += ("text_proj.", "logit_scale", "siglip_logit_")
        kept += () if new_levels or new_head else ("image_proj.",)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(kept)}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith(kept) for k in missing):
        raise RuntimeError(f"rebuilt model lost weights: {missing[:3]} {unexpected[:3]}")
    return fresh


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or resume) a run described by ``config``; under torchrun, as one rank of many."""
    with distributed.process_group("nccl" if pick_device(config.device).type == "cuda" else "gloo"):
        return Trainer(config).train(resume=resume)
