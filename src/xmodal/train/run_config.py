"""The resolved config of a training run, saved in its ``out_dir`` and checked on resume.

A fresh run writes ``out_dir/config.json``: every field of its :class:`TrainConfig`, defaults
included, so the run can be repeated and read later exactly as it ran. ``--resume`` compares
the config it is given with that record and refuses a different one, naming the keys, except
those that change how a run is watched but not what it computes (:data:`FREE_ON_RESUME`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xmodal.atomic import atomic_write_text
from xmodal.config import ConfigError, to_dict
from xmodal.train.config import RETIRED, TrainConfig

RUN_CONFIG = "config.json"
# keys a resumed run may change: where its logs go and how often, how fast data is read, and
# how long it runs (more steps continue on the longer schedule: train.optim.resume_schedule)
FREE_ON_RESUME = frozenset({"out_dir", "log_every", "data.num_workers", "optim.steps"})


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def save_run_config(out_dir: Path, config: TrainConfig) -> None:
    """Write the resolved config beside the run's outputs (atomically)."""
    text = json.dumps(to_dict(config), indent=2, sort_keys=True, default=str)
    atomic_write_text(out_dir / RUN_CONFIG, text + "\n")


def check_resumed_config(out_dir: Path, config: TrainConfig) -> None:
    """ConfigError naming every key whose value differs from the run being resumed (a run
    saved before configs were recorded is not checked; a retired key it left at its default
    does not count)."""
    path = out_dir / RUN_CONFIG
    if not path.is_file():
        return
    try:
        saved = flatten(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the run's saved config ({err})") from None
    for key, retired in RETIRED.items():  # a run saved before a key went, with it left off
        if key in saved and saved[key] == retired.default:
            del saved[key]
    now = flatten(json.loads(json.dumps(to_dict(config), default=str)))
    changed = sorted(
        key
        for key in saved.keys() | now.keys()
        if key not in FREE_ON_RESUME and saved.get(key) != now.get(key)
    )
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(
            f"resuming the run in {out_dir} needs the config it started with ({RUN_CONFIG}); "
            f"these keys differ: {shown}{more}. Start a new run in another folder to change them"
        )
