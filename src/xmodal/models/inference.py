"""Inference-only rewrites of an image tower: the same outputs (to float rounding), less work.

- Batch norm folded into the convolution before it (one pass over the activations, not two).
- TF-style "same" padding moved into the convolution itself, so no separate zero-padded copy of
  the activations is made. Symmetric padding becomes the convolution's padding; the asymmetric
  padding of stride-2 convolutions (one more zero after than before) becomes a kernel one wider
  whose first row and column are zero, with symmetric padding: the same windows, the same sums.
- Activations of known blocks (EfficientNet's ReLU6, ResNet's ReLU) applied in place, on the
  fresh output of the convolution before them.
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


def absorb_static_padding(module: nn.Module, asymmetric: bool = True) -> int:
    """Move ``static_padding`` (EfficientNet's TF-style "same") into the convolution; returns
    how many were moved. ``asymmetric=False`` moves only symmetric padding.

    Zero padding (left, right) then a kernel k equals a kernel k + right - left whose first
    right - left taps are zero, with ``right`` zeros on both sides: the output has the same size
    and each window starts at the same input position."""
    absorbed = 0
    for conv in module.modules():
        pad = getattr(conv, "static_padding", None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d)):
            continue
        left, right, top, bottom = pad.padding
        extra = right - left
        if (
            extra < 0
            or bottom - top != extra
            or conv.padding != (0, 0)
            or (extra and not asymmetric)
        ):
            continue
        if extra:
            out_channels, in_channels, height, width = conv.weight.shape
            wider = conv.weight.new_zeros(out_channels, in_channels, height + extra, width + extra)
            wider[:, :, extra:, extra:] = conv.weight.detach()
            conv.weight = nn.Parameter(wider, requires_grad=conv.weight.requires_grad)
            conv.kernel_size = (height + extra, width + extra)
        conv.padding = (bottom, right)
        conv.static_padding = nn.Identity()
        absorbed += 1
    return absorbed


# Activation attributes of blocks whose activations only ever see a convolution's (or a folded
# batch norm's) fresh output, so they may overwrite it.
IN_PLACE_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "EfficientNet": ("_swish",),
    "MBConvBlock": ("_swish",),
    "ResNetConvLayer": ("activation",),
    "ResNetBasicLayer": ("activation",),  # applied after the residual was added in place
    "ResNetBottleNeckLayer": ("activation",),
}


def activations_in_place(module: nn.Module) -> int:
    """Switch the known activations (above) to in place; returns how many."""
    switched = 0
    for parent in module.modules():
        for name in IN_PLACE_ACTIVATIONS.get(type(parent).__name__, ()):
            activation = getattr(parent, name, None)
            if isinstance(activation, nn.ReLU | nn.ReLU6 | nn.Hardtanh) and not activation.inplace:
                activation.inplace = True
                switched += 1
    return switched


def inference_copy(
    tower: nn.Module, channels_last: bool = True, widen_kernels: bool = True
) -> nn.Module:
    """A frozen copy of an image tower with the rewrites above (channels_last only for convs).
    ``widen_kernels``: absorb asymmetric padding into wider kernels (faster on CPUs, see
    docs/performance.md; GPUs keep the padding, where that trade is unmeasured)."""
    fast = copy.deepcopy(tower).eval().requires_grad_(False)
    fold_batch_norms(fast)
    absorb_static_padding(fast, asymmetric=widen_kernels)
    activations_in_place(fast)
    if channels_last and has_conv(fast):
        fast.to(memory_format=torch.channels_last)
    return fast
