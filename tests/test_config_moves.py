"""Training-config keys that moved: ``model.overrides`` (one generic mechanism for changing a
loaded model's config), the ``experimental`` section and ``itm_stage.optim``. Each old key is
refused naming its new place, and a run saved under the old keys still resumes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from test_train import make_config

from xmodal.config import ModelConfig, config_keys, from_dict, to_dict
from xmodal.errors import ConfigError
from xmodal.presets import load_model
from xmodal.train import Trainer, itm_task
from xmodal.train import images as images_module
from xmodal.train.config import (
    FRESH_ON_CHANGE,
    MOVED,
    OVERRIDABLE,
    RETIRED,
    ITMStageSection,
    LossSection,
    ModelSection,
    OptimSection,
    StageOptimSection,
    TrainConfig,
    load_train_config,
    merge,
)
from xmodal.train.run_config import (
    RUN_CONFIG,
    check_resumed_config,
    move_old_keys,
    save_run_config,
)
from xmodal.train.surgery import KEPT_PARTS, with_new_heads

# a value of each moved key, as an older config would have given it
OLD_VALUES = {
    "model.image_pool_levels": 3,
    "model.image_token_levels": 2,
    "model.image_projection_hidden": 24,
    "model.fusion_layers": 1,
    "model.fusion_grid_positions": True,
    "model.embed_dim": 16,
    "model.view_flip": 0.25,
    "model.image_trainable_blocks": 2,
    "itm_stage.hard_negatives": 8,
    "itm_stage.reordered_batch": 32,
    "cpu_reuse_memory": False,
    "itm_stage.steps": 150,
    "itm_stage.batch_size": 64,
    "itm_stage.lr": 0.001,
    "itm_stage.warmup_steps": 10,
    "itm_stage.weight_decay": 0.05,
}


def nested(key: str, value: object) -> dict:
    """``"a.b"``, 1 -> ``{"a": {"b": 1}}``."""
    *parents, name = key.split(".")
    data: dict = {name: value}
    for parent in reversed(parents):
        data = {parent: data}
    return data


def write_config(tmp_path: Path, extra: dict) -> Path:
    data = {"data": {"train": "data.jsonl"}, "optim": {"steps": 2}}
    merge(data, extra)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_every_moved_key_is_listed_with_a_value() -> None:
    assert set(OLD_VALUES) == set(MOVED)
    new_keys = config_keys(TrainConfig)
    for where, name in MOVED.values():
        if where != "model.overrides":
            assert f"{where}.{name}" in new_keys, (where, name)
        else:
            assert name in OVERRIDABLE


@pytest.mark.parametrize("old", sorted(OLD_VALUES))
def test_a_moved_key_is_refused_naming_its_new_place(tmp_path, old) -> None:
    where, name = MOVED[old]
    value = OLD_VALUES[old]
    path = write_config(tmp_path, nested(old, value))
    shown = json.dumps(value)
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert str(info.value) == f"{old} moved: write {where}: {{{name}: {shown}}}"
    assert "\n" not in str(info.value)
    # written the new way, the same value loads and lands where the message said
    path = write_config(tmp_path, nested(where, {name: value}))
    config = load_train_config(path)
    if where == "model.overrides":
        assert config.model.overrides == {name: value}
    else:
        section = config
        for part in where.split("."):
            section = getattr(section, part)
        assert getattr(section, name) == value


@pytest.mark.parametrize("key", ["itm_stage.head_from_similarity", "itm_stage.random_negatives"])
def test_keys_removed_without_an_entry_are_refused(tmp_path, key) -> None:
    path = write_config(tmp_path, nested(key, 1))
    with pytest.raises(ConfigError, match=f"^{key}: removed \\(not adopted, docs/experiments"):
        load_train_config(path)
    assert RETIRED[key].default in (False, 0.0)


def test_the_training_config_does_not_grow() -> None:
    """At most 45 keys outside ``experimental``: every leaf field, ``model.overrides`` one key,
    ``itm_stage.optim`` none (it is ``optim``'s keys again, with the stage's defaults)."""
    keys = [
        key
        for key in config_keys(TrainConfig)
        if not key.startswith(("experimental.", "itm_stage.optim."))
    ]
    assert "model.overrides" in keys and "itm_stage.itm" in keys
    assert len(keys) <= 45, sorted(keys)
    stage = {f.name for f in dataclasses.fields(StageOptimSection)}
    assert stage == {f.name for f in dataclasses.fields(OptimSection)}  # no keys of its own


def test_stage_optim_defaults_are_the_old_stage_defaults() -> None:
    old = {"steps": 0, "batch_size": 128, "lr": 5e-4, "warmup_steps": 30, "weight_decay": 0.1}
    optim = ITMStageSection().optim
    assert {k: getattr(optim, k) for k in old} == old
    # what the stage hard-coded before: clipping at 1 and decay to 0
    assert (optim.grad_clip, optim.min_lr_ratio) == (1.0, 0.0)
    for name in ("tower_lr", "accum_steps", "local_loss", "text_length_groups"):
        bad = {"tower_lr": 1e-3, "accum_steps": 2, "local_loss": True, "text_length_groups": 1}
        with pytest.raises(ConfigError, match=f"^itm_stage.optim.{name}: the ITM stage trains"):
            ITMStageSection(optim=StageOptimSection(**{name: bad[name]})).validate()
    with pytest.raises(ConfigError, match="itm_stage.optim.lr must be > 0"):
        StageOptimSection(lr=0.0).validate()


def test_nested_overrides_of_a_run_keep_the_other_keys(tmp_path) -> None:
    path = write_config(tmp_path, {"itm_stage": {"optim": {"steps": 5, "lr": 0.002}}})
    config = load_train_config(path, {"itm_stage": {"optim": {"steps": 7}}})
    assert (config.itm_stage.optim.steps, config.itm_stage.optim.lr) == (7, 0.002)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image.name": "x"}, "model.overrides.image.name: not a key a run overrides"),
        ({"fusion.kind": "pooled"}, "model.overrides.fusion.kind: write model.fusion"),
        ({"fusion.layers": "two"}, "model.overrides.fusion.layers must be an integer"),
        ({"image.pool_levels": True}, "model.overrides.image.pool_levels must be an integer"),
        ({"fusion.dropout": 1.5}, r"model.overrides: fusion.dropout must be in \[0, 1\)"),
        ({"image_projection_hidden": -1}, "model.overrides: image_projection_hidden must be"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelSection(overrides=overrides).validate()


def test_embed_dim_is_checked_against_the_loaded_models_heads(tiny_model_dir) -> None:
    # 12 is not a multiple of the default 8 heads, but the tiny model has 4: a valid override.
    ModelSection(overrides={"embed_dim": 12}).validate()
    model, _ = load_model(tiny_model_dir)
    rebuilt = with_new_heads(model, ModelSection(name=tiny_model_dir, overrides={"embed_dim": 12}))
    assert rebuilt.config.embed_dim == 12 and rebuilt.config.fusion.heads == 4
    with pytest.raises(ConfigError, match=r"model: embed_dim \(10\) must be divisible"):
        with_new_heads(model, ModelSection(name=tiny_model_dir, overrides={"embed_dim": 10}))
    with pytest.raises(ConfigError, match="model.overrides: embed_dim"):
        ModelSection(overrides={"embed_dim": 12, "fusion.heads": 8}).validate()


def test_every_overridable_key_is_a_model_config_key() -> None:
    assert set(FRESH_ON_CHANGE) <= set(config_keys(ModelConfig))
    section = ModelSection(overrides={"fusion.mlp_ratio": 2})
    section.validate()
    assert section.overrides == {"fusion.mlp_ratio": 2.0}  # of the key's type


@pytest.mark.parametrize(
    "overrides",
    [
        {"image.pool_levels": 2},
        {"image_projection_hidden": 12},
        {"embed_dim": 16},
        {"fusion.layers": 1},
        {"fusion.heads": 2},
        {"fusion.mlp_ratio": 2.0},
        {"fusion.dropout": 0.1},
        {"fusion.grid_positions": True},
    ],
)
def test_overrides_land_in_the_model_config_with_fresh_parts_per_the_table(
    tiny_model_dir, overrides
) -> None:
    model, _ = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1234)
    rebuilt = with_new_heads(model, ModelSection(name=tiny_model_dir, overrides=overrides))
    ((key, value),) = overrides.items()
    *parents, leaf = key.split(".")
    owner = rebuilt.config
    for parent in parents:
        owner = getattr(owner, parent)
    assert getattr(owner, leaf) == value
    after, fresh = rebuilt.state_dict(), FRESH_ON_CHANGE[key]
    for name, weight in before.items():
        towers = name.startswith(("image_tower.", "text_tower."))
        if towers or (name.startswith(KEPT_PARTS) and not name.startswith(fresh)):
            assert torch.equal(after[name], weight), name  # kept
        elif weight.dim() >= 2 and name in after and after[name].shape == weight.shape:
            assert not torch.equal(after[name], weight), name  # a fresh matrix
    assert not torch.equal(after["itm_head.weight"], before["itm_head.weight"])
    for part in fresh:  # the table's fresh parts are new
        assert any(k.startswith(part) for k in after), part


def test_overrides_equal_to_the_models_keep_it(tiny_model_dir) -> None:
    model, _ = load_model(tiny_model_dir)
    config = model.config
    same = {"fusion.layers": config.fusion.layers, "embed_dim": config.embed_dim}
    assert with_new_heads(model, ModelSection(name=tiny_model_dir, overrides=same)) is model


def test_experimental_values_reach_the_trainer(tmp_path, tiny_model_dir, monkeypatch) -> None:
    flips: list[float] = []
    stage_keys: list[dict] = []
    real_views, real_stage = images_module.augmented_views, itm_task.ITMStage

    def views(*args, **kwargs):
        flips.append(kwargs["flip"])
        return real_views(*args, **kwargs)

    def stage(*args, **kwargs):
        stage_keys.append(kwargs)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(images_module, "augmented_views", views)
    monkeypatch.setattr(itm_task, "ITMStage", stage)
    config = make_config(tmp_path, tiny_model_dir, "experimental", steps=2, batch_size=4)
    config.model.lock_image, config.model.cached_views = True, 2
    config.loss = LossSection(infonce=1.0, itm=0.0)
    config.itm_stage = ITMStageSection(optim=StageOptimSection(steps=1, batch_size=4))
    config.experimental.view_flip = 0.75
    config.experimental.itm_hard_negatives = 3
    config.experimental.itm_reordered_batch = 5
    config.eval_every = config.save_every = 0
    Trainer(config).train()
    assert flips == [0.75]
    assert [(k["hard_negatives"], k["reordered_batch"]) for k in stage_keys] == [(3, 5)]


def old_saved_config(config: TrainConfig) -> dict:
    """``config`` as the older code saved it: the moved keys at their old places."""
    data = to_dict(config)
    overrides = data["model"].pop("overrides")
    for old, (where, name) in MOVED.items():
        *parents, leaf = old.split(".")
        owner = data
        for parent in parents:
            owner = owner[parent]
        if where == "model.overrides":
            owner[leaf] = overrides.get(name)
            continue
        source = data
        for part in where.split("."):
            source = source[part]
        owner[leaf] = source.pop(name)
    del data["experimental"]
    del data["itm_stage"]["optim"]  # its other keys: not written by the older code
    return data


def test_a_run_saved_under_the_old_keys_resumes_and_compares(tmp_path) -> None:
    config = make_config(tmp_path, "unused", "old")
    config.model.overrides = {"image.pool_levels": 3, "fusion.layers": 1}
    config.itm_stage = ITMStageSection(reordered=1.0, optim=StageOptimSection(steps=4, lr=1e-3))
    config.experimental.view_flip = 0.5
    config.validate()
    out = tmp_path / "out"
    out.mkdir()
    old = old_saved_config(config)
    assert old["model"]["image_pool_levels"] == 3 and old["model"]["embed_dim"] is None
    assert old["itm_stage"]["steps"] == 4 and "optim" not in old["itm_stage"]
    (out / RUN_CONFIG).write_text(json.dumps(old))
    check_resumed_config(out, config)  # the same run
    assert to_dict(from_dict(TrainConfig, move_old_keys(old))) == to_dict(config)
    changed = dataclasses.replace(config, experimental=dataclasses.replace(config.experimental))
    changed.experimental.view_flip = 0.0
    with pytest.raises(ConfigError, match=r"experimental.view_flip \(0.5 -> 0.0\)"):
        check_resumed_config(out, changed)
    changed = dataclasses.replace(config, model=dataclasses.replace(config.model))
    changed.model.overrides = {"image.pool_levels": 3}
    with pytest.raises(ConfigError, match=r"model.overrides.fusion.layers \(1 -> None\)"):
        check_resumed_config(out, changed)
    save_run_config(out, config)  # today's record compares too
    check_resumed_config(out, config)
