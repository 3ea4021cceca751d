"""xmodal: image-text cross-modal feature extraction, fusion, training, evaluation and search."""

from xmodal import losses
from xmodal.config import (
    ConfigError,
    FusionConfig,
    ImageTowerConfig,
    ModelConfig,
    ProcessorConfig,
    TextTowerConfig,
)
from xmodal.errors import XmodalError
from xmodal.models import (
    CrossAttentionFusion,
    CrossModalExtractor,
    CrossModalModel,
    CrossModalOutput,
    Features,
    PooledFusion,
)
from xmodal.models.loading import load_model
from xmodal.models.presets import PRESETS, preset_configs
from xmodal.processing import (
    CaptionError,
    ImageLoadError,
    MultimodalDataProcessor,
    MultimodalProcessor,
    load_image,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CaptionError",
    "ConfigError",
    "CrossAttentionFusion",
    "CrossModalExtractor",
    "CrossModalModel",
    "CrossModalOutput",
    "Features",
    "FusionConfig",
    "ImageLoadError",
    "ImageTowerConfig",
    "ModelConfig",
    "MultimodalDataProcessor",
    "MultimodalProcessor",
    "PooledFusion",
    "ProcessorConfig",
    "TextTowerConfig",
    "XmodalError",
    "load_image",
    "load_model",
    "losses",
    "preset_configs",
]
