"""How to split the cores between decoding images and the model, from measured costs.

``extract()`` times the first batch: its decoding on one core (seconds per image) and the model
on it (seconds per image, with all the model's threads). From these, decoding needs the share
``decode / (decode + model * cores)`` of the machine's core time. Why the plans below
(measurements in docs/performance.md):

- A model on the CPU wants every core, and on few cores decoding is light next to it (an emoji
  PNG decodes in a small fraction of the model's time). Worker *processes* then cost more than
  they bring: a batch of 64 decoded images crosses to the main process as 38 MB of shared
  memory, and a third busy process on 2 cores stalls the model's thread pool. Decoding in
  *threads* of this process (Pillow releases the GIL while it decodes and resizes) avoids both.
  When those threads can use every core (cores <= ``THREAD_DECODE_CORES``), decoding and the
  model *take turns*: each batch is decoded by one thread per core while the model waits, then
  the model runs on all cores with nothing beside it. That costs ``m + d / cores`` per image,
  the cap itself (:func:`best_share`), while a decode thread running beside the model's parallel
  ops delays the op thread it displaces, and every other op thread waits for that one.
- When decoding needs more than the threads of one process can give (the GIL-held part of
  Pillow's Python code limits them to ~2 cores' worth), or the model runs on a GPU and the
  host only decodes, decoding goes to DataLoader worker processes: as many cores as it needs
  on a CPU (the model keeps the rest), every core but one beside a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# The most cores' worth of decoding that threads of one process deliver (GIL-bound beyond).
THREAD_DECODE_CORES = 2.0
MAX_WORKERS = 32


@dataclass(frozen=True)
class DecodePlan:
    """workers: DataLoader processes (0: decode in this process); threads: decode threads in
    this process (when workers == 0; 0 means decode between the model's calls in the model's
    thread); model_threads: the model's intra-op threads (torch, and ONNX Runtime's sessions);
    take_turns: the decode threads decode each batch while the model waits (else one batch
    ahead, beside the model)."""

    workers: int
    threads: int
    model_threads: int
    reason: str = ""
    take_turns: bool = False


def local_cores() -> int:
    """This process's cores: the node's, split between the ranks on it (torchrun)."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // ranks)


def decode_share(decode_s: float, model_s: float, cores: int) -> float:
    """The share of ``cores``' time decoding needs when it keeps pace with the model:
    ``decode_s`` one core's seconds per image, ``model_s`` the model's wall seconds per image."""
    decode_s, model_s = max(decode_s, 0.0), max(model_s, 1e-9)
    return decode_s / (decode_s + model_s * cores)


def best_share(decode_s: float, model_s: float, cores: int) -> float:
    """The largest share of model-only speed end-to-end extraction can reach on ``cores`` when
    the model also runs there: every core busy, decoding spread over all of them."""
    model_s = max(model_s, 1e-9)
    return model_s / (model_s + max(decode_s, 0.0) / max(cores, 1))


def take_turns(cores: int, accelerated: bool) -> bool:
    """Whether host work (decoding, tokenising) should run between the model's calls instead of
    beside them: a model on ``cores`` <= ``THREAD_DECODE_CORES`` CPU cores uses them all in
    every op, and threads of this process can do the host work on all of them in its turn."""
    return not accelerated and 1 < cores <= THREAD_DECODE_CORES


def plan_decoding(
    cores: int,
    accelerated: bool,
    decode_s: float | None = None,
    model_s: float | None = None,
) -> DecodePlan:
    """Workers and threads for ``cores`` cores; ``accelerated`` when the model runs on a GPU.
    ``decode_s`` / ``model_s``: measured seconds per image (see :func:`decode_share`); without
    them the plan assumes decoding is light next to the model."""
    cores = max(1, cores)
    if accelerated:
        workers = min(MAX_WORKERS, cores - 1)
        if workers == 0:
            return DecodePlan(0, 1, 1, "GPU model, one core: decode threads beside it")
        return DecodePlan(workers, 0, 1, "GPU model: every core but one decodes")
    if cores == 1:
        return DecodePlan(0, 0, 1, "CPU model, one core: decode between the model's calls")
    if take_turns(cores, accelerated):
        reason = f"CPU model, {cores} cores: decode threads and the model take turns"
        return DecodePlan(0, cores, cores, reason, take_turns=True)
    if decode_s is None or model_s is None:
        return DecodePlan(0, 1, cores, "CPU model, costs unmeasured: decode thread ahead")
    need = decode_share(decode_s, model_s, cores) * cores  # cores' worth of decoding
    if need <= THREAD_DECODE_CORES:
        # A quarter of headroom over the cores' worth decoding needs: more threads than that
        # only compete with the model for the same cores (measured: 1 thread beat 2 on JPEGs).
        threads = max(1, min(cores, math.ceil(1.25 * need)))
        return DecodePlan(0, threads, cores, f"decoding needs {need:.2f} cores: threads")
    workers = min(MAX_WORKERS, cores - 1, math.ceil(need))
    return DecodePlan(workers, 0, max(1, cores - workers), f"decoding needs {need:.2f} cores")


def explicit_plan(workers: int, cores: int, accelerated: bool) -> DecodePlan:
    """The plan for a ``--workers`` the user chose: that many DataLoader processes (0: decode
    between the model's calls). A CPU model keeps the cores they leave, or all of them when
    that would be under two thirds (decoding is light next to the model)."""
    if accelerated:
        return DecodePlan(workers, 0, 1, "workers chosen")
    left = cores - workers
    return DecodePlan(workers, 0, left if 3 * left >= 2 * cores else cores, "workers chosen")
