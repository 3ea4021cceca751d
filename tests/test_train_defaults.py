"""Training in its defaults: ``precision: auto`` (bf16 autocast on CPUs with bf16 hardware),
``data.num_workers: 1``, and fp16 with its gradient scaler; each resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_colour_dataset
from safetensors.torch import load_file

from xmodal.runtime import cpu_has_bf16_hardware
from xmodal.train import TrainConfig, Trainer
from xmodal.train.checkpoint import STATE_JSON
from xmodal.train.config import DataSection, LossSection, ModelSection, OptimSection
from xmodal.train.contrastive import ContrastiveStage


def default_config(tmp_path: Path, model_dir: str, out: str, **fields) -> TrainConfig:
    """A run that keeps every default it does not name: precision auto, one data worker."""
    data = write_colour_dataset(tmp_path / "data", n=16)
    defaults = TrainConfig()
    assert defaults.precision == "auto" and defaults.data.num_workers == 1
    return TrainConfig(
        data=DataSection(train=data, val=data),
        model=ModelSection(name=model_dir),
        loss=LossSection(infonce=1.0, siglip=0.5, itm=1.0),
        optim=OptimSection(steps=6, batch_size=8, lr=3e-3, tower_lr=1e-3, warmup_steps=1),
        out_dir=str(tmp_path / out),
        device="cpu",
        eval_every=3,
        save_every=3,
        log_every=1,
        **fields,
    )


def final_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    return load_file(str(Path(config.out_dir) / "model" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def log(config: TrainConfig) -> list[dict]:
    text = (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in text]


def train_interrupted(config: TrainConfig, stop: int, prepare=None) -> None:
    """Stop after ``stop`` steps, scramble the global RNG, then resume to the end."""
    trainer = Trainer(config)
    if prepare:
        prepare(trainer)
    trainer.train(stop_after=stop)
    torch.manual_seed(4321)
    trainer = Trainer(config)
    if prepare:
        prepare(trainer)
    trainer.train(resume=True)


@pytest.mark.skipif(
    not cpu_has_bf16_hardware(),
    reason="CPU without AVX512-BF16/AMX: precision auto trains in fp32 here",
)
def test_default_precision_is_bf16_on_this_cpu_and_resumes_exactly(tmp_path, tiny_model_dir):
    straight = default_config(tmp_path, tiny_model_dir, "straight")
    trainer = Trainer(straight)
    assert trainer.precision.dtype == torch.bfloat16 and not trainer.precision.scaler.is_enabled()
    dtypes = []
    trainer.model.text_proj.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer.train()
    assert dtypes.count(torch.bfloat16) == 6  # every training step's forward ran in bf16
    records = log(straight)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert "val_t2i_R@1" in records[-1]

    interrupted = default_config(tmp_path, tiny_model_dir, "interrupted")
    train_interrupted(interrupted, stop=3)
    assert_same_weights(final_weights(straight), final_weights(interrupted))
    assert [r["step"] for r in log(interrupted)] == list(range(1, 7))


def test_data_workers_give_the_same_run_as_the_main_process_and_resume(tmp_path, tiny_model_dir):
    """num_workers 1 (the default) decodes in a worker process: the same batches, the same
    weights as decoding in the main process, and a resumed run ends identical."""
    in_process = default_config(tmp_path, tiny_model_dir, "workers0", precision="fp32")
    in_process.data.num_workers = 0
    Trainer(in_process).train()
    with_worker = default_config(tmp_path, tiny_model_dir, "workers1", precision="fp32")
    train_interrupted(with_worker, stop=3)
    assert_same_weights(final_weights(in_process), final_weights(with_worker))
    recalls = [r["val_t2i_R@1"] for r in log(with_worker) if "val_t2i_R@1" in r]
    expected = [r["val_t2i_R@1"] for r in log(in_process) if "val_t2i_R@1" in r]
    assert recalls == expected and len(recalls) == 2


FORCED_SCALE = 2.0**17


def force_overflow(trainer: Trainer) -> None:
    """A loss scale so large that the first fp16 backwards overflow (this tiny random model's
    gradients overflow from 2**16, the default start); it halves after each, and grows after 2
    good steps, so a short run exercises both."""
    trainer.precision.scaler = torch.amp.GradScaler(
        "cpu", init_scale=FORCED_SCALE, growth_interval=2
    )


def test_fp16_training_scales_the_loss_skips_overflows_and_resumes_exactly(
    tmp_path, tiny_model_dir, monkeypatch
) -> None:
    straight = default_config(tmp_path, tiny_model_dir, "fp16", precision="fp16")
    straight.data.num_workers = 0
    trainer = Trainer(straight)
    assert trainer.precision.dtype == torch.float16 and trainer.precision.scaler.is_enabled()
    force_overflow(trainer)
    start = {k: v.clone() for k, v in trainer.model.named_parameters()}
    after_first: list[dict] = []
    step = ContrastiveStage.step

    def recording_step(stage, micro, index):
        out = step(stage, micro, index)
        if index == 0:
            after_first.append({k: v.clone() for k, v in trainer.model.named_parameters()})
            scale = trainer.precision.scaler.get_scale()
            after_first.append({"scale": scale, "moments": len(trainer.optimizer.state)})
        return out

    monkeypatch.setattr(ContrastiveStage, "step", recording_step)
    trainer.train()
    monkeypatch.undo()
    # The first step overflowed: no parameter update, and the scale backed off.
    weights, first = after_first
    assert first == {"scale": FORCED_SCALE / 2, "moments": 0}
    for key, value in weights.items():
        assert torch.equal(value, start[key]), key
    records = log(straight)
    scales = [r["grad_scale"] for r in records]
    # Halved after each overflow until the gradients fit, grown after 2 good steps.
    assert scales[:2] == [FORCED_SCALE, FORCED_SCALE / 2]
    assert any(b == 2 * a for a, b in zip(scales, scales[1:], strict=False)), scales
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in records])))
    assert trainer.optimizer.state  # later steps did update
    saved = json.loads(
        (Path(straight.out_dir) / "checkpoints" / "step-0000006" / STATE_JSON).read_text()
    )
    assert saved["grad_scaler"]["scale"] == trainer.precision.scaler.get_scale()
    assert saved["grad_scaler"]["growth_interval"] == 2

    interrupted = default_config(tmp_path, tiny_model_dir, "fp16-resumed", precision="fp16")
    interrupted.data.num_workers = 0
    train_interrupted(interrupted, stop=3, prepare=force_overflow)
    assert_same_weights(final_weights(straight), final_weights(interrupted))
    assert [r["grad_scale"] for r in log(interrupted)] == scales


def test_fp32_and_bf16_runs_have_no_scaler_state(tmp_path, tiny_model_dir) -> None:
    config = default_config(tmp_path, tiny_model_dir, "fp32", precision="fp32")
    config.optim.steps = 1
    config.data.num_workers = 0
    trainer = Trainer(config)
    assert not trainer.precision.scaler.is_enabled()
    trainer.train()
    state = json.loads(
        (Path(config.out_dir) / "checkpoints" / "step-0000001" / STATE_JSON).read_text()
    )
    assert "grad_scaler" not in state
    assert "grad_scale" not in log(config)[-1]
