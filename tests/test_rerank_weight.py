"""The re-rank weight: calibration against a brute-force reference, saving, and its use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_colour_dataset
from torch import Tensor

from xmodal.cli import main
from xmodal.config import ConfigError
from xmodal.errors import InputError
from xmodal.evaluate.rerank import (
    NOT_BETTER,
    UNCALIBRATED,
    WEIGHT_GRID,
    calibrate_weight,
    resolve_rerank_weight,
)
from xmodal.evaluate.retrieval import rerank_candidates, retrieval_ranks
from xmodal.models.model import CrossModalModel, save_rerank_weight

SCALE = 20.0


def _data(n: int = 60, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images with two captions each whose embeddings are noisy (ITC alone often errs), and a
    ``truth`` matrix (image, text) -> 1 for the right pairs."""
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    t2i = torch.arange(n).repeat_interleave(2)
    text = image[t2i] + 0.8 * torch.randn(2 * n, dim, generator=g)
    text = torch.nn.functional.normalize(text, dim=-1)
    truth = (t2i[None, :] == torch.arange(n)[:, None]).float()
    return image, text, t2i, truth


def _scorer(matrix: Tensor):
    return lambda i, t: matrix[i, t]


def _ref_r1(image, text, t2i, itm: Tensor, weight: float, k: int) -> tuple[float, float]:
    """R@1 both ways by explicit sorting: the ITC top-k re-ordered by SCALE * sim + w * itm
    (no ties in this data)."""
    sim = image @ text.T
    final = SCALE * sim + weight * itm
    hits_t2i = 0
    for t in range(text.shape[0]):
        top = sim[:, t].argsort(descending=True)[:k].tolist()
        best = max(top, key=lambda i, t=t: float(final[i, t]))
        hits_t2i += best == int(t2i[t])
    hits_i2t = 0
    for i in range(image.shape[0]):
        top = sim[i].argsort(descending=True)[:k].tolist()
        best = max(top, key=lambda t, i=i: float(final[i, t]))
        hits_i2t += int(t2i[best]) == i
    return 100.0 * hits_t2i / text.shape[0], 100.0 * hits_i2t / image.shape[0]


def _ref_calibration(image, text, t2i, itm, k) -> float:
    """The grid weight with the best mean R@1; the first (smallest) among equals."""
    best_w, best = 0.0, sum(_ref_r1(image, text, t2i, itm, 0.0, k))
    for w in sorted(WEIGHT_GRID):
        value = sum(_ref_r1(image, text, t2i, itm, w, k))
        if value > best + 1e-9:
            best_w, best = w, value
    return best_w


def test_head_carrying_the_true_signal_gets_a_positive_weight_and_better_r1() -> None:
    image, text, t2i, truth = _data()
    g = torch.Generator().manual_seed(1)
    itm = 2.0 * truth + 1.5 * torch.randn(truth.shape, generator=g)  # signal + noise
    candidates = rerank_candidates(image, text, t2i, _scorer(itm), k=8, itc_scale=SCALE)
    calibration = calibrate_weight(candidates)
    assert calibration.weight > 0 and calibration.helps
    assert calibration.weight == _ref_calibration(image, text, t2i, itm, 8)
    ref = _ref_r1(image, text, t2i, itm, calibration.weight, 8)
    assert (calibration.t2i_r1, calibration.i2t_r1) == pytest.approx(ref)
    itc = _ref_r1(image, text, t2i, itm, 0.0, 8)
    assert (calibration.itc_t2i_r1, calibration.itc_i2t_r1) == pytest.approx(itc)
    assert calibration.t2i_r1 + calibration.i2t_r1 > sum(itc) + 5
    assert len(calibration.curve) == len(WEIGHT_GRID)
    metrics = candidates.metrics(calibration.weight)
    assert metrics["t2i_R@1"] == pytest.approx(ref[0]) and metrics["weight"] == calibration.weight


def test_head_that_hurts_on_validation_gets_weight_zero() -> None:
    image, text, t2i, truth = _data(seed=2)
    # against the truth, and against ITC (same order at small weights, reversed at large)
    for itm in (-3.0 * truth, -10.0 * image @ text.T):
        candidates = rerank_candidates(image, text, t2i, _scorer(itm), k=8, itc_scale=SCALE)
        calibration = calibrate_weight(candidates)
        assert calibration.weight == 0.0 and not calibration.helps
        assert calibration.weight == _ref_calibration(image, text, t2i, itm, 8)
        # weight 0 is exactly the ITC order
        got = candidates.ranks(0.0)
        itc = retrieval_ranks(image, text, t2i)
        assert got[0].tolist() == itc[0].tolist() and got[1].tolist() == itc[1].tolist()
        assert calibration.t2i_r1 == pytest.approx(100.0 * float((itc[0] == 0).double().mean()))


def test_ties_in_r1_go_to_the_smaller_weight() -> None:
    image, text, t2i, truth = _data(seed=4)
    candidates = rerank_candidates(
        image, text, t2i, _scorer(torch.zeros_like(truth)), k=8, itc_scale=SCALE
    )
    calibration = calibrate_weight(candidates)  # a constant head changes nothing at any weight
    assert calibration.weight == 0.0
    assert len({(p["t2i_R@1"], p["i2t_R@1"]) for p in calibration.curve}) == 1
    with pytest.raises(ValueError, match="re-rank weight"):
        candidates.ranks(-1.0)


def test_resolve_weight_saved_uncalibrated_and_override() -> None:
    assert resolve_rerank_weight(None).to_dict() == {
        "weight": 0.0,
        "source": "uncalibrated",
        "note": UNCALIBRATED,
    }
    zero = resolve_rerank_weight(0.0)
    assert (zero.weight, zero.active, zero.note) == (0.0, False, NOT_BETTER)
    assert "did not beat ITC on validation" in NOT_BETTER
    saved = resolve_rerank_weight(0.5)
    assert (saved.weight, saved.source, saved.active, saved.note) == (0.5, "calibrated", True, None)
    over = resolve_rerank_weight(0.0, override=2.0)
    assert (over.weight, over.source, over.note) == (2.0, "override", None)
    with pytest.raises(InputError, match="rerank-weight"):
        resolve_rerank_weight(None, override=float("nan"))


def test_weight_is_saved_and_loaded_with_the_model(tmp_path, tiny_model_dir) -> None:
    model = CrossModalModel.from_pretrained(tiny_model_dir)
    assert model.config.fusion.rerank_weight is None  # saved before calibration existed
    model.config.fusion.rerank_weight = 0.25
    model.save_pretrained(tmp_path / "m")
    assert CrossModalModel.from_pretrained(tmp_path / "m").config.fusion.rerank_weight == 0.25
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    save_rerank_weight(tmp_path / "m", 0.0)
    assert CrossModalModel.from_pretrained(tmp_path / "m").config.fusion.rerank_weight == 0.0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights  # identity kept
    with pytest.raises(ConfigError, match="rerank_weight"):
        save_rerank_weight(tmp_path / "m", -1.0)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["fusion"]["rerank_weight"] == 0.0  # untouched by the refused write


def _eval(model_dir: str, data: str, out: Path, *extra: str) -> dict:
    argv = ["eval", "--model", model_dir, "--data", data, "--out", str(out), "--workers", "0"]
    assert main([*argv, "--rerank-k", "4", *extra]) == 0
    return json.loads(out.read_text())


def test_eval_uses_the_saved_weight_the_override_and_calibrates(
    tmp_path, tiny_model_dir, capsys
) -> None:
    data = write_colour_dataset(tmp_path / "data", n=10, captions_per_image=2)
    uncalibrated = _eval(tiny_model_dir, data, tmp_path / "a.json")
    assert uncalibrated["rerank"] == {"weight": 0.0, "source": "uncalibrated", "note": UNCALIBRATED}
    assert UNCALIBRATED in capsys.readouterr().out
    for key in ("t2i_R@1", "i2t_R@1", "t2i_R@5"):  # a no-op: the ITC figures
        assert uncalibrated["retrieval_itm_rerank"][key] == uncalibrated["retrieval_itc"][key]
    curve = {p["weight"]: p for p in uncalibrated["rerank_curve"]}

    given = _eval(tiny_model_dir, data, tmp_path / "b.json", "--rerank-weight", "8")
    assert given["rerank"] == {"weight": 8.0, "source": "override"}
    assert given["retrieval_itm_rerank"]["t2i_R@1"] == pytest.approx(curve[8.0]["t2i_R@1"])

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    capsys.readouterr()
    calibrated = _eval(str(model_dir), data, tmp_path / "c.json", "--calibrate-rerank")
    weight = calibrated["rerank_calibration"]["rerank_weight"]
    best = max(
        uncalibrated["rerank_curve"], key=lambda p: (p["t2i_R@1"] + p["i2t_R@1"], -p["weight"])
    )
    assert weight == best["weight"]
    assert f"saved in {model_dir / 'config.json'}" in capsys.readouterr().out
    assert CrossModalModel.from_pretrained(model_dir).config.fusion.rerank_weight == weight
    again = _eval(str(model_dir), data, tmp_path / "d.json")
    assert again["rerank"]["source"] == "calibrated" and again["rerank"]["weight"] == weight

    argv = ["eval", "--model", "offline-default", "--data", data, "--calibrate-rerank"]
    assert main(argv) == 2
    assert "not one" in capsys.readouterr().err


def test_a_transformers_folder_is_refused_before_it_is_changed(tmp_path, capsys) -> None:
    """A CLIP folder loads with a new fusion, but its config.json is transformers': a weight
    written there would never be read back (search would say "never calibrated")."""
    from aligned_fixtures import save_clip

    folder = save_clip(tmp_path / "clip")
    before = (folder / "config.json").read_bytes()
    with pytest.raises(InputError, match="not a model saved by xmodal"):
        save_rerank_weight(folder, 4.0)
    data = write_colour_dataset(tmp_path / "data", n=4)
    capsys.readouterr()  # transformers' notes while the folder was written
    argv = ["eval", "--model", str(folder), "--data", data, "--calibrate-rerank"]
    assert main([*argv, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a model saved by xmodal" in err
    assert "--rerank-weight" in err
    assert (folder / "config.json").read_bytes() == before


@pytest.mark.parametrize("fusion", ["cross", "pooled"])
def test_itm_pair_logits_equal_itm_logits_of_the_selected_rows(fusion, make_tiny_config) -> None:
    """Re-ranking and the ITM losses score pairs sharing images with each image read once."""
    model = CrossModalModel(make_tiny_config(fusion=fusion)).train()
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 32, 32, generator=g)
    ids = torch.randint(5, 99, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    image_rows = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    text_rows = torch.tensor([0, 1, 2, 3, 0, 1, 1])
    torch.manual_seed(1)
    image, text = model.image_features(pixels), model.text_features(ids, mask)
    got = model.itm_pair_logits(image, text, image_rows, text_rows)
    want = model.itm_logits(image.index(image_rows), text.index(text_rows))
    assert got.shape == (7, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = []
    for logits in (got, want):
        model.zero_grad()
        logits.square().sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)
