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
        # (With ``pooling: pooler`` the model's own pooled output is the one used.)
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module) and config.pooling != "pooler":
            pooler.requires_grad_(False)
        self.model = model
        self.pooling = config.pooling
        self.use_attention_mask = config.use_attention_mask
        self.token_dim = _width(model)  # the hidden states' width (the fusion's input)
        self.output_dim = pooled_width(model) if config.pooling == "pooler" else self.token_dim

    @property
    def padding_free(self) -> bool:
        """Whether a caption's output ignores the padding after it: the encoder reads the mask
        and the pooling reads only real tokens (not a ``pooler`` head, which may read a fixed
        position, as SigLIP's reads the last). Captions may then run padded to any length."""
        return self.use_attention_mask and self.pooling != "pooler"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
        mask = attention_mask if self.use_attention_mask else None
        out = self.model(input_ids=input_ids, attention_mask=mask)
        hidden = out.last_hidden_state
        if self.pooling == "pooler":
            pooled = out.pooler_output
        else:
            pooled = pool_tokens(hidden, attention_mask, self.pooling)
        return TowerOutput(pooled=pooled, tokens=hidden, mask=attention_mask)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_hf_checkpointing(self.model, enabled)

    def architecture(self) -> dict:
        return hf_config_dict(self.model)


def _width(model: nn.Module) -> int:
    return model.config.hidden_size


def pooled_width(model: nn.Module) -> int:
    """Width of a text model's ``pooler_output``: SigLIP's head may project to another width."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    return _width(model)


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
