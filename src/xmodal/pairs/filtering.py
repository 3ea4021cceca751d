"""``xmodal filter``: drop mismatched image-caption pairs by their scores (CLIP-score filtering).

Scores come from ``xmodal extract --what pairs``. Rows are kept by thresholds
(``min_similarity``, ``min_itm``, both must hold) or by ``keep_fraction``: the best-scoring
fraction by one score. The kept rows are written in the input's own format (JSONL or CSV,
every other column as it was; a relative ``image`` path is rewritten relative to the output when
it lives in another folder), beside a report (JSON) and a histogram of the scores (PNG).
Everything is checked before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.atomic import atomic_path, atomic_write_text
from xmodal.config import ConfigError
from xmodal.data.datasets import CAPTION_FILES
from xmodal.errors import InputError, OutputError
from xmodal.extract.pairs import SCORE_COLUMNS
from xmodal.pairs.scores import Extraction, load_matching_dataset, open_extraction
from xmodal.shards import ERRORS_NAME

SCORE_RANGES = {"similarity": (-1.0, 1.0), "itm": (0.0, 1.0)}


@dataclass
class FilterReport:
    """What a filter run kept and dropped, written as ``<out stem>.report.json``."""

    data: str
    scores: str
    out: str
    criterion: dict[str, Any]
    rows_scored: int
    kept: int
    dropped: int
    unscored: int  # rows extraction could not score (errors.jsonl / skipped.jsonl); not kept
    cutoffs: dict[str, float]  # the lowest kept score per criterion score
    score_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    report: str = ""
    histogram: str | None = None


def check_criterion(
    min_similarity: float | None, min_itm: float | None, keep_fraction: float | None, by: str
) -> None:
    """Refuse a missing, contradictory or out-of-range criterion (ConfigError, one line)."""
    for name, value in (("min_similarity", min_similarity), ("min_itm", min_itm)):
        if value is None:
            continue
        low, high = SCORE_RANGES[name.removeprefix("min_")]
        if not (low <= value <= high) or math.isnan(value):
            raise ConfigError(f"{name} must be within [{low:g}, {high:g}], got {value}")
    if keep_fraction is not None:
        if not (0.0 < keep_fraction <= 1.0):
            raise ConfigError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        if min_similarity is not None or min_itm is not None:
            raise ConfigError("keep_fraction and min_similarity / min_itm exclude each other")
    elif min_similarity is None and min_itm is None:
        raise ConfigError("give min_similarity, min_itm or keep_fraction")
    if by not in SCORE_COLUMNS:
        raise ConfigError(f"by must be one of {', '.join(SCORE_COLUMNS)}, got {by!r}")


def keep_mask(
    scores: dict[str, np.ndarray],
    min_similarity: float | None = None,
    min_itm: float | None = None,
    keep_fraction: float | None = None,
    by: str = "similarity",
) -> np.ndarray:
    """Which rows pass: every given threshold (score >= threshold), or the
    ``round(keep_fraction * n)`` best by ``by`` (ties broken by row order)."""
    count = len(next(iter(scores.values())))
    if keep_fraction is not None:
        keep = np.zeros(count, dtype=bool)
        order = np.argsort(-scores[by], kind="stable")
        keep[order[: int(round(keep_fraction * count))]] = True
        return keep
    keep = np.ones(count, dtype=bool)
    if min_similarity is not None:
        keep &= scores["similarity"] >= min_similarity
    if min_itm is not None:
        keep &= scores["itm"] >= min_itm
    return keep


def filter_pairs(
    scores: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    min_similarity: float | None = None,
    min_itm: float | None = None,
    keep_fraction: float | None = None,
    by: str = "similarity",
    histogram: bool = True,
) -> FilterReport:
    """Write the rows of ``data`` (default: the dataset the scores were extracted from) that pass
    the criterion to ``out`` (same format), ``<out stem>.report.json`` and, with ``histogram``,
    ``<out stem>.scores.png``. Returns the report."""
    check_criterion(min_similarity, min_itm, keep_fraction, by)
    extraction = open_extraction(scores, data)
    source = caption_file(extraction.data)
    out = Path(out)
    _check_out(source, out)
    needed = {by} if keep_fraction is not None else set()
    if min_similarity is not None:
        needed.add("similarity")
    if min_itm is not None:
        needed.add("itm")
    table = extraction.pairs()
    missing = sorted(needed - set(table.scores))
    if missing:
        raise InputError(
            f"{extraction.directory}: the pair shards have no {' / '.join(missing)} score "
            f"(they hold {', '.join(sorted(table.scores))}; a model without an ITM head has no itm)"
        )
    load_matching_dataset(extraction)  # the data must be the one the scores describe
    keep = keep_mask(table.scores, min_similarity, min_itm, keep_fraction, by)
    kept_rows = {row for row, k in zip(table.columns["row"], keep, strict=True) if k}
    text = _kept_text(source, out, kept_rows)
    criterion = {
        "min_similarity": min_similarity,
        "min_itm": min_itm,
        "keep_fraction": keep_fraction,
        "by": by if keep_fraction is not None else None,
    }
    shown = sorted(needed)
    report = FilterReport(
        data=str(source),
        scores=str(extraction.directory),
        out=str(out),
        criterion=criterion,
        rows_scored=len(table),
        kept=int(keep.sum()),
        dropped=int((~keep).sum()),
        unscored=_unscored(extraction),
        cutoffs={n: float(table.scores[n][keep].min()) for n in shown if keep.any()},
        score_summary={n: _summary(v) for n, v in table.scores.items()},
        report=str(report_path(out)),
    )
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    if histogram:
        report.histogram = plot_scores(table.scores, keep, shown, report, histogram_path(out))
    atomic_write_text(report_path(out), json.dumps(asdict(report), indent=2))
    return report


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json")


def histogram_path(out: Path) -> Path:
    return out.with_name(out.stem + ".scores.png")


def caption_file(data: Path) -> Path:
    """The JSONL / CSV file whose rows are filtered (a folder's captions.jsonl / .csv)."""
    if data.is_dir():
        for name in CAPTION_FILES[:2]:
            if (data / name).is_file():
                return data / name
        raise InputError(f"{data}: filter writes JSONL or CSV datasets; no captions.jsonl/.csv")
    if data.suffix.lower() not in (".jsonl", ".csv"):
        raise InputError(f"{data}: filter writes JSONL or CSV datasets, not {data.suffix!r}")
    if not data.is_file():
        raise InputError(f"{data}: dataset file not found")
    return data


def _check_out(source: Path, out: Path) -> None:
    if out.suffix.lower() != source.suffix.lower():
        raise ConfigError(f"--out {out} must have the input's suffix {source.suffix!r}")
    if out.exists() and out.resolve() == source.resolve():
        raise OutputError(f"{out} is the input dataset; write the kept rows to another file")
    if out.is_dir():
        raise OutputError(f"{out} is a directory; name the output file")


def _kept_text(source: Path, out: Path, kept_rows: set[str]) -> str:
    """The kept records of ``source`` as text in its format (rows named ``file:line``)."""
    move = source.parent.resolve() != out.parent.resolve()
    buffer = io.StringIO()
    if source.suffix.lower() == ".jsonl":
        for number, line in _numbered_lines(source):
            if f"{source.name}:{number}" not in kept_rows:
                continue
            if move:
                record = json.loads(line)
                record["image"] = _moved(record["image"], source.parent, out.parent)
                line = json.dumps(record, ensure_ascii=False) + "\n"
            buffer.write(line if line.endswith("\n") else line + "\n")
        return buffer.getvalue()
    writer = csv.writer(buffer, lineterminator="\n")
    header, records = _csv_records(source)
    writer.writerow(header)
    column = [h.strip() for h in header].index("image")
    for number, fields in records:
        if f"{source.name}:{number}" in kept_rows:
            if move:
                fields = list(fields)
                fields[column] = _moved(fields[column], source.parent, out.parent)
            writer.writerow(fields)
    return buffer.getvalue()


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as fh:
        yield from enumerate(fh, start=1)


def _csv_records(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (first line number, fields) of each record, numbered as the reader does."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        records = []
        last = reader.line_num
        for fields in reader:
            records.append((last + 1, fields))
            last = reader.line_num
    return header, records


def _moved(image: str, base: Path, target: Path) -> str:
    """A relative image path re-expressed relative to ``target``; absolute paths unchanged."""
    if not isinstance(image, str) or os.path.isabs(image):
        return image
    return os.path.relpath((base / image).resolve(), target.resolve())


def _unscored(extraction: Extraction) -> int:
    """Rows extraction recorded as unusable: pairs errors plus skipped dataset rows."""
    errors = extraction.directory / ERRORS_NAME
    count = 0
    if errors.is_file():
        for line in errors.read_text(encoding="utf-8").splitlines():
            count += bool(line.strip()) and json.loads(line).get("modality") == "pairs"
    return count + int(extraction.manifest.get("skipped_rows", 0))


def _summary(values: np.ndarray) -> dict[str, float]:
    quantiles = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0]) if len(values) else [np.nan] * 5
    return dict(zip(("min", "p10", "median", "p90", "max"), map(float, quantiles), strict=True))


def plot_scores(
    scores: dict[str, np.ndarray],
    keep: np.ndarray,
    names: list[str],
    report: FilterReport,
    png: Path,
) -> str | None:
    """Histograms of the criterion's scores, kept and dropped rows stacked; None without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(5.5 * len(names), 3.8))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        values = scores[name]
        bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 41)
        ax.hist(
            [values[keep], values[~keep]],
            bins=bins,
            stacked=True,
            label=[f"kept ({int(keep.sum())})", f"dropped ({int((~keep).sum())})"],
            color=["tab:green", "tab:red"],
        )
        if name in report.cutoffs:
            ax.axvline(report.cutoffs[name], color="black", linestyle="--", linewidth=1)
        ax.set(xlabel=name, ylabel="pairs", title=f"{name} of {len(values)} pairs")
        ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return str(png)
