"""The training loop: optimiser, schedule, accumulation, clipping, checkpoints, resume, logging.

Resuming continues exactly: model, optimiser, scheduler, RNG states and the data position are
restored, so a run stopped at step 10 and resumed ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from xmodal.config import ConfigError
from xmodal.data import ImageTextDataset, load_dataset
from xmodal.evaluate.runner import _worker_init, evaluate_model, image_tower_outputs
from xmodal.models.model import CrossModalModel
from xmodal.models.towers import TowerOutput
from xmodal.presets import load_model
from xmodal.processing import ImageLoadError, MultimodalProcessor
from xmodal.train.checkpoint import (
    TrainProgress,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
)
from xmodal.train.config import TrainConfig
from xmodal.train.objective import compute_losses
from xmodal.train.plot import plot_metrics


@dataclass
class TrainResult:
    model_dir: Path
    progress: TrainProgress
    last_metrics: dict


class _PairBatches(Dataset):
    """Item i = the i-th batch of a fixed list of index batches, decoded and tokenised."""

    def __init__(
        self,
        dataset: ImageTextDataset,
        batches: list[list[int]],
        processor: MultimodalProcessor,
        image_index: dict[str, int],
        decode_images: bool,
        skip_bad: bool,
    ):
        self.dataset = dataset
        self.batches = batches
        self.processor = processor
        self.image_index = image_index
        self.decode_images = decode_images
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        examples = [self.dataset[j] for j in self.batches[i]]
        batch: dict = {}
        if self.decode_images:
            pixels, kept = [], []
            for ex in examples:
                try:
                    pixels.append(self.processor.process_image(ex.image))
                    kept.append(ex)
                except ImageLoadError as exc:
                    if not self.skip_bad:
                        raise ImageLoadError(ex.origin or exc.source, exc.reason) from exc
            examples = kept
            batch["pixel_values"] = torch.stack(pixels)
        batch.update(self.processor.process_text([ex.caption for ex in examples]))
        batch["image_index"] = torch.tensor([self.image_index[ex.image_id] for ex in examples])
        return batch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled, full batches of one epoch; a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. On CPUs bf16 only pays with AMX / AVX-512 BF16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16_hardware() else None


def cpu_has_bf16_hardware() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def configure_trainable(model: CrossModalModel, config: TrainConfig) -> None:
    """Lock towers or train only the last layers of the text tower."""
    section = config.model
    if section.lock_image:
        model.image_tower.requires_grad_(False)
    if section.lock_text:
        model.text_tower.requires_grad_(False)
    elif section.text_trainable_layers is not None:
        layers = _encoder_layers(model.text_tower.model)
        model.text_tower.requires_grad_(False)
        keep = section.text_trainable_layers
        for layer in list(layers)[len(layers) - keep :] if keep else []:
            layer.requires_grad_(True)


def _encoder_layers(module: torch.nn.Module) -> torch.nn.ModuleList:
    encoder = getattr(module, "encoder", None)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ConfigError("model.text_trainable_layers: this text tower has no encoder.layer list")


def set_train_mode(model: CrossModalModel) -> None:
    """Train mode, except locked towers (their batch-norm statistics and dropout stay fixed)."""
    model.train()
    for tower in (model.image_tower, model.text_tower):
        if not any(p.requires_grad for p in tower.parameters()):
            tower.eval()


def build_optimizer(model: CrossModalModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW: towers at ``tower_lr``, new layers at ``lr``; no decay on norms, biases, scales."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_tower = name.startswith(("image_tower.", "text_tower."))
        no_decay = (
            param.ndim < 2 or "norm" in name.lower() or "embeddings" in name or "logit" in name
        )
        groups.setdefault((is_tower, no_decay), []).append(param)
    optim = config.optim
    param_groups = [
        {
            "params": params,
            "lr": optim.tower_lr if is_tower else optim.lr,
            "weight_decay": 0.0 if no_decay else optim.weight_decay,
        }
        for (is_tower, no_decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-6)


def cosine_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine decay to ``min_ratio`` of it."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Runs one training configuration to the end (or resumes it)."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.device = pick_device(config.device)
        self.autocast = pick_autocast(config.precision, self.device)
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
        if len(self.train_set) < config.optim.batch_size:
            raise ConfigError(
                f"optim.batch_size ({config.optim.batch_size}) exceeds the {len(self.train_set)} "
                f"training pairs in {config.data.train}"
            )
        configure_trainable(self.model, config)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = cosine_schedule(
            self.optimizer, config.optim.warmup_steps, config.optim.steps, config.optim.min_lr_ratio
        )
        self.image_index = {iid: i for i, iid in enumerate(self.train_set.image_ids())}
        self.cache = None
        self.val_cache = None

    def _build_model(self) -> tuple[CrossModalModel, MultimodalProcessor]:
        section = self.config.model
        model, processor = load_model(section.name)
        if section.fusion_layers is not None or section.embed_dim is not None:
            model_config = model.config
            if section.fusion_layers is not None:
                model_config.fusion.layers = section.fusion_layers
            if section.embed_dim is not None:
                model_config.embed_dim = section.embed_dim
            towers = (model.image_tower, model.text_tower)
            model_config.image.pretrained = model_config.text.pretrained = False
            model_config.image.hf_config = getattr(towers[0], "architecture", lambda: None)()
            model_config.text.hf_config = towers[1].architecture()
            fresh = CrossModalModel(model_config)
            fresh.image_tower.load_state_dict(towers[0].state_dict())
            fresh.text_tower.load_state_dict(towers[1].state_dict())
            model = fresh
        processor.config.caption_template = self.config.data.caption_template
        processor.config.validate()
        return model, processor

    # -- data -----------------------------------------------------------------------------------
    def _use_cache(self) -> bool:
        return self.config.model.lock_image and self.config.model.cache_image_features

    def _loader(self, epoch: int, start: int) -> DataLoader:
        cfg = self.config
        batches = epoch_batches(len(self.train_set), cfg.optim.batch_size, cfg.seed, epoch)
        dataset = _PairBatches(
            self.train_set,
            batches[start:],
            self.processor,
            self.image_index,
            decode_images=not self._use_cache(),
            skip_bad=cfg.data.skip_bad,
        )
        workers = cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            persistent_workers=False,
            worker_init_fn=_worker_init if workers else None,
            generator=torch.Generator().manual_seed(cfg.seed + epoch),  # not the global RNG
        )

    def _image_features(self, batch: dict):
        if self.cache is not None:
            pooled, tokens = self.cache
            idx = batch["image_index"]
            out = TowerOutput(pooled[idx].to(self.device), tokens[idx].to(self.device).float())
            return self.model.image_features_from_tower(out)
        return self.model.image_features(batch["pixel_values"].to(self.device))

    # -- loop -----------------------------------------------------------------------------------
    def train(self, resume: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run to ``optim.steps``; ``stop_after`` ends the process's work early at that step
        (right after its checkpoint), as a stop or kill would, leaving ``--resume`` to finish."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = TrainProgress()
        if resume:
            checkpoint = latest_checkpoint(self.out_dir / "checkpoints")
            if checkpoint is not None:
                progress, _ = load_checkpoint(
                    checkpoint, self.model, self.optimizer, self.scheduler
                )
                print(f"resumed from {checkpoint} at step {progress.step}")
        self._truncate_log(progress.step)
        if self._use_cache():
            self.cache = self._cache_images(self.train_set, "caching train images")
        last_metrics: dict = {}
        steps_per_epoch = len(self.train_set) // cfg.optim.batch_size
        micro_per_step = cfg.optim.accum_steps
        bar = tqdm(
            total=cfg.optim.steps, initial=progress.step, desc="train", unit="step", disable=None
        )
        started, samples_at_start = time.time(), progress.samples_seen
        micro: list[dict] = []
        while progress.step < cfg.optim.steps:
            for batch in self._loader(progress.epoch, progress.batch_in_epoch):
                progress.batch_in_epoch += 1
                micro.append(batch)
                if len(micro) == micro_per_step:
                    losses = self._optimizer_step(micro)
                    progress.step += 1
                    progress.samples_seen += sum(len(b["image_index"]) for b in micro)
                    micro = []
                    if progress.batch_in_epoch >= steps_per_epoch:
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
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
        bar.close()
        final = save_final_model(self.out_dir, self.model, self.processor)
        plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "training.png")
        return TrainResult(final, progress, last_metrics)

    def _optimizer_step(self, micro: list[dict]) -> dict[str, float]:
        set_train_mode(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for batch in micro:
            with torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)
            ):
                image = self._image_features(batch)
                text = self.model.text_features(
                    batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                )
                image_ids = batch["image_index"].to(self.device)
                terms = compute_losses(self.model, image, text, image_ids, self.config.loss)
            (terms["loss"] / len(micro)).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.item() / len(micro)
        if self.config.optim.grad_clip:
            params = [p for p in self.model.parameters() if p.grad is not None]
            totals["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
            )
        self.optimizer.step()
        self.scheduler.step()
        return totals

    def _after_step(self, progress: TrainProgress, losses: dict, rate: float) -> dict:
        cfg = self.config
        record: dict = {}
        final = progress.step >= cfg.optim.steps
        if final or (cfg.log_every and progress.step % cfg.log_every == 0):
            record.update(losses)
            record["lr"] = self.scheduler.get_last_lr()[-1]
            record["logit_scale"] = float(self.model.clip_scale().detach())
            record["samples_per_s"] = round(rate, 2)
        if self.val_set is not None and (
            final or (cfg.eval_every and progress.step % cfg.eval_every == 0)
        ):
            record.update(self.validate())
        if record:
            record = {"step": progress.step, "epoch": progress.epoch, **record}
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if final or (cfg.save_every and progress.step % cfg.save_every == 0):
            save_checkpoint(
                self.out_dir / "checkpoints",
                self.model,
                self.processor,
                self.optimizer,
                self.scheduler,
                progress,
            )
            plot_metrics(self.out_dir / "metrics.jsonl", self.out_dir / "training.png")
        return record

    def validate(self) -> dict[str, float]:
        """Retrieval recall on the validation set (ITC only: fast enough to run often)."""
        if self._use_cache() and self.val_cache is None:
            self.val_cache = self._cache_images(self.val_set, "caching val images")
        rng = torch.get_rng_state()
        report = evaluate_model(
            self.model,
            self.processor,
            self.val_set,
            rerank_k=0,
            num_workers=self.config.data.num_workers,
            image_outputs=self.val_cache,
        )
        torch.set_rng_state(rng)
        metrics = report["retrieval_itc"]
        return {f"val_{k}": v for k, v in metrics.items() if "R@" in k}

    def _cache_images(self, dataset: ImageTextDataset, desc: str):
        self.model.eval()
        images = [ex.image for ex in dataset.unique_images()]
        return image_tower_outputs(
            self.model,
            self.processor,
            images,
            num_workers=self.config.data.num_workers,
            desc=desc,
        )

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the resumed step, so a resumed run's log has no duplicates."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        from xmodal.atomic import atomic_write_text

        atomic_write_text(path, "".join(line + "\n" for line in kept))


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or resume) a run described by ``config``."""
    return Trainer(config).train(resume=resume)
