"""Gradient (activation) checkpointing: recompute blocks in the backward pass to save memory.

Hugging Face towers that support it use their own switch; any other list of blocks (the
EfficientNet MBConv blocks, a ResNet's stages, the fusion layers) is wrapped with
``torch.utils.checkpoint``. The recomputation leaves batch-norm running statistics alone, so a
checkpointed step updates them exactly as an ordinary one does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from xmodal.errors import ConfigError

_WRAPPED = "_xmodal_checkpointed"


@contextlib.contextmanager
def frozen_batch_norm_stats(module: nn.Module) -> Iterator[None]:
    """Batch norms in ``module`` normalise as usual but leave their running statistics alone."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None
    ]
    saved = [(m.momentum, _batches_tracked(m)) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.fill_(tracked)


def _batches_tracked(norm: nn.Module) -> int | None:
    tracked = getattr(norm, "num_batches_tracked", None)
    return None if tracked is None else int(tracked)


def _checkpointed_forward(module: nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> Any:
    if not (module.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(
        forward,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), frozen_batch_norm_stats(module)),
        **kwargs,
    )


def checkpoint_modules(modules: Iterable[nn.Module], enabled: bool) -> None:
    """Make each module recompute its forward during backward (in training mode, with grad)."""
    for module in modules:
        if enabled and not getattr(module, _WRAPPED, False):
            original = type(module).forward.__get__(module)
            module.forward = partial(_checkpointed_forward, module, original)
            setattr(module, _WRAPPED, True)
        elif not enabled and getattr(module, _WRAPPED, False):
            del module.forward
            delattr(module, _WRAPPED)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`checkpoint_modules` wrapped this module."""
    return bool(getattr(module, _WRAPPED, False))


def set_hf_checkpointing(model: nn.Module, enabled: bool) -> None:
    """A transformers model's own checkpointing, or its first list of blocks wrapped when it has
    none (e.g. ResNet, whose stages are checkpointed instead)."""
    if getattr(model, "supports_gradient_checkpointing", False):
        if enabled:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:  # transformers < 5
                model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            disable = getattr(model, "activation_checkpointing_disable", None)
            (disable or model.gradient_checkpointing_disable)()
        return
    blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)), None)
    if blocks is None:
        raise ConfigError(f"{type(model).__name__}: no block list to checkpoint")
    checkpoint_modules(blocks, enabled)
