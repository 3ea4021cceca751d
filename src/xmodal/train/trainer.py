"""The training loop: it counts steps, logs ``metrics.jsonl``, validates and writes
checkpoints; the run's parts do the rest (model surgery, image features, batches, the
contrastive and ITM stages, validation, the record of undecodable images: ``xmodal.train.*``).

Resuming continues exactly: model, optimiser, scheduler, RNG states and the data position are
restored, so a run stopped at step 10 and resumed ends with the weights of an uninterrupted run.
Under ``torchrun`` (docs/distributed.md) every rank runs this loop on its block of each global
batch; only rank 0 logs, validates and writes checkpoints and the final model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from xmodal import distributed
from xmodal.atomic import make_dir
from xmodal.config import ConfigError
from xmodal.data import ImageTextDataset, load_dataset
from xmodal.runtime import pick_device, reuse_freed_memory
from xmodal.train.bad_images import BadImageLog
from xmodal.train.batches import RankBatches
from xmodal.train.checkpoint import (
    RunCheckpoints,
    TrainProgress,
    save_final_model,
    seed_everything,
)
from xmodal.train.config import TrainConfig
from xmodal.train.contrastive import ContrastiveStage
from xmodal.train.images import DecodedImages, ImageSource, cached_training_images
from xmodal.train.itm_task import ITMStageTask
from xmodal.train.optim import build_optimizer, cosine_schedule
from xmodal.train.plot import append_metrics, plot_metrics, truncate_metrics
from xmodal.train.precision import MixedPrecision
from xmodal.train.run_config import check_resumed_config, save_run_config
from xmodal.train.surgery import build_model, prepare_for_training
from xmodal.train.validation import Validator


@dataclass
class TrainResult:
    model_dir: Path
    progress: TrainProgress
    last_metrics: dict


class Trainer:
    """Runs one training configuration to the end (or resumes it), alone or as one rank."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config, data, optim = config, config.data, config.optim
        self.out_dir = Path(config.out_dir)
        self.device = pick_device(config.device)  # this rank's GPU under torchrun
        self.world = distributed.init_distributed("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cpu" and config.experimental.cpu_reuse_memory:
            reuse_freed_memory()  # faster steps, higher peak: docs/performance.md
        self.precision = MixedPrecision(config.precision, self.device)
        seed_everything(config.seed)
        self.model, self.processor = build_model(config, log=self.world.is_main)
        self.train_set = load_dataset(data.train, data.format, skip_bad=data.skip_bad)
        self.val_set = None
        if data.val:
            self.val_set = load_dataset(data.val, data.format, skip_bad=data.skip_bad)
        if len(self.train_set) < self.global_batch:
            raise ConfigError(
                f"optim.batch_size x optim.accum_steps x ranks ({optim.batch_size} x "
                f"{optim.accum_steps} x {self.world.size}) exceeds the {len(self.train_set)} "
                f"training pairs in {data.train}"
            )
        self.image_start = prepare_for_training(self.model, config, self.device)
        distributed.broadcast_module(self.model)  # every rank starts from rank 0's weights
        if self.world.rank:  # its own dropout stream; rank 0 keeps the single-process one
            seed_everything(config.seed + 7919 * self.world.rank)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = cosine_schedule(
            self.optimizer, optim.warmup_steps, optim.steps, optim.min_lr_ratio
        )
        self.checkpoints = RunCheckpoints(
            self.out_dir / "checkpoints",
            self.model,
            self.processor,
            self.optimizer,
            self.scheduler,
            self.precision,
            self.world,
        )
        self.bad_images = BadImageLog(self.out_dir, data.skip_bad, self.world.is_main)
        self.validator: Validator | None = None
        if self.val_set is not None:
            cached = config.image_cached and self.image_start is None
            self.validator = Validator(
                self.model, self.processor, self.val_set, config, self.bad_images, cached
            )
        self.images: ImageSource | None = None  # the last train() call's (for inspection)

    @property
    def global_batch(self) -> int:
        """Pairs per optimiser step over all ranks: batch_size x accum_steps x world size."""
        return self.config.optim.batch_size * self.config.optim.accum_steps * self.world.size

    def image_source(self) -> tuple[ImageSource, ImageTextDataset]:
        """Where the steps' image features come from, and the training pairs they cover: the
        tower's outputs cached once (``TrainConfig.image_cached``; an undecodable image is refused
        or, with ``data.skip_bad``, dropped with its captions), else decoded pixels."""
        if not self.config.image_cached:
            return DecodedImages(self.model, self.device), self.train_set

        def drop_failed(dataset: ImageTextDataset, failures: dict[int, str]) -> ImageTextDataset:
            return self.bad_images.drop_failed(dataset, failures, self.global_batch)

        return cached_training_images(
            self.model,
            self.processor,
            self.train_set,
            self.config,
            self.device,
            self.image_start,
            drop_failed,
        )

    def train(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run to ``optim.steps``; ``stop_after`` ends the process's work early at that step
        (right after its checkpoint), as a stop or kill would, leaving ``--resume`` to finish."""
        cfg, optim, world = self.config, self.config.optim, self.world
        if world.is_main:
            make_dir(self.out_dir)
        progress = TrainProgress()
        if resume:
            check_resumed_config(self.out_dir, cfg)
            progress = self.checkpoints.resume()
        if world.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", progress.step)
            if progress.step == 0:
                save_run_config(self.out_dir, cfg)
        self.bad_images.start(resume)
        images, train_set = self.image_source()
        self.images = images
        batches = RankBatches(
            train_set,
            self.processor,
            optim.batch_size,
            optim.accum_steps,
            cfg.seed,
            cfg.data.num_workers,
            images.decode_images,
            images.views,
            world,
        )
        stage = ContrastiveStage(
            self.model,
            images,
            cfg,
            self.precision,
            self.optimizer,
            self.scheduler,
            image_eval=self.image_start is not None,
        )
        last_metrics: dict = {}
        shown = None if world.is_main else True
        bar = tqdm(
            total=optim.steps, initial=progress.step, desc="train", unit="step", disable=shown
        )
        started, samples_at_start = time.time(), progress.samples_seen
        while progress.step < optim.steps:
            micro: list[dict] = []
            for batch in batches.epoch(progress.epoch, progress.batch_in_epoch):
                progress.batch_in_epoch += 1
                micro.append(self.bad_images.check(batch, train_set))
                if len(micro) < optim.accum_steps:
                    continue
                losses, samples = stage.step(micro, progress.step)
                self.bad_images.end_step()
                progress.step += 1
                progress.samples_seen += samples
                micro = []
                if progress.batch_in_epoch >= batches.per_epoch:
                    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                rate = (progress.samples_seen - samples_at_start) / (time.time() - started)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", samples_s=f"{rate:.0f}")
                bar.update(1)
                last_metrics = self._after_step(progress, losses, rate)
                if stop_after is not None and progress.step >= stop_after:
                    bar.close()
                    return TrainResult(self.out_dir / "model", progress, last_metrics)
                if progress.step >= optim.steps:
                    break
        bar.close()
        if cfg.itm_stage.optim.steps:
            self._itm_stage(progress.step, train_set, images)
        if world.is_main and self.validator and self.validator.uncalibrated():
            self.validator()  # e.g. resumed from the last checkpoint
        if world.is_main:
            save_final_model(self.out_dir, self.model, self.processor)
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "training.png")
        distributed.barrier()
        return TrainResult(self.out_dir / "model", progress, last_metrics)

    def _itm_stage(self, step: int, train_set: ImageTextDataset, images: ImageSource) -> None:
        """``itm_stage``: the fusion and ITM head train alone on frozen features (rank 0; the
        other ranks wait and receive its weights), then validation calibrates the re-rank
        weight. Logged after the contrastive steps, as steps ``step + 1 ..``."""
        cfg, section = self.config, self.config.itm_stage
        if self.validator:
            self.validator.stage_done()
        if self.world.is_main:

            def log(done: int, terms: dict) -> None:
                record = {"step": step + done, "stage": "itm", **terms}
                if done == section.steps and self.validator:
                    record.update(self.validator())
                append_metrics(self.out_dir / "metrics.jsonl", record)

            task = ITMStageTask(self.model, self.processor, train_set, images, cfg, self.precision)
            task.run(log, cfg.log_every or section.steps)
        distributed.broadcast_module(self.model)

    def _after_step(self, progress: TrainProgress, losses: dict, rate: float) -> dict:
        """Log (rank 0), validate (rank 0; the others wait) and checkpoint when due."""
        cfg, record = self.config, {}
        final = progress.step >= cfg.optim.steps
        if final or (cfg.log_every and progress.step % cfg.log_every == 0):
            record.update(losses)
            record["lr"] = self.scheduler.get_last_lr()[-1]
            record["logit_scale"] = float(self.model.clip_scale().detach())
            record["samples_per_s"] = round(rate, 2)
            if self.bad_images:
                record["bad_images"] = len(self.bad_images)
        if self.validator and (final or (cfg.eval_every and progress.step % cfg.eval_every == 0)):
            if self.world.is_main:
                record.update(self.validator())
            distributed.barrier()
        if record and self.world.is_main:
            record = {"step": progress.step, "epoch": progress.epoch, **record}
            append_metrics(self.out_dir / "metrics.jsonl", record)
        if final or (cfg.save_every and progress.step % cfg.save_every == 0):
            self.checkpoints.save(progress)
            if self.world.is_main:
                plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "training.png")
        return record


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or resume) a run described by ``config``; under torchrun, as one rank of many."""
    with distributed.process_group("nccl" if pick_device(config.device).type == "cuda" else "gloo"):
        return Trainer(config).train(resume=resume)
