"""A run's numeric precision: the autocast dtype and, for fp16, the dynamic loss scaler."""

from __future__ import annotations

import contextlib

import torch

from xmodal.runtime import pick_autocast


class MixedPrecision:
    """``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) on ``device``: ``dtype`` is the
    autocast type (None: fp32); fp16 gradients underflow without loss scaling, so ``scaler``
    is a dynamic one there (bf16/fp32: a no-op). Its state is checkpointed."""

    def __init__(self, precision: str, device: torch.device):
        self.device = device
        self.dtype = pick_autocast(precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=bool(self.dtype)
        )
