"""Text towers: token ids -> a pooled vector and the hidden states with their mask."""

from __future__ import annotations

import torch
from torch import nn

from xmodal.config import TextTowerConfig
from xmodal.models.checkpointing import set_hf_checkpointing
from xmodal.models.towers import (
    TowerOutput,
    hf_config_dict,
    load_hf_backbone,
    resolve_package_path,
)


def resolve_text_source(config: TextTowerConfig) -> str:
    """Where the text model lives: its package folder when installed, else the name (folder/hub)."""
    if config.package:
        try:
            return resolve_package_path(config.package)
        except ImportError:
            pass
    return config.name


class HFTextTower(nn.Module):
    """Any Hugging Face ``AutoModel`` encoder (BERT, MiniLM, RoBERTa, CLIP text, ...)."""

    def __init__(self, config: TextTowerConfig):
        super().__init__()
        source = resolve_text_source(config)
        model = load_hf_backbone(source, config.pretrained, config.hf_config)
        if hasattr(model, "text_model"):  # a full CLIP/SigLIP model: keep the text half
            model = model.text_model
        # pool_tokens pools the hidden states itself; the model's own pooler (BERT's dense + tanh
        # on [CLS]) never reaches an output, so freeze it: every trainable parameter gets a grad.
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.model = model
        self.pooling = config.pooling
        self.output_dim = model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return TowerOutput(
            pooled=pool_tokens(hidden, attention_mask, self.pooling),
            tokens=hidden,
            mask=attention_mask,
        )

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_hf_checkpointing(self.model, enabled)

    def architecture(self) -> dict:
        return hf_config_dict(self.model)


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``cls``: the first token; ``eos``: the last real (unmasked) token, wherever the padding
    is; ``mean``: the mean of the real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "eos":
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        last = (mask.to(torch.long) * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
