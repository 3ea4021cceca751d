"""Towers, fusion and the full cross-modal model; the presets (:mod:`.presets`), a model by name
(:mod:`.loading`) and a new model from two towers (:mod:`.assembly`) in their own modules."""

from xmodal.models.fusion import CrossAttentionFusion, PooledFusion
from xmodal.models.image import EfficientNetLiteTower, HFImageTower, build_image_tower
from xmodal.models.model import CrossModalModel, CrossModalOutput, Features
from xmodal.models.text import HFTextTower
from xmodal.models.towers import TowerOutput

CrossModalExtractor = CrossModalModel  # the original design's name (README)

__all__ = [
    "CrossAttentionFusion",
    "CrossModalExtractor",
    "CrossModalModel",
    "CrossModalOutput",
    "EfficientNetLiteTower",
    "Features",
    "HFImageTower",
    "HFTextTower",
    "PooledFusion",
    "TowerOutput",
    "build_image_tower",
]
