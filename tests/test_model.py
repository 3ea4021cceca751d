"""CrossModalModel on tiny random towers: shapes, gradients, fusion, logit scale, save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import xmodal
from xmodal import losses
from xmodal.models import CrossModalModel, PooledFusion
from xmodal.models.fusion import CrossAttentionFusion
from xmodal.processing import MultimodalProcessor

CAPTIONS = ["a red square", "a red square on white", "a small blue circle", "green grass"]
IMAGE_IDS = torch.tensor([0, 0, 1, 2])  # the first two captions describe the same image


def _batch(processor, captions=CAPTIONS, image_ids=IMAGE_IDS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(int(image_ids.max()) + 1, 3, 64, 64, generator=g)
    text = processor(text=captions)
    return {"pixel_values": distinct[image_ids], **text}


@pytest.fixture(params=["cross", "pooled"])
def fusion_kind(request) -> str:
    return request.param


def test_forward_shapes(make_tiny_config, processor, fusion_kind) -> None:
    model = CrossModalModel(make_tiny_config(fusion_kind)).eval()
    batch = _batch(processor)
    with torch.no_grad():
        out = model(**batch)
    b, length = batch["input_ids"].shape
    assert out.image_embeds.shape == (b, 32) and out.text_embeds.shape == (b, 32)
    assert out.fused_embeds.shape == (b, 32)
    assert out.itm_logits.shape == (b, 2)
    assert out.logits_per_text.shape == (b, b)
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.t())
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(b))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(b))
    expected = model.clip_scale() * out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, expected)
    assert out.text.tokens.shape == (b, length, 32) and out.text.mask.shape == (b, length)
    assert out.image.tokens.shape == (b, 16 * 16 // 4, 32)  # 64 px -> 8 x 8 grid, 32 channels
    assert out.image.mask is None
    agreement = out.image_embeds * out.text_embeds
    expected_itm = model.itm_head(torch.cat([out.fused_embeds, agreement], dim=-1))
    torch.testing.assert_close(out.itm_logits, expected_itm)
    torch.testing.assert_close(
        model.itm_score(out.image, out.text), out.itm_logits[:, 1] - out.itm_logits[:, 0]
    )
    torch.testing.assert_close(model.encode_image(batch["pixel_values"]), out.image_embeds)
    torch.testing.assert_close(
        model.encode_text(batch["input_ids"], batch["attention_mask"]), out.text_embeds
    )
    # same pixels -> same image embedding (rows 0 and 1 show image 0)
    torch.testing.assert_close(out.image_embeds[0], out.image_embeds[1])
    assert isinstance(
        model.fusion, PooledFusion if fusion_kind == "pooled" else CrossAttentionFusion
    )


def test_features_index(make_tiny_config, processor) -> None:
    model = CrossModalModel(make_tiny_config()).eval()
    batch = _batch(processor)
    with torch.no_grad():
        text = model.text_features(batch["input_ids"], batch["attention_mask"])
    idx = torch.tensor([2, 0])
    sub = text.index(idx)
    assert torch.equal(sub.embeds, text.embeds[idx]) and torch.equal(sub.mask, text.mask[idx])
    assert torch.equal(sub.tokens, text.tokens[idx])
    assert torch.equal(sub.projected, text.projected[idx])


def test_gradients_reach_every_parameter(make_tiny_config, processor, fusion_kind) -> None:
    model = CrossModalModel(make_tiny_config(fusion_kind)).train()
    batch = _batch(processor)
    out = model(**batch)
    img, txt = out.image_embeds, out.text_embeds
    contrastive = losses.clip_loss(img, txt, model.clip_scale(), IMAGE_IDS)
    sigmoid = losses.siglip_loss(
        img, txt, model.siglip_logit_scale.exp(), model.siglip_logit_bias, IMAGE_IDS
    )
    g = torch.Generator().manual_seed(0)
    neg_text, neg_image, valid = losses.sample_hard_negatives(img @ txt.t(), IMAGE_IDS, g)
    assert valid.all() and (IMAGE_IDS[neg_text] != IMAGE_IDS).all()
    rows = torch.arange(len(IMAGE_IDS))
    negatives = torch.cat(
        [
            model.itm_logits(out.image.index(rows), out.text.index(neg_text))[valid],
            model.itm_logits(out.image.index(neg_image), out.text.index(rows))[valid],
        ]
    )
    matching = losses.itm_loss(out.itm_logits, negatives)
    pair = losses.cosine_pair_loss(out.image.projected, out.text.projected, IMAGE_IDS)
    loss = contrastive + sigmoid + matching + pair
    assert torch.isfinite(loss)
    loss.backward()

    missing, zero = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            missing.append(name)
        elif not torch.isfinite(param.grad).all() or param.grad.abs().sum() == 0:
            zero.append(name)
    assert not missing, f"no gradient: {missing}"
    assert not zero, f"zero or non-finite gradient: {zero}"
    groups = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert groups >= {
        "image_tower",
        "text_tower",
        "image_proj",
        "text_proj",
        "fusion",
        "itm_head",
        "logit_scale",
        "siglip_logit_scale",
        "siglip_logit_bias",
    }


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_cross_fusion_padding_invariance(make_tiny_config, minilm_tokenizer, pooling) -> None:
    model = CrossModalModel(make_tiny_config("cross", pooling)).eval()
    captions = ["a dog chasing a ball", "two cats"]
    short = minilm_tokenizer(
        captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    long = minilm_tokenizer(
        captions, padding="max_length", max_length=64, truncation=True, return_tensors="pt"
    )
    assert short["input_ids"].shape == (2, 16) and long["input_ids"].shape == (2, 64)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image = model.image_features(pixels)
        text_short = model.text_features(short["input_ids"], short["attention_mask"])
        text_long = model.text_features(long["input_ids"], long["attention_mask"])
        fused_short = model.fuse(image, text_short)
        fused_long = model.fuse(image, text_long)
    torch.testing.assert_close(text_short.embeds, text_long.embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_short, fused_long, atol=1e-5, rtol=0)
    # and padding is the only thing ignored: a different caption gives a different fused vector
    assert (fused_short[0] - fused_short[1]).abs().max() > 1e-3


def test_pooled_fusion_matches_note() -> None:
    fusion = PooledFusion(32, 4).eval()
    for param in fusion.parameters():  # non-trivial biases too
        nn.init.normal_(param, std=0.2)
    reference = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    reference.load_state_dict(fusion.cross_attention.state_dict())
    img, txt = torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        stacked = torch.stack([img, txt], 1)
        want = reference(stacked, stacked, stacked)[0][:, 0]
        got = fusion(img, txt)
    assert got.shape == (5, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the note's computation is not symmetric in its inputs
    with torch.no_grad():
        assert (fusion(txt, img) - got).abs().max() > 1e-3


def test_model_pooled_fusion_uses_projected_vectors(make_tiny_config, processor) -> None:
    model = CrossModalModel(make_tiny_config("pooled")).eval()
    batch = _batch(processor)
    with torch.no_grad():
        out = model(**batch)
        stacked = torch.stack([out.image.projected, out.text.projected], 1)
        want = model.fusion.cross_attention(stacked, stacked, stacked)[0][:, 0]
    torch.testing.assert_close(out.fused_embeds, want)


def test_logit_scale_init_and_clamp(make_tiny_config) -> None:
    model = CrossModalModel(make_tiny_config())
    assert model.clip_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert model.config.max_logit_scale == 100.0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.clip_scale().item() == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    assert model.clip_scale().item() == pytest.approx(50.0, rel=1e-5)
    assert model.siglip_logit_scale.exp().item() == pytest.approx(10.0, rel=1e-6)
    assert model.siglip_logit_bias.item() == pytest.approx(-10.0)


def test_logits_never_exceed_max_scale(make_tiny_config, processor) -> None:
    config = make_tiny_config()
    config.max_logit_scale = 30.0
    model = CrossModalModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026
        out = model(**_batch(processor))
    assert model.clip_scale().item() == pytest.approx(30.0)
    assert out.logits_per_text.abs().max().item() <= 30.0 + 1e-4


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return [out.image_embeds, out.text_embeds, out.fused_embeds, out.itm_logits]


def test_save_load_round_trip(tmp_path: Path, make_tiny_config, processor, fusion_kind) -> None:
    model = CrossModalModel(make_tiny_config(fusion_kind)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
        model.siglip_logit_bias.fill_(-4.5)
    batch = _batch(processor)
    before = _outputs(model, batch)
    model.save_pretrained(tmp_path, processor)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer",
    ]
    pickles = [
        p
        for p in tmp_path.rglob("*")
        if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
    ]
    assert not pickles
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no leftover atomic-write temp files
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["image"]["hf_config"]["model_type"] == "resnet"
    assert saved["model"]["text"]["hf_config"]["hidden_size"] == 32
    assert saved["model"]["fusion"]["kind"] == fusion_kind

    loaded = CrossModalModel.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config.fusion == model.config.fusion
    assert loaded.clip_scale().item() == pytest.approx(math.exp(3.0), rel=1e-6)
    for a, b in zip(before, _outputs(loaded, batch), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    state, state_loaded = model.state_dict(), loaded.state_dict()
    assert state.keys() == state_loaded.keys()
    assert all(torch.equal(state[k], state_loaded[k]) for k in state)

    reloaded_processor = MultimodalProcessor.from_pretrained(tmp_path)
    assert reloaded_processor.config_hash == processor.config_hash
    assert reloaded_processor.config == processor.config

    model2, processor2 = xmodal.load_model(tmp_path)
    assert processor2.config_hash == processor.config_hash
    batch2 = _batch(processor2)
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    for a, b in zip(before, _outputs(model2, batch2), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_load_errors(tmp_path: Path, make_tiny_config) -> None:
    with pytest.raises(FileNotFoundError):
        CrossModalModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        xmodal.load_model(tmp_path)  # an existing folder that is not a model directory
    model = CrossModalModel(make_tiny_config())
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CrossModalModel.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown preset"):
        xmodal.load_model("no-such-preset-or-dir")


def test_mismatched_weights_refused(tmp_path: Path, make_tiny_config) -> None:
    CrossModalModel(make_tiny_config("cross")).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["model"]["fusion"]["kind"] = "pooled"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="do not match"):
        CrossModalModel.from_pretrained(tmp_path)


def test_public_names() -> None:
    names = [
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
        "PRESETS",
        "load_image",
        "load_model",
        "losses",
        "preset_configs",
    ]
    for name in names:
        assert hasattr(xmodal, name), name
        assert name in xmodal.__all__, name
    for name in xmodal.__all__:
        assert getattr(xmodal, name) is not None
    assert xmodal.CrossModalExtractor is xmodal.CrossModalModel
    assert xmodal.MultimodalDataProcessor is xmodal.MultimodalProcessor
    for fn in ("clip_loss", "siglip_loss", "itm_loss", "cosine_pair_loss", "sample_hard_negatives"):
        assert callable(getattr(xmodal.losses, fn))
    assert set(xmodal.PRESETS) >= {"offline-default", "seed"}
