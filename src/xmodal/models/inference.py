"""Inference-only rewrites of an image tower: the same outputs (to float rounding), less work.

- Batch norm folded into the convolution before it (one pass over the activations, not two).
- Symmetric "same" padding (stride-1 convolutions) moved into the convolution itself, so no
  separate zero-padded copy of the activations is made.
- Weights and activations in channels_last: oneDNN's depthwise and 1x1 convolutions are much
  faster in NHWC on CPUs (measured: docs/performance.md).

The rewrites apply to a copy; the training model is left as it was.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Which (convolution, batch norm) attributes of a module are applied one after the other.
CONV_BN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNet": (("_conv_stem", "_bn0"), ("_conv_head", "_bn1")),
    "MBConvBlock": (
        ("_expand_conv", "_bn0"),
        ("_depthwise_conv", "_bn1"),
        ("_project_conv", "_bn2"),
    ),
    "ResNetConvLayer": (("convolution", "normalization"),),
    "ResNetShortCut": (("convolution", "normalization"),),
}


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every known conv -> batch-norm pair in ``module`` (eval mode, in place); returns how
    many were folded."""
    folded = 0
    for parent in list(module.modules()):
        for conv_name, bn_name in CONV_BN_PAIRS.get(type(parent).__name__, ()):
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def absorb_static_padding(module: nn.Module) -> int:
    """Move symmetric ``static_padding`` (EfficientNet's TF-style "same") into the convolution."""
    absorbed = 0
    for conv in module.modules():
        pad = getattr(conv, "static_padding", None)
        if isinstance(conv, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and conv.padding == (0, 0):
                conv.padding = (top, left)
                conv.static_padding = nn.Identity()
                absorbed += 1
    return absorbed


def inference_copy(tower: nn.Module, channels_last: bool = True) -> nn.Module:
    """A frozen copy of an image tower with the rewrites above (channels_last only for convs)."""
    fast = copy.deepcopy(tower).eval().requires_grad_(False)
    fold_batch_norms(fast)
    absorb_static_padding(fast)
    if channels_last and has_conv(fast):
        fast.to(memory_format=torch.channels_last)
    return fast
