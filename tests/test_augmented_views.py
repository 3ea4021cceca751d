"""The augmented view cache of a locked image tower: views differ, are seeded, resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_config, read_log

from xmodal.config import ConfigError
from xmodal.train import Trainer, load_train_config
from xmodal.train.batches import sample_views
from xmodal.train.config import DataSection, ExperimentalSection, ModelSection, TrainConfig
from xmodal.train.images import CachedImages


def views_config(tmp_path: Path, model_dir: str, out: str, views: int = 4, **optim):
    config = make_config(tmp_path, model_dir, out, **optim)
    config.model.lock_image = True
    config.model.cache_image_features = True
    config.model.cached_views = views
    return config


def test_views_differ_and_are_the_same_for_a_seed(tmp_path, tiny_model_dir) -> None:
    caches = []
    for run in ("a", "b"):
        images, _ = Trainer(views_config(tmp_path, tiny_model_dir, run, views=4)).image_source()
        caches.append((images.base, images.extra))
    (base, extra), (base_b, extra_b) = caches
    assert base.pooled.shape[0] == 24 and extra.pooled.shape[:2] == (3, 24)
    assert extra.tokens is not None and extra.tokens.shape[:2] == (3, 24)  # ITM reads them
    assert torch.equal(extra.pooled, extra_b.pooled) and torch.equal(base.pooled, base_b.pooled)
    pooled = torch.cat([base.pooled[None], extra.pooled])
    for i in range(4):
        for j in range(i + 1, 4):
            gap = (pooled[i] - pooled[j]).abs().mean(dim=-1)
            assert (gap > 1e-4).all(), (i, j)  # every image's views differ
    other_seed = views_config(tmp_path, tiny_model_dir, "c", views=2)
    other_seed.seed = 1
    images, _ = Trainer(other_seed).image_source()
    assert not torch.equal(images.extra.pooled[0], extra.pooled[0])


def test_zoomed_out_views_reach_the_cache(tmp_path, tiny_model_dir) -> None:
    caches = []
    for zoom in (0.0, 1.0):
        config = views_config(tmp_path, tiny_model_dir, f"zoom{zoom}", views=2)
        config.model.view_zoom_out = zoom
        images, _ = Trainer(config).image_source()
        caches.append((images.base.pooled, images.extra.pooled))
    (base, plain), (base_zoomed, zoomed) = caches
    assert torch.equal(base, base_zoomed)  # view 0 is the image as evaluation sees it
    assert ((plain - zoomed).abs().mean(dim=-1) > 1e-4).all()  # every augmented view zoomed


def test_each_pair_reads_its_sampled_view(tmp_path, tiny_model_dir) -> None:
    trainer = Trainer(views_config(tmp_path, tiny_model_dir, "pick", views=3))
    images, _ = trainer.image_source()
    assert isinstance(images, CachedImages) and images.views == 3
    idx = torch.tensor([0, 5, 5, 7])
    view = torch.tensor([0, 1, 2, 2])
    image = images.features({"image_index": idx, "view": view})
    stacked = torch.cat([images.base.pooled[None], images.extra.pooled])
    expected = trainer.model.embed_image_pooled(stacked[view, idx])
    torch.testing.assert_close(image.embeds.detach(), expected.detach())
    draws = [sample_views(8, 3, 0, 0, 0, b) for b in range(40)]
    assert set(torch.cat(draws).tolist()) == {0, 1, 2}  # all views read
    assert torch.equal(draws[3], sample_views(8, 3, 0, 0, 0, 3))
    assert not torch.equal(torch.stack(draws[:4]), torch.stack(draws[4:8]))


def test_resume_with_augmented_views_is_exact(tmp_path, tiny_model_dir, monkeypatch) -> None:
    seen: dict[str, list] = {"straight": [], "interrupted": []}
    original = CachedImages.features

    def recording(name):
        def wrapped(self, batch):
            seen[name].append((batch["image_index"].tolist(), batch["view"].tolist()))
            return original(self, batch)

        return wrapped

    straight = views_config(tmp_path, tiny_model_dir, "straight", views=3, steps=12)
    monkeypatch.setattr(CachedImages, "features", recording("straight"))
    Trainer(straight).train()
    interrupted = views_config(tmp_path, tiny_model_dir, "interrupted", views=3, steps=12)
    interrupted.save_every = 5
    monkeypatch.setattr(CachedImages, "features", recording("interrupted"))
    Trainer(interrupted).train(stop_after=5)
    torch.manual_seed(4321)  # a different global state: resume restores its own
    Trainer(interrupted).train(resume=True)
    assert seen["interrupted"] == seen["straight"]  # the same pairs and the same views
    assert len({v for _, views in seen["straight"] for v in views}) == 3
    a = load_file(str(Path(straight.out_dir) / "model" / "model.safetensors"))
    b = load_file(str(Path(interrupted.out_dir) / "model" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_log(interrupted.out_dir)[-1]["step"] == 12


def test_cached_views_config_is_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cached_views must be >= 1"):
        ModelSection(lock_image=True, cached_views=0).validate()
    config = TrainConfig(data=DataSection(train="x"))
    config.model.cached_views = 4
    with pytest.raises(ConfigError, match="cached_views > 1 needs cached image tower outputs"):
        config.validate()
    with pytest.raises(ConfigError, match="experimental.view_flip must be in"):
        ExperimentalSection(view_flip=1.5).validate()
    path = tmp_path / "views.yaml"
    path.write_text("data: {train: x.jsonl}\nmodel: {lock_image: true, cached_views: 6}\n")
    assert load_train_config(path).model.cached_views == 6
