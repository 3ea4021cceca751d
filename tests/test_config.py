"""Config validation: unknown keys, wrong types and bad values raise ConfigError naming the key."""

from __future__ import annotations

import pytest

import xmodal
from xmodal.config import (
    ConfigError,
    FusionConfig,
    ModelConfig,
    ProcessorConfig,
    from_dict,
    load_yaml_or_json,
    stable_hash,
    to_dict,
)


def test_round_trip_defaults() -> None:
    for cls in (ModelConfig, ProcessorConfig):
        config = cls()
        data = to_dict(config)
        assert from_dict(cls, data) == config
    rebuilt = from_dict(ProcessorConfig, to_dict(ProcessorConfig()))
    assert isinstance(rebuilt.mean, tuple) and rebuilt.mean == ProcessorConfig().mean


def test_round_trip_presets() -> None:
    for name in xmodal.PRESETS:
        model, processor = xmodal.preset_configs(name)
        assert from_dict(ModelConfig, to_dict(model)) == model
        assert from_dict(ProcessorConfig, to_dict(processor)) == processor


@pytest.mark.parametrize(
    ("cls", "data", "key"),
    [
        (ModelConfig, {"embed_dim": 64, "bogus_key": 1}, "bogus_key"),
        (ModelConfig, {"image": {"kind": "hf", "colour": "red"}}, "colour"),
        (ModelConfig, {"fusion": {"nheads": 4}}, "nheads"),
        (ProcessorConfig, {"img_size": 224}, "img_size"),
    ],
)
def test_unknown_keys(cls, data, key) -> None:
    with pytest.raises(ConfigError, match=key):
        from_dict(cls, data)


@pytest.mark.parametrize(
    ("cls", "data", "key"),
    [
        (ModelConfig, {"embed_dim": "512"}, "embed_dim"),
        (ModelConfig, {"embed_dim": 512.0}, "embed_dim"),
        (ModelConfig, {"embed_dim": True}, "embed_dim"),
        (ModelConfig, {"embed_dim": None}, "embed_dim"),
        (ModelConfig, {"fusion": {"heads": 2.5}}, "fusion.heads"),
        (ModelConfig, {"fusion": {"kind": "concat"}}, "fusion.kind"),
        (ModelConfig, {"fusion": "cross"}, "fusion"),
        (ModelConfig, {"image": {"pretrained": "yes"}}, "image.pretrained"),
        (ModelConfig, {"text": {"pooling": "max"}}, "text.pooling"),
        (ModelConfig, {"text": {"hf_config": [1, 2]}}, "text.hf_config"),
        (ModelConfig, {"init_logit_scale": "14"}, "init_logit_scale"),
        (ProcessorConfig, {"image_size": "224"}, "image_size"),
        (ProcessorConfig, {"mean": [0.5, 0.5]}, "mean"),
        (ProcessorConfig, {"std": "0.5"}, "std"),
        (ProcessorConfig, {"mean": [0.5, "a", 0.5]}, r"mean\[1\]"),
        (ProcessorConfig, {"padding": "right"}, "padding"),
        (ProcessorConfig, {"resize_size": "big"}, "resize_size"),
    ],
)
def test_wrong_types(cls, data, key) -> None:
    with pytest.raises(ConfigError, match=key):
        from_dict(cls, data)


@pytest.mark.parametrize(
    ("cls", "data", "key"),
    [
        (ModelConfig, {"embed_dim": -8}, "embed_dim"),
        (ModelConfig, {"embed_dim": 0}, "embed_dim"),
        (ModelConfig, {"fusion": {"layers": -1}}, "fusion.layers"),
        (ModelConfig, {"fusion": {"heads": 0}}, "fusion.heads"),
        (ModelConfig, {"fusion": {"dropout": 1.5}}, "fusion.dropout"),
        (ModelConfig, {"fusion": {"mlp_ratio": -2.0}}, "fusion.mlp_ratio"),
        (ModelConfig, {"embed_dim": 30, "fusion": {"heads": 8}}, "embed_dim"),
        (ModelConfig, {"init_logit_scale": -1.0}, "init_logit_scale"),
        (ModelConfig, {"max_logit_scale": 1.0}, "max_logit_scale"),
        (ModelConfig, {"init_siglip_scale": 0.0}, "init_siglip_scale"),
        (ModelConfig, {"max_siglip_scale": 5.0}, "max_siglip_scale"),
        (ModelConfig, {"image": {"name": ""}}, "image.name"),
        (ProcessorConfig, {"image_size": -224}, "image_size"),
        (ProcessorConfig, {"image_size": 0}, "image_size"),
        (ProcessorConfig, {"max_length": -1}, "max_length"),
        (ProcessorConfig, {"max_image_pixels": 0}, "max_image_pixels"),
        (ProcessorConfig, {"image_size": 224, "resize_size": 100}, "resize_size"),
        (ProcessorConfig, {"std": [0.5, 0.0, 0.5]}, "std"),
    ],
)
def test_bad_values(cls, data, key) -> None:
    with pytest.raises(ConfigError, match=key):
        from_dict(cls, data)


def test_direct_validate() -> None:
    with pytest.raises(ConfigError, match="fusion.heads"):
        FusionConfig(heads=-4).validate()
    with pytest.raises(ConfigError, match="image_size"):
        xmodal.MultimodalProcessor(ProcessorConfig(image_size=-1))
    with pytest.raises(ConfigError, match="embed_dim"):
        xmodal.CrossModalModel(ModelConfig(embed_dim=-1))


def test_valid_values_accepted() -> None:
    config = from_dict(
        ModelConfig,
        {"embed_dim": 64, "fusion": {"kind": "pooled", "heads": 4}, "init_logit_scale": 10},
    )
    assert config.embed_dim == 64 and config.fusion.kind == "pooled"
    assert isinstance(config.init_logit_scale, float) and config.init_logit_scale == 10.0
    proc = from_dict(ProcessorConfig, {"resize_size": None, "mean": [0.1, 0.2, 0.3]})
    assert proc.resize_size is None and proc.mean == (0.1, 0.2, 0.3)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="mapping"):
        from_dict(ModelConfig, [1, 2])


def test_yaml_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("embed_dim: 64\nfusion:\n  heads: 4\n", encoding="utf-8")
    config = from_dict(ModelConfig, load_yaml_or_json(path))
    assert config.embed_dim == 64 and config.fusion.heads == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml_or_json(bad)
    with pytest.raises(FileNotFoundError):
        load_yaml_or_json(tmp_path / "missing.yaml")


def test_stable_hash() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash({})) == 16


def test_config_files_read_exponent_floats_as_numbers(tmp_path):
    """``5e-05`` without a dot is a number in YAML (PyYAML alone reads a string) and in a
    ``.json`` file (a run's saved config.json is read back as JSON)."""
    from xmodal.config import load_yaml_or_json

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim:\n  tower_lr: 5e-05\n  lr: 1.0e-3\n  steps: 10\nname: 1e3x\n")
    data = load_yaml_or_json(yaml_file)
    assert data["optim"] == {"tower_lr": 5e-05, "lr": 1e-3, "steps": 10}
    assert data["name"] == "1e3x"
    json_file = tmp_path / "config.json"
    json_file.write_text('{"optim": {"tower_lr": 5e-05}}')
    assert load_yaml_or_json(json_file)["optim"]["tower_lr"] == 5e-05
    json_file.write_text('{"optim": ')
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_yaml_or_json(json_file)
