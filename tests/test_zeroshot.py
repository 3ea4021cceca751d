"""Tests for xmodal.evaluate.zeroshot."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xmodal.evaluate import DEFAULT_TEMPLATES, build_classifier, zeroshot_metrics


def _normed(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


class _FakeEncoder:
    """Maps each prompt to a fixed random, unnormalised vector; records the calls."""

    def __init__(self, dim: int = 12, seed: int = 0) -> None:
        self.dim = dim
        self.gen = torch.Generator().manual_seed(seed)
        self.table: dict[str, Tensor] = {}
        self.calls: list[list[str]] = []

    def __call__(self, prompts: list[str]) -> Tensor:
        self.calls.append(list(prompts))
        for p in prompts:
            if p not in self.table:
                scale = torch.rand(1, generator=self.gen) * 5 + 0.1
                self.table[p] = torch.randn(self.dim, generator=self.gen) * scale
        return torch.stack([self.table[p] for p in prompts])


def test_default_templates() -> None:
    assert 6 <= len(DEFAULT_TEMPLATES) <= 12
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    assert "a photo of a {}." in DEFAULT_TEMPLATES


def test_classifier_is_normalised_mean_of_normalised_prompts() -> None:
    names = ["dog", "cat", "red car"]
    templates = ["a photo of a {}.", "{}.", "an emoji of {}."]
    enc = _FakeEncoder()
    weights = build_classifier(names, enc, templates)
    assert weights.shape == (3, enc.dim) and weights.dtype == torch.float32
    assert len(enc.calls) == 1  # batched across classes
    assert "a photo of a red car." in enc.calls[0]
    for c, name in enumerate(names):
        prompts = [t.replace("{}", name) for t in templates]
        mean = torch.stack([_normed(enc.table[p]) for p in prompts]).mean(0)
        torch.testing.assert_close(weights[c], _normed(mean))
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(3))


def test_classifier_batching_and_default_templates() -> None:
    names = [f"class {i}" for i in range(5)]
    enc = _FakeEncoder(seed=1)
    weights = build_classifier(names, enc, batch_size=7)
    n_prompts = len(names) * len(DEFAULT_TEMPLATES)
    assert [len(c) for c in enc.calls] == [7] * (n_prompts // 7) + [n_prompts % 7] * (
        n_prompts % 7 > 0
    )
    torch.testing.assert_close(weights, build_classifier(names, enc))


def test_classifier_validation() -> None:
    enc = _FakeEncoder()
    with pytest.raises(ValueError, match="empty"):
        build_classifier([], enc)
    with pytest.raises(ValueError, match="unique"):
        build_classifier(["dog", "cat", "dog"], enc)
    with pytest.raises(ValueError, match="template"):
        build_classifier(["dog"], enc, ["a photo of a dog"])
    with pytest.raises(ValueError, match="template"):
        build_classifier(["dog"], enc, ["{} and {}"])
    with pytest.raises(ValueError, match="encode_text"):
        build_classifier(["dog", "cat"], lambda prompts: torch.zeros(len(prompts) + 1, 4))


def _noisy_copies(
    n_cls: int, n: int, dim: int = 32, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    classes = _normed(torch.randn(n_cls, dim, generator=g))
    labels = torch.randint(0, n_cls, (n,), generator=g)
    images = _normed(classes[labels] + 0.05 * torch.randn(n, dim, generator=g))
    return classes, images, labels


def test_known_top1_and_per_class() -> None:
    classes, images, labels = _noisy_copies(6, 60)
    names = [f"c{i}" for i in range(6)]
    # Images are classified correctly; relabel the first 9 so exactly those are wrong.
    wrong = labels.clone()
    wrong[:9] = (labels[:9] + 1) % 6
    m = zeroshot_metrics(images, wrong, classes, names, ks=(1, 5))
    assert m["n"] == 60
    assert m["top1"] == pytest.approx(100 * 51 / 60)
    expected = {}
    for c in range(6):
        total = int((wrong == c).sum())
        correct = int(((wrong == c) & (wrong == labels)).sum())
        expected[f"c{c}"] = 100 * correct / total
    assert m["per_class"] == pytest.approx(expected)
    assert m["mean_per_class"] == pytest.approx(sum(expected.values()) / 6)
    assert m["top1"] <= m["top5"] <= 100.0


def test_absent_class_and_small_c() -> None:
    classes, images, labels = _noisy_copies(3, 20, seed=2)
    keep = labels != 2
    names = ["a", "b", "c"]
    m = zeroshot_metrics(images[keep], labels[keep], classes, names, ks=(1, 5))
    assert m["per_class"]["c"] is None
    assert m["per_class"]["a"] == 100.0 and m["per_class"]["b"] == 100.0
    assert m["mean_per_class"] == 100.0
    assert m["top5"] == 100.0  # C=3 < 5: top-5 means top-3


def test_ties_are_pessimistic() -> None:
    classes = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # classes 0 and 1 identical
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 2, 2])
    m = zeroshot_metrics(images, labels, classes, ["x", "y", "z"], ks=(1, 2))
    assert m["top1"] == 50.0
    assert m["top2"] == 100.0
    assert m["per_class"] == {"x": 0.0, "y": 0.0, "z": 100.0}
    assert m["mean_per_class"] == pytest.approx(100 / 3)


def test_chunking_matches() -> None:
    classes, images, labels = _noisy_copies(7, 50, seed=3)
    images = _normed(
        images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(9))
    )
    names = [str(i) for i in range(7)]
    full = zeroshot_metrics(images, labels, classes, names)
    assert zeroshot_metrics(images, labels, classes, names, chunk_size=6) == full


def test_zeroshot_validation() -> None:
    classes, images, labels = _noisy_copies(3, 10)
    names = ["a", "b", "c"]
    with pytest.raises(ValueError, match="class names"):
        zeroshot_metrics(images, labels, classes, names[:2])
    with pytest.raises(ValueError, match="labels must lie"):
        zeroshot_metrics(images, labels + 3, classes, names)
    with pytest.raises(ValueError, match="labels must have shape"):
        zeroshot_metrics(images, labels[:-1], classes, names)
    with pytest.raises(ValueError, match="dims differ"):
        zeroshot_metrics(images, labels, classes[:, :4], names)
