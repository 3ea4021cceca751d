"""The metrics log of a run (``metrics.jsonl``, one JSON record a line) and a PNG of its
curves: loss terms and validation recall over steps."""

from __future__ import annotations

import json
from pathlib import Path

from xmodal.atomic import atomic_path, atomic_write_text


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics log; a torn last line (a killed process) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def append_metrics(path: str | Path, record: dict) -> None:
    """Add one record to a metrics log."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop the records past ``step`` (a resumed run's log then has no duplicates)."""
    if Path(path).exists():
        kept = [record for record in read_metrics(path) if record["step"] <= step]
        atomic_write_text(Path(path), "".join(json.dumps(record) + "\n" for record in kept))


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Plot the losses and ``val_*R@k`` series of a metrics log; None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "infonce", "siglip", "itm", "cosine"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax_loss.plot(*zip(*points, strict=True), label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    for key in ("val_t2i_R@1", "val_t2i_R@5", "val_i2t_R@1"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax_recall.plot(*zip(*points, strict=True), marker="o", label=key[4:])
    ax_recall.set(xlabel="step", ylabel="recall (%)", title="validation retrieval")
    if ax_recall.lines:
        ax_recall.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png_path
