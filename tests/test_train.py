"""The trainer: the loss falls, resume is exact, configs are checked, outputs are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_colour_dataset
from safetensors.torch import load_file

from xmodal.config import ConfigError
from xmodal.models.checkpointing import is_checkpointed
from xmodal.models.model import CrossModalModel, save_rerank_weight
from xmodal.train import TrainConfig, Trainer, load_train_config
from xmodal.train.batches import epoch_batches
from xmodal.train.config import DataSection, LossSection, ModelSection, OptimSection
from xmodal.train.images import CachedImages
from xmodal.train.optim import build_optimizer, cosine_schedule


def make_config(tmp_path: Path, model_dir: str, out: str, **optim) -> TrainConfig:
    data = write_colour_dataset(tmp_path / "data", n=24)
    return TrainConfig(
        data=DataSection(train=data, val=data, num_workers=0),
        model=ModelSection(name=model_dir),
        loss=LossSection(infonce=1.0, siglip=0.5, itm=1.0, cosine=0.5),
        optim=OptimSection(
            **{"steps": 20, "batch_size": 8, "lr": 3e-3, "tower_lr": 1e-3, "warmup_steps": 2}
            | optim
        ),
        out_dir=str(tmp_path / out),
        device="cpu",
        precision="fp32",
        eval_every=10,
        save_every=10,
        log_every=1,
    )


def read_log(out_dir: str) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_twenty_steps_loss_falls_and_outputs_written(tmp_path, tiny_model_dir) -> None:
    config = make_config(tmp_path, tiny_model_dir, "run")
    result = Trainer(config).train()
    log = read_log(config.out_dir)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert {"infonce", "siglip", "itm", "cosine", "lr", "grad_norm"} <= set(log[-1])
    assert "val_t2i_R@1" in log[-1] and "val_t2i_R@1" in log[9]
    # each validation calibrates the re-rank weight; the saved model carries the last one
    weight = log[-1]["val_rerank_weight"]
    assert weight >= 0 and "val_rerank_weight" in log[9]
    rerank = log[-1]["val_rerank_t2i_R@1"] + log[-1]["val_rerank_i2t_R@1"]
    assert rerank >= log[-1]["val_t2i_R@1"] + log[-1]["val_i2t_R@1"]  # never below ITC
    assert CrossModalModel.from_pretrained(result.model_dir).config.fusion.rerank_weight == weight
    out = Path(config.out_dir)
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000010",
        "step-0000020",
    ]
    assert (result.model_dir / "model.safetensors").is_file()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*tmp*"))


def test_fine_tuning_without_val_drops_the_old_rerank_weight(tmp_path, tiny_model_dir) -> None:
    """A weight calibrated for the old ITM head does not hold for the fine-tuned one."""
    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    save_rerank_weight(source, 0.5)
    config = make_config(tmp_path, str(source), "run", steps=2)
    config.data.val = None
    result = Trainer(config).train()
    assert CrossModalModel.from_pretrained(result.model_dir).config.fusion.rerank_weight is None


def test_resume_after_stop_at_step_10_is_exact(tmp_path, tiny_model_dir) -> None:
    straight = make_config(tmp_path, tiny_model_dir, "straight")
    Trainer(straight).train()
    interrupted = make_config(tmp_path, tiny_model_dir, "interrupted")
    Trainer(interrupted).train(stop_after=10)
    assert not (Path(interrupted.out_dir) / "model").exists()
    torch.manual_seed(1234)  # a different global state: resume must restore its own
    Trainer(interrupted).train(resume=True)
    a = load_file(str(Path(straight.out_dir) / "model" / "model.safetensors"))
    b = load_file(str(Path(interrupted.out_dir) / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_log(interrupted.out_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # no duplicated log lines


def test_resume_with_more_steps_follows_the_longer_schedule(tmp_path, tiny_model_dir) -> None:
    """A finished run resumed with a larger ``optim.steps`` (``--resume --steps N``): its added
    steps run at the longer schedule's rates, not at the 0 the finished schedule ended on."""
    import math

    short = make_config(tmp_path, tiny_model_dir, "run", steps=2, warmup_steps=1)
    short.data.val, short.eval_every, short.save_every = None, 0, 0
    Trainer(short).train()
    finished = load_file(str(Path(short.out_dir) / "model" / "model.safetensors"))
    assert read_log(short.out_dir)[-1]["lr"] == 0.0  # the end of the 2-step schedule

    longer = make_config(tmp_path, tiny_model_dir, "run", steps=4, warmup_steps=1)
    longer.data.val, longer.eval_every, longer.save_every = None, 0, 0
    trainer = Trainer(longer)
    assert trainer.checkpoints.resume().step == 2
    factor = 0.5 * (1 + math.cos(math.pi * (2 - 1) / (4 - 1)))  # step 2 of 4, warm-up 1
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx(
        [base * factor for base in trainer.scheduler.base_lrs]
    )
    Trainer(longer).train(resume=True)
    log = read_log(longer.out_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["lr"] > 0
    after = load_file(str(Path(longer.out_dir) / "model" / "model.safetensors"))
    assert not torch.equal(after["image_proj.weight"], finished["image_proj.weight"])


def test_accumulation_and_locked_image_with_cache(tmp_path, tiny_model_dir) -> None:
    config = make_config(tmp_path, tiny_model_dir, "accum", steps=4, accum_steps=2)
    config.model.lock_image = True
    config.model.cache_image_features = True
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.image_tower.state_dict().items()}
    result = trainer.train()
    assert result.progress.step == 4
    assert result.progress.samples_seen == 4 * 2 * 8
    after = trainer.model.image_tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # locked: BN stats too
    assert isinstance(trainer.images, CachedImages) and trainer.images.base.pooled.shape[0] == 24


def test_gradient_checkpointing_setting_trains_to_the_same_weights(tmp_path, tiny_model_dir):
    """model.gradient_checkpointing recomputes activations; the weights it reaches are the same."""
    weights = {}
    for enabled in (False, True):
        config = make_config(tmp_path, tiny_model_dir, f"ckpt-{enabled}", steps=3, accum_steps=2)
        config.model.gradient_checkpointing = enabled
        config.eval_every = config.save_every = 0
        trainer = Trainer(config)
        fusion_layer = trainer.model.fusion.layers[0]
        assert is_checkpointed(fusion_layer) == enabled
        assert trainer.model.text_tower.model.is_activation_checkpointing == enabled
        trainer.train()
        weights[enabled] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for key, plain in weights[False].items():
        torch.testing.assert_close(weights[True][key], plain, rtol=1e-4, atol=1e-5, msg=key)
    path = tmp_path / "ckpt.yaml"
    path.write_text("data: {train: x.jsonl}\nmodel: {gradient_checkpointing: true}\n")
    assert load_train_config(path).model.gradient_checkpointing is True


def test_optimizer_groups_skip_decay_on_norms_biases_and_scales(tiny_model_dir, tmp_path):
    config = make_config(tmp_path, tiny_model_dir, "groups")
    trainer = Trainer(config)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in build_optimizer(trainer.model, config).param_groups:
        for param in group["params"]:
            name = names[id(param)]
            no_decay = param.ndim < 2 or "norm" in name.lower() or "logit" in name
            if no_decay:
                assert group["weight_decay"] == 0.0, name
            is_tower = name.startswith(("image_tower.", "text_tower."))
            assert group["lr"] == (config.optim.tower_lr if is_tower else config.optim.lr)


def test_cosine_schedule_warms_up_then_decays() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = cosine_schedule(optimizer, warmup=4, total=20, min_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(15 / 16 * torch.pi)).item())
    )


def test_epoch_batches_are_deterministic_full_and_disjoint() -> None:
    a = epoch_batches(50, 8, seed=3, epoch=2)
    assert a == epoch_batches(50, 8, seed=3, epoch=2)
    assert a != epoch_batches(50, 8, seed=3, epoch=3)
    flat = [i for batch in a for i in batch]
    assert len(a) == 6 and all(len(b) == 8 for b in a) and len(set(flat)) == 48


def test_yaml_config_errors_name_the_key(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: x.jsonl\noptim:\n  steps: -5\n")
    with pytest.raises(ConfigError, match="optim.steps"):
        load_train_config(path)
    path.write_text("data:\n  train: x.jsonl\n  trian: y\n")
    with pytest.raises(ConfigError, match="trian"):
        load_train_config(path)
    path.write_text("data:\n  train: x.jsonl\noptim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_train_config(path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_train_config(tmp_path / "nope.yaml")


def test_missing_dataset_is_a_clear_error(tmp_path, tiny_model_dir) -> None:
    config = make_config(tmp_path, tiny_model_dir, "missing")
    config.data.train = str(tmp_path / "absent.jsonl")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        Trainer(config)


def test_cpu_memory_reuse_follows_the_setting(tmp_path, tiny_model_dir, monkeypatch) -> None:
    from xmodal.train import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "reuse_freed_memory", lambda: calls.append(1) or True)
    config = make_config(tmp_path, tiny_model_dir, "no-reuse")
    config.experimental.cpu_reuse_memory = False
    Trainer(config)
    assert calls == []
    config = make_config(tmp_path, tiny_model_dir, "reuse")
    Trainer(config)
    assert calls == [1]


def test_new_embed_dim_on_an_aligned_clip_gets_new_projections_at_lr(tmp_path) -> None:
    """Fresh projections are new layers (lr, with bias); the aligned towers stay at tower_lr."""
    from aligned_fixtures import save_clip

    clip = save_clip(tmp_path / "clip", projection_dim=24)
    config = make_config(tmp_path, str(clip), "dim")
    config.model.overrides = {"embed_dim": 16}
    trainer = Trainer(config)
    model = trainer.model
    assert model.config.projection == "linear" and model.text_proj.weight.shape[0] == 16
    assert model.text_proj.bias is not None
    groups = trainer.optimizer.param_groups  # initial_lr: the peak, before the warm-up factor
    lr_of = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.text_proj.weight)] == lr_of[id(model.image_proj.weight)] == 3e-3
    tower = next(p for p in model.text_tower.parameters() if p.requires_grad)
    assert lr_of[id(tower)] == 1e-3


def test_fusion_settings_equal_to_the_models_keep_its_trained_heads(tiny_model_dir) -> None:
    from xmodal.presets import load_model
    from xmodal.train.surgery import with_new_heads

    model, _ = load_model(tiny_model_dir)
    same = ModelSection(
        name=tiny_model_dir, fusion="cross", overrides={"fusion.layers": 2, "embed_dim": 32}
    )
    assert with_new_heads(model, same) is model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = with_new_heads(
        model, ModelSection(name=tiny_model_dir, overrides={"fusion.layers": 1})
    )
    assert rebuilt.config.fusion.layers == 1 and len(rebuilt.fusion.layers) == 1
    state = rebuilt.state_dict()
    tower = "image_tower.model.embedder.embedder.convolution.weight"
    for key in ("text_proj.weight", "logit_scale", tower):
        assert torch.equal(state[key], saved[key]), key
    assert not torch.equal(state["itm_head.weight"], saved["itm_head.weight"])  # a new head


def test_pure_dual_encoder_trains_from_cached_pooled_features_only(tmp_path, tiny_model_dir):
    """fusion: none turns ITM off, so the image cache holds no token grids, accumulation runs
    on the pooled features, and eval reports the re-rank as skipped."""
    from xmodal.data import load_dataset
    from xmodal.evaluate.runner import evaluate_model

    config = make_config(tmp_path, tiny_model_dir, "none", steps=2, accum_steps=2)
    config.model.fusion = "none"
    config.model.lock_image = True
    trainer = Trainer(config)
    assert trainer.model.fusion is None and config.loss.itm == 0.0
    result = trainer.train()
    assert result.progress.step == 2
    assert trainer.images.base.tokens is None and trainer.images.base.pooled.shape[0] == 24
    assert trainer.validator.cache.tokens is None
    report = evaluate_model(
        trainer.model, trainer.processor, load_dataset(config.data.val), num_workers=0
    )
    assert "retrieval_itm_rerank" not in report
    assert "no ITM head" in report["retrieval_itm_rerank_skipped"]


def test_itm_as_the_only_loss_of_a_pure_dual_encoder_is_refused(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, "itm-only")
    config.model.fusion = "none"
    config.loss = LossSection(infonce=0.0, siglip=0.0, itm=1.0, cosine=0.0)
    with pytest.raises(ConfigError, match=r"itm is the only loss .*fusion: none"):
        Trainer(config)
