"""``xmodal demo``: load the offline default, embed a few real photos and captions, print tables.

The towers are pretrained separately, so image-image and caption-caption similarities are
meaningful before any training; image-text alignment needs ``xmodal quickstart`` (training).
"""

from __future__ import annotations

import torch

from xmodal.errors import MissingDependencyError

DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera")
DEMO_CAPTIONS = (
    "a cat lying on a rug",
    "a kitten sleeping",
    "a cup of espresso",
    "stock prices fell sharply",
    "a rocket on the launch pad",
)


def run_demo(preset: str = "offline-default") -> dict:
    """Embed the skimage photos and the demo captions; print shapes, hash and similarity tables."""
    try:
        from skimage import data as skdata
    except ImportError as err:
        raise MissingDependencyError(
            f"the demo photos come from scikit-image ({err}): pip install 'xmodal[demo]'"
        ) from err

    from xmodal.models.loading import load_model

    model, processor = load_model(preset)
    model.eval()
    photos = [getattr(skdata, name)() for name in DEMO_PHOTOS]
    batch = processor(images=photos, text=list(DEMO_CAPTIONS))
    with torch.inference_mode():
        image = model.image_features(batch["pixel_values"])
        text = model.text_features(batch["input_ids"], batch["attention_mask"])
        # The towers' own pooled features: meaningful before any image-text training.
        image_tower = torch.nn.functional.normalize(model.image_tower(batch["pixel_values"]).pooled)
        text_tower = torch.nn.functional.normalize(
            model.text_tower(batch["input_ids"], batch["attention_mask"]).pooled
        )
        fused = model.fuse(image.index(torch.arange(len(DEMO_CAPTIONS))), text)
    print(f"preset: {preset}")
    print(f"processor hash: {processor.config_hash}")
    print(
        f"image embeddings: {tuple(image.embeds.shape)}  image tokens: {tuple(image.tokens.shape)}"
    )
    print(f"text embeddings:  {tuple(text.embeds.shape)}  text tokens:  {tuple(text.tokens.shape)}")
    print(f"fused embeddings: {tuple(fused.shape)}")
    image_sim = image_tower @ image_tower.t()
    text_sim = text_tower @ text_tower.t()
    print("\nphoto-to-photo cosine similarity (pretrained image tower)")
    print(format_table(list(DEMO_PHOTOS), image_sim))
    print("\ncaption-to-caption cosine similarity (pretrained text tower)")
    print(format_table([c[:18] for c in DEMO_CAPTIONS], text_sim))
    return {"image_similarity": image_sim, "text_similarity": text_sim}


def format_table(names: list[str], matrix: torch.Tensor) -> str:
    """A square similarity matrix as aligned text."""
    width = max(len(n) for n in names) + 2
    head = " " * width + "".join(f"{n[:8]:>9}" for n in names)
    rows = [
        f"{n:<{width}}" + "".join(f"{v:9.2f}" for v in row.tolist())
        for n, row in zip(names, matrix, strict=True)
    ]
    return "\n".join([head, *rows])
