"""A training run records its resolved config; --resume refuses a different one, naming keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import write_colour_dataset

from xmodal.cli import main
from xmodal.config import ConfigError
from xmodal.train import TrainConfig, load_train_config
from xmodal.train.config import RETIRED, DataSection
from xmodal.train.run_config import RUN_CONFIG, check_resumed_config, flatten, save_run_config


def write_config(path: Path, data: str, model: str, **optim) -> Path:
    config = {
        "data": {"train": data, "num_workers": 0},
        "model": {"name": model},
        "optim": {"steps": 3, "batch_size": 4, "warmup_steps": 1, **optim},
        "device": "cpu",
        "precision": "fp32",
        "eval_every": 0,
        "save_every": 1,
        "log_every": 1,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_the_run_records_its_config_and_resume_checks_it(
    tmp_path: Path, tiny_model_dir: str, capsys
) -> None:
    data = write_colour_dataset(tmp_path / "data", n=8)
    out = tmp_path / "run"
    first = write_config(tmp_path / "a.yaml", data, tiny_model_dir, lr=0.001)
    assert main(["train", "--config", str(first), "--out-dir", str(out)]) == 0
    saved = json.loads((out / RUN_CONFIG).read_text())
    resolved = load_train_config(first, {"out_dir": str(out)})
    assert saved["optim"]["lr"] == 0.001 and saved["optim"]["steps"] == 3
    assert saved["seed"] == resolved.seed and "itm_stage" in saved  # defaults recorded too
    assert len(flatten(saved)) > 40
    capsys.readouterr()

    changed = write_config(tmp_path / "b.yaml", data, tiny_model_dir, lr=0.002, batch_size=2)
    code = main(["train", "--config", str(changed), "--out-dir", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "optim.lr (0.001 -> 0.002)" in err[0] and "optim.batch_size (4 -> 2)" in err[0]
    assert json.loads((out / RUN_CONFIG).read_text()) == saved  # the record is unchanged

    same = write_config(tmp_path / "c.yaml", data, tiny_model_dir, lr=0.001)
    config = yaml.safe_load(same.read_text())
    config["log_every"] = 5  # how the run is watched may change, and how long it runs
    config["optim"]["steps"] = 4
    same.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(same), "--out-dir", str(out), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("key", sorted(RETIRED))
def test_a_retired_key_is_refused_in_one_line_saying_what_to_do(
    tmp_path: Path, tiny_model_dir: str, capsys, key: str
) -> None:
    data = write_colour_dataset(tmp_path / "data", n=8)
    path = write_config(tmp_path / "a.yaml", data, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    section, name = key.split(".")
    config.setdefault(section, {})[name] = RETIRED[key].default
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape(f"{key}: {RETIRED[key].note}")):
        load_train_config(path)
    assert main(["train", "--config", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and ("removed" in err[0] or "moved" in err[0])


def test_a_run_saved_with_retired_keys_left_off_resumes(tmp_path: Path) -> None:
    config = TrainConfig(data=DataSection(train="data.jsonl"), out_dir=str(tmp_path))
    save_run_config(tmp_path, config)
    saved = json.loads((tmp_path / RUN_CONFIG).read_text())
    for key, retired in RETIRED.items():  # as a run written before they went recorded them
        section, name = key.split(".")
        saved[section][name] = retired.default
    (tmp_path / RUN_CONFIG).write_text(json.dumps(saved))
    check_resumed_config(tmp_path, config)  # left off: the same run
    saved["loss"]["itm_reordered"] = 1.0  # the run used one: it cannot go on without it
    (tmp_path / RUN_CONFIG).write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"loss.itm_reordered \(1.0 -> None\)"):
        check_resumed_config(tmp_path, config)
