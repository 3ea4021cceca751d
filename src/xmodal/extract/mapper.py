"""Model: batches -> float32 L2-normalised embeddings (inference mode, channels_last for convs)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from xmodal.models.model import CrossModalModel


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


class EmbeddingMapper:
    """Wraps a model for extraction; a convolutional image tower runs in channels_last."""

    def __init__(self, model: CrossModalModel):
        self.model = model.eval()
        self.channels_last = has_conv(model.image_tower)
        if self.channels_last:
            model.image_tower.to(memory_format=torch.channels_last)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @torch.inference_mode()
    def images(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) -> (B, D) float32."""
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.model.encode_image(pixel_values).float().numpy()

    @torch.inference_mode()
    def texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """(B, L) token ids -> (B, D) float32."""
        return self.model.encode_text(input_ids, attention_mask).float().numpy()
