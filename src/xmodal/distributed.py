"""torchrun support: the process group and the collectives the global-batch objective needs.

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without
them (or with ``WORLD_SIZE=1``) every function here is a no-op and the code runs as one process.

Gradient rule. :func:`gather_with_grad` returns every rank's rows; in the backward pass the
gradient reaching rank r's rows is the *sum over ranks* of the gradient each rank's loss sends
there (as ``torch.distributed.nn.all_gather`` does). So if each rank's loss ``loss_r`` satisfies
``mean_r(loss_r) = L`` and the parameter gradients are then averaged over ranks (what DDP does,
and :func:`average_gradients` here), every parameter receives exactly ``dL/dparam`` of the
single-process computation on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_BUCKET_ELEMENTS = 32 * 1024 * 1024  # gradients are all-reduced in buckets of this many values


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_minutes: int = 60) -> World:
    """Join the process group torchrun describes in the environment (no-op for one process).

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. The timeout bounds how
    long ranks wait for each other, e.g. while rank 0 alone validates or writes a checkpoint.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return world()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return world()


def world() -> World:
    """The current rank, world size and local rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return world().is_main


def barrier() -> None:
    """Wait until every rank gets here."""
    if world().distributed:
        dist.barrier()


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[World]:
    """:func:`init_distributed` for the block; leaves the group afterwards if it joined it."""
    joined = world().distributed
    current = init_distributed(backend)
    try:
        yield current
    finally:
        if current.distributed and not joined:
            shutdown()


def shutdown() -> None:
    """Leave the process group (if this process is in one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def row_counts(rows: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's number of rows, in rank order."""
    if not world().distributed:
        return [rows]
    return [int(n) for n in gather_no_grad(torch.tensor([rows], device=device))]


def gather_no_grad(x: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order (no gradient).

    Ranks may hold different numbers of rows; pass ``counts`` (from :func:`row_counts`) when
    they may differ, otherwise all ranks must hold the same shape.
    """
    w = world()
    if not w.distributed:
        return x
    x = x.detach().contiguous()
    if counts is None or len(set(counts)) == 1:
        parts = [torch.empty_like(x) for _ in range(w.size)]
        dist.all_gather(parts, x)
        return torch.cat(parts)
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather rows. Backward: sum the gradient over ranks, keep this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        return gather_no_grad(x, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop], None


def gather_with_grad(x: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
    """All ranks' ``x`` along dim 0, differentiable with respect to this rank's ``x``.

    The forward value is this rank's own tensor at its own rows and the other ranks' values
    elsewhere; the gradient of this rank's rows is summed over all ranks' losses (see the module
    doc), so losses that score one rank's rows against another's are differentiated exactly.
    """
    if not world().distributed:
        return x
    counts = tuple(counts) if counts is not None else tuple(row_counts(len(x), x.device))
    return _GatherWithGrad.apply(x, counts)


def gather_rows(
    tensors: Sequence[torch.Tensor], counts: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Gather several (n, ...) tensors of one batch with as few collectives as possible.

    Tensors that require grad are packed into one :func:`gather_with_grad` call (one backward
    collective, so ranks can never disagree on its order); the others go through
    :func:`gather_no_grad`, one call per dtype.
    """
    if not world().distributed:
        return list(tensors)
    if counts is None:
        counts = row_counts(len(tensors[0]), tensors[0].device)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    with_grad = [i for i, t in enumerate(tensors) if t.requires_grad]
    if with_grad:
        _gather_packed(tensors, with_grad, counts, gather_with_grad, out)
    for dtype in sorted({t.dtype for t in tensors if not t.requires_grad}, key=str):
        group = [i for i, t in enumerate(tensors) if not t.requires_grad and t.dtype == dtype]
        _gather_packed(tensors, group, counts, gather_no_grad, out)
    return out  # type: ignore[return-value]


def _gather_packed(tensors, indices, counts, gather, out) -> None:
    """Flatten ``tensors[indices]`` into one (n, k) tensor, gather it, unpack into ``out``."""
    dtype = tensors[indices[0]].dtype
    for i in indices[1:]:
        dtype = torch.promote_types(dtype, tensors[i].dtype)
    flat = [tensors[i].reshape(len(tensors[i]), math.prod(tensors[i].shape[1:])) for i in indices]
    flat = [f.to(dtype) for f in flat]
    widths = [f.shape[1] for f in flat]
    gathered = gather(torch.cat(flat, dim=1), counts)
    for i, part in zip(indices, gathered.split(widths, dim=1), strict=True):
        shape = tensors[i].shape[1:]
        out[i] = part.reshape(len(part), *shape).to(tensors[i].dtype)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``values`` (a new tensor; the input is untouched)."""
    w = world()
    if not w.distributed:
        return values.detach().clone()
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / w.size


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` (e.g. RNG states), in rank order, on every rank."""
    w = world()
    if not w.distributed:
        return [obj]
    objects: list[Any] = [None] * w.size
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_module(module: nn.Module, parameters: bool = True) -> None:
    """Copy rank 0's buffers (and parameters) to every rank, as DDP does at start-up."""
    if not world().distributed:
        return
    tensors = list(module.buffers())
    if parameters:
        tensors += list(module.parameters())
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in place (DDP's reduction, run once per optimiser step).

    A parameter that received a gradient on some rank but not on another (e.g. a data-dependent
    branch) gets zeros on the other; one that received none anywhere keeps ``grad = None``.
    """
    w = world()
    params = [p for p in parameters if p.requires_grad]
    if not w.distributed or not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], device=device, dtype=torch.int32)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    reduced = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag]
    for p in reduced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(reduced):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= w.size
        for p, part in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
            p.grad.copy_(part.view_as(p.grad))


def _buckets(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Consecutive groups of same-dtype parameters of at most ``_BUCKET_ELEMENTS`` values."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        if not buckets or size + p.numel() > _BUCKET_ELEMENTS or buckets[-1][0].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets
