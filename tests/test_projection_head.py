"""The image projection as a two-layer MLP (``image_projection_hidden``): values, saving,
config checks, training and the ONNX extraction path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config
from test_train import make_config

from xmodal.config import ConfigError, ModelConfig, from_dict, to_dict
from xmodal.models.model import CrossModalModel
from xmodal.train import Trainer
from xmodal.train.config import ModelSection


def mlp_model(hidden: int = 16) -> CrossModalModel:
    config = tiny_model_config()
    config.image_projection_hidden = hidden
    return CrossModalModel(config).eval()


def test_mlp_projection_is_linear_gelu_linear_on_the_pooled_vector() -> None:
    torch.manual_seed(0)
    model = mlp_model(16)
    first, second = model.image_proj[0], model.image_proj[2]
    assert (first.in_features, first.out_features) == (model.image_tower.output_dim, 16)
    assert (second.in_features, second.out_features) == (16, 32)
    assert isinstance(model.text_proj, torch.nn.Linear)  # the text side stays linear
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pooled = model.image_tower(pixels).pooled
        hidden = F.gelu(pooled @ first.weight.t() + first.bias)
        expected = F.normalize(hidden @ second.weight.t() + second.bias, dim=-1)
        torch.testing.assert_close(model.encode_image(pixels), expected)
        torch.testing.assert_close(model.embed_image_pooled(pooled), expected)


def test_mlp_projection_config_is_checked_and_saved(tmp_path, processor) -> None:
    plain = to_dict(tiny_model_config())
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="image_projection_hidden must be an integer"):
            from_dict(ModelConfig, {**plain, "image_projection_hidden": bad})
    with pytest.raises(ConfigError, match="needs projection: linear"):
        from_dict(
            ModelConfig, {**plain, "image_projection_hidden": 8, "projection": "linear_no_bias"}
        )
    with pytest.raises(ConfigError, match="overrides: image_projection_hidden must be an integer"):
        from_dict(ModelSection, {"overrides": {"image_projection_hidden": -2}})
    model = mlp_model(8)
    model.save_pretrained(tmp_path / "m", processor)
    again = CrossModalModel.from_pretrained(tmp_path / "m")
    assert again.config.image_projection_hidden == 8
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels), model.encode_image(pixels))


def test_training_gets_a_fresh_mlp_head_at_lr_and_keeps_the_rest(tmp_path, tiny_model_dir) -> None:
    config = make_config(tmp_path, tiny_model_dir, "mlp", steps=6)
    config.model.lock_image = True
    config.model.overrides = {"image_projection_hidden": 24}
    trainer = Trainer(config)
    model = trainer.model
    assert isinstance(model.image_proj, torch.nn.Sequential)
    assert model.image_proj[0].out_features == 24
    original = CrossModalModel.from_pretrained(tiny_model_dir)
    for key, value in original.state_dict().items():  # towers, text projection, scales kept
        if key.startswith(("image_tower.", "text_tower.", "text_proj.", "logit_scale")):
            torch.testing.assert_close(model.state_dict()[key], value)
    lr_of = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.image_proj[0].weight)] == lr_of[id(model.image_proj[2].weight)] == 3e-3
    start = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("image_proj.")}
    result = trainer.train()
    saved = CrossModalModel.from_pretrained(result.model_dir)
    assert saved.config.image_projection_hidden == 24
    for key, value in start.items():  # the head learned
        assert not torch.equal(saved.state_dict()[key], value), key
    # fine-tuning the saved model again keeps its MLP head (None: keep the model's)
    again = make_config(tmp_path, str(result.model_dir), "again", steps=2)
    kept = Trainer(again).model
    for key, value in saved.state_dict().items():
        if key.startswith("image_proj."):
            torch.testing.assert_close(kept.state_dict()[key], value)


def test_extraction_backends_apply_the_mlp_head(tmp_path, processor) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from xmodal.export.onnx import export_onnx
    from xmodal.extract.mapper import EmbeddingMapper, MapperOptions

    model = mlp_model(16)
    export_onnx(model, processor, tmp_path, "mlp")
    pixels = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        expected = model.encode_image(pixels).numpy()
    onnx = EmbeddingMapper(model, MapperOptions(backend="onnx", onnx_dir=str(tmp_path)))
    plain = EmbeddingMapper(model, MapperOptions(device="cpu", backend="torch"))
    assert onnx.backend == "onnx" and plain.backend == "torch"
    for mapper in (onnx, plain):
        torch.testing.assert_close(
            torch.from_numpy(mapper.images(pixels)),
            torch.from_numpy(expected),
            rtol=1e-4,
            atol=1e-4,
        )
