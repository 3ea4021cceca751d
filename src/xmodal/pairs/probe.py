"""``xmodal probe``: does fusion help on my task? A linear probe per feature kind, side by side.

For a label column of the dataset, a logistic regression (standardised features, L2, lbfgs) is
trained on each kind of extracted feature of the same rows and scored on held-out rows:

- ``fused``: the pair's fused vector (``xmodal extract --what pairs --fused``);
- ``image``: the row's image embedding, ``text``: its caption embedding (``--what both``);
- ``image+text``: the two concatenated; ``fused+image+text``: all three.

Held-out rows are a seeded split by image (no image on both sides), or a second extraction
folder (``test``) made by the same model, e.g. of a split with unseen names.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.choices import ProbeFeatures
from xmodal.config import ConfigError
from xmodal.errors import InputError, MissingDependencyError
from xmodal.extract.pairs import PAIRS
from xmodal.models.identity import ModelIdentity, check_compatible
from xmodal.pairs.scores import Extraction, column_value, load_matching_dataset, open_extraction
from xmodal.shards import read_shard

KINDS = typing.get_args(ProbeFeatures)


@dataclass
class ProbeResult:
    """One feature kind's probe: held-out accuracy and mean per-class accuracy (balanced)."""

    kind: str
    dim: int
    accuracy: float
    mean_class_accuracy: float


@dataclass
class ProbeReport:
    label: str
    train_rows: int
    test_rows: int
    classes: int
    majority_accuracy: float  # always predicting the most frequent training class
    unseen_test_labels: int  # test rows whose class never occurs in training (always wrong)
    results: list[ProbeResult] = field(default_factory=list)
    split: str = ""

    def table(self) -> str:
        """The results as a small text table."""
        lines = [f"{'features':<18} {'dim':>5} {'accuracy':>9} {'per class':>10}"]
        for r in self.results:
            lines.append(
                f"{r.kind:<18} {r.dim:>5} {100 * r.accuracy:>8.1f}% "
                f"{100 * r.mean_class_accuracy:>9.1f}%"
            )
        lines.append(f"{'majority class':<18} {'':>5} {100 * self.majority_accuracy:>8.1f}%")
        return "\n".join(lines)


@dataclass
class LabelledFeatures:
    """Features of the labelled rows of one extraction, aligned row by row."""

    labels: np.ndarray  # (N,) str
    groups: np.ndarray  # (N,) image ids
    features: dict[str, np.ndarray]  # kind -> (N, D)


def labelled_features(extraction: Extraction, label: str) -> LabelledFeatures:
    """The rows with a ``label`` value that every extracted kind covers, and their features."""
    dataset = load_matching_dataset(extraction)
    labels = [column_value(ex, label) for ex in dataset]
    if all(v is None or str(v).strip() == "" for v in labels):
        raise ConfigError(f"{extraction.data}: no row has a {label!r} column to probe")
    base: dict[str, dict[str, np.ndarray]] = {}  # kind -> key -> vector
    if extraction.record(PAIRS) is not None and extraction.record(PAIRS).get("fused"):
        table = extraction.pairs()
        base["fused"] = dict(zip(table.columns["id"], table.fused, strict=True))
    for kind, modality in (("image", "images"), ("text", "texts")):
        if extraction.record(modality) is not None:
            extraction.require_complete(modality)
            base[kind] = _shard_vectors(extraction, modality)
    if not base:
        raise InputError(
            f"{extraction.directory} holds no features to probe: extract them with "
            "`xmodal extract --what both` and/or `--what pairs --fused`"
        )
    keys = {"fused": lambda i, ex: str(i), "image": lambda i, ex: ex.image_id}
    keys["text"] = keys["fused"]
    rows = [
        i
        for i, ex in enumerate(dataset)
        if labels[i] is not None
        and str(labels[i]).strip()
        and all(keys[k](i, ex) in vectors for k, vectors in base.items())
    ]
    if not rows:
        raise InputError(f"{extraction.directory}: no labelled row has every kind of feature")
    features = {
        k: np.stack([vectors[keys[k](i, dataset[i])] for i in rows]) for k, vectors in base.items()
    }
    for combined in KINDS:
        parts = combined.split("+")
        if len(parts) > 1 and all(p in features for p in parts):
            features[combined] = np.concatenate([features[p] for p in parts], axis=1)
    return LabelledFeatures(
        np.asarray([str(labels[i]) for i in rows]),
        np.asarray([dataset[i].image_id for i in rows]),
        {k: features[k] for k in KINDS if k in features},
    )


def _shard_vectors(extraction: Extraction, modality: str) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    for entry in extraction.record(modality)["shards"]:
        shard = read_shard(extraction.directory / entry["file"])
        vectors.update(zip(shard.ids, shard.embeddings, strict=True))
    return vectors


def group_split(groups: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask: a seeded ``test_fraction`` of the distinct groups (images), so no
    image has rows on both sides."""
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    count = min(len(unique) - 1, max(1, math.ceil(test_fraction * len(unique))))
    chosen = rng.permutation(unique)[:count]
    return np.isin(groups, chosen)


def fit_and_score(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    c: float = 1.0,
    max_iter: int = 2000,
) -> tuple[float, float]:
    """Accuracy and mean per-class accuracy (over the test classes) of a standardised L2
    logistic regression."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        raise MissingDependencyError(
            f"the linear probe needs scikit-learn ({exc}): pip install 'xmodal[probe]'"
        ) from exc
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    model.fit(x_train, y_train)
    predicted = model.predict(x_test)
    correct = predicted == y_test
    per_class = [correct[y_test == label].mean() for label in np.unique(y_test)]
    return float(correct.mean()), float(np.mean(per_class))


def probe(
    features: str | Path,
    label: str,
    *,
    test: str | Path | None = None,
    data: str | Path | None = None,
    test_data: str | Path | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    c: float = 1.0,
    kinds: tuple[str, ...] | None = None,
) -> ProbeReport:
    """Linear probes of ``label`` on each kind of feature in the extraction folder ``features``
    (trained there), scored on ``test`` (another folder of the same model) or on a seeded
    ``test_fraction`` of its images. ``data`` / ``test_data`` default to the manifests'."""
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise ConfigError(f"unknown feature kind(s) {unknown}; expected some of {list(KINDS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if c <= 0:
        raise ConfigError(f"c (inverse regularisation) must be > 0, got {c}")
    train_ex = open_extraction(features, data)
    train = labelled_features(train_ex, label)
    if test is not None:
        test_ex = open_extraction(test, test_data)
        check_compatible(
            ModelIdentity.from_record(train_ex.manifest),
            ModelIdentity.from_record(test_ex.manifest),
            f"{test} holds features of another model than {features}; not probing",
        )
        held = labelled_features(test_ex, label)
        split = f"train {train_ex.directory}, test {test_ex.directory}"
    else:
        mask = group_split(train.groups, test_fraction, seed)
        held = LabelledFeatures(
            train.labels[mask], train.groups[mask], {k: v[mask] for k, v in train.features.items()}
        )
        train = LabelledFeatures(
            train.labels[~mask],
            train.groups[~mask],
            {k: v[~mask] for k, v in train.features.items()},
        )
        split = f"seeded split by image (seed {seed}, test fraction {test_fraction})"
    chosen = [k for k in (kinds or KINDS) if k in train.features and k in held.features]
    if not chosen:
        raise InputError(f"no feature kind is in both {features} and the test features")
    if len(np.unique(train.labels)) < 2:
        raise InputError(f"the training rows have fewer than two {label!r} classes")
    values, counts = np.unique(train.labels, return_counts=True)
    report = ProbeReport(
        label=label,
        train_rows=len(train.labels),
        test_rows=len(held.labels),
        classes=len(values),
        majority_accuracy=float(np.mean(held.labels == values[np.argmax(counts)])),
        unseen_test_labels=int((~np.isin(held.labels, values)).sum()),
        split=split,
    )
    for kind in chosen:
        accuracy, per_class = fit_and_score(
            train.features[kind], train.labels, held.features[kind], held.labels, c
        )
        report.results.append(
            ProbeResult(kind, int(train.features[kind].shape[1]), accuracy, per_class)
        )
    return report


def report_dict(report: ProbeReport) -> dict[str, Any]:
    """The report as plain data (for JSON)."""
    return asdict(report)
