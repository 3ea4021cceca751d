"""OpenCLIP models as xmodal models: the same embeddings, logit scale, pixels and token ids as
OpenCLIP itself. Runs where open_clip imports (it needs torchvision, which the CPU torch build
of the main test run has no matching wheel of); skipped with the reason elsewhere. CI runs these
tests again in a second environment that has open_clip (.ci/run, ``./install.sh --open-clip``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

CAPTIONS = ["a photo of a cat", "a woman in a space suit", "a cup of coffee"]
# (height, width): square, landscape with an odd width, landscape (skimage's astronaut, chelsea
# and coffee sizes), so the resize and the centre crop are checked on each shape
PHOTO_SIZES = ((512, 512), (300, 451), (400, 600))


def photos() -> list[Image.Image]:
    """Deterministic RGB pictures: smooth gradients (what resizing averages) plus noise (what
    it must not smear differently) at the PHOTO_SIZES."""
    rng = np.random.default_rng(0)
    out = []
    for height, width in PHOTO_SIZES:
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
        pixels = smooth + rng.integers(0, 56, size=(height, width, 3))
        out.append(Image.fromarray(pixels.astype(np.uint8), "RGB"))
    return out


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # torchvision missing or mismatched also lands here
        pytest.skip(f"open_clip does not import here ({exc}); pip install 'xmodal[open_clip]'")
    return open_clip


@pytest.fixture(scope="module")
def tiny_open_clip():
    """A tiny random OpenCLIP ViT CLIP model (real vocabulary, 77-token context)."""
    open_clip = _open_clip()
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=2, width=32, head_width=8, patch_size=8, image_size=32
        ),
        text_cfg=open_clip.CLIPTextCfg(width=32, heads=4, layers=2),
    ).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    return model


def test_open_clip_parity(tiny_open_clip) -> None:
    open_clip = _open_clip()
    from xmodal.models.openclip import from_open_clip_model

    pictures = photos()
    model, processor = from_open_clip_model(tiny_open_clip)
    preprocess = open_clip.image_transform(tiny_open_clip.visual.image_size, False)
    ref_pixels = torch.stack([preprocess(p) for p in pictures])
    pixels = processor.process_images(pictures)
    torch.testing.assert_close(pixels, ref_pixels, atol=1e-6, rtol=0)
    tokens = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)  # SimpleTokenizer, padded to 77
    batch = processor.process_text(CAPTIONS)
    for row, ids in enumerate(batch["input_ids"]):
        length = int(batch["attention_mask"][row].sum())
        assert ids[:length].tolist() == tokens[row][:length].tolist()
    with torch.no_grad():
        ref_image = tiny_open_clip.encode_image(ref_pixels, normalize=True)
        ref_text = tiny_open_clip.encode_text(tokens, normalize=True)
        image = model.encode_image(pixels)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert float(F.cosine_similarity(image, ref_image).min()) >= 0.99999
    assert float(F.cosine_similarity(text, ref_text).min()) >= 0.99999
    assert model.clip_scale().item() == pytest.approx(tiny_open_clip.logit_scale.exp().item())


def test_open_clip_model_saves_without_open_clip(tiny_open_clip, tmp_path) -> None:
    from xmodal import load_model
    from xmodal.models.openclip import from_open_clip_model

    model, processor = from_open_clip_model(tiny_open_clip, fusion="none")
    model.save_pretrained(tmp_path / "m", processor)
    loaded, loaded_processor = load_model(tmp_path / "m")  # a plain xmodal folder now
    batch = loaded_processor.process_text(CAPTIONS)
    with torch.no_grad():
        a = model.encode_text(batch["input_ids"], batch["attention_mask"])
        b = loaded.encode_text(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)
