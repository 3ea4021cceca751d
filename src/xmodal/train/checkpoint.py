"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``step-000100/`` holding the model directory files plus
``train_state.safetensors`` (optimiser moments, RNG states) and ``train_state.json`` (step, data
position, scheduler, optimiser hyper-parameters, an fp16 run's gradient scaler state). It is
written under a temporary name and renamed when complete, so a crash never leaves a
half-written checkpoint under its final name.

A distributed run saves every rank's RNG states: rank 0's under the plain names (``rng.torch``,
``python_random``), rank r's under ``rank{r}.rng.torch`` and ``python_random_ranks[r]``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from xmodal import distributed
from xmodal.atomic import atomic_dir, atomic_write_text
from xmodal.distributed import World
from xmodal.errors import ConfigError, IncompatibleError
from xmodal.models.model import (
    WEIGHTS_NAME,
    CrossModalModel,
    load_safetensors,
    refuse_pickle_payloads,
)
from xmodal.train.optim import resume_schedule

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass
class TrainProgress:
    """Where training stands: optimiser steps done and the data position of the next batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0


class RunCheckpoints:
    """The checkpoints of one run in ``directory``: what they hold (``model`` with its
    ``processor``, ``optimizer``, ``scheduler``, ``precision.scaler``) and this process's place
    among the ranks (``world``): rank 0 writes them, every rank restores its own RNG states."""

    def __init__(
        self,
        directory: Path,
        model: CrossModalModel,
        processor,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        precision,
        world: World,
    ):
        self.directory, self.model, self.processor = Path(directory), model, processor
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.world = world

    def save(self, progress: TrainProgress) -> None:
        """Rank 0 writes the checkpoint (atomically) with every rank's RNG states; all wait."""
        states = distributed.gather_objects(rng_state())
        if self.world.is_main:
            save_checkpoint(
                self.directory,
                self.model,
                self.processor,
                self.optimizer,
                self.scheduler,
                progress,
                extra={"world_size": self.world.size},
                rng_states=states,
                scaler=self.precision.scaler,
            )
        distributed.barrier()

    def resume(self) -> TrainProgress:
        """Restore the latest checkpoint (:func:`load_checkpoint`; none: a fresh start) with
        this rank's RNG states, on this run's schedule (:func:`~xmodal.train.optim.
        resume_schedule`); ConfigError when another number of ranks wrote it (the global
        batch would change)."""
        checkpoint = latest_checkpoint(self.directory)
        if checkpoint is None:
            return TrainProgress()
        rank, size = self.world.rank, self.world.size
        progress, extra = load_checkpoint(
            checkpoint, self.model, self.optimizer, self.scheduler, rank, self.precision.scaler
        )
        resume_schedule(self.scheduler)  # this run's schedule (optim.steps may have grown)
        ranks = extra.get("world_size", 1)
        if ranks != size:
            raise ConfigError(
                f"{checkpoint} was written by a run of {ranks} rank(s); resume it with "
                f"{ranks} rank(s), not {size} (the global batch would change)"
            )
        if self.world.is_main:
            print(f"resumed from {checkpoint} at step {progress.step}")
        return progress


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(
    directory: str | Path,
    model: CrossModalModel,
    processor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: TrainProgress,
    extra: dict | None = None,
    rng_states: Sequence[dict] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Write a complete checkpoint atomically (temporary folder, then rename).

    ``rng_states``: every rank's :func:`rng_state`, in rank order (default: this process's).
    ``scaler``: the fp16 gradient scaler, whose state (plain numbers) is saved when enabled.
    """
    rng_states = list(rng_states) if rng_states is not None else [rng_state()]
    final = Path(directory) / checkpoint_name(progress.step)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, processor)
        tensors, meta = _optimizer_to_flat(optimizer)
        for rank, rng in enumerate(rng_states):
            prefix = f"rank{rank}." if rank else ""
            tensors.update({prefix + key: value for key, value in rng["tensors"].items()})
        save_file(tensors, str(tmp / STATE_TENSORS))
        state = {
            "progress": asdict(progress),
            "optimizer": meta,
            "scheduler": scheduler.state_dict(),
            "python_random": rng_states[0]["python"],
            "extra": extra or {},
        }
        if scaler is not None and scaler.is_enabled():
            state["grad_scaler"] = scaler.state_dict()
        if len(rng_states) > 1:
            state["python_random_ranks"] = {
                str(rank): rng["python"] for rank, rng in enumerate(rng_states) if rank
            }
        atomic_write_text(tmp / STATE_JSON, json.dumps(state, indent=1))
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [
        p
        for p in directory.glob("step-*")
        if p.is_dir() and (p / STATE_JSON).is_file() and (p / WEIGHTS_NAME).is_file()
    ]
    return max(done, key=lambda p: p.name) if done else None


def load_checkpoint(
    path: str | Path,
    model: CrossModalModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[TrainProgress, dict]:
    """Restore model weights, optimiser, scheduler, ``rank``'s RNG states and, for an enabled
    ``scaler``, the fp16 gradient scaler (its defaults when the checkpoint has none, e.g. one
    written by an fp32 or bf16 run).

    Returns the progress and the ``extra`` dict saved with the checkpoint.
    """
    path = Path(path)
    refuse_pickle_payloads(path)
    weights = load_safetensors(path / WEIGHTS_NAME)
    model.load_state_dict(weights)
    state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    tensors = load_safetensors(path / STATE_TENSORS)
    optimizer.load_state_dict(_optimizer_from_flat(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    if rank:
        prefix = f"rank{rank}."
        python_state = state.get("python_random_ranks", {}).get(str(rank))
        if python_state is None:
            raise IncompatibleError(
                f"{path} holds no RNG state for rank {rank}: written by fewer ranks"
            )
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        python_state = state["python_random"]
    _restore_rng(tensors, python_state)
    return TrainProgress(**state["progress"]), state.get("extra", {})


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_meta: dict[str, dict] = {}
    for pid, pstate in sd["state"].items():
        meta = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().cpu()
                meta[key] = "tensor"
            else:
                meta[key] = value
        state_meta[str(pid)] = meta
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"]}


def _optimizer_from_flat(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, pmeta in meta["state"].items():
        state[int(pid)] = {
            key: tensors[f"optim.{pid}.{key}"] if value == "tensor" else value
            for key, value in pmeta.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def seed_everything(seed: int) -> None:
    """Seed every RNG a run draws from (Python, NumPy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, NumPy, Python) as plain data."""
    return {"tensors": _rng_tensors(), "python": _python_rng_json()}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    tensors["rng.numpy.meta"] = torch.tensor([np_state[2], np_state[3]], dtype=torch.float64)
    tensors["rng.numpy.gauss"] = torch.tensor([np_state[4]], dtype=torch.float64)
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def _python_rng_json() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict, python_state: list) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    keys = tensors["rng.numpy.keys"].numpy().astype(np.uint32)
    pos, has_gauss = tensors["rng.numpy.meta"].tolist()
    np.random.set_state(
        ("MT19937", keys, int(pos), int(has_gauss), float(tensors["rng.numpy.gauss"][0]))
    )
    cuda_keys = [k for k in tensors if k.startswith("rng.cuda.")]
    cuda = [tensors[k] for k in sorted(cuda_keys, key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def save_final_model(out_dir: Path, model: CrossModalModel, processor) -> Path:
    """The finished model as a plain model directory ``out_dir/model`` (atomic folder swap)."""
    final = Path(out_dir) / "model"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp, processor)
    return final
