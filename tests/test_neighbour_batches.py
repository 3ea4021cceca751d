"""Neighbour-mined batches (``optim.neighbour_share``): look-alikes trained in the same batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_augmented_views import views_config
from test_train import read_log

from xmodal.config import ConfigError
from xmodal.train import Trainer
from xmodal.train.batches import Neighbours, epoch_batches, nearest_images, rank_micro_batches


def reference_nearest(features: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: standardise, cosine of every pair, self excluded, k best."""
    x = (features - features.mean(0)) / features.std(0)
    scores = F.normalize(x, dim=1) @ F.normalize(x, dim=1).t()
    scores.fill_diagonal_(float("-inf"))
    return scores.topk(k, dim=1).indices


def test_nearest_images_match_brute_force_in_any_chunking() -> None:
    generator = torch.Generator().manual_seed(0)
    # columns on very different scales: standardising makes each count alike
    features = torch.randn(40, 12, generator=generator) * torch.logspace(-3, 3, 12)
    expected = reference_nearest(features, 5)
    assert torch.equal(nearest_images(features, 5), expected)
    assert torch.equal(nearest_images(features, 5, chunk=7), expected)
    assert nearest_images(features[:4], 8).shape == (4, 3)  # k capped at the other rows
    # many dimensions: a random projection keeps the clearly nearest row
    base = torch.randn(30, 2000, generator=generator)
    twins = base + 0.05 * torch.randn(30, 2000, generator=generator)
    near = nearest_images(torch.cat([base, twins]), 1, dims=256)
    assert torch.equal(near[:30, 0], torch.arange(30, 60))
    assert torch.equal(near[30:, 0], torch.arange(30))


def two_caption_neighbours(images: int, k: int, share: float, seed: int = 0) -> Neighbours:
    """Rows 2i and 2i + 1 are captions of image i; random k nearest images."""
    generator = torch.Generator().manual_seed(seed)
    near = nearest_images(torch.randn(images, 6, generator=generator), k)
    rows = [[2 * i, 2 * i + 1] for i in range(images)]
    return Neighbours([r // 2 for r in range(2 * images)], near, rows, share)


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_mined_batches_hold_each_anchor_look_alike(share) -> None:
    neighbours = two_caption_neighbours(60, k=8, share=share)
    batches = epoch_batches(120, 16, seed=3, epoch=2, neighbours=neighbours)
    assert batches == epoch_batches(120, 16, seed=3, epoch=2, neighbours=neighbours)
    assert batches != epoch_batches(120, 16, seed=3, epoch=3, neighbours=neighbours)
    mined = round(16 * share)
    anchors = 16 - mined
    assert len(batches) == 7  # as many batches as plain shuffling gives
    plain = epoch_batches(120, 16, seed=3, epoch=2)
    anchor_rows = [row for batch in batches for row in batch[:anchors]]
    assert anchor_rows == [row for batch in plain for row in batch][: len(anchor_rows)]
    near = neighbours.near_images.tolist()
    image = neighbours.image_of_row
    look_alikes = 0
    for batch in batches:
        assert len(batch) == 16 and len(set(batch)) == 16  # full, no row twice
        for i, row in enumerate(batch[anchors:]):
            anchor = batch[i % anchors]
            look_alikes += image[row] in near[image[anchor]]
    assert look_alikes >= 0.9 * 7 * mined  # almost always; else a row of another image


def test_mined_batches_fall_back_when_look_alikes_are_taken() -> None:
    # every image's only neighbour is image 0, which has one row: one batch-mate can use it
    near = torch.zeros(10, 1, dtype=torch.long)
    near[0, 0] = 1
    neighbours = Neighbours(list(range(10)), near, [[i] for i in range(10)], 0.5)
    batches = epoch_batches(10, 8, seed=0, epoch=0, neighbours=neighbours)
    assert len(batches) == 1 and sorted(set(batches[0])) == sorted(batches[0])
    assert len(batches[0]) == 8


def test_share_zero_is_plain_shuffling_and_ranks_split_the_mined_batch() -> None:
    neighbours = two_caption_neighbours(50, k=4, share=0.0)
    assert epoch_batches(100, 8, 1, 0, neighbours) == epoch_batches(100, 8, 1, 0)
    neighbours = two_caption_neighbours(50, k=4, share=0.5)
    blocks = [rank_micro_batches(100, 4, 2, 2, r, 1, 0, neighbours) for r in range(2)]
    steps = epoch_batches(100, 16, 1, 0, neighbours)
    for s, step in enumerate(steps):
        joined = blocks[0][2 * s] + blocks[0][2 * s + 1] + blocks[1][2 * s] + blocks[1][2 * s + 1]
        assert joined == step


def test_trainer_mines_from_the_cached_tower_and_resumes_exactly(
    tmp_path, tiny_model_dir, monkeypatch
) -> None:
    seen: dict[str, list] = {"straight": [], "interrupted": []}
    original = Trainer._image_features

    def recording(name):
        def wrapped(self, batch):
            seen[name].append(batch["image_index"].tolist())
            return original(self, batch)

        return wrapped

    def config(out: str):
        run = views_config(tmp_path, tiny_model_dir, out, views=2, steps=9, neighbour_share=0.5)
        run.save_every = 4
        return run

    straight = config("straight")
    monkeypatch.setattr(Trainer, "_image_features", recording("straight"))
    trainer = Trainer(straight)
    trainer.train()
    expected = nearest_images(trainer.cache.pooled, 8)
    assert torch.equal(trainer.neighbours.near_images, expected)  # view 0 of the locked tower
    near = expected.tolist()
    mates = [
        image in near[batch[i]] for batch in seen["straight"] for i, image in enumerate(batch[4:])
    ]
    assert sum(mates) >= 0.9 * len(mates)  # batch-mates of the first four pairs' images

    interrupted = config("interrupted")
    monkeypatch.setattr(Trainer, "_image_features", recording("interrupted"))
    Trainer(interrupted).train(stop_after=4)
    torch.manual_seed(99)
    Trainer(interrupted).train(resume=True)
    assert seen["interrupted"] == seen["straight"]
    a = load_file(str(Path(straight.out_dir) / "model" / "model.safetensors"))
    b = load_file(str(Path(interrupted.out_dir) / "model" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_log(interrupted.out_dir)[-1]["step"] == 9


def test_neighbour_share_config_is_checked(tmp_path, tiny_model_dir) -> None:
    run = views_config(tmp_path, tiny_model_dir, "bad", views=1, neighbour_share=1.0)
    with pytest.raises(ConfigError, match=r"optim.neighbour_share must be in \[0, 1\)"):
        run.validate()
    run = views_config(tmp_path, tiny_model_dir, "bad", views=1, neighbour_share=0.5)
    run.model.cache_image_features = False
    with pytest.raises(ConfigError, match="neighbour_share > 0 needs cached image tower outputs"):
        run.validate()
