"""Distribution and accumulation change speed, not the objective.

Two gloo ranks on CPU (spawned once for the module) score their halves of a batch with
``global_batch_losses``; after averaging, their loss and every parameter's gradient equal the
single-process ``compute_losses`` on the concatenated batch. float64 throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import tiny_model_config, write_colour_dataset
from safetensors.torch import load_file, save_file

from xmodal import distributed as xdist
from xmodal.models.model import CrossModalModel, Features, cat_features
from xmodal.train import Trainer, load_train_config
from xmodal.train.accumulate import accumulated_backward
from xmodal.train.batches import epoch_batches, rank_micro_batches
from xmodal.train.config import LossSection
from xmodal.train.objective import compute_losses, global_batch_losses

ROWS, WORLD, SEED = 8, 2, 11
ALL = {"infonce": 1.0, "siglip": 0.5, "itm": 1.0, "cosine": 0.5}
# case -> (loss weights, local_loss, micro-batches per rank, fusion kind)
CASES = {
    "infonce": ({"infonce": 1.0}, False, 1, "cross"),
    "infonce_local": ({"infonce": 1.0}, True, 1, "cross"),
    "siglip": ({"siglip": 1.0}, False, 1, "cross"),
    "siglip_local": ({"siglip": 1.0}, True, 1, "cross"),
    "itm": ({"itm": 1.0}, False, 1, "cross"),
    "itm_pooled": ({"itm": 1.0}, False, 1, "pooled"),
    "cosine_local": ({"cosine": 1.0}, True, 1, "cross"),
    "all_global_accum": (ALL, False, 2, "cross"),
    "all_local_accum": (ALL, True, 2, "cross"),
    "infonce_local_detached": ({"infonce": 1.0}, True, 1, "cross"),
}


def weights(terms: dict[str, float]) -> LossSection:
    return LossSection(**{name: terms.get(name, 0.0) for name in ALL})


def make_inputs(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and token ids of varying length; some images repeat (within and across
    halves), so the same-image masks matter."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 8, 5, 4, 2, 6, 3, 4, 7, 2, 5, 3][:rows])
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    return {
        "pixels": torch.randn(rows, 3, 32, 32, generator=g, dtype=torch.float64),
        "input_ids": torch.randint(1000, 2000, (rows, 8), generator=g) * mask,
        "attention_mask": mask,
        "image_ids": torch.tensor([0, 1, 2, 2, 1, 5, 6, 0, 8, 9, 8, 11][:rows]),
    }


def take(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {name: value[start:stop] for name, value in batch.items()}


def feature_fn(model: CrossModalModel):
    def features(batch: dict) -> tuple[Features, Features, torch.Tensor]:
        length = int(batch["attention_mask"].sum(1).max())  # each part padded to its own max
        text = model.text_features(
            batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
        )
        return model.image_features(batch["pixels"]), text, batch["image_ids"]

    return features


def load_model(directory: Path, train: bool = False) -> CrossModalModel:
    model = CrossModalModel.from_pretrained(directory).double()
    return model.train(train)


def grads(model: CrossModalModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _detached_gather(x: torch.Tensor, counts=None) -> torch.Tensor:
    """OpenCLIP's gather without --gather-with-grad: other ranks' rows carry no gradient."""
    full = xdist.gather_no_grad(x, counts)
    start = dist.get_rank() * len(x)
    return torch.cat([full[:start], x, full[start + len(x) :]])


def run_objective(
    model: CrossModalModel, micro: list[dict], loss: LossSection, local: bool = False
) -> dict[str, torch.Tensor]:
    """accumulated_backward of global_batch_losses over ``micro``."""
    return accumulated_backward(
        model,
        micro,
        feature_fn(model),
        lambda i, t, ids: global_batch_losses(model, i, t, ids, loss, local_loss=local, seed=SEED),
    )


def _rank_worker(rank: int, root: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root / 'init'}", rank=rank, world_size=WORLD
    )
    inputs = {name: tensor for name, tensor in load_file(str(root / "inputs.safetensors")).items()}
    per_rank = ROWS // WORLD
    mine = take(inputs, rank * per_rank, (rank + 1) * per_rank)
    for case, (terms, local, micro_count, fusion) in CASES.items():
        model = load_model(root / fusion)
        size = per_rank // micro_count
        micro = [take(mine, j * size, (j + 1) * size) for j in range(micro_count)]
        gather = xdist.gather_with_grad
        if case.endswith("_detached"):
            xdist.gather_with_grad = _detached_gather
        try:
            result = run_objective(model, micro, weights(terms), local)
        finally:
            xdist.gather_with_grad = gather
        xdist.average_gradients(model.parameters())
        names = sorted(result)
        means = xdist.all_reduce_mean(torch.stack([result[n] for n in names]))
        out = {f"grad.{n}": g for n, g in grads(model).items()}
        out.update({f"term.{n}": v.reshape(1) for n, v in zip(names, means, strict=True)})
        save_file(out, str(root / f"{case}.rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run every case on 2 spawned gloo ranks once; their results are files in the folder."""
    root = tmp_path_factory.mktemp("ranks")
    for fusion in ("cross", "pooled"):
        torch.manual_seed(0)
        CrossModalModel(tiny_model_config(fusion=fusion)).save_pretrained(root / fusion)
    save_file(make_inputs(ROWS), str(root / "inputs.safetensors"))
    mp.spawn(_rank_worker, args=(root,), nprocs=WORLD, join=True)
    return root


def single_process(root: Path, case: str) -> tuple[dict, dict]:
    """The reference: compute_losses on the whole batch in this process."""
    terms, _, _, fusion = CASES[case]
    model = load_model(root / fusion)
    image, text, ids = feature_fn(model)(make_inputs(ROWS))
    generator = torch.Generator().manual_seed(SEED)
    losses = compute_losses(model, image, text, ids, weights(terms), generator)
    losses["loss"].backward()
    return {n: float(v.detach()) for n, v in losses.items()}, grads(model)


def rank_result(root: Path, case: str, rank: int) -> tuple[dict, dict]:
    saved = load_file(str(root / f"{case}.rank{rank}.safetensors"))
    terms = {k[5:]: float(v) for k, v in saved.items() if k.startswith("term.")}
    return terms, {k[5:]: v for k, v in saved.items() if k.startswith("grad.")}


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("_detached")])
def test_two_ranks_match_one_process(two_ranks: Path, case: str) -> None:
    want_terms, want_grads = single_process(two_ranks, case)
    got_terms, got_grads = rank_result(two_ranks, case, 0)
    assert got_terms == pytest.approx(want_terms, rel=1e-9)
    assert got_grads.keys() == want_grads.keys()
    assert len(got_grads) > 50  # towers, projections, heads: every trainable parameter
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-6, atol=1e-9, msg=name)
    _, other = rank_result(two_ranks, case, 1)
    assert all(torch.equal(other[n], got_grads[n]) for n in got_grads)  # ranks stay in sync


def test_local_loss_needs_the_gradient_summing_gather(two_ranks: Path) -> None:
    """With other ranks' rows detached (OpenCLIP without --gather-with-grad), local_loss keeps
    the loss and the logit scale's gradient but loses the towers' cross-rank terms."""
    want_terms, want_grads = single_process(two_ranks, "infonce_local")
    got_terms, got_grads = rank_result(two_ranks, "infonce_local_detached", 0)
    assert got_terms == pytest.approx(want_terms, rel=1e-9)
    torch.testing.assert_close(got_grads["logit_scale"], want_grads["logit_scale"])
    weight = "text_proj.weight"
    assert (got_grads[weight] - want_grads[weight]).abs().max() > 1e-3 * want_grads[
        weight
    ].abs().max()


def test_four_micro_batches_give_the_gradient_of_one_big_batch(tmp_path) -> None:
    torch.manual_seed(0)
    CrossModalModel(tiny_model_config()).save_pretrained(tmp_path / "model")
    inputs, loss = make_inputs(12, seed=3), weights(ALL)

    model = load_model(tmp_path / "model")
    image, text, ids = feature_fn(model)(inputs)
    want = compute_losses(model, image, text, ids, loss, torch.Generator().manual_seed(SEED))
    want["loss"].backward()
    want_grads = grads(model)

    model = load_model(tmp_path / "model")
    micro = [take(inputs, 3 * j, 3 * j + 3) for j in range(4)]
    got = run_objective(model, micro, loss)
    assert {n: float(v) for n, v in got.items()} == pytest.approx(
        {n: float(v.detach()) for n, v in want.items()}, rel=1e-9
    )
    got_grads = grads(model)
    assert got_grads.keys() == want_grads.keys()
    for name, value in want_grads.items():
        torch.testing.assert_close(got_grads[name], value, rtol=1e-6, atol=1e-9, msg=name)


def test_accumulation_replays_dropout_and_counts_batch_norm_once(tmp_path) -> None:
    """In train mode (dropout, batch norm) the cached pass and its re-run see the same masks,
    and running statistics move once per micro-batch, as in a plain pass over the parts."""
    torch.manual_seed(0)
    CrossModalModel(tiny_model_config()).save_pretrained(tmp_path / "model")
    inputs, loss = make_inputs(8, seed=4), weights(ALL)
    micro = [take(inputs, 0, 4), take(inputs, 4, 8)]

    model = load_model(tmp_path / "model", train=True)
    torch.manual_seed(5)
    parts = [feature_fn(model)(batch) for batch in micro]
    image, text = cat_features([p[0] for p in parts]), cat_features([p[1] for p in parts])
    ids = torch.cat([p[2] for p in parts])
    global_batch_losses(model, image, text, ids, loss, seed=SEED)["loss"].backward()
    want_grads, want_buffers = grads(model), {n: b.clone() for n, b in model.named_buffers()}

    model = load_model(tmp_path / "model", train=True)
    torch.manual_seed(5)
    run_objective(model, micro, loss)
    for name, value in want_grads.items():
        torch.testing.assert_close(grads(model)[name], value, rtol=1e-6, atol=1e-9, msg=name)
    running = [n for n in want_buffers if "running_mean" in n]
    assert running
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, want_buffers[name], rtol=0, atol=1e-12, msg=name)


def test_rank_blocks_are_disjoint_equal_and_form_the_global_batch() -> None:
    n, size, accum, world = 50, 3, 2, 4
    blocks = [rank_micro_batches(n, size, accum, world, r, seed=1, epoch=2) for r in range(world)]
    steps = epoch_batches(n, size * accum * world, seed=1, epoch=2)
    assert all(len(b) == accum * len(steps) for b in blocks)
    for s, step in enumerate(steps):
        joined = [i for rank in blocks for m in rank[s * accum : (s + 1) * accum] for i in m]
        assert joined == step
    flat = [i for rank in blocks for m in rank for i in m]
    assert len(flat) == len(set(flat)) == len(steps) * size * accum * world
    assert rank_micro_batches(n, 8, 1, 1, 0, seed=1, epoch=2) == epoch_batches(n, 8, 1, 2)


# -- torchrun end to end -----------------------------------------------------------------------
def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(WORLD), "-m", "xmodal.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def run_config(tmp_path: Path, make_processor) -> Path:
    """A 4-step run: 2 pairs x 2 micro-batches per rank (global batch 8), no dropout, locked
    image tower on cached features, so 2 ranks can match 1 process step for step."""
    config = tiny_model_config()
    config.text.hf_config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    CrossModalModel(config).save_pretrained(tmp_path / "model", make_processor())
    data = write_colour_dataset(tmp_path / "data", n=16)
    run = {
        "data": {"train": data, "val": data, "num_workers": 0},
        "model": {"name": str(tmp_path / "model"), "lock_image": True},
        "loss": ALL,
        "optim": {"steps": 4, "batch_size": 2, "accum_steps": 2, "lr": 3e-3, "tower_lr": 1e-3}
        | {"warmup_steps": 1, "local_loss": True},
        "out_dir": str(tmp_path / "run"),
        "device": "cpu",
        "precision": "fp32",
        "eval_every": 4,
        "save_every": 2,
        "log_every": 1,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def test_torchrun_two_ranks_train_like_one_process_and_resume(run_config: Path) -> None:
    tmp = run_config.parent
    torchrun(["--config", str(run_config)], tmp)
    out = tmp / "run"
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # one line per step: rank 0 alone logs
    assert "val_t2i_R@1" in log[-1] and "val_t2i_R@1" not in log[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000002",
        "step-0000004",
    ]
    state = load_file(str(out / "checkpoints" / "step-0000002" / "train_state.safetensors"))
    assert not torch.equal(state["rng.torch"], state["rank1.rng.torch"])  # per-rank RNG
    meta = json.loads((out / "checkpoints" / "step-0000002" / "train_state.json").read_text())
    assert meta["extra"]["world_size"] == WORLD and meta["progress"]["samples_seen"] == 16
    assert (out / "model" / "model.safetensors").is_file()
    assert not list(out.rglob(".*tmp*"))

    # one process, batch 8: the same global batches, the same objective, the same weights
    single = load_train_config(
        run_config, {"out_dir": str(tmp / "single"), "optim": {"batch_size": 8, "accum_steps": 1}}
    )
    Trainer(single).train()
    reference = read_log(tmp / "single")
    for got, want in zip(log, reference, strict=True):
        for key in ("loss", *ALL):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key)
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(tmp / "single" / "model" / "model.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)

    # resume from the step-2 checkpoint on 2 ranks: exactly the uninterrupted run's weights
    resumed = tmp / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    torchrun(["--config", str(run_config), "--resume", "--out-dir", str(resumed)], tmp)
    assert [r["step"] for r in read_log(resumed)] == [1, 2, 3, 4]
    c = load_file(str(resumed / "model" / "model.safetensors"))
    assert all(torch.equal(a[key], c[key]) for key in a)


def test_torchrun_runs_the_itm_stage_like_one_process(run_config: Path) -> None:
    """``itm_stage`` runs on rank 0 after the contrastive steps (the other ranks wait for its
    weights): the log and the saved model are the one-process run's."""
    tmp = run_config.parent
    config = yaml.safe_load(run_config.read_text())
    config["itm_stage"] = {"optim": {"steps": 3, "batch_size": 4}}
    config["experimental"] = {"itm_hard_negatives": 2}
    path = tmp / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun(["--config", str(path), "--out-dir", str(tmp / "ranks")], tmp)
    single = load_train_config(
        path, {"out_dir": str(tmp / "single"), "optim": {"batch_size": 8, "accum_steps": 1}}
    )
    Trainer(single).train()
    log, reference = read_log(tmp / "ranks"), read_log(tmp / "single")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6, 7]  # rank 0 alone logs the stage
    assert "val_rerank_weight" in log[-1] and "val_rerank_weight" not in log[3]
    for got, want in zip(log[4:], reference[4:], strict=True):
        assert got["itm"] == pytest.approx(want["itm"], rel=1e-4), got["step"]
    a = load_file(str(tmp / "ranks" / "model" / "model.safetensors"))
    b = load_file(str(tmp / "single" / "model" / "model.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
