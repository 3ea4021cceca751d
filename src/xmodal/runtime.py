"""Where and how to run: device, autocast and CPU memory choices shared by every command."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Literal

import torch

from xmodal.config import ConfigError, check_choice
from xmodal.errors import CancelledWorkError, DeadlineError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""Autocast: ``auto`` (bf16 on CUDA with bf16, fp16 on older GPUs, bf16 on CPUs with AMX /
AVX-512 BF16, else fp32), or fp32, bf16, fp16 (see :func:`pick_autocast`)."""


def check_device_name(name: str, key: str = "device") -> None:
    """Refuse a device name other than ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")


def pick_device(name: str) -> torch.device:
    """The device for ``name``: ``auto`` is this process's GPU when CUDA is available, else the
    CPU; ``cuda`` this process's GPU (``LOCAL_RANK`` under torchrun, else 0); ``cpu`` and
    ``cuda:N`` as named. The one place every command decides where to run; ConfigError for an
    unknown name or missing CUDA."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. On CPUs bf16 only pays with AMX / AVX-512 BF16.
    The one place every command decides its precision; ConfigError for an unknown one."""
    check_choice("precision", precision, Precision)
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


# -- reusing freed memory on glibc ----------------------------------------------------------------
# glibc hands every allocation above its mmap threshold (at most 32 MiB) straight from the kernel
# and gives it back on free, so each large activation tensor page-faults in zeroed memory on every
# forward pass. For EfficientNet-Lite0 at 224 px (5 MB of activations per image) that slows the
# torch extraction path and full-model training markedly on CPUs (docs/performance.md).
# Serving all allocations from the heap and keeping freed memory removes that cost; the process
# then keeps its peak memory until it exits, which suits an extraction or training run.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_FREED = 2**31 - 1  # bytes of free memory at the heap's top before it is returned


def load_glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """Serve allocations from the heap and keep freed memory (glibc ``mallopt``); False where
    the C library is not glibc (then nothing changes)."""
    libc = load_glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED))


class Deadline:
    """A cooperative stop signal for work done on someone's behalf (a service request).

    Long work calls :meth:`check` between its steps (an image decoded, a model call, a chunk
    of re-ranking): past ``seconds`` it raises :class:`DeadlineError`, after :meth:`cancel`
    :class:`CancelledWorkError`. Thread-safe: the event loop cancels, a worker thread checks.
    ``priority`` orders waiters for a shared resource (the model: 0, short requests, first).
    """

    def __init__(self, seconds: float | None = None, priority: int = 0):
        self.seconds = seconds
        self.priority = priority  # for shared resources: lower goes first
        self.expires = None if seconds is None else time.monotonic() + seconds
        self._cancelled: str | None = None

    def remaining(self) -> float:
        """Seconds left (``inf`` without a deadline, 0 once passed)."""
        if self.expires is None:
            return math.inf
        return max(0.0, self.expires - time.monotonic())

    def cancel(self, reason: str) -> None:
        self._cancelled = reason

    @property
    def cancelled(self) -> bool:
        return self._cancelled is not None

    def check(self) -> None:
        """Raise when the work should stop."""
        if self._cancelled is not None:
            raise CancelledWorkError(f"work cancelled: {self._cancelled}")
        if self.expires is not None and time.monotonic() > self.expires:
            raise DeadlineError(f"the work took longer than its deadline of {self.seconds:g} s")


NO_DEADLINE = Deadline()
