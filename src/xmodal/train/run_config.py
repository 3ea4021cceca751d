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
from xmodal.train.config import MOVED, RETIRED, TrainConfig

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


def move_old_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A saved run config (nested, as read) written by older code, in today's keys: a moved
    key (:data:`MOVED`) at its new place (a ``model.overrides`` key saved as None, "keep the
    model's", left out), a retired key (:data:`RETIRED`) saved at its default left out."""
    data = json.loads(json.dumps(data))
    for key, (where, name) in MOVED.items():
        *parents, old = key.split(".")
        owner = data
        for parent in parents:
            owner = owner.get(parent) if isinstance(owner, dict) else None
        if not isinstance(owner, dict) or old not in owner:
            continue
        value = owner.pop(old)
        if value is None and where == "model.overrides":
            continue
        target = data
        for part in where.split("."):
            target = target.setdefault(part, {})
        target.setdefault(name, value)
    for key, retired in RETIRED.items():
        section, name = key.split(".", 1)
        values = data.get(section)
        if isinstance(values, dict) and name in values and values[name] == retired.default:
            del values[name]
    return data


def save_run_config(out_dir: Path, config: TrainConfig) -> None:
    """Write the resolved config beside the run's outputs (atomically)."""
    text = json.dumps(to_dict(config), indent=2, sort_keys=True, default=str)
    atomic_write_text(out_dir / RUN_CONFIG, text + "\n")


def check_resumed_config(out_dir: Path, config: TrainConfig) -> None:
    """ConfigError naming every key whose value differs from the run being resumed (a run
    saved before configs were recorded is not checked; one saved by older code is read in
    today's keys: :func:`move_old_keys`)."""
    path = out_dir / RUN_CONFIG
    if not path.is_file():
        return
    try:
        saved = flatten(move_old_keys(json.loads(path.read_text("utf-8"))))
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path}: cannot read the run's saved config ({err})") from None
    # a key added since the run was saved ran as its default (new keys keep the old behaviour)
    defaults = flatten(json.loads(json.dumps(to_dict(TrainConfig()), default=str)))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
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
